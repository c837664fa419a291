"""vLLM offline engine (GPU). ``vllm`` is imported only when this backend is built.

Tensor parallelism comes from the config (``tensor_parallel_size``); for data
parallelism run several ``vllm serve`` processes and give the ``openai`` backend
their URLs as a list. Log-probabilities come from the top-k next-token list
(``SamplingParams(logprobs=k)``), mapped onto candidates like the HTTP backend.
Prompts that share a prefix (the tree judge asked in both orders) are left to vLLM's
own automatic prefix caching; the transformers backend groups them itself.

Not run in CI (no GPU there): tests/test_backends_vllm.py drives this adapter
through a stand-in ``vllm`` module, and a ``gpu``-marked test runs the real engine.
"""

from __future__ import annotations

import gc
import importlib

from aloe.backends.base import (CandidateLogprobs, ChatBackend, ChatRequest, Completion, ProbRequest,
                                match_candidates)
from aloe.cache import CallCache
from aloe.errors import AloeError


class VLLMBackend(ChatBackend):
    kind = "vllm"

    def __init__(self, location: str, model_id: str, revision: str, cache: CallCache | None = None,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85,
                 max_model_len: int | None = None, top_logprobs: int = 20, hf_revision: str | None = None,
                 dtype: str = "auto"):
        super().__init__(model_id, revision, cache)
        try:
            self._vllm = importlib.import_module("vllm")
        except ImportError:
            raise AloeError("backend kind 'vllm' needs vLLM on a CUDA machine: "
                            "pip install -c constraints/gpu.txt -e '.[vllm]' (see README, GPU install)") from None
        kwargs = {"model": location, "tensor_parallel_size": tensor_parallel_size,
                  "gpu_memory_utilization": gpu_memory_utilization, "revision": hf_revision,
                  "dtype": "auto" if dtype == "autocast-bf16" else dtype}
        self.dtype = kwargs["dtype"]
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.llm = self._vllm.LLM(**kwargs)
        self.top_logprobs = top_logprobs
        self.tensor_parallel_size = tensor_parallel_size

    def close(self) -> None:
        """Free the GPU. In vLLM 0.33 ``LLM`` has no ``shutdown()``: its engine lives in a subprocess that
        stops through the engine core's ``shutdown()`` (or garbage collection, which is not prompt),
        and until then a new ``LLM`` fails vLLM's free-memory check. Safe to call twice."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        stop = getattr(llm, "shutdown", None)  # newer vLLM releases have it
        if stop is None:
            stop = getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "shutdown", None)
        if callable(stop):
            stop()
        self.llm = None
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - vLLM brings torch
            pass

    def key_identity(self) -> dict:
        return {"dtype": self.dtype}

    def prob_key_extra(self) -> dict:
        return {"top_logprobs": self.top_logprobs}

    def describe(self) -> dict:
        return {**super().describe(), "tensor_parallel_size": self.tensor_parallel_size}

    def _params(self, r: ChatRequest):
        s, seed = r.sampling, r.sampling.seed * 1000 + r.sample_index
        if s.model_default:
            # the model's own generation config (vLLM reads generation_config.json)
            p = self.llm.get_default_sampling_params()
            p.max_tokens, p.seed = s.max_tokens, seed
            return p
        return self._vllm.SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=seed)

    def _generate(self, requests: list[ChatRequest]) -> list[Completion]:
        params = [self._params(r) for r in requests]
        outs = self.llm.chat([list(r.messages) for r in requests], sampling_params=params, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            n = len(c.token_ids)
            self.generated_tokens += n
            results.append(Completion(c.text.strip(), finish_reason=c.finish_reason, completion_tokens=n))
        return results

    def _score(self, requests: list[ProbRequest]) -> list[CandidateLogprobs]:
        """One-token candidates ("1".."5"): the next token's top-k list. A request with a longer
        candidate (a whole reply, for the likelihood judge) is scored exactly instead: the
        candidate is appended as the assistant's message and vLLM's prompt log-probabilities
        of its tokens are summed."""
        tok = self.llm.get_tokenizer()
        ntok = [{c: len(tok(c, add_special_tokens=False)["input_ids"]) for c in r.candidates} for r in requests]
        exact = [i for i, n in enumerate(ntok) if max(n.values()) > 1]
        results: list[CandidateLogprobs | None] = [None] * len(requests)
        topk = [i for i in range(len(requests)) if i not in set(exact)]
        if topk:
            params = self._vllm.SamplingParams(temperature=0.0, max_tokens=1, logprobs=self.top_logprobs)
            outs = self.llm.chat([list(requests[i].messages) for i in topk], sampling_params=params, use_tqdm=False)
            for i, o in zip(topk, outs):
                step = (o.outputs[0].logprobs or [{}])[0]
                top = {lp.decoded_token: lp.logprob for lp in step.values() if lp.decoded_token is not None}
                results[i] = CandidateLogprobs(match_candidates(top, requests[i].candidates), exact=False)
        if exact:
            pairs = [(i, c) for i in exact for c in requests[i].candidates]
            params = self._vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
            outs = self.llm.chat([list(requests[i].messages) + [{"role": "assistant", "content": c}] for i, c in pairs],
                                 sampling_params=params, use_tqdm=False, add_generation_prompt=False,
                                 continue_final_message=True)
            got: dict[int, dict[str, float]] = {}
            for (i, c), o in zip(pairs, outs):
                n = ntok[i][c]  # the prompt's last n tokens are the candidate's
                ids, lps = o.prompt_token_ids[-n:], o.prompt_logprobs[-n:]
                got.setdefault(i, {})[c] = float(sum(lp[t].logprob for t, lp in zip(ids, lps)))
            for i in exact:
                results[i] = CandidateLogprobs(got[i], exact=True, tokens=ntok[i])
        return results  # type: ignore[return-value]
