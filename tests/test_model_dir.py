"""ModelDir: loading the packaged fixture, every config variant, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from dynamo_backend_common.fixtures import tiny_model_dir
from dynamo_backend_common.model_dir import ModelDir, ModelDirError

MIXED = "héllo wörld 你好 🎉"


@pytest.fixture(scope="module")
def md() -> ModelDir:
    return ModelDir.load(tiny_model_dir())


def copy_model(tmp_path: Path, name: str = "m") -> Path:
    dst = tmp_path / name
    shutil.copytree(tiny_model_dir(), dst)
    return dst


def edit_json(path: Path, **changes: Any) -> None:
    obj = json.loads(path.read_text("utf-8")) if path.exists() else {}
    for k, v in changes.items():
        if v is None:
            obj.pop(k, None)
        else:
            obj[k] = v
    path.write_text(json.dumps(obj), "utf-8")


def test_fixture_loads(md: ModelDir) -> None:
    tok = md.tokenizer
    assert md.name == "tiny-model"
    assert md.path == tiny_model_dir()
    assert md.model_type == "llama"
    assert md.context_length == 2048
    assert md.bos_token == "<|begin_of_text|>"
    # eos_token is written as an AddedToken dict in tokenizer_config.json.
    assert md.eos_token == "<|im_end|>"
    assert md.bos_token_id == tok.token_to_id("<|begin_of_text|>")
    assert md.add_bos_token is True
    # Union of tokenizer_config (im_end), config (end_of_text), generation_config (both).
    assert set(md.eos_token_ids) == {
        tok.token_to_id("<|im_end|>"), tok.token_to_id("<|end_of_text|>")
    }
    assert list(md.eos_token_ids) == sorted(md.eos_token_ids)
    assert md.chat_template is not None and "<|im_start|>" in md.chat_template
    assert set(md.chat_templates) == {"default"}
    assert md.special_token_ids == {
        tok.token_to_id(t)
        for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>")
    }
    assert 1000 <= tok.get_vocab_size() <= 4096


def test_fixture_is_small() -> None:
    total = sum(p.stat().st_size for p in tiny_model_dir().iterdir())
    assert total < 2 * 1024 * 1024


def test_tokenization_round_trip(md: ModelDir) -> None:
    tok = md.tokenizer
    enc = tok.encode(MIXED, add_special_tokens=False)
    assert tok.decode(enc.ids) == MIXED
    # The fixture is meant to split multi-byte characters over byte-level tokens.
    pieces = [tok.decode([i]) for i in enc.ids]
    assert any("\ufffd" in p for p in pieces)
    # With special tokens: the post-processor adds BOS once, skip_special_tokens drops it.
    ids = tok.encode(MIXED).ids
    assert ids[0] == md.bos_token_id and ids[1:] == enc.ids
    assert tok.decode(ids) == MIXED
    assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>" + MIXED


def test_checksum_is_stable_and_content_sensitive(tmp_path: Path, md: ModelDir) -> None:
    assert md.checksum.startswith("config.json=blake3:")
    d = copy_model(tmp_path)
    assert ModelDir.load(d).checksum == md.checksum  # independent of the directory's path
    edit_json(d / "generation_config.json", temperature=0.1)
    assert ModelDir.load(d).checksum != md.checksum


def test_one_checksum_for_worker_cards_and_frontends(tmp_path: Path) -> None:
    """The checksum a frontend caches a model under (the worker card's files) is the model
    directory's own, and an edited chat_template.jinja changes both."""
    from dynamo_backend_common.protocols.discovery import ModelDeploymentCard, checked_files

    d = copy_model(tmp_path)
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")

    def card_checksum() -> str:
        card = ModelDeploymentCard(display_name="m", slug="m", **checked_files(d))
        from dynamo_backend_common.protocols.discovery import files_checksum

        return files_checksum(card.files())

    before = ModelDir.load(d).checksum
    assert before == card_checksum() and "chat_template.jinja=blake3:" in before
    (d / "chat_template.jinja").write_text("{{ messages[-1]['content'] }}!")
    assert ModelDir.load(d).checksum == card_checksum() != before


def test_name_from_config_and_override(tmp_path: Path) -> None:
    d = copy_model(tmp_path, "some-dir")
    assert ModelDir.load(d).name == "some-dir"
    edit_json(d / "config.json", _name_or_path="org/Tiny-1B")
    assert ModelDir.load(d).name == "org/Tiny-1B"
    assert ModelDir.load(d, name="served-name").name == "served-name"


def test_tokenizer_json_only(tmp_path: Path) -> None:
    d = tmp_path / "bare"
    d.mkdir()
    shutil.copy(tiny_model_dir() / "tokenizer.json", d)
    m = ModelDir.load(d)
    assert m.chat_template is None
    assert m.eos_token_ids == ()
    assert m.context_length is None
    assert m.bos_token is None and m.bos_token_id is None and m.add_bos_token is None


def test_named_chat_templates_pick_default(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    edit_json(
        d / "tokenizer_config.json",
        chat_template=[
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "DEFAULT"},
        ],
    )
    m = ModelDir.load(d)
    assert m.chat_template == "DEFAULT"
    assert dict(m.chat_templates) == {"tool_use": "TOOLS", "default": "DEFAULT"}


def test_chat_template_jinja_file(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    edit_json(d / "tokenizer_config.json", chat_template=None)
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", "utf-8")
    assert ModelDir.load(d).chat_template == "{{ messages[0]['content'] }}"


def test_chat_template_json_file(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    edit_json(d / "tokenizer_config.json", chat_template=None)
    edit_json(d / "chat_template.json", chat_template="X")
    assert ModelDir.load(d).chat_template == "X"


@pytest.mark.parametrize(
    ("config", "tok_config", "expected"),
    [
        ({"n_positions": 1024}, {}, 1024),
        ({"max_seq_len": 4096}, {}, 4096),
        ({"text_config": {"max_position_embeddings": 8192}}, {}, 8192),
        ({}, {"model_max_length": 512}, 512),
        ({}, {"model_max_length": 1e30}, None),  # transformers' "no limit" sentinel
        ({"max_position_embeddings": 300}, {"model_max_length": 512}, 300),
    ],
)
def test_context_length_sources(
    tmp_path: Path, config: dict[str, Any], tok_config: dict[str, Any], expected: int | None
) -> None:
    d = copy_model(tmp_path)
    (d / "config.json").write_text(json.dumps(config), "utf-8")
    edit_json(d / "tokenizer_config.json", **{"model_max_length": None, **tok_config})
    assert ModelDir.load(d).context_length == expected


def test_eos_ids_int_or_list_and_string_eos(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    edit_json(d / "tokenizer_config.json", eos_token="<|end_of_text|>")
    edit_json(d / "config.json", eos_token_id=[2])
    edit_json(d / "generation_config.json", eos_token_id=3)
    m = ModelDir.load(d)
    assert m.eos_token == "<|end_of_text|>"
    assert m.eos_token_ids == (1, 2, 3)


# ------------------------------------------------------------------------ errors


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="does not exist") as ei:
        ModelDir.load(tmp_path / "nope")
    assert "nope" in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelDirError, match=r"tokenizer\.json: missing"):
        ModelDir.load(d)


def test_malformed_tokenizer_json(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": 42}', "utf-8")
    with pytest.raises(ModelDirError, match=r"tokenizer\.json: cannot load tokenizer"):
        ModelDir.load(d)


@pytest.mark.parametrize(
    "fname", ["config.json", "tokenizer_config.json", "generation_config.json"]
)
def test_invalid_json(tmp_path: Path, fname: str) -> None:
    d = copy_model(tmp_path)
    (d / fname).write_text("{not json", "utf-8")
    with pytest.raises(ModelDirError, match=rf"{fname}: invalid JSON"):
        ModelDir.load(d)


def test_json_not_an_object(tmp_path: Path) -> None:
    d = copy_model(tmp_path)
    (d / "config.json").write_text("[1, 2]", "utf-8")
    with pytest.raises(ModelDirError, match=r"config\.json: expected a JSON object, got list"):
        ModelDir.load(d)


@pytest.mark.parametrize(
    ("fname", "changes", "pattern"),
    [
        ("tokenizer_config.json", {"chat_template": 7}, "chat_template must be a string"),
        ("tokenizer_config.json", {"chat_template": [{"name": "x"}]}, "list entries"),
        ("tokenizer_config.json", {"eos_token": "<nope>"}, "eos_token '<nope>' is not in"),
        ("tokenizer_config.json", {"bos_token": {"id": 1}}, "special token must be"),
        ("generation_config.json", {"eos_token_id": "2"}, "eos_token_id must be a token id"),
        ("config.json", {"eos_token_id": [1, True]}, "eos_token_id must be a token id"),
        ("config.json", {"eos_token_id": 99999}, "outside the tokenizer's vocabulary"),
        ("config.json", {"max_position_embeddings": -5}, "must be a positive integer"),
    ],
)
def test_inconsistent_configs(
    tmp_path: Path, fname: str, changes: dict[str, Any], pattern: str
) -> None:
    d = copy_model(tmp_path)
    edit_json(d / fname, **changes)
    with pytest.raises(ModelDirError, match=pattern) as ei:
        ModelDir.load(d)
    # Every message points at the directory or file at fault.
    assert str(d) in str(ei.value)
