"""Disaggregated prefill/decode interop with the REAL NVIDIA Dynamo 1.6.1, both directions.

- 1: our frontend (``dynamo-backend frontend``) in front of Dynamo's mocker in both roles
  (``python -m dynamo.mocker --disaggregation-mode prefill`` / ``decode``), on Dynamo's
  standard path and on its bootstrap path (``--bootstrap-ports``).
- 2: Dynamo's frontend (``python -m dynamo.frontend``) in front of our mocker in both roles
  (``dynamo-backend worker --engine mocker --disaggregation-mode prefill`` / ``decode``), with
  and without our prefill worker advertising a bootstrap endpoint.
- Pools mixing Dynamo's mocker and ours behind Dynamo's frontend: decode (the cards must agree
  on ``needs``, which enters Dynamo's card checksum) and prefill (one prefill worker set per
  model, keyed by endpoint, ``model_type`` and ``worker_type``).

Which worker served which hop is read from the processes themselves: Dynamo's mockers count
requests per component on their ``/metrics`` (``prefill`` for the prefill role, ``backend``
for decode); our mocker counts its KV transfers (``dynamo_mocker_kv_transfers_total``: a decode
``completed`` is a pull of the KV that the prefill result named); our frontend counts its
disaggregation paths and the roles it sent to; Dynamo's frontend logs each request's
``prefill_worker_id`` and ``decode_worker_id``.

The wire facts these depend on (captured from the real binaries with strace):

- Dynamo's prefill mocker puts ``disaggregated_params`` (``"dummy"``) on its token chunk, then
  ends with a terminal chunk (no tokens, ``length``) without them;
- on the bootstrap path Dynamo's mocker requires ``bootstrap_info.handoff_id`` (a UUID, a
  16-byte msgpack bin) and the same request id on both hops;
- a Dynamo decode card ``needs`` ``[["prefill"]]``, a prefill card ``[["decode"]]``; its
  frontend lists a decode-only model only once a prefill worker is there;
- a Dynamo prefill card has ``model_type`` ``""`` and registers on ``dynamo.prefill.generate``;
  its frontend serves a model only with a single prefill worker set.

Everything shares one file-discovery directory, the TCP request plane and ZMQ events
(``dynamo_real.Deployment``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import openai
import pytest
from dynamo_real import (
    Deployment,
    Proc,
    _free_i16_port,
    deployment,
    generate_instances,
    models,
    wait_for_model,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration
_ = deployment  # the fixture, used by name below

MODEL = "dyn-disagg"
MAX_TOKENS = 8
N = 3  # requests per test: round robin would put one of them on a wrong worker
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30.0)


def samples(base_url: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` on ``base_url``'s /metrics whose labels include
    ``labels``; 0 if none."""
    text = httpx.get(base_url + "/metrics", timeout=5.0, trust_env=False).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def worker_id(base_url: str) -> int:
    """The instance id of one of our workers, from its /metrics (``worker_id`` label, hex)."""
    text = httpx.get(base_url + "/metrics", timeout=5.0, trust_env=False).text
    m = re.search(r'worker_id="([0-9a-f]+)"', text)
    assert m is not None, text[:2000]
    return int(m.group(1), 16)


def chat_n(url: str, n: int = N) -> list[str]:
    """``n`` chat completions through the openai client (the last one streamed), each with the
    whole ``MAX_TOKENS``; their response ids."""
    c = client(url)
    ids = []
    for i in range(n - 1):
        r = c.chat.completions.create(
            model=MODEL, max_tokens=MAX_TOKENS,
            messages=[{"role": "user", "content": f"The quick brown fox, take {i}"}])
        assert r.usage is not None and r.usage.completion_tokens == MAX_TOKENS, r
        assert r.usage.total_tokens == r.usage.prompt_tokens + MAX_TOKENS
        assert r.choices[0].finish_reason == "length"
        ids.append(r.id)
    chunks, usage, finish, sid = 0, None, None, ""
    for ch in c.chat.completions.create(
            model=MODEL, max_tokens=MAX_TOKENS, stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "The quick brown fox, streamed"}]):
        sid = ch.id
        if ch.choices:
            chunks += 1
            finish = ch.choices[0].finish_reason or finish
        if ch.usage is not None:
            usage = ch.usage
    assert usage is not None and usage.completion_tokens == MAX_TOKENS, usage
    assert finish == "length" and chunks > 0
    return [*ids, sid]


def line_with(*parts: str) -> Callable[[str], bool]:
    """A :meth:`Proc.wait_line` predicate: every part in the line (ANSI colours stripped)."""
    return lambda line: all(p in ANSI.sub("", line) for p in parts)


# -- 1: our frontend, Dynamo's mockers ----------------------------------------------------------


def _dynamo_pair(d: Deployment, *prefill_extra: str) -> tuple[Proc, Proc]:
    prefill = d.dynamo_mocker(MODEL, "--disaggregation-mode", "prefill", *prefill_extra,
                              speedup=1000, system_port=0)
    decode = d.dynamo_mocker(MODEL, "--disaggregation-mode", "decode", speedup=1000,
                             system_port=0)
    return prefill, decode


def _our_frontend_knows_both(d: Deployment) -> str:
    fe, url = d.our_frontend()
    # Each pool logs its worker joining: no request before the prefill pool has one (it would
    # be served aggregated).
    fe.wait_line(line_with(f"model {MODEL}: prefill worker", "joined"), 60)
    fe.wait_line(line_with(f"model {MODEL}: decode worker", "joined"), 60)
    wait_for_model(url, MODEL)
    return url


def _dynamo_served_each_hop(prefill: Proc, decode: Proc) -> None:
    """Dynamo's prefill mocker (component ``prefill``) served every prefill hop, its decode
    mocker (component ``backend``) every decode hop; neither served the other's."""
    requests = "dynamo_component_requests_total"
    assert samples(prefill.status_url, requests, dynamo_component="prefill",
                   dynamo_endpoint="generate") == N
    assert samples(decode.status_url, requests, dynamo_component="backend",
                   dynamo_endpoint="generate") == N


def test_our_frontend_disaggregates_over_dynamos_mockers(deployment: Deployment) -> None:
    """Standard path: the prefill hop (max_tokens 1) on Dynamo's prefill mocker, its
    ``disaggregated_params`` (on the token chunk, not the terminal) into the decode request's
    ``prefill_result``, the decode hop on Dynamo's decode mocker."""
    prefill, decode = _dynamo_pair(deployment)
    url = _our_frontend_knows_both(deployment)
    chat_n(url)

    disagg = "dynamo_frontend_disagg_requests_total"
    # "standard" counts a prefill that returned disaggregated_params, whose decode request
    # carried them: without them the request would have been served aggregated.
    assert samples(url, disagg, model=MODEL, path="standard") == N
    assert samples(url, disagg, model=MODEL, path="aggregated_fallback") == 0
    assert samples(url, "dynamo_frontend_prefill_errors_total", model=MODEL) == 0
    roles = "dynamo_frontend_worker_requests_total"
    assert samples(url, roles, model=MODEL, role="prefill") == N
    assert samples(url, roles, model=MODEL, role="decode") == N
    _dynamo_served_each_hop(prefill, decode)


def test_our_frontend_takes_the_bootstrap_path_with_dynamos_mockers(
        deployment: Deployment) -> None:
    """Dynamo's prefill mocker with ``--bootstrap-ports`` advertises ``disaggregated_endpoint``:
    both hops carry one ``bootstrap_info`` (room and ``handoff_id``) and the same request id,
    and Dynamo's decode mocker meets its prefill at the bootstrap server."""
    prefill, decode = _dynamo_pair(deployment, "--bootstrap-ports", str(_free_i16_port()))
    url = _our_frontend_knows_both(deployment)
    chat_n(url)

    disagg = "dynamo_frontend_disagg_requests_total"
    assert samples(url, disagg, model=MODEL, path="bootstrap") == N
    assert samples(url, disagg, model=MODEL, path="aggregated_fallback") == 0
    assert samples(url, "dynamo_frontend_prefill_errors_total", model=MODEL) == 0
    _dynamo_served_each_hop(prefill, decode)


# -- 2: Dynamo's frontend, our mockers ----------------------------------------------------------


def _our_worker(d: Deployment, role: str, *engine: str) -> Proc:
    # No router grace at teardown: nothing is routed to it by then.
    return d.our_worker("mocker", MODEL, "--disaggregation-mode", role,
                        "--graceful-shutdown-grace-secs", "0", "--",
                        "--speedup-ratio", "1000", *engine)


def _dynamo_frontend_routes(d: Deployment, n_instances: int) -> tuple[Proc, str]:
    fe, url = d.dynamo_frontend()
    fe.wait_line(line_with("Prefill router target activated", MODEL), 60)
    wait_for_model(url, MODEL)
    wait_until(lambda: len(generate_instances(url)) >= n_instances, 60,
               f"{n_instances} generate instances at {url}")
    return fe, url


def _hops_in_dynamo_log(fe: Proc, response_id: str) -> tuple[int, int]:
    """``(prefill_worker_id, decode_worker_id)`` Dynamo's frontend logs for the request it
    answered with ``response_id`` (``chatcmpl-<request id>``)."""
    rid = response_id.removeprefix("chatcmpl-")
    line = ANSI.sub("", fe.wait_line(
        line_with(f"request completed request_id={rid} ", "prefill_worker_id="), 10))
    p = re.search(r"prefill_worker_id=(\d+)", line)
    d = re.search(r"decode_worker_id=(\d+)", line)
    assert p is not None and d is not None, line
    return int(p.group(1)), int(d.group(1))


@pytest.mark.parametrize("bootstrap", [False, True], ids=["standard", "bootstrap"])
def test_dynamo_frontend_disaggregates_over_our_mockers(deployment: Deployment,
                                                        bootstrap: bool) -> None:
    """Dynamo's prefill router sends the prefill to our prefill worker and the decode to our
    decode worker, which pulls the KV that prefill left instead of prefilling. Standard: the
    decode request carries the prefill's ``disaggregated_params`` (our mocker's KV handle) as
    ``prefill_result``. Bootstrap (our prefill card advertises ``disaggregated_endpoint``):
    Dynamo 1.6.1 still runs the prefill first, then sends the decode with no
    ``prefill_result`` but both hops with one ``bootstrap_info`` (room, ``handoff_id``), and
    our decode pulls by room (seen on the wire; the counters below cannot tell the two
    apart, but a decode with neither would count ``local_prefill``)."""
    prefill = _our_worker(deployment, "prefill", *(["--bootstrap"] if bootstrap else []))
    decode = _our_worker(deployment, "decode")
    fe, url = _dynamo_frontend_routes(deployment, 2)
    responses = chat_n(url)

    transfers = "dynamo_mocker_kv_transfers_total"
    # Every prefill hop held its KV and every hold was pulled; every decode hop pulled the
    # KV its request named (none prefilled locally, none fell back to recomputing).
    assert samples(prefill.status_url, transfers, role="prefill", outcome="completed") == N
    assert samples(prefill.status_url, transfers, role="prefill", outcome="expired") == 0
    assert samples(decode.status_url, transfers, role="decode", outcome="completed") == N
    for outcome in ("local_prefill", "recomputed", "failed"):
        assert samples(decode.status_url, transfers, role="decode", outcome=outcome) == 0
    # And Dynamo's frontend says the same: each request's prefill on ours, decode on ours.
    ours = (worker_id(prefill.status_url), worker_id(decode.status_url))
    assert [_hops_in_dynamo_log(fe, r) for r in responses] == [ours] * N


def test_mixed_decode_pool_behind_dynamos_frontend(deployment: Deployment) -> None:
    """Dynamo's decode mocker and our decode worker share one decode pool (Dynamo's frontend
    keeps a worker set only for equal card checksums, which cover ``needs``), and our decode
    worker alone is no servable model: like Dynamo's, its card needs a prefill worker."""
    ours = _our_worker(deployment, "decode")
    fe, url = deployment.dynamo_frontend()
    fe.wait_line(line_with("Adding worker set to model", MODEL, "decode"), 60)
    wait_until(lambda: len(generate_instances(url)) >= 1, 60, "our decode instance")
    assert MODEL not in models(url)
    with pytest.raises(openai.APIStatusError) as err:
        client(url).chat.completions.create(model=MODEL, max_tokens=MAX_TOKENS,
                                            messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 503, err.value  # "not ready to serve requests yet"

    theirs = deployment.dynamo_mocker(MODEL, "--disaggregation-mode", "decode", speedup=1000,
                                      system_port=0)
    deployment.dynamo_mocker(MODEL, "--disaggregation-mode", "prefill", speedup=1000)
    fe.wait_line(line_with("Prefill router target activated", MODEL), 60)
    wait_for_model(url, MODEL)
    wait_until(lambda: len(generate_instances(url)) >= 3, 60, "3 generate instances")
    wait_until(lambda: samples(theirs.status_url, "dynamo_component_uptime_seconds") > 0, 30,
               "the Dynamo decode mocker's status server")
    chat_n(url, 2 * N)

    assert not any("Rejected incompatible" in ln for ln in fe.lines), fe.tail(20)
    served_theirs = samples(theirs.status_url, "dynamo_component_requests_total",
                            dynamo_component="backend", dynamo_endpoint="generate")
    # Ours cannot read the KV Dynamo's prefill mocker describes (``"dummy"``): it recomputes.
    served_ours = samples(ours.status_url, "dynamo_mocker_kv_transfers_total", role="decode",
                          outcome="recomputed")
    assert (served_theirs, served_ours) == (N, N), fe.tail(20)



def test_mixed_prefill_pool_behind_dynamos_frontend(deployment: Deployment) -> None:
    """Dynamo's prefill mocker and our prefill worker (on Dynamo's prefill endpoint,
    ``--component prefill``) form one prefill worker set: Dynamo's frontend serves the model
    and its prefill router sends prefills to both (a second prefill worker set, e.g. from a
    different ``model_type``, leaves the model unserved)."""
    theirs = deployment.dynamo_mocker(MODEL, "--disaggregation-mode", "prefill", speedup=1000,
                                      system_port=0)
    ours = deployment.our_worker("mocker", MODEL, "--disaggregation-mode", "prefill",
                                 "--component", "prefill", "--graceful-shutdown-grace-secs",
                                 "0", "--", "--speedup-ratio", "1000",
                                 # Its holds are never pulled: no drain wait at teardown.
                                 env={"DYN_PREFILL_DRAIN_TIMEOUT_S": "0"})
    deployment.dynamo_mocker(MODEL, "--disaggregation-mode", "decode", speedup=1000)
    fe, url = _dynamo_frontend_routes(deployment, 3)
    wait_until(lambda: samples(theirs.status_url, "dynamo_component_uptime_seconds") > 0, 30,
               "the Dynamo prefill mocker's status server")
    responses = chat_n(url, 2 * N)

    assert not any("Rejected incompatible" in ln for ln in fe.lines), fe.tail(20)
    prefills = [_hops_in_dynamo_log(fe, r)[0] for r in responses]
    assert prefills.count(worker_id(ours.status_url)) == N, prefills
    assert samples(theirs.status_url, "dynamo_component_requests_total",
                   dynamo_component="prefill", dynamo_endpoint="generate") == N
    # Dynamo's decode mocker never pulls our holds: each prefill we served is still held.
    assert samples(ours.status_url, "dynamo_mocker_kv_holds") == N
