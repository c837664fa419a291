import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub at test time


@pytest.fixture(scope="session")
def smollm():
    """The embedded model as a transformers backend in fp32 (exact batch/single equality)."""
    from aloe.backends.transformers_backend import TransformersBackend
    from aloe.models import hf_location, model_identity, resolve_model

    spec = resolve_model("smollm2-135m")
    mid, rev = model_identity(spec)
    return TransformersBackend(hf_location(spec), mid, rev, None, batch_size=4, dtype="float32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """A real HTTP server on 127.0.0.1 that serves ``handler`` from a daemon thread; ``url`` is its
    OpenAI-style base URL (ending in /v1). Subclasses build their handler and call start()."""

    def start(self, handler) -> None:
        import http.server
        import threading

        # headers and body go out in two writes: with Nagle's algorithm on, the body would wait for
        # the client's delayed ACK, about 40 ms a request on loopback
        handler.disable_nagle_algorithm = True
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        # a short poll: shutdown() waits up to one interval (0.5 s by default), at every test's end
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class JsonHandler(http.server.BaseHTTPRequestHandler):
    """A quiet handler of an OpenAI-style loopback server: ``_send`` answers JSON, GET lists model "m"."""

    def log_message(self, *a):
        pass

    def _send(self, body: dict):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"data": [{"id": "m"}]})


def start_llama_server(port: int) -> subprocess.Popen:
    from aloe.models import gguf_path, resolve_model

    gguf = gguf_path(resolve_model("smollm2-135m"))
    # stderr to a file, not a pipe: llama.cpp logs enough to fill a pipe and block
    log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--model_alias",
            "smollm2-135m",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    wait_until_serving(proc, f"http://127.0.0.1:{port}/v1", log.name, 120, "llama.cpp server")
    return proc


def wait_until_serving(proc: subprocess.Popen, url: str, log: str, seconds: float, name: str) -> None:
    """Wait until the OpenAI-style server ``proc`` answers ``{url}/models``; if it exits first, or is
    still not answering after ``seconds`` (then it is killed), raise with the end of its ``log``."""
    import httpx

    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {open(log).read()[-2000:]}")
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{name} did not start within {seconds} s: {open(log).read()[-2000:]}")


@pytest.fixture(scope="session")
def llama_server():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python[server] is installed by `make test`")
    port = free_port()
    proc = start_llama_server(port)
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random 2-layer Llama (hidden size 32) with the embedded model's tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from aloe.models import hf_location, resolve_model

    tok = AutoTokenizer.from_pretrained(hf_location(resolve_model("smollm2-135m")))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def pytest_collection_modifyitems(config, items):
    """Three tiers: ``e2e`` runs the Papermill pipeline (``aloe run``); ``integration`` loads a real
    model, starts a real server or child processes; ``unit`` is the rest (``make test-fast``).
    A test that uses the embedded model or a server is integration whatever it says."""
    for item in items:
        tiers = {m.name for m in item.iter_markers()} & {"e2e", "integration", "gpu", "vllm", "network"}
        if not tiers and {"smollm", "tiny_model", "llama_server"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
            tiers.add("integration")
        if not tiers:
            item.add_marker(pytest.mark.unit)
