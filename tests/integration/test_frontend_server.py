"""The one-command server for real: ``dynamo-backend run`` as a subprocess (echo workers as
subprocesses, the frontend in it), driven by the official ``openai`` client and by raw HTTP."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

MODEL = "tiny-model"
START_TIMEOUT = 60.0
_URL_RE = re.compile(r"Serving (\S+) at (http://\S+/v1)")
_PID_RE = re.compile(r"worker (\d+)/\d+ started \(pid (\d+)\)")
# A plain-text prompt: no special tokens, so the echo engine never meets an EOS token in it.
PROMPT = "The quick brown fox jumps over the lazy dog"


class RunServer:
    """``dynamo-backend run`` in a subprocess; output lines are collected by a thread."""

    def __init__(self, *args: str, command: str = "run") -> None:
        self.argv = [sys.executable, "-m", "dynamo_backend_common.cli", command, "--port", "0",
                     *args]
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.model = ""
        self.worker_pids: dict[int, int] = {}
        self.eof = False

    def start(self) -> RunServer:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        threading.Thread(target=self._pump, daemon=True).start()
        line = self.wait_for_line(lambda s: _URL_RE.search(s) is not None, START_TIMEOUT)
        m = _URL_RE.search(line)
        assert m is not None
        self.model, self.url = m.group(1), m.group(2)
        for s in self.lines:
            pm = _PID_RE.search(s)
            if pm:
                self.worker_pids[int(pm.group(1))] = int(pm.group(2))
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_for_line(self, pred: Callable[[str], bool], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching output line after {timeout}s:\n"
                                     + "\n".join(self.lines))
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.eof = True
                raise AssertionError("the server exited; output:\n" + "\n".join(self.lines))
            self.lines.append(line)
            if pred(line):
                return line

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> int:
        """SIGINT, then wait for the exit (and the workers it stops)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        # Drain what is left so the output is complete.
        while not self.eof:
            try:
                line = self._q.get(timeout=5)
            except queue.Empty:
                break
            if line is None:
                self.eof = True
                break
            self.lines.append(line)
        return code


@pytest.fixture(scope="module")
def server() -> Iterator[RunServer]:
    srv = RunServer("--engine", "echo", "--workers", "2", "--", "--delay-ms", "2").start()
    yield srv
    code = srv.stop()
    out = srv.output()
    assert code == 0, out
    assert "stopping 2 worker(s)" in out and out.rstrip().endswith("stopped"), out
    for pid in srv.worker_pids.values():  # every worker was reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture
def client(server: RunServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=30)


def base(server: RunServer) -> str:
    return server.url.removesuffix("/v1")


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def worker_status_urls(server: RunServer) -> list[str]:
    health = httpx.get(base(server) + "/health", timeout=5).json()
    return [i["status_url"] for i in health["instances"]]


def workers_metric(server: RunServer, name: str, **labels: str) -> float:
    return sum(metric(httpx.get(u + "/metrics", timeout=5).text, name, **labels)
               for u in worker_status_urls(server))


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling an external process's counter: there is no event to await


# ------------------------------------------------------------------------- openai client


def test_models_lists_the_served_model(server: RunServer, client: openai.OpenAI) -> None:
    assert server.model == MODEL
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_unary_with_usage_and_max_tokens(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=6)
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    # The echo engine returns the chat prompt: the template's "user" turn comes first.
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.message.content.startswith("user\nThe")
    assert r.usage is not None and r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert r.model == MODEL and r.id.startswith("chatcmpl-")


def test_chat_stream_with_include_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert text.startswith("user\nThe")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_unary_and_stream_agree(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 12
    # The prompt is echoed back token by token (a BOS, if any, is a skipped special token).
    assert PROMPT.startswith(r.choices[0].text.lstrip())
    parts = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, stream=True)]
    assert "".join(parts) == r.choices[0].text


def test_stop_string_cuts_the_text(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, stop=["fox"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text.strip() == "The quick brown"
    s = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=40,
        stop=[" brown"], stream=True)
    chunks = list(s)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "user\nThe quick"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model",
                                       messages=[{"role": "user", "content": "hi"}])
    assert exc.value.code == "model_not_found"


def test_invalid_parameter_is_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5000)
    assert exc.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       n=9)  # above the frontend's max_n (8)
    assert exc.value.param == "n"


def test_n_choices_fan_out(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=6, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) == 1  # echo: the same text each time
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage is not None and r.usage.completion_tokens == 18
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, n=2,
                                       stream=True, stream_options={"include_usage": True})
    texts = ["", ""]
    finishes: list[str | None] = [None, None]
    usage = None
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            finishes[c.index] = finishes[c.index] or c.finish_reason
        usage = chunk.usage or usage
    assert texts[0] == texts[1] and texts[0].strip()
    assert finishes == ["length", "length"]
    assert usage is not None and usage.completion_tokens == 10


def test_client_disconnect_mid_stream_cancels_the_engine(
    server: RunServer, client: openai.OpenAI
) -> None:
    before = workers_metric(server, "dynamo_component_requests_finished_total",
                            status="cancelled")
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1500,
                                       stream=True, extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        got += len(chunk.choices[0].text) > 0
        if got >= 5:
            break
    stream.close()  # drop the connection: 1500 tokens at 2 ms would take 3 s
    # Only a cancellation counts as "cancelled" (a request left alone ends as "success").
    wait_until(lambda: workers_metric(server, "dynamo_component_requests_finished_total",
                                      status="cancelled") >= before + 1, 10,
               "the worker to count a cancelled request")
    front = httpx.get(base(server) + "/metrics", timeout=5).text
    wait_until(lambda: metric(httpx.get(base(server) + "/metrics", timeout=5).text,
                              "dynamo_frontend_requests_total", status="cancelled") >= 1, 5,
               "the frontend to count a cancelled request")
    assert metric(front, "dynamo_frontend_inflight_requests", model=MODEL) <= 1


def test_client_leaving_a_unary_n2_request_cancels_both_choices(server: RunServer) -> None:
    before = workers_metric(server, "dynamo_component_requests_finished_total",
                            status="cancelled")
    with pytest.raises(httpx.ReadTimeout), httpx.Client(timeout=0.5) as h:
        # 1500 tokens at 2 ms: the client gives up (and closes the connection) long before.
        h.post(server.url + "/completions", json={
            "model": MODEL, "prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True, "n": 2})
    # Two choices, two engine requests, both cancelled.
    wait_until(lambda: workers_metric(server, "dynamo_component_requests_finished_total",
                                      status="cancelled") >= before + 2, 5,
               "the workers to count both choices of the unary request cancelled")


def test_round_robin_shares_load_between_two_workers(
    server: RunServer, client: openai.OpenAI
) -> None:
    def decisions() -> dict[str, float]:
        text = httpx.get(base(server) + "/metrics", timeout=5).text
        ids = set(re.findall(r'dynamo_frontend_router_decisions_total\{[^}]*'
                             r'worker_id="([0-9a-f]+)"', text))
        return {i: metric(text, "dynamo_frontend_router_decisions_total", worker_id=i)
                for i in ids}

    before = decisions()
    for _ in range(6):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    after = decisions()
    assert len(after) == 2
    assert sorted(n - before.get(i, 0.0) for i, n in after.items()) == [3, 3]


def test_frontend_metrics_cover_requests_ttft_itl_and_tokens(server: RunServer,
                                                             client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    text = httpx.get(base(server) + "/metrics", timeout=5).text
    assert metric(text, "dynamo_frontend_requests_total", model=MODEL,
                  endpoint="completions", status="success") >= 1
    assert metric(text, "dynamo_frontend_time_to_first_token_seconds_count", model=MODEL) >= 1
    assert metric(text, "dynamo_frontend_inter_token_latency_seconds_count", model=MODEL) >= 1
    assert metric(text, "dynamo_frontend_output_tokens_total", model=MODEL) >= 4
    assert metric(text, "dynamo_frontend_model_workers", model=MODEL) == 2


# ------------------------------------------------------------------------------ README


def test_readme_client_snippets_work_as_written(server: RunServer,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    try:
        from test_readme import blocks
    finally:
        sys.path.pop(0)
    readme_url = "http://127.0.0.1:8000/v1"
    (snippet,) = blocks("python", "Set-up")
    assert readme_url in snippet
    exec(compile(snippet.replace(readme_url, server.url), "README.md", "exec"), {})
    assert capsys.readouterr().out == "user\nHello there\n"
    (curl,) = [b for b in blocks("bash", "Set-up") if b.startswith("curl")]
    if shutil.which("curl") is None:
        return
    out = subprocess.run(["bash", "-c", curl.replace(readme_url, server.url)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    body = json.loads(out)
    assert body["model"] == MODEL
    assert body["choices"][0]["message"]["content"] == "user\nHello there"
    assert body["choices"][0]["finish_reason"] == "stop"


# ------------------------------------------------------------------------------ raw HTTP


def _error(r: httpx.Response, status: int, code: str | None, param: str | None = None
           ) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return dict(err)


def test_raw_http_error_shapes(server: RunServer) -> None:
    url = server.url
    with httpx.Client(timeout=10) as h:
        _error(h.post(url + "/chat/completions", content=b"{not json",
                      headers={"content-type": "application/json"}), 400, "invalid_json")
        _error(h.post(url + "/chat/completions", json={"model": MODEL}), 400,
               "missing_required_parameter", "messages")
        _error(h.post(url + "/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}],
            "temperature": 7}), 400, "invalid_value", "temperature")
        _error(h.post(url + "/completions", json={"model": "nope", "prompt": "x"}), 404,
               "model_not_found", "model")
        err = _error(h.post(url + "/completions", json={
            "model": MODEL, "prompt": "word " * 3000}), 400, "context_length_exceeded")
        assert "maximum context length is 2048" in str(err["message"])
        _error(h.get(url + "/nothing-here"), 404, "not_found")
        _error(h.get(url + "/chat/completions"), 405, "method_not_allowed")
        assert h.get(base(server) + "/live").json() == {"status": "live"}


def test_body_over_the_limit_is_413(server: RunServer) -> None:
    big = b'{"model": "tiny-model", "prompt": "' + b"a" * (4 * 1024 * 1024) + b'"}'
    with httpx.Client(timeout=10) as h:
        _error(h.post(server.url + "/completions", content=big,
                      headers={"content-type": "application/json"}), 413, "request_too_large")


def test_stream_sse_framing_ends_with_done(server: RunServer) -> None:
    with httpx.Client(timeout=10) as h, h.stream("POST", server.url + "/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
        "stream": True,
    }) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


# --------------------------------------------------------------------------- lifecycle


def _pid_listening_on(port: int, pids: list[int]) -> int:
    """The pid (among ``pids``) that owns the TCP socket listening on ``port`` (Linux)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{parts[9]}]")
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no process among {pids} listens on {port}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_worker_killed_mid_stream_is_invisible_to_the_client() -> None:
    # Output that depends only on token positions, so a continued stream equals an unbroken one.
    engine = str(Path(__file__).resolve().parent.parent / "frontend_engines.py")
    srv = RunServer("--engine", f"{engine}:PositionalEngine", "--workers", "2", "--",
                    "--delay-ms", "3").start()
    try:
        c = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=30)
        n = 200
        expected = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=n)
        assert expected.usage is not None and expected.usage.completion_tokens == n
        stream = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=n, stream=True,
                                      stream_options={"include_usage": True})
        parts: list[str] = []
        killed = False
        usage = None
        for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].text)
            if chunk.usage is not None:
                usage = chunk.usage
            if not killed and len(parts) >= 20:
                # Find the worker serving this stream (its in-flight gauge is 1) and kill it.
                health = httpx.get(srv.url.removesuffix("/v1") + "/health").json()
                busy = [i for i in health["instances"] if metric(
                    httpx.get(i["status_url"] + "/metrics").text,
                    "dynamo_component_inflight_requests") >= 1]
                assert len(busy) == 1, health
                port = int(busy[0]["address"].rsplit(":", 1)[1])
                pid = _pid_listening_on(port, list(srv.worker_pids.values()))
                os.kill(pid, signal.SIGKILL)
                killed = True
        assert killed
        assert "".join(parts) == expected.choices[0].text
        assert usage is not None and usage.completion_tokens == n
        assert usage.prompt_tokens == expected.usage.prompt_tokens
        srv.wait_for_line(lambda s: "exited with code -9" in s, 10)
        migrations = metric(httpx.get(srv.url.removesuffix("/v1") + "/metrics").text,
                            "dynamo_frontend_migrations_total")
        assert migrations == 1
    finally:
        assert srv.stop() == 0, srv.output()


def test_a_worker_that_fails_at_start_is_reported_with_its_log() -> None:
    srv = RunServer("--engine", "echo", "--workers", "1", "--", "--no-such-flag")
    with pytest.raises(AssertionError, match="server exited"):
        srv.start()
    assert srv.stop() == 1
    out = srv.output()
    assert "worker 1/1 exited with code 2 before it was ready" in out
    assert "--no-such-flag" in out  # the worker's own error message, from its log


def test_frontend_command_serves_workers_found_through_discovery(tmp_path: Path) -> None:
    """The multi-machine shape on one machine: a worker and ``dynamo-backend frontend`` as
    separate processes that only share the discovery directory."""
    discovery = f"file://{tmp_path}"
    worker = subprocess.Popen(
        [sys.executable, "-m", "dynamo_backend_common.cli", "worker", "--engine", "echo",
         "--model-path", str(Path(__file__).resolve().parents[2] / "src" /
                             "dynamo_backend_common" / "_data" / "tiny-model"),
         "--served-model-name", "tiny", "--discovery", discovery,
         "--graceful-shutdown-grace-secs", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    front = RunServer("--discovery", discovery, "--api-key", "k3y", command="frontend")
    try:
        line_re = re.compile(r"Frontend serving OpenAI API at (http://\S+/v1)")
        front.proc = subprocess.Popen(front.argv, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=front._pump, daemon=True).start()
        m = line_re.search(front.wait_for_line(lambda s: line_re.search(s) is not None, 30))
        assert m is not None
        c = openai.OpenAI(base_url=m.group(1), api_key="k3y", max_retries=0, timeout=30)
        wait_until(lambda: [x.id for x in c.models.list()] == ["tiny"], 30,
                   "the worker's model to appear")
        r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=5)
        assert r.usage is not None and r.usage.completion_tokens == 5
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=m.group(1), api_key="wrong", max_retries=0).models.list()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
        wait_until(lambda: [x.id for x in c.models.list()] == [], 30,
                   "the model to disappear with its worker")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        code = front.stop()
    assert code == 0, front.output()
    assert "shutting down" in front.output()


def test_run_starts_a_disaggregated_set() -> None:
    srv = RunServer("--engine", "mocker", "--prefill-workers", "1", "--decode-workers", "1",
                    "--", "--speedup-ratio", "0").start()
    try:
        out = srv.output()
        assert "starting 2 workers (1 prefill, 1 decode)" in out, out
        assert "(prefill, instance" in out and "(decode, instance" in out, out
        c = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=30)
        r = c.chat.completions.create(model=MODEL, max_tokens=5, extra_body={"ignore_eos": True},
                                      messages=[{"role": "user", "content": PROMPT}])
        assert r.usage is not None and r.usage.completion_tokens == 5
        root = srv.url.removesuffix("/v1")
        health = httpx.get(root + "/health", timeout=5).json()
        assert sorted(i["worker_type"] for i in health["instances"]) == ["decode", "prefill"]
        assert health["models"] == {MODEL: 1}  # the prefill worker serves no route itself
        fm = httpx.get(root + "/metrics", timeout=5).text
        assert metric(fm, "dynamo_frontend_disagg_requests_total", path="standard") == 1
        (prefill,) = [i for i in health["instances"] if i["worker_type"] == "prefill"]
        pm = httpx.get(prefill["status_url"] + "/metrics", timeout=5).text
        assert metric(pm, "dynamo_mocker_kv_transfers_total", role="prefill",
                      outcome="completed") == 1
    finally:
        assert srv.stop() == 0, srv.output()


def test_run_refuses_prefill_workers_with_nothing_to_decode() -> None:
    p = subprocess.run([sys.executable, "-m", "dynamo_backend_common.cli", "run", "--engine",
                        "mocker", "--prefill-workers", "2"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "--prefill-workers needs --decode-workers" in p.stdout
