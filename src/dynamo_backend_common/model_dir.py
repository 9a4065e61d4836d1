"""Load a Hugging Face model directory: tokenizer, chat template, special tokens, context length.

Only the files a frontend needs are read (no weights): ``tokenizer.json`` (required),
``tokenizer_config.json``, ``config.json``, ``generation_config.json`` and, for newer exports,
``chat_template.jinja`` / ``chat_template.json``. Every problem is a :class:`ModelDirError` (a
``ValueError``) whose message names the file and what is wrong with it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tokenizers import Tokenizer

from .protocols.discovery import model_dir_checksum

__all__ = ["ModelDir", "ModelDirError", "model_context_length"]

# Keys that carry the context length in config.json, most specific first.
_CONTEXT_KEYS: Final = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_sequence_length",
    "n_ctx",
)
# Transformers writes int(1e30) when a tokenizer has no limit; anything this big means "unset".
_UNSET_MODEL_MAX_LENGTH: Final = 10**9


class ModelDirError(ValueError):
    """A model directory is missing, incomplete or malformed. The message names the file."""


@dataclass(frozen=True, eq=False)
class ModelDir:
    """What a frontend needs from a model directory. Build it with :meth:`load`.

    - ``name``: ``config.json``'s ``_name_or_path`` when set, else the directory's basename
      (``load(name=...)`` overrides both).
    - ``chat_template``: the template source, or ``None`` when the model has none (completions
      only). A list of named templates resolves to the one named ``"default"``; all named ones
      are in ``chat_templates``.
    - ``eos_token_ids``: sorted union of ``eos_token`` (tokenizer_config), ``config.json`` and
      ``generation_config.json`` ``eos_token_id`` (int or list).
    - ``context_length``: from ``config.json`` (``max_position_embeddings``, ``n_positions``,
      ``max_seq_len``, ...; also inside ``text_config``), else ``model_max_length`` from
      ``tokenizer_config.json`` when it is a real limit; ``None`` when unknown.
    - ``checksum``: the directory's one checksum
      (:func:`~dynamo_backend_common.protocols.discovery.files_checksum`, blake3 of each model
      file), equal to the card checksum of a worker serving it: it changes whenever a model
      file does, so a frontend never keeps a stale tokenizer or template.
    """

    path: Path
    name: str
    tokenizer: Tokenizer = field(repr=False)
    chat_template: str | None = field(repr=False)
    chat_templates: Mapping[str, str] = field(repr=False)
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    add_bos_token: bool | None
    context_length: int | None
    model_type: str | None
    checksum: str
    special_token_ids: frozenset[int] = field(repr=False)

    @classmethod
    def load(cls, path: str | Path, *, name: str | None = None,
             checksum: str | None = None) -> ModelDir:
        """Read ``path``. Raises :class:`ModelDirError` when it is not a directory, has no
        ``tokenizer.json``, or any JSON file in it is malformed or inconsistent.

        ``checksum``: the directory's checksum when the caller already verified the files
        against it (a frontend that fetched them for a card); else the files are hashed."""
        root = Path(path)
        if not root.is_dir():
            raise ModelDirError(f"model directory {str(root)!r} does not exist or is not a dir")
        tok_path = root / "tokenizer.json"
        if not tok_path.is_file():
            raise ModelDirError(
                f"{tok_path}: missing (a Hugging Face 'fast' tokenizer.json is required)"
            )
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ModelDirError(f"{tok_path}: cannot load tokenizer: {e}") from e

        tok_cfg = _read_json(root / "tokenizer_config.json")
        config = _read_json(root / "config.json")
        gen_cfg = _read_json(root / "generation_config.json")

        templates = _chat_templates(root, tok_cfg)
        chat_template = templates.get("default")

        bos_token = _token_content(tok_cfg.get("bos_token"), root / "tokenizer_config.json")
        eos_token = _token_content(tok_cfg.get("eos_token"), root / "tokenizer_config.json")
        bos_token_id = _resolve(tokenizer, bos_token, root / "tokenizer_config.json", "bos_token")

        eos_ids: set[int] = set()
        eos_from_tok = _resolve(tokenizer, eos_token, root / "tokenizer_config.json", "eos_token")
        if eos_from_tok is not None:
            eos_ids.add(eos_from_tok)
        for fname, cfg in (("config.json", config), ("generation_config.json", gen_cfg)):
            eos_ids.update(_int_list(cfg.get("eos_token_id"), root / fname, "eos_token_id"))
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        for i in eos_ids:
            if i >= vocab:
                raise ModelDirError(
                    f"{root}: eos_token_id {i} is outside the tokenizer's vocabulary ({vocab})"
                )

        add_bos = tok_cfg.get("add_bos_token")
        special = frozenset(
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        )
        return cls(
            path=root,
            name=name or _model_name(root, config),
            tokenizer=tokenizer,
            chat_template=chat_template,
            chat_templates=templates,
            bos_token=bos_token,
            eos_token=eos_token,
            eos_token_ids=tuple(sorted(eos_ids)),
            bos_token_id=bos_token_id,
            add_bos_token=add_bos if isinstance(add_bos, bool) else None,
            context_length=_context_length(config, tok_cfg, root),
            model_type=_opt_str(config.get("model_type")),
            checksum=checksum if checksum is not None else model_dir_checksum(root),
            special_token_ids=special,
        )


def _read_json(p: Path) -> dict[str, Any]:
    """The object in ``p``, or ``{}`` when the file is absent (all but tokenizer.json are
    optional)."""
    if not p.is_file():
        return {}
    try:
        obj = json.loads(p.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{p}: invalid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ModelDirError(f"{p}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _chat_templates(root: Path, tok_cfg: Mapping[str, Any]) -> dict[str, str]:
    """Named templates; the unnamed/primary one is ``"default"``. tokenizer_config.json wins
    over the standalone files, as in transformers when both exist."""
    where = root / "tokenizer_config.json"
    raw = tok_cfg.get("chat_template")
    if raw is None:
        jinja = root / "chat_template.jinja"
        if jinja.is_file():
            return {"default": jinja.read_text("utf-8")}
        ct_json = _read_json(root / "chat_template.json")
        raw = ct_json.get("chat_template")
        where = root / "chat_template.json"
        if raw is None:
            return {}
    if isinstance(raw, str):
        return {"default": raw}
    if isinstance(raw, list):
        out: dict[str, str] = {}
        for item in raw:
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("name"), str)
                or not isinstance(item.get("template"), str)
            ):
                raise ModelDirError(
                    f"{where}: chat_template list entries must be "
                    f'{{"name": str, "template": str}}, got {item!r:.80}'
                )
            out[item["name"]] = item["template"]
        return out
    raise ModelDirError(
        f"{where}: chat_template must be a string or a list of named templates, "
        f"got {type(raw).__name__}"
    )


def _token_content(tok: Any, where: Path) -> str | None:
    """A special token written as ``"<s>"`` or as an AddedToken dict ``{"content": "<s>"}``."""
    if tok is None or isinstance(tok, str):
        return tok
    if isinstance(tok, dict) and isinstance(tok.get("content"), str):
        return str(tok["content"])
    raise ModelDirError(f"{where}: special token must be a string or {{'content': str}}: {tok!r}")


def _resolve(tokenizer: Tokenizer, token: str | None, where: Path, key: str) -> int | None:
    if token is None:
        return None
    tid = tokenizer.token_to_id(token)
    if tid is None:
        raise ModelDirError(f"{where}: {key} {token!r} is not in the tokenizer's vocabulary")
    return int(tid)


def _int_list(v: Any, where: Path, key: str) -> list[int]:
    if v is None:
        return []
    items = v if isinstance(v, list) else [v]
    for i in items:
        # bool is an int subclass; true/false here is a typo, not a token id.
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise ModelDirError(f"{where}: {key} must be a token id or a list of them, got {v!r}")
    return list(items)


def model_context_length(root: str | Path) -> int | None:
    """The context length a model directory declares (``config.json``, else
    ``tokenizer_config.json``'s ``model_max_length``); None when it declares none."""
    root = Path(root)
    return _context_length(_read_json(root / "config.json"),
                           _read_json(root / "tokenizer_config.json"), root)


def _context_length(
    config: Mapping[str, Any], tok_cfg: Mapping[str, Any], root: Path
) -> int | None:
    for cfg in (config, config.get("text_config") or {}):
        if not isinstance(cfg, Mapping):
            continue
        for key in _CONTEXT_KEYS:
            v = cfg.get(key)
            if v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ModelDirError(
                    f"{root / 'config.json'}: {key} must be a positive integer, got {v!r}"
                )
            return v
    mml = tok_cfg.get("model_max_length")
    if isinstance(mml, int | float) and not isinstance(mml, bool) and 0 < mml < (
        _UNSET_MODEL_MAX_LENGTH
    ):
        return int(mml)
    return None


def _model_name(root: Path, config: Mapping[str, Any]) -> str:
    n = config.get("_name_or_path")
    if isinstance(n, str) and n.strip():
        return n.strip()
    return root.resolve().name


def _opt_str(v: Any) -> str | None:
    return v if isinstance(v, str) else None
