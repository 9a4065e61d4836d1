"""Engines that ship with the package: :mod:`.echo` (returns the prompt; the smallest complete
engine, for smoke tests and benchmarks of the serving path) and :mod:`.mocker` (a simulated
vLLM-like engine: paged KV cache, prefix caching, batching, timing, KV events), both selectable
by name (``--engine echo`` / ``--engine mocker``)."""
