"""The HTTP backend against a real loopback server that misbehaves on purpose: 5xx bursts,
Retry-After, slow answers past the deadline, malformed bodies, NaN/Inf/positive logprobs,
top-k lists without a candidate, a server that echoes the key. Nothing bad is cached, a batch
never crashes on one bad answer, an outage stops the stage, and a rerun against a healthy
server completes with nothing lost or duplicated."""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest
from conftest import LoopbackServer

from aloe.backends import ChatRequest, ProbRequest, Sampling, open_backend
from aloe.cache import CallCache
from aloe.errors import BackendError

CANARY = "sk-canary-7f3a9c1e5b2d4a6f8e0c"


def _chat_body(text="a fine reply", logprobs=None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"content": [logprobs]}
    return {"choices": [choice], "usage": {"completion_tokens": 3}}


GOOD_TOP = {
    "token": "3",
    "logprob": -0.2,
    "top_logprobs": [{"token": "3", "logprob": -0.2}, {"token": "4", "logprob": -1.9}],
}


class FaultServer(LoopbackServer):
    """Answers POSTs from ``faults`` first (each: a status code, or a dict with status, body
    (bytes or JSON), headers, delay), then healthily; ``always`` maps a request's last message
    to a fault given on every try. Records every request's Authorization header."""

    def __init__(self, faults=()):
        self.faults, self.lock, self.posts, self.seen_auth = list(faults), threading.Lock(), 0, []
        self.always: dict[str, object] = {}
        self.delay, self.answered = 0.0, 0  # seconds before each healthy answer; healthy answers sent
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body, headers=()):
                self.send_response(code)
                for k, v in dict(headers).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(200, json.dumps({"data": [{"id": "m"}]}).encode(), {"Content-Type": "application/json"})

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with srv.lock:
                    srv.posts += 1
                    srv.seen_auth.append(self.headers.get("Authorization"))
                    fault = srv.faults.pop(0) if srv.faults else None
                    fault = srv.always.get(req["messages"][-1]["content"], fault)
                if isinstance(fault, int):
                    fault = {"status": fault}
                if fault is None:
                    fault = {}
                if fault:  # {} (or None) is a healthy answer
                    time.sleep(fault.get("delay", 0))
                    body = fault.get("body", {"error": {"message": "injected fault"}})
                    if not isinstance(body, bytes):
                        body = json.dumps(body).encode()
                    return self._send(
                        fault.get("status", 200), body, {"Content-Type": "application/json", **fault.get("headers", {})}
                    )
                good = (
                    _chat_body(logprobs=GOOD_TOP)
                    if req.get("logprobs")
                    else _chat_body(f"reply to {req['messages'][-1]['content']}")
                )
                time.sleep(srv.delay)
                self._send(200, json.dumps(good).encode(), {"Content-Type": "application/json"})
                with srv.lock:
                    srv.answered += 1

        self.start(Handler)


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


def backend(url, cache=None, **kw):
    cfg = {"kind": "openai", "model": "m", "base_url": url, "max_concurrency": 1, "max_retries": 2, **kw}
    b = open_backend(cfg, cache)
    b.backoff_base_s, b.backoff_max_s = 0.01, 0.05  # fast tests; Retry-After still counts
    return b


def chats(n):
    return [ChatRequest([{"role": "user", "content": f"q{i}"}], Sampling(max_tokens=8)) for i in range(n)]


SCORE = [ProbRequest([{"role": "user", "content": f"score {i}"}], ("1", "2", "3", "4", "5")) for i in range(3)]


MALFORMED = {
    "a list body": {"body": [1, 2]},
    "no choices": {"body": {"choices": []}},
    "a string message": {"body": {"choices": [{"message": "hello"}]}},
    "content of numbers": {"body": {"choices": [{"message": {"content": 5}}]}},
    "an empty reply": {"body": _chat_body("   ")},
    "broken gzip": {"body": b"\x1f\x8bnot gzip at all", "headers": {"Content-Encoding": "gzip"}},
    "not JSON": {"body": b"<html>oops</html>"},
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_answer_fails_that_request_only_and_is_not_cached(server, tmp_path, kind):
    # the bad answer comes back on every try of the first request; the others are healthy
    server.always = {"q0": MALFORMED[kind]}
    cache = str(tmp_path / "c.sqlite")
    out = backend(server.url, cache).chat(chats(3))
    assert not out[0].ok and out[0].text is None and out[0].error
    assert [c.text for c in out[1:]] == ["reply to q1", "reply to q2"]
    assert len(CallCache(cache)) == 2
    # rerun, server healthy: the failed request is asked again, the others come from the cache
    server.always = {}
    again = backend(server.url, cache).chat(chats(3))
    assert [c.text for c in again] == ["reply to q0", "reply to q1", "reply to q2"]
    assert [c.cached for c in again] == [False, True, True] and len(CallCache(cache)) == 3


def test_content_parts_are_read_as_text(server):
    server.faults = [{"body": {"choices": [{"message": {"content": [{"type": "text", "text": "part one"}]}}]}}]
    assert backend(server.url).chat(chats(1))[0].text == "part one"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.5, "x", None])
def test_logprobs_that_are_not_log_probabilities_are_failures(server, tmp_path, bad):
    top = {"token": "3", "logprob": -0.1, "top_logprobs": [{"token": "3", "logprob": bad}]}
    raw = json.dumps(_chat_body(logprobs=top)).replace("NaN", "NaN").encode()  # Python writes NaN/Infinity
    server.always = {"score 0": {"body": raw}}
    cache = str(tmp_path / "c.sqlite")
    out = backend(server.url, cache).logprobs(SCORE)
    assert not out[0].ok and "log-probability" in out[0].error
    assert out[1].ok and out[2].ok and len(CallCache(cache)) == 2


def test_a_top_k_list_without_any_candidate_is_not_an_answer(server, tmp_path):
    top = {
        "token": "Hello",
        "logprob": -0.1,
        "top_logprobs": [{"token": "Hello", "logprob": -0.1}, {"token": "The", "logprob": -2.5}],
    }
    server.always = {"score 0": {"body": _chat_body(logprobs=top)}}
    cache = str(tmp_path / "c.sqlite")
    out = backend(server.url, cache).logprobs(SCORE[:2])
    assert not out[0].ok and "no candidate" in out[0].error and out[1].ok
    assert len(CallCache(cache)) == 1


def test_retry_after_is_honoured(server):
    server.faults = [{"status": 503, "headers": {"Retry-After": "1"}}]
    t0 = time.monotonic()
    out = backend(server.url).chat(chats(1))
    assert out[0].ok and time.monotonic() - t0 >= 1.0 and server.posts == 2


def test_a_request_has_an_overall_deadline(server):
    # every answer takes 1 s, each try may take 0.3 s: without a deadline 8 tries would run
    server.faults = [{"delay": 1.0, "body": _chat_body()}] * 20
    b = backend(server.url, timeout_s=0.3, max_retries=8, deadline_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(BackendError, match="cannot reach .* all 1 requests failed"):
        b.chat(chats(1))
    assert time.monotonic() - t0 < 2.5


def test_an_outage_of_5xx_stops_the_batch_instead_of_leaving_holes(server, tmp_path):
    server.faults = [500] * 9  # 3 requests x 3 tries
    cache = str(tmp_path / "c.sqlite")
    with pytest.raises(BackendError, match="all 3 requests failed; first: gave up after 3 attempt"):
        backend(server.url, cache).chat(chats(3))
    assert len(CallCache(cache)) == 0
    assert [c.text for c in backend(server.url, cache).chat(chats(3))] == ["reply to q0", "reply to q1", "reply to q2"]


def test_a_4xx_for_one_request_fails_that_request_and_a_refused_key_stops_the_batch(server):
    server.always = {"q0": {"status": 400, "body": {"error": {"message": "prompt too long"}}}}
    out = backend(server.url).chat(chats(2))
    assert not out[0].ok and "HTTP 400" in out[0].error and out[1].ok
    server.always = {"q0": 401, "q1": 401}
    with pytest.raises(BackendError, match="HTTP 401"):
        backend(server.url).chat(chats(2))


def test_the_key_never_reaches_errors_or_records(server, tmp_path, monkeypatch):
    # a hostile server echoes the Authorization header in its error body
    monkeypatch.setenv("ALOE_CANARY", CANARY)
    server.always = {"q0": {"status": 400, "body": {"error": f"bad request from Bearer {CANARY} key {CANARY}"}}}
    b = backend(server.url, str(tmp_path / "c.sqlite"), api_key_env="ALOE_CANARY")
    out = b.chat(chats(2))
    assert server.seen_auth[-1] == f"Bearer {CANARY}"  # it was sent (loopback http is allowed) ...
    assert CANARY not in out[0].error and "***" in out[0].error  # ... and never recorded
    assert CANARY not in json.dumps(b.describe()) and CANARY not in (tmp_path / "c.sqlite").read_bytes().decode(
        "latin-1"
    )


@pytest.mark.e2e  # runs `aloe run` (the Papermill pipeline) in a subprocess
def test_a_planted_key_appears_in_no_file_a_run_writes(server, tmp_path):
    """A whole run (personas, trees, evaluation) through the HTTP backend with a canary key; the
    server also echoes the key back in one error body. Then every file the run wrote (data,
    cache, reports, executed notebooks, logs) and its output are searched for the key."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    server.always = {}
    server.faults = [{"status": 400, "body": {"error": f"bad key Bearer {CANARY} ({CANARY})"}}]
    name = "canary-run"
    params = tmp_path / f"{name}.yaml"
    params.write_text(f"""experiment: {name}
data_root: {tmp_path / "data"}
cache_path: {tmp_path / "cache.sqlite"}
backend: {{kind: openai, model: m, base_url: '{server.url}', api_key_env: ALOE_CANARY_KEY, max_retries: 1}}
stages:
  personas: {{target_profiles: 4, target_personalities: 4}}
  trees: {{n_personas: 4, turns: 1, max_failed_share: 0.5}}
  evaluate: {{n_personas: 2, turns: 1, models: [base, oracle], n_boot: 50, judge_card: {{enabled: false}},
             max_failed_share: 0.5}}
""")
    reports = REPO / "reports" / name
    shutil.rmtree(reports, ignore_errors=True)
    env = {**os.environ, "ALOE_CANARY_KEY": CANARY}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "aloe",
            "run",
            str(params),
            "--only",
            "personas",
            "--only",
            "trees",
            "--only",
            "evaluate",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert server.seen_auth and all(a == f"Bearer {CANARY}" for a in server.seen_auth)  # it was used ...
    assert CANARY not in r.stdout + r.stderr
    written = [p for root in (tmp_path, reports) for p in root.rglob("*") if p.is_file()]
    assert len(written) > 20 and any(p.suffix == ".ipynb" for p in written)
    leaks = [str(p) for p in written if CANARY.encode() in p.read_bytes()]
    assert leaks == []  # ... and written nowhere
    failed = [
        t["failed"] for t in aloe_io().read_jsonl(tmp_path / "data" / name / "trees" / "trees.jsonl") if t["failed"]
    ]
    assert failed and "***" in failed[0]["error"]  # the echoed key, redacted where the failure is recorded
    shutil.rmtree(reports, ignore_errors=True)


def aloe_io():
    import aloe.io

    return aloe.io


@pytest.mark.integration  # runs aloe or a pipeline in a subprocess
def test_an_outage_mid_stage_fails_it_and_a_healthy_rerun_equals_an_uninterrupted_run(tmp_path):
    """Trees over HTTP: the server goes down (503 to every try) during turn 2; the stage fails
    with nothing written as done; rerun against the healthy server, it ends as a run that never
    saw the outage."""
    import aloe.personas
    import aloe.trees
    from aloe.backends.scripted import ScriptedBackend
    from aloe.config import stage_config
    from aloe.io import read_jsonl

    got = {}
    for name in ("straight", "outage"):
        srv = FaultServer()
        try:
            root = tmp_path / name
            common = dict(experiment="o", data_root=str(root), cache_path=str(root / "c.sqlite"))
            aloe.personas.run(
                stage_config(
                    "personas",
                    **common,
                    backend={"kind": "scripted", "model": "s"},
                    target_profiles=4,
                    target_personalities=4,
                ),
                ScriptedBackend(),
            )
            http = {"kind": "openai", "model": "m", "base_url": srv.url, "max_retries": 1, "max_concurrency": 2}
            cfg = stage_config(
                "trees",
                **common,
                backend=http,
                n_personas=3,
                turns=2,
                pair_judge="likelihood",
                roles={"judge": {"kind": "scripted", "model": "j"}},
            )
            from aloe.roles import open_roles

            if name == "outage":
                calls_in_turn_1 = 3 * 4  # simulator, inferrer, two replies per tree
                srv.faults = [None] * calls_in_turn_1 + [503] * 200
                with pytest.raises(BackendError, match=r"all \d+ requests failed"):
                    aloe.trees.run(cfg, open_roles(cfg, aloe.trees.ROLES))
                assert not cfg.paths.manifest("trees").exists()
                assert all(len(t["turns"]) == 1 and t["failed"] is None for t in read_jsonl(cfg.paths.trees))
                srv.faults = []
            counts = aloe.trees.run(cfg, open_roles(cfg, aloe.trees.ROLES))
            assert counts["trees"] == 3 and counts["failed_trees"] == 0 and counts["turns"] == 6
            got[name] = [
                (t["id"], [(n["turn"], n["user"], n.get("preferred")) for n in t["turns"]])
                for t in read_jsonl(cfg.paths.trees)
            ]
        finally:
            srv.close()
    assert got["outage"] == got["straight"]


# --------------------------------------------------------------------------- every answer kept as it arrives


def _cached(path) -> int:
    import sqlite3

    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
    finally:
        con.close()


@pytest.mark.integration  # runs aloe or a pipeline in a subprocess
def test_a_sigkill_mid_batch_loses_at_most_the_calls_in_flight(server, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO

    server.delay = 0.05
    cache = tmp_path / "c.sqlite"
    code = (
        f"import sys; sys.path.insert(0, {str(REPO / 'src')!r})\n"
        "from aloe.backends import ChatRequest, Sampling, open_backend\n"
        f"b = open_backend({{'kind': 'openai', 'model': 'm', 'base_url': {server.url!r}, 'max_concurrency': 4}}, "
        f"{str(cache)!r})\n"
        "print('sending', flush=True)\n"
        "b.chat([ChatRequest([{'role': 'user', 'content': f'q{i}'}], Sampling(max_tokens=8)) for i in range(600)])\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "sending"
    deadline = time.time() + 60
    while server.answered < 40 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    time.sleep(0.3)  # answers the server was sending when the client died
    answered, kept = server.answered, _cached(cache)
    assert 40 <= answered < 600
    assert answered - kept <= 4, f"{answered} answered, {kept} kept: more lost than the 4 in flight"
    # the rerun asks only for what was not kept
    before = server.posts
    b = backend(server.url, str(cache), max_concurrency=4)
    out = b.chat([ChatRequest([{"role": "user", "content": f"q{i}"}], Sampling(max_tokens=8)) for i in range(600)])
    assert all(c.ok for c in out) and server.posts - before == 600 - kept


def test_ctrl_c_stops_new_requests_and_keeps_the_answers_in_flight(server, tmp_path):
    import _thread
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (another test may
    server.delay = 0.05  # have left SIGINT ignored)
    cache = tmp_path / "c.sqlite"
    b = backend(server.url, str(cache), max_concurrency=4)
    threading.Timer(0.6, _thread.interrupt_main).start()  # Ctrl-C, 0.6 s into the batch
    with pytest.raises(KeyboardInterrupt):
        b.chat([ChatRequest([{"role": "user", "content": f"q{i}"}], Sampling(max_tokens=8)) for i in range(600)])
    sent = server.posts
    time.sleep(0.5)
    assert server.posts == sent < 100, "requests went on being sent after Ctrl-C"
    assert _cached(cache) == server.answered  # every answer that arrived was kept, in flight ones included
    signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------- rate limits and a pool


def test_the_limiter_holds_requests_and_tokens_per_minute_within_ten_percent(server):
    b = backend(server.url, max_concurrency=8, rpm=1200)  # 20 requests a second
    t0 = time.monotonic()
    assert all(c.ok for c in b.chat(chats(40)))
    rate = 40 / (time.monotonic() - t0) * 60
    assert 0.8 * 1200 <= rate <= 1.1 * 1200, rate
    # tokens: each request counts its prompt (4 characters a token) and max_tokens 8
    b = backend(server.url, max_concurrency=8, tpm=6000)  # 100 tokens a second; each request ~10
    t0 = time.monotonic()
    assert all(c.ok for c in b.chat(chats(30)))
    per = 8 + len("q10") // 4
    rate = 30 * per / (time.monotonic() - t0) * 60
    assert 0.7 * 6000 <= rate <= 1.1 * 6000, rate


def test_a_429_halves_the_rate_for_a_while():
    from aloe.backends.openai_backend import RateLimiter

    lim = RateLimiter(rpm=1200, tpm=None, penalty_s=10)
    t0 = time.monotonic()
    for _ in range(10):
        lim.acquire(1)
    fast = time.monotonic() - t0
    lim.slow_down()
    t0 = time.monotonic()
    for _ in range(10):
        lim.acquire(1)
    assert time.monotonic() - t0 > 1.6 * fast


def test_a_failing_server_leaves_the_pool_and_its_requests_go_to_the_others():
    bad, good = FaultServer([503] * 1000), FaultServer()
    try:
        b = backend([bad.url, good.url], max_concurrency=1, max_retries=6)
        out = b.chat(chats(30))
        assert all(c.ok for c in out)
        assert bad.posts <= 4, f"the failing server got {bad.posts} requests"
        assert good.posts >= 30 and b.pool.down() == [bad.url.rstrip("/")]
    finally:
        bad.close()
        good.close()


def test_a_server_taken_out_is_counted_once_probed_alone_and_routed_around_while_busy():
    from aloe.backends.openai_backend import _Pool

    pool = _Pool(("a", "b"), per_url=4, fail_after=3, cool_down_s=0.2)
    held = [pool.acquire(1) for _ in range(8)]
    assert sorted(u for u, _ in held) == ["a"] * 4 + ["b"] * 4  # the least busy server takes each request
    for u, epoch in held:  # a hangs: its 4 requests time out one after another
        if u == "a":
            pool.release(u, epoch, "failed")
    assert pool.down() == ["a"]
    assert pool._cool["a"] == 0.4, "the requests a had in flight when it was taken out counted against it again"
    for u, epoch in held:
        if u == "b":
            pool.release(u, epoch, "ok")
    assert [pool.acquire(1)[0] for _ in range(2)] == ["b", "b"]  # a is out
    time.sleep(0.25)
    probe = pool.acquire(1)
    assert probe[0] == "a"  # back from its cool-down: one request, the probe
    assert pool.acquire(1)[0] == "b"  # not a second one while the probe is out, though b is busier
    pool.release(*probe, "ok")
    assert pool.acquire(1)[0] == "a"  # answered: a takes requests again


def test_a_full_pool_makes_a_request_wait_for_a_slot_within_its_time():
    from aloe.backends.openai_backend import _Pool

    pool = _Pool(("a",), per_url=1)
    first = pool.acquire(1)
    t0 = time.monotonic()
    assert pool.acquire(0.2) is None and time.monotonic() - t0 >= 0.2
    threading.Timer(0.1, pool.release, (*first, "ok")).start()
    assert pool.acquire(2)[0] == "a"
