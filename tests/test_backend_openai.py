"""The OpenAI-compatible backend against a real server: llama.cpp's server on
127.0.0.1 serving the embedded GGUF, with a loopback proxy in front of it that
injects real HTTP faults (429/500/503 for a while, 401 for a bad key)."""

import http.server
import threading
import time

import httpx
import pytest
from conftest import free_port

from aloe.backends import ChatRequest, ProbRequest, Sampling, open_backend
from aloe.errors import BackendError, ConfigError

pytestmark = pytest.mark.integration


class FaultyProxy:
    """Forwards to the real server; answers the first ``faults`` POSTs with those status codes
    and, when ``key`` is set, 401s any request without ``Authorization: Bearer <key>``."""

    def __init__(self, upstream: str, faults=(), key: str | None = None):
        self.upstream, self.faults, self.key = upstream.removesuffix("/v1"), list(faults), key
        self.lock = threading.Lock()
        self.posts = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _auth_ok(self):
                return proxy.key is None or self.headers.get("Authorization") == f"Bearer {proxy.key}"

            def _send(self, code, body, ctype="application/json"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if not self._auth_ok():
                    return self._send(401, b'{"error": {"message": "invalid api key"}}')
                r = httpx.get(proxy.upstream + self.path, timeout=60)
                self._send(r.status_code, r.content)

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with proxy.lock:
                    proxy.posts += 1
                    fault = proxy.faults.pop(0) if proxy.faults else None
                if not self._auth_ok():
                    return self._send(401, b'{"error": {"message": "invalid api key"}}')
                if fault:
                    return self._send(fault, b'{"error": {"message": "injected fault"}}')
                r = httpx.post(
                    proxy.upstream + self.path, content=body, headers={"Content-Type": "application/json"}, timeout=120
                )
                self._send(r.status_code, r.content)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def backend(url, tmp_path=None, **kw):
    cfg = {"kind": "openai", "model": "smollm2-135m", "base_url": url, "max_concurrency": 3, **kw}
    b = open_backend(cfg, str(tmp_path / "c.sqlite") if tmp_path else None)
    b.backoff_base_s, b.backoff_max_s = 0.05, 0.2  # keep the test fast
    return b


REQS = [
    ChatRequest([{"role": "user", "content": q}], Sampling(max_tokens=12, seed=1))
    for q in ("What is the capital of France?", "Say hi.", "Name a colour.", "Name an animal.")
]


def test_chat_against_real_server(llama_server, tmp_path):
    b = backend(llama_server, tmp_path)
    out = b.chat(REQS)
    assert all(c.ok and c.text for c in out)
    # order preserved: greedy answers from the concurrent batch equal each request sent alone
    alone = backend(llama_server)
    assert [c.text for c in out] == [alone.chat([r])[0].text for r in REQS]
    assert len({c.text for c in out}) == len(REQS)
    again = b.chat(REQS)
    assert [c.text for c in again] == [c.text for c in out] and all(c.cached for c in again)


def test_logprobs_against_real_server(llama_server):
    b = backend(llama_server)
    r = ProbRequest(
        [{"role": "user", "content": "Pick a number from 1 to 5. Answer with one digit only."}],
        ("1", "2", "3", "4", "5"),
    )
    lp = b.logprobs([r])[0]
    assert lp.ok and not lp.exact
    seen = {c: v for c, v in lp.logprobs.items() if v is not None}
    assert seen and all(v <= 0 for v in seen.values())


def test_run_completes_through_429_and_500(llama_server):
    proxy = FaultyProxy(llama_server, faults=[429, 500, 503, 429, 500, 502])
    try:
        b = backend(proxy.url + "/v1", max_retries=8)
        out = b.chat(REQS)
        assert all(c.ok for c in out)
        assert b.retries >= 6 and proxy.posts >= len(REQS) + 6
    finally:
        proxy.close()


def test_gives_up_per_request_without_crashing(llama_server):
    proxy = FaultyProxy(llama_server, faults=[500] * 3)
    try:
        b = backend(proxy.url + "/v1", max_retries=2, max_concurrency=1)
        out = b.chat(REQS[:2])
        assert not out[0].ok and "HTTP 500" in out[0].error  # failure recorded, not text
        assert out[1].ok
    finally:
        proxy.close()


def test_bad_api_key_fails_at_once(llama_server, monkeypatch):
    proxy = FaultyProxy(llama_server, key="good-key")
    try:
        monkeypatch.setenv("ALOE_TEST_KEY", "bad-key")
        with pytest.raises(BackendError, match="refused the API key"):
            backend(proxy.url + "/v1", api_key_env="ALOE_TEST_KEY")
        monkeypatch.setenv("ALOE_TEST_KEY", "good-key")
        assert backend(proxy.url + "/v1", api_key_env="ALOE_TEST_KEY").chat(REQS[:1])[0].ok
    finally:
        proxy.close()


def test_missing_key_variable_and_unreachable_server(monkeypatch):
    monkeypatch.delenv("ALOE_NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="'ALOE_NO_SUCH_KEY' is not set"):
        backend("http://127.0.0.1:9/v1", api_key_env="ALOE_NO_SUCH_KEY")
    # a key with a newline (a paste gone wrong) is named as malformed, never echoed, never sent
    for bad in ("sk-secret\nmore", " sk-secret", "sk-sécret"):
        monkeypatch.setenv("ALOE_BAD_KEY", bad)
        with pytest.raises(ConfigError, match="'ALOE_BAD_KEY' is malformed") as e:
            backend("http://127.0.0.1:9/v1", api_key_env="ALOE_BAD_KEY")
        assert "secret" not in str(e.value) and "sécret" not in str(e.value)
    t = time.time()
    with pytest.raises(BackendError, match="cannot reach"):
        backend(f"http://127.0.0.1:{free_port()}/v1")
    assert time.time() - t < 15


def test_server_stopped_mid_run(tmp_path):
    """A real server that goes away: requests fail cleanly, and the error is clear."""
    from conftest import start_llama_server

    port = free_port()
    proc = start_llama_server(port)
    try:
        b = backend(f"http://127.0.0.1:{port}/v1", max_retries=1)
        assert b.chat(REQS[:1])[0].ok
        proc.terminate()
        proc.wait(timeout=30)
        with pytest.raises(BackendError, match="cannot reach"):
            b.chat(REQS[1:3])
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_cached_logprob_answer_counts_what_it_once_cost(llama_server, tmp_path):
    # a judge's log-probability call reads its prompt and is billed the one token it answers; asked
    # again, the cache answers it, and "what the cache saved" counts those tokens like a chat answer's
    r = ProbRequest([{"role": "user", "content": "Is water wet? Answer yes or no."}], ("yes", "no"))
    b = backend(llama_server, tmp_path)
    first = b.logprobs([r])[0]
    used = b.usage()
    assert first.ok and used["prompt_tokens"] > 5 and used["completion_tokens"] == 1
    assert (first.prompt_tokens, first.completion_tokens) == (used["prompt_tokens"], 1)
    again = backend(llama_server, tmp_path)
    assert again.logprobs([r])[0].cached
    u = again.usage()
    assert (u["calls"], u["cached_calls"]) == (0, 1)
    assert (u["cached_prompt_tokens"], u["cached_completion_tokens"]) == (used["prompt_tokens"], 1)
