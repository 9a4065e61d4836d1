"""Turn a model deployment card's files into a local model directory the frontend can load.

A card (ours or a Dynamo worker's) names each model file as a ``CheckedFile``: an absolute path
or an ``http(s)://`` URL (a worker's status server, ``/v1/metadata/...``), a ``blake3:``
checksum and a size. :func:`materialize` returns a directory holding exactly those bytes:

- every file local, in one directory, with matching checksums: that directory, as it is;
- otherwise: a cache directory keyed by the checksums (``$DYN_MDC_CACHE``, else
  ``$XDG_CACHE_HOME/dynamo_backend_common/mdc`` or ``~/.cache/...``), filled by copying or
  downloading each file and verifying it. Files already there with the right checksum are
  reused, so a restarted frontend does not download again.

A checksum or size mismatch, a missing file or a failed download raises
:class:`~.model_dir.ModelDirError` naming the file, never a silently wrong tokenizer.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from ..model_dir import ModelDirError
from ..protocols.discovery import CheckedFile, ModelDeploymentCard, blake3_file

__all__ = ["cache_root", "materialize"]

_DOWNLOAD_TIMEOUT = 30.0


def cache_root() -> Path:
    env = os.environ.get("DYN_MDC_CACHE", "").strip()
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "dynamo_backend_common" / "mdc"


def _is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def _local_path(path: str) -> Path:
    return Path(path[len("file://"):]) if path.startswith("file://") else Path(path)


def _matches(p: Path, cf: CheckedFile) -> bool:
    try:
        checksum, size = blake3_file(p)
    except OSError:
        return False
    return checksum == cf.checksum and (cf.size is None or size == cf.size)


def materialize(card: ModelDeploymentCard, root: Path | None = None) -> Path:
    """A local directory with the card's files (see the module docstring). Blocking: call it
    in a thread."""
    files = card.files()
    if "tokenizer.json" not in files:
        raise ModelDirError(
            f"the card of {card.display_name!r} names no tokenizer.json, so this frontend "
            "cannot tokenize for it")
    local = {name: cf for name, cf in files.items() if not _is_url(cf.path)}
    if len(local) == len(files):
        dirs = {_local_path(cf.path).parent for cf in files.values()}
        if len(dirs) == 1 and all(
            _local_path(cf.path).name == name and _matches(_local_path(cf.path), cf)
            for name, cf in files.items()
        ):
            return dirs.pop()
    key = hashlib.sha256(
        "\n".join(f"{n}={cf.checksum}" for n, cf in sorted(files.items())).encode()
    ).hexdigest()[:32]
    target = (root or cache_root()) / key
    target.mkdir(parents=True, exist_ok=True)
    for name, cf in sorted(files.items()):
        dest = target / name
        if dest.is_file() and _matches(dest, cf):
            continue
        data = _fetch(cf)
        tmp = target / f".{name}.{secrets.token_hex(4)}.tmp"
        tmp.write_bytes(data)
        if not _matches(tmp, cf):
            tmp.unlink(missing_ok=True)
            raise ModelDirError(
                f"{name} of {card.display_name!r} from {cf.path}: checksum mismatch (the card "
                f"says {cf.checksum}, size {cf.size}; got {len(data)} bytes that differ)")
        os.replace(tmp, dest)
    return target


def _fetch(cf: CheckedFile) -> bytes:
    if _is_url(cf.path):
        import httpx

        try:
            resp = httpx.get(cf.path, timeout=_DOWNLOAD_TIMEOUT, trust_env=False)
        except httpx.HTTPError as exc:
            raise ModelDirError(f"cannot download {cf.path}: {exc}") from exc
        if resp.status_code != 200:
            raise ModelDirError(f"cannot download {cf.path}: HTTP {resp.status_code}")
        return resp.content
    try:
        return _local_path(cf.path).read_bytes()
    except OSError as exc:
        raise ModelDirError(f"cannot read {cf.path}: {exc}") from exc
