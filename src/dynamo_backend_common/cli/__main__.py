"""``python -m dynamo_backend_common.cli``: the ``dynamo-backend`` command."""

import sys

from . import main

sys.exit(main())
