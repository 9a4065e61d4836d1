"""Test fixtures shipped with the package (usable by engine authors' own tests too)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["tiny_model_dir"]

_DATA = Path(__file__).resolve().parent / "_data"


def tiny_model_dir() -> Path:
    """Path of the packaged tiny Hugging Face model directory (no weights): a byte-level BPE
    ``tokenizer.json`` (~1.5k tokens; accented Latin, CJK and emoji split over byte tokens),
    ``tokenizer_config.json`` with a ChatML ``chat_template``, ``config.json``
    (``max_position_embeddings`` 2048) and ``generation_config.json``. Regenerate it with
    ``scripts/make_tokenizer_fixture.py``. Treat it as read-only; copy it to modify it.
    """
    p = _DATA / "tiny-model"
    if not (p / "tokenizer.json").is_file():
        raise FileNotFoundError(f"packaged fixture missing: {p} (reinstall the package)")
    return p
