"""Interop with the REAL NVIDIA Dynamo 1.6.1, both directions, no etcd and no NATS.

- A: Dynamo's frontend (``python -m dynamo.frontend``) serves our workers
  (``dynamo-backend worker``), driven by the official ``openai`` client.
- B: our frontend (``dynamo-backend frontend``) serves Dynamo's mocker (``python -m
  dynamo.mocker``).
- Mixed pools: one Dynamo mocker and one of our workers behind either frontend.

Everything shares one file-discovery directory, the TCP request plane and the ZMQ event plane,
configured only through Dynamo's environment variables (see ``dynamo_real.Deployment``).
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from dynamo_real import Deployment, deployment, models, wait_for_model, wait_until

pytestmark = pytest.mark.integration
_ = deployment  # the fixture, used by name below

PROMPT = "The quick brown fox jumps over the lazy dog"
# The echo engine streams the chat template's rendering of the messages back.
ECHO_CHAT = "user\nThe quick brown fox jumps over the lazy dog"
LONG_PROMPT = " ".join(f"word{i} alpha beta gamma" for i in range(60))


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30.0)


def chat(c: openai.OpenAI, model: str, text: str = PROMPT, **kw: object) -> str:
    r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                  **kw)  # type: ignore[call-overload]
    return r.choices[0].message.content or ""


def stream_chat(c: openai.OpenAI, model: str, text: str = PROMPT, **kw: object) -> tuple[
        str, object]:
    parts: list[str] = []
    usage = None
    for ch in c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}], stream=True,
            stream_options={"include_usage": True}, **kw):  # type: ignore[call-overload]
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
        if ch.usage is not None:
            usage = ch.usage
    return "".join(parts), usage


# -- A: Dynamo's frontend, our workers -------------------------------------------------------


def test_dynamo_frontend_serves_our_echo_worker(deployment: Deployment) -> None:
    _fe, url = deployment.dynamo_frontend()
    deployment.our_worker("echo", "our-echo")
    wait_for_model(url, "our-echo")
    c = client(url)

    assert chat(c, "our-echo", max_tokens=64) == ECHO_CHAT
    r = c.chat.completions.create(model="our-echo", max_tokens=64,
                                  messages=[{"role": "user", "content": PROMPT}])
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    text, usage = stream_chat(c, "our-echo", max_tokens=64)
    assert text == ECHO_CHAT
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens  # type: ignore[attr-defined]

    comp = c.completions.create(model="our-echo", prompt=PROMPT, max_tokens=4)
    assert comp.choices[0].text and PROMPT.startswith(comp.choices[0].text.lstrip())
    assert comp.usage is not None and comp.usage.completion_tokens == 4
    assert comp.choices[0].finish_reason == "length"
    parts = [ch.choices[0].text for ch in c.completions.create(
        model="our-echo", prompt=PROMPT, max_tokens=4, stream=True) if ch.choices]
    assert "".join(parts) == comp.choices[0].text


def test_dynamo_frontend_serves_our_mocker_and_a_disconnect_aborts_once(
        deployment: Deployment, tmp_path: Path) -> None:
    _fe, url = deployment.dynamo_frontend()
    deployment.our_worker("mocker", "our-mocker", "--", "--speedup-ratio", "1000")
    events = tmp_path / "events.txt"
    slow = deployment.our_worker(
        "tests/worker_engines.py:LifecycleEngine", "our-slow", "--",
        "--events-file", str(events), "--delay-ms", "50", "--tokens", "400")
    wait_for_model(url, "our-mocker")
    wait_for_model(url, "our-slow")
    c = client(url)
    r = c.chat.completions.create(model="our-mocker", max_tokens=7,
                                  messages=[{"role": "user", "content": PROMPT}])
    assert r.usage is not None and r.usage.completion_tokens == 7
    assert r.choices[0].finish_reason == "length"

    # A client that goes away mid-stream: Dynamo's frontend sends "kill", which must reach the
    # engine as one abort().
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30.0, trust_env=False,
                      json={"model": "our-slow", "stream": True, "max_tokens": 400,
                            "messages": [{"role": "user", "content": PROMPT}]}) as resp:
        assert resp.status_code == 200
        got = 0
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                got += 1
                if got >= 3:
                    break
    line = slow.wait_line("lifecycle: abort ", 15.0)
    request_id = line.split("lifecycle: abort ", 1)[1].strip()
    slow.stop()  # after its orderly exit every record is on disk: count them
    lines = events.read_text().splitlines()
    assert lines.count(f"abort {request_id}") == 1, lines
    assert lines[-1] == "cleanup", lines


def test_dynamo_kv_router_follows_our_mockers_kv_events(deployment: Deployment) -> None:
    _fe, url = deployment.dynamo_frontend(router_mode="kv")
    for _ in range(2):
        deployment.our_worker("mocker", "our-kv", "--", "--speedup-ratio", "1000",
                              "--block-size", "16")
    wait_until(lambda: "our-kv" in models(url), 60, "model our-kv")
    c = client(url)
    # Let both workers be known to the router before the first request.
    time.sleep(0)
    cached = []
    for _ in range(5):
        r = c.chat.completions.create(model="our-kv", max_tokens=2,
                                      messages=[{"role": "user", "content": LONG_PROMPT}])
        assert r.usage is not None
        details = r.usage.prompt_tokens_details
        cached.append(details.cached_tokens if details is not None else 0)
    # The first request fills one worker's cache; every repeat must be routed to it (with two
    # workers and no KV awareness, four hits in a row happen 1 time in 16).
    assert cached[0] == 0 or cached[0] is None
    assert all((x or 0) >= 16 * 8 for x in cached[1:]), cached


def test_sigterm_of_our_worker_under_dynamo_loses_no_request(deployment: Deployment) -> None:
    _fe, url = deployment.dynamo_frontend()
    victim = deployment.our_worker("mocker", "our-pool", "--", "--speedup-ratio", "20")
    deployment.our_worker("mocker", "our-pool", "--", "--speedup-ratio", "20")
    wait_for_model(url, "our-pool")
    c = client(url)
    started = threading.Event()
    results: list[tuple[str, int]] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            cc = client(url)
            n = 0
            finish = ""
            for ch in cc.chat.completions.create(
                    model="our-pool", max_tokens=48, stream=True,
                    messages=[{"role": "user", "content": f"{PROMPT} {i}"}]):
                if ch.choices:
                    started.set()
                    if ch.choices[0].delta.content:
                        n += 1
                    finish = ch.choices[0].finish_reason or finish
            results.append((finish, n))
        except BaseException as exc:
            errors.append(exc)

    _ = c
    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        assert started.wait(30)
        victim.signal(signal.SIGTERM)
        for f in futures:
            f.result(timeout=120)
    assert victim.wait(60) == 0, victim.tail()
    assert not errors, errors[:3]
    assert len(results) == 24
    assert all(finish == "length" for finish, _n in results), results


def test_sigkill_of_our_worker_leaves_dynamos_view(deployment: Deployment) -> None:
    _fe, url = deployment.dynamo_frontend()
    w = deployment.our_worker("echo", "our-doomed")
    wait_for_model(url, "our-doomed")
    w.signal(signal.SIGKILL)
    # No unregistration happens: the frontend drops the worker once its files' mtimes are a
    # TTL (10 s) old.
    wait_until(lambda: "our-doomed" not in models(url), 30, "the model to leave Dynamo's view")


# -- B: our frontend, Dynamo's mocker ----------------------------------------------------------


def test_our_frontend_serves_dynamos_mocker(deployment: Deployment) -> None:
    mocker = deployment.dynamo_mocker("dyn-mock", speedup=1000)
    _fe, url = deployment.our_frontend()
    wait_for_model(url, "dyn-mock")
    _ = mocker
    c = client(url)
    r = c.chat.completions.create(model="dyn-mock", max_tokens=6,
                                  messages=[{"role": "user", "content": PROMPT}])
    assert r.usage is not None and r.usage.completion_tokens == 6
    assert r.choices[0].finish_reason == "length"
    text, usage = stream_chat(c, "dyn-mock", max_tokens=6)
    assert usage is not None and usage.completion_tokens == 6  # type: ignore[attr-defined]
    assert text
    comp = c.completions.create(model="dyn-mock", prompt=PROMPT, max_tokens=3)
    assert comp.usage is not None and comp.usage.completion_tokens == 3


def test_our_frontend_cancels_on_dynamos_mocker(deployment: Deployment) -> None:
    mocker = deployment.dynamo_mocker("dyn-slow", speedup=1)
    fe, url = deployment.our_frontend()
    wait_for_model(url, "dyn-slow")
    _ = mocker
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30.0, trust_env=False,
                      json={"model": "dyn-slow", "stream": True, "max_tokens": 2000,
                            "messages": [{"role": "user", "content": PROMPT}]}) as resp:
        assert resp.status_code == 200
        got = 0
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                got += 1
                if got >= 3:
                    break
    # Our frontend counts the request as cancelled and the mocker's stream is released.
    wait_until(lambda: 'dynamo_frontend_requests_total' in _metrics(url), 10, "metrics")

    def cancelled() -> bool:
        for line in _metrics(url).splitlines():
            if line.startswith("dynamo_frontend_requests_total") and 'status="cancelled"' in line:
                return float(line.rsplit(" ", 1)[1]) >= 1
        return False

    wait_until(cancelled, 15, "the request to be counted as cancelled")
    _ = fe


def test_our_kv_router_follows_dynamos_mocker_events(deployment: Deployment) -> None:
    for _ in range(2):
        deployment.dynamo_mocker("dyn-kv", speedup=1000)
    _fe, url = deployment.our_frontend(router_mode="kv")
    wait_for_model(url, "dyn-kv")
    c = client(url)
    cached = []
    for _ in range(5):
        r = c.chat.completions.create(model="dyn-kv", max_tokens=2,
                                      messages=[{"role": "user", "content": LONG_PROMPT}])
        assert r.usage is not None
        details = r.usage.prompt_tokens_details
        cached.append((details.cached_tokens or 0) if details is not None else 0)
    assert all(x >= 16 * 8 for x in cached[1:]), cached


# -- mixed pools -------------------------------------------------------------------------------


@pytest.mark.parametrize("front", ["dynamo", "ours"])
def test_mixed_pool_behind_either_frontend(deployment: Deployment, front: str) -> None:
    deployment.dynamo_mocker("mixed", speedup=1000)
    deployment.our_worker("mocker", "mixed", "--", "--speedup-ratio", "1000")
    if front == "dynamo":
        _fe, url = deployment.dynamo_frontend()
    else:
        _fe, url = deployment.our_frontend()
    wait_for_model(url, "mixed")
    c = client(url)
    for i in range(12):
        r = c.chat.completions.create(model="mixed", max_tokens=3,
                                      messages=[{"role": "user", "content": f"{PROMPT} {i}"}])
        assert r.usage is not None and r.usage.completion_tokens == 3


def _metrics(url: str) -> str:
    try:
        return httpx.get(url + "/metrics", timeout=5.0, trust_env=False).text
    except httpx.HTTPError:
        return ""
