"""Discovery records in Dynamo 1.6.1's shapes, pinned by the captured golden files, and the
frontend's materialisation of a card's files (local paths, HTTP URLs, checksum mismatches)."""

from __future__ import annotations

import argparse
import hashlib
import http.server
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from dynamo_backend_common.frontend.card_files import materialize
from dynamo_backend_common.model_dir import ModelDir, ModelDirError
from dynamo_backend_common.protocols.codec import to_json
from dynamo_backend_common.protocols.discovery import (
    CheckedFile,
    InstanceInfo,
    ModelCard,
    ModelDeploymentCard,
    checked_files,
    endpoint_path,
    instance_key,
    model_key,
    slugify,
)
from dynamo_backend_common.runtime.discovery import parse_etcd_endpoints
from dynamo_backend_common.runtime.planes import (
    add_plane_args,
    discovery_url_for_backend,
    event_url_for_plane,
    resolve_discovery,
    resolve_events,
)

GOLDEN = Path(__file__).parent / "golden" / "dynamo-1.6.1" / "discovery"
TINY = Path(__file__).resolve().parents[1] / "src/dynamo_backend_common/_data/tiny-model"


def golden(run: str, bucket: str) -> dict[str, bytes]:
    d = GOLDEN / run / "v1" / bucket
    return {urllib.parse.unquote(p.name): p.read_bytes() for p in sorted(d.iterdir())}


def test_golden_instance_records_decode_and_reencode_byte_identical() -> None:
    records = golden("mocker_running", "instances")
    assert len(records) == 2
    for key, raw in records.items():
        info = msgspec.json.decode(raw, type=InstanceInfo)
        assert key == f"dynamo/backend/{info.endpoint}/{info.instance_id:x}"
        assert info.instance_id == 15556482102005470797  # >= 2**63: a u64
        assert info.address == "127.0.0.1:44641"
        assert info.path == endpoint_path(info.instance_id, "dynamo", "backend", info.endpoint)
        assert info.request_plane_codec == "msgpack" and info.device_type == "cuda"
        assert to_json(info) == raw


def test_golden_model_cards_decode() -> None:
    for run, url_paths in (("mocker_running", True), ("mocker_no_system_port", False)):
        (raw,) = golden(run, "mdc").values()
        card = msgspec.json.decode(raw, type=ModelCard)
        assert card.display_name == "tiny-llama-mock"
        assert card.card_json.slug == "tiny-llama-mock"
        assert card.kv_cache_block_size == 16 and card.migration_limit == 0
        assert card.model_type == "Chat | Completions" and card.worker_type == "aggregated"
        assert card.runtime_config.total_kv_blocks == 16384
        assert card.runtime_config.enable_local_indexer is True
        files = card.card_json.files()
        assert sorted(files) == ["config.json", "generation_config.json", "tokenizer.json",
                                 "tokenizer_config.json"]
        assert files["tokenizer.json"].size == 2222338
        assert files["tokenizer.json"].checksum.startswith("blake3:c4bd2c8b")
        assert all(cf.path.startswith("http://") == url_paths for cf in files.values())
        assert card.checksum == msgspec.json.decode(raw, type=ModelCard).checksum


def test_our_card_has_every_field_dynamos_frontend_requires() -> None:
    card = ModelCard(namespace="ns", component="c", endpoint="generate", instance_id=2**64 - 1,
                     card_json=ModelDeploymentCard(display_name="My Model", slug=slugify(
                         "My Model"), **checked_files(TINY)))  # type: ignore[arg-type]
    obj = msgspec.json.decode(to_json(card))
    assert obj["type"] == "Model" and obj["instance_id"] == 2**64 - 1
    mdc = obj["card_json"]
    # What the 1.6.1 frontend rejects a card without (SPEC §2.3, probed with the real binary).
    for required in ("display_name", "slug", "kv_cache_block_size", "model_type",
                     "model_input", "migration_limit", "model_info", "tokenizer",
                     "prompt_formatter"):
        assert required in mdc, required
    assert mdc["slug"] == "my_model"
    assert mdc["model_type"] == "Chat | Completions"  # the bitflags string, never an integer
    tok = mdc["tokenizer"]["hf_tokenizer_json"]
    data = (TINY / "tokenizer.json").read_bytes()
    assert tok["size"] == len(data) and tok["path"] == str(TINY / "tokenizer.json")
    assert tok["checksum"].startswith("blake3:") and len(tok["checksum"]) == 7 + 64
    assert instance_key("ns", "c", "generate", 255) == "v1/instances/ns/c/generate/ff"
    assert model_key("ns", "c", "generate", 255) == "v1/mdc/ns/c/generate/ff"


def test_mdcsum_matches_what_the_real_dynamo_frontend_computed() -> None:
    """Dynamo's frontend pools workers of one model only when their card checksums agree. Both
    values were read from the real 1.6.1 frontend's log ("Rejected incompatible workers ...
    incumbent_checksum=... rejected_checksum=...") with Dynamo's mocker and ours serving the
    repo's tiny model as "our-pool" from /work/main: theirs reported no context length, ours
    8192. The checksum ignores where the files are, and the runtime config's figures."""
    src = "/work/main/src/dynamo_backend_common/_data/tiny-model"

    def card(ctx: int | None, **kw: object) -> ModelDeploymentCard:
        c = ModelDeploymentCard(display_name="our-pool", slug="our_pool", source_path=src,
                                **checked_files(TINY, url_base="http://h:1/x"),  # type: ignore[arg-type]
                                **kw)  # type: ignore[arg-type]
        c.runtime_config.context_length = ctx
        return c

    dynamos = "f260b26038343d6c4daf98823ad08aaef2698498cf8314dbd0f20fd02d48db9c"
    assert card(0).mdcsum() == dynamos
    assert card(8192).mdcsum() == (
        "51ea19f29bd8eed4e2dacd9f0eccd6f67b2d9d85899165c882cbc9648f24743e")
    local = card(0)
    for k, v in checked_files(TINY).items():  # local paths instead of URLs
        setattr(local, k, v)
    local.runtime_config.total_kv_blocks = 7
    assert local.mdcsum() == dynamos
    # No runtime figure: the model's own limit counts.
    assert card(None, architectural_max_context_length=8192).mdcsum() == card(8192).mdcsum()
    for changed in (card(0, kv_cache_block_size=32), card(0, worker_type="decode"),
                    card(0, needs=[["prefill"]])):
        assert changed.mdcsum() != dynamos


def test_blake3_checksum_is_plain_blake3_of_the_bytes(tmp_path: Path) -> None:
    # The blake3 test vector for the empty input.
    (tmp_path / "tokenizer.json").write_bytes(b"")
    cf = checked_files(tmp_path)["tokenizer"]["hf_tokenizer_json"]
    assert cf.checksum == (
        "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")
    assert cf.size == 0


def _card(files: dict[str, dict[str, CheckedFile]]) -> ModelDeploymentCard:
    return ModelDeploymentCard(display_name="m", slug="m", **files)  # type: ignore[arg-type]


def test_materialize_uses_a_local_directory_as_it_is(tmp_path: Path) -> None:
    assert materialize(_card(checked_files(TINY)), tmp_path / "cache") == TINY
    assert not (tmp_path / "cache").exists()


def test_materialize_rejects_a_changed_file(tmp_path: Path) -> None:
    d = tmp_path / "model"
    d.mkdir()
    for p in TINY.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    card = _card(checked_files(d))
    (d / "tokenizer_config.json").write_bytes(b"{}")  # edited after registration
    with pytest.raises(ModelDirError, match=r"tokenizer_config\.json.*checksum mismatch"):
        materialize(card, tmp_path / "cache")


def test_materialize_rejects_a_card_without_tokenizer(tmp_path: Path) -> None:
    files = checked_files(TINY)
    del files["tokenizer"]
    with pytest.raises(ModelDirError, match=r"names no tokenizer\.json"):
        materialize(_card(files), tmp_path / "cache")


@pytest.fixture
def http_model() -> Iterator[tuple[str, list[str]]]:
    """TINY's files over HTTP, like a Dynamo worker's ``/v1/metadata/...`` routes."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            name = self.path.rsplit("/", 1)[-1]
            p = TINY / name
            if not p.is_file():
                self.send_error(404)
                return
            body = p.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1/metadata/ns/c/ep/m/_base", hits
    finally:
        srv.shutdown()
        srv.server_close()


def test_materialize_downloads_verifies_and_caches(
        tmp_path: Path, http_model: tuple[str, list[str]]) -> None:
    base, hits = http_model
    card = _card(checked_files(TINY, url_base=base))
    d = materialize(card, tmp_path / "cache")
    assert d != TINY and d.parent == tmp_path / "cache"
    assert len(hits) == 4
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert hashlib.sha256((d / name).read_bytes()).digest() == hashlib.sha256(
            (TINY / name).read_bytes()).digest()
    assert ModelDir.load(d, name="m").chat_template is not None
    assert materialize(card, tmp_path / "cache") == d
    assert len(hits) == 4  # verified cache files are not downloaded again


def test_materialize_reports_a_bad_download(
        tmp_path: Path, http_model: tuple[str, list[str]]) -> None:
    base, _ = http_model
    files = checked_files(TINY, url_base=base)
    tok = files["tokenizer"]["hf_tokenizer_json"]
    files["tokenizer"]["hf_tokenizer_json"] = CheckedFile(
        path=tok.path.replace("tokenizer.json", "missing.json"), checksum=tok.checksum,
        size=tok.size)
    with pytest.raises(ModelDirError, match="HTTP 404"):
        materialize(_card(files), tmp_path / "cache")


# -- Dynamo's plane selectors ------------------------------------------------------------------


def test_dynamo_backend_names_map_to_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ETCD_ENDPOINTS", raising=False)
    monkeypatch.delenv("NATS_SERVER", raising=False)
    monkeypatch.delenv("DYN_EVENT_PLANE_HOST", raising=False)
    assert discovery_url_for_backend("file") == "file://"
    assert discovery_url_for_backend("mem") == "memory://"
    assert parse_etcd_endpoints(discovery_url_for_backend("etcd")) == ["http://localhost:2379"]
    for value in ("http://10.0.0.1:2379,http://10.0.0.2:2379", "10.0.0.1:2379,10.0.0.2"):
        monkeypatch.setenv("ETCD_ENDPOINTS", value)  # both spellings Dynamo users write
        assert parse_etcd_endpoints(discovery_url_for_backend("etcd")) == [
            "http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    monkeypatch.setenv("ETCD_ENDPOINTS", "https://e:2379")
    assert parse_etcd_endpoints(discovery_url_for_backend("etcd")) == ["https://e:2379"]
    assert event_url_for_plane("zmq") == "zmq://"
    assert event_url_for_plane("nats") == "nats://localhost:4222"
    monkeypatch.setenv("NATS_SERVER", "nats://127.0.0.1:4333")
    monkeypatch.setenv("DYN_EVENT_PLANE_HOST", "127.0.0.2")
    assert event_url_for_plane("nats") == "nats://127.0.0.1:4333"
    assert event_url_for_plane("zmq") == "zmq://127.0.0.2"
    with pytest.raises(ValueError, match="expected one of file, etcd, mem"):
        discovery_url_for_backend("kubernetes")
    with pytest.raises(ValueError, match="expected one of zmq, nats"):
        event_url_for_plane("kafka")
    # Our URL flags beat Dynamo's selectors.
    assert resolve_discovery("etcd://h:1", "file") == "etcd://h:1"
    assert resolve_discovery(None, "file") == "file://"
    assert resolve_discovery("", None) is None
    assert resolve_events("nats://h:1", "zmq") == "nats://h:1"
    assert resolve_events(None, None) is None


def test_plane_flags_read_dynamos_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_DISCOVERY_BACKEND", "etcd")
    monkeypatch.setenv("DYN_EVENT_PLANE", "nats")
    monkeypatch.setenv("DYN_REQUEST_PLANE", "tcp")
    p = argparse.ArgumentParser()
    add_plane_args(p)
    a = p.parse_args([])
    assert (a.discovery_backend, a.event_plane, a.request_plane) == ("etcd", "nats", "tcp")
    a = p.parse_args(["--discovery-backend", "file", "--request-plane", "mux"])
    assert (a.discovery_backend, a.request_plane) == ("file", "mux")
    with pytest.raises(SystemExit):
        p.parse_args(["--request-plane", "nats"])
