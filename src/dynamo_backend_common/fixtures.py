"""Test fixtures shipped with the package (usable by engine authors' own tests too)."""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["make_tiny_llama", "tiny_model_dir"]

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


def make_tiny_llama(dest: Path, *, seed: int = 0) -> Path:
    """Write a tiny, randomly initialised Llama model directory to ``dest`` and return ``dest``.

    Offline (nothing is downloaded) and small (~500 KB, float32): ``config.json`` for
    ``LlamaForCausalLM`` (the packaged tokenizer's vocabulary, hidden size 32, 2 layers, 4
    attention and 2 KV heads, ``max_position_embeddings`` 512, ``bos_token_id`` 0,
    ``eos_token_id`` 1), ``generation_config.json``, ``model.safetensors``, and
    ``tokenizer.json`` / ``tokenizer_config.json`` (with its chat template) copied from
    :func:`tiny_model_dir`. ``AutoModelForCausalLM.from_pretrained(dest)`` loads it, and it is a
    valid ``--model`` for ``dynamo-backend run`` with ``examples/transformers_engine.py``; its
    output is random tokens. The output rows of the tokenizer's special tokens (BOS, EOS, the
    ChatML markers) are zero, so their logit is 0 while the best of ~1.5k random ordinary logits
    is in practice positive: a greedy reply streams text up to ``max_tokens`` instead of often
    ending at once on EOS. The same ``seed`` gives the same weights; the global torch RNG is
    left as it was. ``dest`` (and its parents) is created if missing; files of those names in
    it are overwritten. Needs ``torch`` and ``transformers`` (the ``examples`` extra), imported
    here only: ``ImportError`` saying how to install them otherwise.
    """
    try:
        import torch
        import transformers
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ImportError(
            f"make_tiny_llama needs torch and transformers ({exc}); install the CPU build of "
            "torch first, then the examples extra: pip install torch --index-url "
            "https://download.pytorch.org/whl/cpu && pip install 'dynamo-backend-common[examples]'"
        ) from exc
    tok_dir = tiny_model_dir()
    tokenizer = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
    )
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    special = sorted(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        # Random weights put EOS near the top for most prompts, so a greedy reply would often
        # be empty; a zero row (logit 0) keeps the special tokens below the best ordinary one.
        model.lm_head.weight[special] = 0.0
    model.save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, dest / name)
    return dest
