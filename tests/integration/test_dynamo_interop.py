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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from dynamo_real import (
    Deployment,
    deployment,
    metric,
    metric_at,
    models,
    wait_for_instances,
    wait_for_model,
    wait_until,
)

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


SCRIPTED = str(Path(__file__).resolve().parent.parent / "frontend_engines.py") + ":ScriptedEngine"
TOOL_REPLY = ('Let me look.</think><tool_call>\n{"name": "get_weather", "arguments": '
              '{"city": "Paris"}}\n</tool_call>')
TOOLS: list[dict[str, object]] = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("front", ["dynamo", "ours"])
def test_the_card_s_parsers_drive_either_frontend(deployment: Deployment, front: str) -> None:
    """Our worker names hermes and deepseek_r1 in its card (Dynamo's runtime_config fields, the
    tiny template has nothing to detect): both frontends parse its reply with them."""
    _fe, url = (deployment.dynamo_frontend() if front == "dynamo"
                else deployment.our_frontend())
    deployment.our_worker(SCRIPTED, "scripted", "--tool-call-parser", "hermes",
                          "--reasoning-parser", "deepseek_r1", "--", "--reply", TOOL_REPLY)
    wait_for_model(url, "scripted")
    r = client(url).chat.completions.create(
        model="scripted", max_tokens=64, tools=TOOLS,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "Weather in Paris?"}])
    msg = r.choices[0].message
    calls = msg.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather"], msg  # type: ignore[union-attr]
    assert calls[0].function.arguments.replace(" ", "") == '{"city":"Paris"}'  # type: ignore[union-attr]
    assert r.choices[0].finish_reason == "tool_calls"
    assert getattr(msg, "reasoning_content", None) == "Let me look."


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
    wait_for_model(url, "our-kv")
    wait_for_instances(url, 2)  # both workers known before the first request
    c = client(url)
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
    """A worker leaving under load: streams in flight on it at SIGTERM finish, requests keep
    flowing (to the survivor) while it drains, and none fails.

    Dynamo 1.6.1's frontend cancels a request whose response stream has not called home yet
    when it sees the instance leave discovery, and without migration answers it 503 (Dynamo's
    own mocker loses requests the same way). Our worker shrinks that window (it unregisters
    only once every accepted request has called home), and ``--migration-limit``, the
    frontend's remedy, re-routes what is left to the survivor."""
    _fe, url = deployment.dynamo_frontend("--migration-limit", "3")
    victim = deployment.our_worker("mocker", "our-pool", "--", "--speedup-ratio", "5")
    survivor = deployment.our_worker("mocker", "our-pool", "--", "--speedup-ratio", "5")
    wait_for_model(url, "our-pool")
    wait_for_instances(url, 2)
    stop = threading.Event()
    signalled = threading.Event()
    results: list[tuple[bool, str, int]] = []  # (sent after SIGTERM, finish, tokens)
    errors: list[BaseException] = []

    def loop(i: int) -> None:
        cc = client(url)
        while not stop.is_set():
            after = signalled.is_set()
            try:
                n, finish = 0, ""
                for ch in cc.chat.completions.create(
                        model="our-pool", max_tokens=32, stream=True,
                        messages=[{"role": "user", "content": f"{PROMPT} {i}"}]):
                    if ch.choices:
                        n += 1 if ch.choices[0].delta.content else 0
                        finish = ch.choices[0].finish_reason or finish
                results.append((after, finish, n))
            except BaseException as exc:
                errors.append(exc)
                return

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(loop, i) for i in range(16)]
        # SIGTERM while the victim has streams in flight.
        wait_until(lambda: metric(victim, "dynamo_component_inflight_requests") >= 2, 30,
                   "streams in flight on the victim")
        served_before = metric(victim, "dynamo_component_requests_total")
        victim.signal(signal.SIGTERM)
        signalled.set()
        victim.wait_line("shutdown stage unregister", 10)
        after_unregister = metric(survivor, "dynamo_component_requests_total")
        # Requests keep flowing to the survivor while the victim drains.
        wait_until(lambda: metric(survivor, "dynamo_component_requests_total")
                   >= after_unregister + 32, 60, "the survivor to take the load")
        stop.set()
        for f in futures:
            f.result(timeout=120)
    assert victim.wait(60) == 0, victim.tail()
    assert not errors, errors[:3]
    assert served_before > 0
    assert sum(1 for after, _f, _n in results if after) >= 32
    bad = [r for r in results if r[1] != "length"]
    assert not bad, bad[:5]
    lines = victim.lines
    order = [next(i for i, ln in enumerate(lines) if f"shutdown stage {st}" in ln)
             for st in ("unregister", "router_grace", "inflight", "cleanup")]
    assert order == sorted(order), victim.tail()


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
    _text, usage = stream_chat(c, "dyn-mock", max_tokens=6)
    # The mocker samples random ids, which may decode to nothing (ids past the tokenizer's
    # vocabulary, special tokens): the token count is what is certain.
    assert usage is not None and usage.completion_tokens == 6  # type: ignore[attr-defined]
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
    wait_until(lambda: _health_workers(url, "dyn-kv") == 2, 60, "both mockers in our view")
    c = client(url)
    cached = []
    for i in range(5):
        r = c.chat.completions.create(model="dyn-kv", max_tokens=2,
                                      messages=[{"role": "user", "content": LONG_PROMPT}])
        assert r.usage is not None
        details = r.usage.prompt_tokens_details
        cached.append((details.cached_tokens or 0) if details is not None else 0)
        if i == 0:
            # The mocker's KV events travel apart from the response: wait until the prompt's
            # blocks are in the router's index before routing the repeat.
            wait_until(lambda: metric_at(url, "dynamo_frontend_router_indexed_blocks") >= 8, 15,
                       "the first prompt's blocks in our router's index")
    assert all(x >= 16 * 8 for x in cached[1:]), cached


# -- mixed pools -------------------------------------------------------------------------------


@pytest.mark.parametrize("front", ["dynamo", "ours"])
def test_mixed_pool_behind_either_frontend(deployment: Deployment, front: str) -> None:
    """One Dynamo mocker and one of ours serve one model: both take requests. Behind Dynamo's
    frontend this needs equal card checksums (it rejects a worker whose card differs)."""
    theirs = deployment.dynamo_mocker("mixed", speedup=1000, system_port=0)
    ours = deployment.our_worker("mocker", "mixed", "--", "--speedup-ratio", "1000")
    if front == "dynamo":
        fe, url = deployment.dynamo_frontend()
        wait_for_model(url, "mixed")
        wait_for_instances(url, 2)
    else:
        fe, url = deployment.our_frontend()
        wait_for_model(url, "mixed")
        wait_until(lambda: metric(theirs, "dynamo_component_uptime_seconds") > 0, 30,
                   "the Dynamo mocker's status server")
    c = client(url)
    for i in range(12):
        r = c.chat.completions.create(model="mixed", max_tokens=3,
                                      messages=[{"role": "user", "content": f"{PROMPT} {i}"}])
        assert r.usage is not None and r.usage.completion_tokens == 3
    served = (metric(theirs, "dynamo_component_requests_total"),
              metric(ours, "dynamo_component_requests_total"))
    # Round robin over two workers: both served (a worker left out of the pool serves none).
    assert min(served) >= 3, (served, fe.tail(20))
    assert not any("Rejected incompatible" in ln for ln in fe.lines), fe.tail(20)


def _health_workers(url: str, model: str) -> int:
    """How many workers our frontend's /health lists for ``model``."""
    try:
        body = httpx.get(url + "/health", timeout=5.0, trust_env=False).json()
    except (httpx.HTTPError, ValueError):
        return 0
    n = body.get("models", {}).get(model, 0)
    return n if isinstance(n, int) else len(n)


def _metrics(url: str) -> str:
    try:
        return httpx.get(url + "/metrics", timeout=5.0, trust_env=False).text
    except httpx.HTTPError:
        return ""
