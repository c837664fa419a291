"""Cache keys name the engine as well as the request: a changed served model, server,
top_logprobs or dtype is a cache miss, never a stale answer from another model.

The HTTP cases run against real loopback servers (stdlib ``http.server``) that list the
models they serve the way ``vllm serve`` does (``id`` = the served name, ``root`` = the
weights) and answer chat completions.
"""

import http.server
import json
import threading

import pytest
from conftest import free_port

from aloe.backends import ChatRequest, ProbRequest, Sampling, open_backend
from aloe.errors import BackendError


class ModelServer:
    """Lists ``models`` ({served name: root or None}) at /v1/models and answers every chat
    completion with "ok" (and top log-probabilities when asked)."""

    def __init__(self, models: dict[str, str | None]):
        self.posts = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(
                    {"object": "list", "data": [{"id": k, **({"root": v} if v else {})} for k, v in models.items()]}
                )

            def do_POST(self):
                json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.posts += 1
                top = [{"token": "1", "logprob": -0.1}, {"token": "2", "logprob": -2.0}]
                self._send(
                    {
                        "choices": [
                            {
                                "message": {"role": "assistant", "content": "ok"},
                                "finish_reason": "stop",
                                "logprobs": {"content": [{"token": "1", "logprob": -0.1, "top_logprobs": top}]},
                            }
                        ],
                        "usage": {"completion_tokens": 1},
                    }
                )

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    made = []

    def make(models):
        s = ModelServer(models)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


REQ = ChatRequest([{"role": "user", "content": "hi"}], Sampling(max_tokens=4), prompt_version="p@v1")
PROB = ProbRequest([{"role": "user", "content": "1 or 2?"}], ("1", "2"), prompt_version="j@v1")


def http_backend(url, cache, **kw):
    return open_backend({"kind": "openai", "model": "m", "base_url": url, **kw}, cache)


def test_served_model_server_and_top_logprobs_miss_the_cache(tmp_path, servers):
    cache = str(tmp_path / "c.sqlite")
    a = servers({"m": "/weights/llama-8b", "m-other": "/weights/mistral-7b"})
    b = servers({"m": "/weights/llama-8b"})  # the same weights on another host
    c = servers({"m": "/weights/qwen-7b"})  # another model served under the same name
    first = http_backend(a.url, cache)
    assert first.chat([REQ])[0].text == "ok" and a.posts == 1
    # the same weights moved to another server: a hit (the key names the weights, not the host)
    moved = http_backend(b.url, cache)
    assert moved.chat([REQ])[0].cached and b.posts == 0
    # another model under the same served name: a miss
    other = http_backend(c.url, cache)
    assert not other.chat([REQ])[0].cached and c.posts == 1
    # another served model on the same server: a miss
    renamed = http_backend(a.url, cache, served_model="m-other")
    assert not renamed.chat([REQ])[0].cached and a.posts == 2
    # top_logprobs changes log-probability answers (a candidate may fall out of the top k), not chat ones
    lp5 = http_backend(a.url, cache, top_logprobs=5)
    lp20 = http_backend(a.url, cache, top_logprobs=20)
    assert lp5.prob_key(PROB) != lp20.prob_key(PROB) and lp5.chat_key(REQ) == lp20.chat_key(REQ)
    assert not lp20.logprobs([PROB])[0].cached and lp20.logprobs([PROB])[0].cached
    assert not lp5.logprobs([PROB])[0].cached


def test_a_server_that_does_not_list_the_model_is_keyed_by_its_url(tmp_path, servers):
    cache = str(tmp_path / "c.sqlite")
    a, b = servers({"something-else": None}), servers({"something-else": None})
    http_backend(a.url, cache).chat([REQ])
    assert not http_backend(b.url, cache).chat([REQ])[0].cached
    assert http_backend(a.url, cache).chat([REQ])[0].cached


def test_a_pool_serving_different_models_is_refused(servers):
    a, b = servers({"m": "/weights/a"}), servers({"m": "/weights/b"})
    with pytest.raises(BackendError, match="serve different models under 'm'"):
        http_backend([a.url, b.url], None)


@pytest.mark.integration
def test_dtype_is_part_of_the_key(smollm):
    from aloe.backends.transformers_backend import TransformersBackend
    from aloe.models import hf_location, resolve_model

    bf16 = TransformersBackend(
        hf_location(resolve_model("smollm2-135m")), smollm.model_id, smollm.revision, None, dtype="bfloat16"
    )
    assert (smollm.dtype_used, bf16.dtype_used) == ("float32", "bfloat16")
    assert smollm.chat_key(REQ) != bf16.chat_key(REQ) and smollm.prob_key(PROB) != bf16.prob_key(PROB)
    assert bf16.describe()["compute_dtype"] == "bfloat16"
