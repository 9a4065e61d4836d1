"""etcd discovery in Dynamo's etcd layout: full keys, raw values, lease-bound create txn."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import httpx
import pytest

from dynamo_backend_common.runtime.discovery import EtcdDiscovery, open_discovery

pytestmark = pytest.mark.integration


async def raw_kv(url: str, key: str) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.post(
            url + "/v3/kv/range", json={"key": base64.b64encode(key.encode()).decode()}, timeout=5
        )
        response.raise_for_status()
        kvs = response.json().get("kvs", [])
        assert len(kvs) == 1, kvs
        kv: dict[str, Any] = kvs[0]
        return kv


async def test_create_is_a_txn_and_keys_are_dynamos(
    etcd_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DYN_DISCOVERY_TTL", raising=False)
    monkeypatch.setenv("ETCD_LEASE_TTL", "7")
    key = f"v1/instances/test{uuid.uuid4().hex}/backend/generate/1a2b"
    value = b'{"type":"Endpoint","instance_id":6699}'
    first, second = open_discovery(etcd_url), open_discovery(etcd_url)
    assert isinstance(first, EtcdDiscovery) and isinstance(second, EtcdDiscovery)
    paths: list[str] = []
    call = first._call

    async def spy(path: str, body: dict[str, Any]) -> dict[str, Any]:
        paths.append(path)
        return await call(path, body)

    monkeypatch.setattr(first, "_call", spy)
    async with first, second:
        assert first.ttl == 7.0 and first._granted_ttl == 7
        await first.put(key, value)
        assert paths[-1] == "/v3/kv/txn"  # create-if-absent
        kv = await raw_kv(etcd_url, key)
        # The full key is the bucket path plus the key, the value is the raw bytes, bound to
        # the lease whose id is instance_id.
        assert base64.b64decode(kv["key"]).decode() == key
        assert base64.b64decode(kv["value"]) == value
        assert int(kv["lease"]) == first.instance_id and kv["version"] == "1"
        paths.clear()
        await first.put(key, b"updated")
        assert paths == ["/v3/kv/put"]  # an update of an owned key: a plain put
        # Another process's existing key: the create txn fails, then put overwrites it
        # (create-or-update), and the key moves to the writer's lease.
        await second.put(key, b"second")
        kv = await raw_kv(etcd_url, key)
        assert int(kv["lease"]) == second.instance_id and kv["version"] == "3"
        assert await first.get_prefix(key) == {key: b"second"}
        await first.delete(key)
        paths.clear()
        await first.put(key, b"again")
        assert paths == ["/v3/kv/txn"]  # deleted, so a create again
        assert int((await raw_kv(etcd_url, key))["lease"]) == first.instance_id
    async with open_discovery(etcd_url) as reader:
        assert await reader.get_prefix(key) == {}  # closing revoked the leases
