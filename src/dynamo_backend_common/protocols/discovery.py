"""What a worker registers in discovery, and where: NVIDIA Dynamo 1.6.1's records, byte for byte.

Keys (Dynamo's KV-store discovery layout, the same in files and in etcd):

- ``v1/instances/{ns}/{comp}/{ep}/{instance_id:x}`` -> :class:`InstanceInfo` (JSON
  ``{"type": "Endpoint", ...}``)
- ``v1/mdc/{ns}/{comp}/{ep}/{instance_id:x}`` -> :class:`ModelCard` (JSON
  ``{"type": "Model", ..., "card_json": ModelDeploymentCard}``)

Both are written under the worker's lease, so they vanish when the worker dies. A real Dynamo
frontend reads these records to serve our workers, and our frontend reads the ones a Dynamo
worker writes (``tests/golden/dynamo-1.6.1/discovery`` holds captured examples).

The model deployment card names the model's files as :class:`CheckedFile` s (a path or URL, a
``blake3:`` checksum of the bytes and the size), so a frontend can fetch the tokenizer and the
chat template and verify them. Unknown fields are ignored on decode; the few fields that are our
own extensions (``InstanceInfo.status_url``, ``RuntimeConfig.supported_controls``,
``ModelDeploymentCard.model``) are optional and tolerated by Dynamo's decoders.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import msgspec

__all__ = [
    "INSTANCES_PREFIX",
    "MODELS_PREFIX",
    "MODEL_FILES",
    "CheckedFile",
    "InstanceInfo",
    "ModelCard",
    "ModelDeploymentCard",
    "RuntimeConfig",
    "blake3_file",
    "checked_files",
    "endpoint_path",
    "files_checksum",
    "instance_key",
    "model_dir_checksum",
    "model_key",
    "slugify",
]

INSTANCES_PREFIX: Final = "v1/instances/"
MODELS_PREFIX: Final = "v1/mdc/"

#: The model-directory files a card names: (card field, artifact variant, file name). The
#: variant names are Dynamo's (``model_info: {"hf_config_json": CheckedFile}`` and so on).
MODEL_FILES: Final[tuple[tuple[str, str, str], ...]] = (
    ("model_info", "hf_config_json", "config.json"),
    ("tokenizer", "hf_tokenizer_json", "tokenizer.json"),
    ("prompt_formatter", "hf_tokenizer_config_json", "tokenizer_config.json"),
    ("chat_template_file", "hf_chat_template_jinja", "chat_template.jinja"),
    ("gen_config", "hf_generation_config_json", "generation_config.json"),
)


def instance_key(namespace: str, component: str, endpoint: str, instance_id: int) -> str:
    return f"{INSTANCES_PREFIX}{namespace}/{component}/{endpoint}/{instance_id:x}"


def model_key(namespace: str, component: str, endpoint: str, instance_id: int) -> str:
    return f"{MODELS_PREFIX}{namespace}/{component}/{endpoint}/{instance_id:x}"


def endpoint_path(instance_id: int, namespace: str, component: str, endpoint: str) -> str:
    """Dynamo's request-plane endpoint path ``{instance_id:x}/{ns}/{comp}/{ep}``: what follows
    ``host:port/`` in ``transport.tcp`` and what a frontend puts in each request frame."""
    return f"{instance_id:x}/{namespace}/{component}/{endpoint}"


def slugify(name: str) -> str:
    """Dynamo's model slug: lower-case, every character outside ``[a-z0-9_-]`` -> ``_``."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "_"
                   for c in name.lower())


class InstanceInfo(
    msgspec.Struct, omit_defaults=True, kw_only=True, tag_field="type", tag="Endpoint"
):
    """One serving endpoint instance (Dynamo's ``DiscoveryInstance::Endpoint``).

    ``transport`` is ``{"tcp": "host:port/{instance_id:x}/{ns}/{comp}/{ep}"}``: a frontend
    splits it at the first ``/`` into the address to connect to and the endpoint path it sends.
    ``request_plane_codec`` is the body codec the worker wants (absent = JSON).
    """

    component: str
    endpoint: str
    namespace: str
    instance_id: int
    transport: dict[str, str]
    device_type: str | None = None
    request_plane_codec: str | None = None
    #: Our extension: base URL of the worker's status server (``/metrics``, ``/health``).
    status_url: str | None = None
    #: Our extension: ``host:port/endpoint`` of the same endpoint on our multiplexed plane,
    #: beside Dynamo's ``tcp`` transport (Dynamo's frontend ignores it; ours prefers it).
    mux: str | None = None

    @property
    def protocol(self) -> str:
        """``"tcp"`` (Dynamo's TCP request plane) or ``"mux"`` (our private protocol)."""
        return "tcp" if "tcp" in self.transport else next(iter(self.transport), "")

    @property
    def address(self) -> str:
        """``host:port`` of the request plane."""
        return self.transport.get(self.protocol, "").partition("/")[0]

    @property
    def path(self) -> str:
        """The endpoint path to send in requests (after the first ``/`` of the transport)."""
        return self.transport.get(self.protocol, "").partition("/")[2]


class CheckedFile(msgspec.Struct, kw_only=True):
    """A model file a frontend fetches: absolute path or ``http(s)://`` URL, ``blake3:<hex>``
    checksum of its bytes, and its size."""

    path: str
    checksum: str
    size: int | None = None


#: Dynamo's ``WorkerType`` ordinals as its card checksum hashes them.
_WORKER_TYPE_CODE: Final = {"prefill": 1, "decode": 2, "encode": 3, "aggregated": 4}


class RuntimeConfig(msgspec.Struct, kw_only=True):
    """Scheduling hints (Dynamo's ``ModelRuntimeConfig``), every field written like Dynamo."""

    context_length: int | None = None
    total_kv_blocks: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    data_parallel_start_rank: int = 0
    data_parallel_size: int = 1
    #: We do not serve Dynamo's ``worker_kv_query`` recovery endpoint.
    enable_local_indexer: bool = False
    kv_event_publishing_enabled: bool = False
    runtime_data: dict[str, Any] = msgspec.field(default_factory=dict)
    disaggregated_endpoint: dict[str, Any] | None = None
    #: Our extension: the engine's ``supported_controls()``.
    supported_controls: list[str] = msgspec.field(default_factory=list)


class ModelDeploymentCard(msgspec.Struct, kw_only=True):
    """Dynamo's model deployment card (``card_json``). ``model_info``, ``tokenizer``,
    ``prompt_formatter``, ``chat_template_file`` and ``gen_config`` map one artifact variant
    name (see :data:`MODEL_FILES`) to a :class:`CheckedFile`."""

    display_name: str
    slug: str
    source_path: str | None = None
    model_info: dict[str, CheckedFile] | None = None
    tokenizer: dict[str, CheckedFile] | None = None
    prompt_formatter: dict[str, CheckedFile] | None = None
    chat_template_file: dict[str, CheckedFile] | None = None
    gen_config: dict[str, CheckedFile] | None = None
    #: The model's own limit (``config.json``); counts when the runtime reports none.
    architectural_max_context_length: int | None = None
    context_length: int = 0
    kv_cache_block_size: int = 16
    migration_limit: int = 0
    #: ``"Chat | Completions"`` style bitflag names (Dynamo's string form), or ``"Prefill"``.
    model_type: str = "Chat | Completions"
    model_input: str = "Tokens"
    worker_type: str = "aggregated"
    needs: list[Any] = msgspec.field(default_factory=list)
    runtime_config: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)
    #: Our extension: the engine's canonical model id (``EngineConfig.model``).
    model: str | None = None

    def mdcsum(self) -> str:
        """Dynamo 1.6.1's card checksum: workers registering one model under one endpoint
        share a pool only when theirs are equal (its frontend rejects a later worker whose
        checksum differs from the first). It covers the name, the source path, the files'
        checksums (not their locations), the effective context length, the KV block size, the
        worker type and ``needs``; not the runtime config's scheduling figures."""
        from blake3 import blake3

        h = blake3()
        h.update(self.display_name.encode())
        if self.source_path is not None:
            h.update(self.source_path.encode())
        for field_name, _, _ in MODEL_FILES:
            for cf in (getattr(self, field_name) or {}).values():
                h.update(cf.checksum.encode())
        ctx = self.runtime_config.context_length
        if ctx is None:
            ctx = self.architectural_max_context_length or 0
        h.update(ctx.to_bytes(4, "big"))
        h.update(self.kv_cache_block_size.to_bytes(4, "big"))
        h.update(bytes([_WORKER_TYPE_CODE.get(self.worker_type, 0)]))
        h.update(len(self.needs).to_bytes(4, "big"))
        for alt in self.needs:
            alts = alt if isinstance(alt, list) else [alt]
            h.update(len(alts).to_bytes(4, "big"))
            h.update(bytes(_WORKER_TYPE_CODE.get(str(w).lower(), 0) for w in alts))
        return h.hexdigest()

    def files(self) -> dict[str, CheckedFile]:
        """``{file name: CheckedFile}`` for every artifact the card names. A known variant keeps
        its usual file name (``hf_tokenizer_json`` -> ``tokenizer.json``); any other variant
        keeps the base name of its path."""
        names = {variant: fname for _, variant, fname in MODEL_FILES}
        out: dict[str, CheckedFile] = {}
        for field_name, _, _ in MODEL_FILES:
            group = getattr(self, field_name)
            for variant, cf in (group or {}).items():
                fname = names.get(variant) or os.path.basename(cf.path.rstrip("/"))
                if fname:
                    out[fname] = cf
        return out


class ModelCard(msgspec.Struct, kw_only=True, tag_field="type", tag="Model"):
    """The ``v1/mdc`` record (Dynamo's ``DiscoveryInstance::Model``): the card of the model a
    worker serves. The properties read through to :attr:`card_json`."""

    namespace: str
    component: str
    endpoint: str
    instance_id: int
    card_json: ModelDeploymentCard

    @property
    def display_name(self) -> str:
        return self.card_json.display_name

    @property
    def model(self) -> str:
        return self.card_json.model or self.card_json.display_name

    @property
    def model_type(self) -> str:
        return self.card_json.model_type

    @property
    def worker_type(self) -> str:
        return self.card_json.worker_type

    @property
    def kv_cache_block_size(self) -> int:
        return self.card_json.kv_cache_block_size

    @property
    def migration_limit(self) -> int:
        return self.card_json.migration_limit

    @property
    def runtime_config(self) -> RuntimeConfig:
        return self.card_json.runtime_config

    @property
    def checksum(self) -> str:
        """One string that changes when any file the card names changes (a cache key):
        :func:`files_checksum` of the card's files, equal to the ``ModelDir.checksum`` of the
        directory they came from."""
        return files_checksum(self.card_json.files())


def files_checksum(files: Mapping[str, CheckedFile]) -> str:
    """The model directory's one checksum: ``name=blake3:<hex>`` of each model file
    (:data:`MODEL_FILES`), sorted by name and comma-joined. Workers (card files), frontends
    (the cache of loaded tokenizers and templates) and engines (``mdc_sum``) all use it, so an
    edited file anywhere in the directory, ``chat_template.jinja`` included, changes it."""
    return ",".join(f"{name}={cf.checksum}" for name, cf in sorted(files.items()))


def model_dir_checksum(model_dir: str | Path) -> str:
    """:func:`files_checksum` of the model files present in ``model_dir``."""
    root = Path(model_dir).resolve()
    files: dict[str, CheckedFile] = {}
    for _, _, fname in MODEL_FILES:
        p = root / fname
        if p.is_file():
            checksum, size = blake3_file(p)
            files[fname] = CheckedFile(path=str(p), checksum=checksum, size=size)
    return files_checksum(files)


def blake3_file(path: str | Path) -> tuple[str, int]:
    """``("blake3:<hex>", size)`` of a file's bytes (Dynamo's ``CheckedFile`` checksum)."""
    from blake3 import blake3

    h = blake3()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return f"blake3:{h.hexdigest()}", size


def checked_files(
    model_dir: str | Path,
    *,
    url_base: str | None = None,
    names: Iterable[tuple[str, str, str]] = MODEL_FILES,
) -> dict[str, dict[str, CheckedFile]]:
    """The card's file fields for the files present in ``model_dir``.

    ``{"tokenizer": {"hf_tokenizer_json": CheckedFile(...)}, ...}``; each path is the absolute
    local path, or ``{url_base}/{file name}`` when the files are served over HTTP (a worker's
    status server, for frontends on other hosts).
    """
    root = Path(model_dir).resolve()
    out: dict[str, dict[str, CheckedFile]] = {}
    for field_name, variant, fname in names:
        p = root / fname
        if not p.is_file():
            continue
        checksum, size = blake3_file(p)
        where = f"{url_base.rstrip('/')}/{fname}" if url_base else str(p)
        out[field_name] = {variant: CheckedFile(path=where, checksum=checksum, size=size)}
    return out

