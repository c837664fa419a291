"""The vLLM adapter. CI has no GPU: a stand-in ``vllm`` module checks what the adapter
sends to vLLM's API (LLM(...), LLM.chat, SamplingParams) and how it reads results back.
This proves the adapter's plumbing, not that vLLM itself runs: see the gpu test below."""

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


def make_stand_in():
    mod = types.ModuleType("vllm")
    calls = {"init": None, "chat": [], "gpu_held": 0.0}

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    class Tokenizer:
        """One token per word: ids are positions in a growing vocabulary."""

        vocab: dict = {}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [self.vocab.setdefault(w, len(self.vocab) + 10) for w in text.split()]}

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
                raise ValueError(f"Free memory on device cuda:0 ({1 - calls['gpu_held']:.2f}) is less than desired "
                                 f"GPU memory utilization ({share:.2f})")
            calls["gpu_held"] += share
            calls["init"] = kw
            self.tok = Tokenizer()
            self.llm_engine = types.SimpleNamespace(engine_core=EngineCore(share))

        def get_tokenizer(self):
            return self.tok

        def get_default_sampling_params(self):
            return SamplingParams(temperature=0.6, top_p=0.9)  # as a generation_config.json would say

        def chat(self, messages, sampling_params=None, use_tqdm=True, add_generation_prompt=True,
                 continue_final_message=False):
            calls["chat"].append((messages, sampling_params))
            calls.setdefault("continue", []).append(continue_final_message)
            outs = []
            for i, m in enumerate(messages):
                sp = sampling_params[i] if isinstance(sampling_params, list) else sampling_params
                if sp.kw.get("prompt_logprobs") is not None:
                    # the prompt is "<system words> <user words> <assistant words>"; each token's
                    # log-probability is -0.1 x its position in the assistant's message, -9 elsewhere
                    ids = [t for turn in m for t in self.tok(turn["content"])["input_ids"]]
                    n = len(self.tok(m[-1]["content"])["input_ids"])
                    lps = [None] + [{t: FakeLogprob(-9.0, 1, "x")} for t in ids[1:len(ids) - n]]
                    lps += [{t: FakeLogprob(-0.1 * (j + 1), 1, "x")} for j, t in enumerate(ids[len(ids) - n:])]
                    outs.append(types.SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=lps, outputs=[
                        types.SimpleNamespace(text="", token_ids=[], finish_reason="length", logprobs=None)]))
                    continue
                if sp.kw.get("logprobs"):
                    lp = {1: FakeLogprob(-0.1, 1, "4"), 2: FakeLogprob(-2.5, 2, " 5"), 3: FakeLogprob(-4.0, 3, "The")}
                    comp = types.SimpleNamespace(text="4", token_ids=[1], finish_reason="length", logprobs=[lp])
                else:
                    comp = types.SimpleNamespace(text=f" reply to {m[-1]['content']} ", token_ids=[7, 8, 9],
                                                 finish_reason="stop", logprobs=None)
                outs.append(types.SimpleNamespace(outputs=[comp]))
            return outs

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod, calls


def test_vllm_adapter_with_stand_in(monkeypatch, tmp_path):
    mod, calls = make_stand_in()
    monkeypatch.setitem(sys.modules, "vllm", mod)
    from aloe.backends import open_backend

    b = open_backend({"kind": "vllm", "model": "qwen2-7b", "tensor_parallel_size": 4, "max_model_len": 4096},
                     str(tmp_path / "c.sqlite"))
    assert calls["init"]["model"] == "Qwen/Qwen2-7B-Instruct"
    assert calls["init"]["tensor_parallel_size"] == 4 and calls["init"]["max_model_len"] == 4096
    assert calls["init"]["dtype"] == "auto"
    reqs = [ChatRequest([{"role": "user", "content": q}], Sampling(temperature=0.7, max_tokens=5, seed=2),
                        sample_index=i) for i, q in enumerate(["a", "b", "c"])]
    out = b.chat(reqs)
    assert [c.text for c in out] == ["reply to a", "reply to b", "reply to c"]
    msgs, params = calls["chat"][0]
    assert [m[-1]["content"] for m in msgs] == ["a", "b", "c"]
    assert [p.kw for p in params] == [{"temperature": 0.7, "top_p": 1.0, "max_tokens": 5, "seed": 2000 + i}
                                      for i in range(3)]
    lp = b.logprobs([ProbRequest([{"role": "user", "content": "rate"}], ("1", "2", "3", "4", "5"))])[0]
    assert lp.logprobs["4"] == pytest.approx(-0.1) and lp.logprobs["5"] == pytest.approx(-2.5)
    assert lp.logprobs["1"] is None and not lp.exact
    assert b.chat(reqs)[0].cached  # through the same cache as every backend
    # a whole reply as the candidate (the likelihood judge): appended as the assistant's message,
    # its tokens' prompt log-probabilities summed, exact
    lp = b.logprobs([ProbRequest([{"role": "user", "content": "hi there"}], ("nice to meet you",))])[0]
    assert lp.exact and lp.tokens == {"nice to meet you": 4}
    assert lp.logprobs["nice to meet you"] == pytest.approx(-0.1 - 0.2 - 0.3 - 0.4)
    msgs, params = calls["chat"][-1]
    assert msgs[0][-1] == {"role": "assistant", "content": "nice to meet you"} and calls["continue"][-1] is True
    assert params.kw == {"temperature": 0.0, "max_tokens": 1, "prompt_logprobs": 0}
    # the paper protocol's "model default" sampling: vLLM's defaults from the model, with our cap and seed
    b.chat([ChatRequest([{"role": "user", "content": "d"}], Sampling(temperature=None, top_p=None, max_tokens=7, seed=3))])
    _, params = calls["chat"][-1]
    assert params[0].kw == {"temperature": 0.6, "top_p": 0.9} and (params[0].max_tokens, params[0].seed) == (7, 3000)


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


def test_vllm_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    from aloe.backends import open_backend
    from aloe.errors import AloeError

    with pytest.raises(AloeError, match="constraints/gpu.txt"):
        open_backend({"kind": "vllm", "model": "qwen2-7b"})


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed (GPU environment only)")
def test_vllm_real_engine_on_gpu(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from aloe.backends import open_backend

    b = open_backend({"kind": "vllm", "model": "smollm2-135m", "gpu_memory_utilization": 0.3}, None)
    out = b.chat([ChatRequest([{"role": "user", "content": "What is the capital of France?"}], Sampling(max_tokens=10))])
    assert out[0].ok and out[0].text
    lp = b.logprobs([ProbRequest([{"role": "user", "content": "Say a digit from 1 to 5."}], ("1", "2", "3", "4", "5"))])[0]
    assert lp.ok
    # the likelihood judge's exact path: a whole reply's log-probability from prompt log-probabilities
    lp = b.logprobs([ProbRequest([{"role": "user", "content": "Hi!"}], ("Hello! How are you today?",))])[0]
    assert lp.exact and lp.tokens["Hello! How are you today?"] > 1 and lp.logprobs["Hello! How are you today?"] < 0
