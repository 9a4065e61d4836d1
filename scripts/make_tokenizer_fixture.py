#!/usr/bin/env python3
"""Generate the tiny Hugging Face model directory used by tests, examples and benchmarks.

Writes ``src/dynamo_backend_common/_data/tiny-model/`` (or ``--out DIR``):

- ``tokenizer.json``: a byte-level BPE (GPT-2 style) trained with the ``tokenizers`` library on a
  small built-in multilingual corpus (English, accented Latin, CJK, emoji). The vocabulary is kept
  small (~1-2k) so that rare multi-byte characters stay split over several byte tokens, which is
  exactly what incremental detokenization must cope with.
- ``tokenizer_config.json``: a ChatML-style ``chat_template``, ``bos_token`` (a string),
  ``eos_token`` (an AddedToken dict, as many real models write it), ``add_bos_token``,
  ``model_max_length``.
- ``config.json``: a Llama-shaped config (``model_type``, ``max_position_embeddings``, a tiny
  architecture so an example engine could instantiate random weights, ``eos_token_id``).
- ``generation_config.json``: ``eos_token_id`` as a list (both end tokens).

Nothing is downloaded. Run ``python scripts/make_tokenizer_fixture.py`` after changing it and
commit the result; training is deterministic for a given ``tokenizers`` version.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]
VOCAB_SIZE = 2048
CONTEXT_LENGTH = 2048

# ChatML with a BOS, a role check (exercises raise_exception) and tools rendered with tojson.
# Content must be a string: the preprocessor flattens OpenAI content parts for this template.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n# Tools\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{- raise_exception('Unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_ENGLISH = (
    "the a an of to and in is it that for on with as was by at from this be are or not have "
    "has had but what all were when we there can your which their said if do will each about "
    "how up out them then she many some so these would other into more her two like him see "
    "time could no make than first been its who now people my made over did down only way find "
    "use may water long little very after words called just where most know get through back "
    "much go good new write our used me man too any day same right look think also around "
    "another came come work three word must because does part even place well such here take "
    "why things help put years different away again off went old number great tell men say "
    "small every found still between name should home big give air line set own under read "
    "last never us left end along while might next sound below saw something thought both few "
    "those always looked show large often together asked house don't world going want school "
    "important until form food keep children feet land side without boy once animals life "
    "enough took sometimes four head above kind began almost live page got earth need far hand "
    "high year mother light parts country father let night following picture being study "
    "second eyes soon times story boys since white days paper hard near sentence better best "
    "across during today others however sure means knew try told young miles sun ways thing "
    "whole hear example heard several change answer room sea against top turned learn point "
    "city play toward five using himself usually model token tokens request stream worker "
    "router engine prompt frontend server cache prefix decode prefill batch latency"
).split()

_CODE = [
    "def main():\n    print('hello world')\n    return 0\n",
    "for i in range(10):\n    total += i * i\n",
    '{"role": "user", "content": "What is the capital of France?"}',
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 2048 and 3.14159 appear in text.",
    "Punctuation: commas, periods. Questions? Exclamations! (Parentheses) [brackets] {braces}",
]

# Accented Latin is common enough to get merged tokens for frequent characters.
_LATIN = [
    "café naïve résumé über Straße señor año façade crème brûlée élève été déjà",
    "Les élèves étudient à l'école; où est la bibliothèque? Très bien, merci.",
    "Schöne Grüße aus München! Die Bäume blühen im Frühling.",
    "El niño comió una piña en la montaña. ¿Qué tal? ¡Muy bien!",
    "Ça va? Oui, ça va très bien. Noël. Zoë. Greek: αβγδε λόγος; Cyrillic: привет мир.",
]

# CJK and emoji appear once each: below min_frequency, so most stay split over byte tokens
# (only byte pairs shared by several characters get merged), which is what tests need.
_RARE = [
    "你好，世界！今天天气很好。我们一起学习中文。",  # noqa: RUF001 (CJK punctuation)
    "こんにちは世界。日本語のテキストです。ありがとうございます。안녕하세요",
    "Emoji: 🎉 🚀 😀 👍 ❤️ 🔥 🤖 ✨",
]


def corpus() -> list[str]:
    """The training corpus: pseudo-random English sentences (deterministic), code and numbers,
    accented Latin a few times, CJK and emoji once."""
    rng = random.Random(0)
    lines = []
    for _ in range(3000):
        words = [rng.choice(_ENGLISH) for _ in range(rng.randint(4, 14))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", ".", ".", "?", "!", ","]))
    return lines + _CODE * 20 + _LATIN * 4 + _RARE


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Llama-3 style: encode(add_special_tokens=True) prepends BOS; the chat template writes its
    # own BOS, so chat prompts are encoded with add_special_tokens=False.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return tok


def _added_token(content: str) -> dict[str, object]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def write_model_dir(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = tok.get_vocab_size(with_added_tokens=True)

    eos_dict = _added_token(IM_END)
    eos_dict.pop("special")
    eos_dict["__type"] = "AddedToken"
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(ids[t]): _added_token(t) for t in SPECIAL_TOKENS},
        "bos_token": BOS,
        "eos_token": eos_dict,
        "pad_token": EOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": CONTEXT_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": CONTEXT_LENGTH,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
    }
    generation_config = {
        "bos_token_id": ids[BOS],
        "eos_token_id": [ids[IM_END], ids[EOS]],
        "do_sample": True,
        "temperature": 0.7,
    }
    for name, obj in (
        ("tokenizer_config.json", tokenizer_config),
        ("config.json", config),
        ("generation_config.json", generation_config),
    ):
        (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", "utf-8")
    print(f"wrote {out} (vocab {vocab_size}, special ids {ids})")


def main() -> None:
    default = (
        Path(__file__).resolve().parent.parent
        / "src"
        / "dynamo_backend_common"
        / "_data"
        / "tiny-model"
    )
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=default, help="output directory")
    args = ap.parse_args()
    write_model_dir(args.out)


if __name__ == "__main__":
    main()
