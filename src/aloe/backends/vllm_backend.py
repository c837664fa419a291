"""vLLM offline engine (GPU). ``vllm`` is imported only when this backend is built.

Tensor parallelism comes from the config (``tensor_parallel_size``); for data
parallelism run several ``vllm serve`` processes and give the ``openai`` backend
their URLs as a list. Log-probabilities come from the top-k next-token list
(``SamplingParams(logprobs=k)``), mapped onto candidates like the HTTP backend.
Prompts that share a prefix (the same persona and history; the tree judge asked in both orders)
reuse its KV cache through vLLM's prefix caching, set explicitly (``enable_prefix_caching``, on by
default); the transformers backend groups them itself. How many prompt tokens came from that
cache is counted and logged when the engine closes.

Checked against vLLM 0.33.0's source:
- one prompt longer than the model's context (or exactly at it) makes ``LLM.chat`` raise for the
  whole batch, so prompts are measured first and such a request fails alone, like a failed HTTP
  request; what still escapes a batch is retried request by request;
- "the model's own default sampling" is resolved once from the generation config
  (:func:`aloe.backends.base.default_sampling`), as the transformers engine resolves it, instead of
  vLLM's ``get_default_sampling_params()`` (which ignores ``do_sample`` and applies top_k and the
  penalties that the transformers engine does not);
- the tokenizer is the Hugging Face one (``tokenizer_mode="hf"``), so both engines render the same
  prompt; a whole reply's token count is measured on the rendered prompt and checked by decoding;
- top-k log-probabilities of ids that decode to the same text are summed, not overwritten.

Tested twice: tests/test_backend_vllm.py drives this adapter through a stand-in ``vllm`` module
(vLLM 0.33's API), and its ``vllm``-marked tests run the real engine, vLLM 0.32's CPU build, in
.venv-vllm (``make test-vllm``); the ``gpu``-marked one adds what only a GPU shows (memory).
"""

from __future__ import annotations

import gc
import importlib
import logging
import math

from aloe.backends.base import (
    CandidateLogprobs,
    ChatBackend,
    ChatRequest,
    Completion,
    ProbRequest,
    default_sampling,
    match_candidates,
)
from aloe.cache import CallCache
from aloe.errors import AloeError

log = logging.getLogger(__name__)


def _generation_config(location: str, revision: str | None):
    """The model's generation config as transformers reads it; the library default (greedy) where
    the model has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(location, revision=revision)
    except (OSError, ValueError):
        return None


class VLLMBackend(ChatBackend):
    kind = "vllm"

    def __init__(
        self,
        location: str,
        model_id: str,
        revision: str,
        cache: CallCache | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        top_logprobs: int = 20,
        hf_revision: str | None = None,
        dtype: str = "auto",
    ):
        super().__init__(model_id, revision, cache)
        try:
            self._vllm = importlib.import_module("vllm")
        except ImportError:
            raise AloeError(
                "backend kind 'vllm' needs vLLM on a CUDA machine: "
                "pip install -c constraints/gpu.txt -e '.[vllm]' (see docs/models.md, GPU install)"
            ) from None
        kwargs = {
            "model": location,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "revision": hf_revision,
            "dtype": "auto" if dtype == "autocast-bf16" else dtype,
            # the Hugging Face tokenizer and chat template, as the transformers engine uses
            # ("auto" switches Mistral models to mistral_common, whose prompts differ)
            "tokenizer_mode": "hf",
            # vLLM refuses a whole batch asking for more top log-probabilities than this (20)
            "max_logprobs": max(20, top_logprobs),
            # explicit, so a run's behaviour does not depend on the vLLM release's default
            "enable_prefix_caching": enable_prefix_caching,
            "enforce_eager": enforce_eager,
        }
        self.dtype = kwargs["dtype"]
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        self.llm = self._vllm.LLM(**kwargs)
        self.top_logprobs = top_logprobs
        self.tensor_parallel_size = tensor_parallel_size
        self.prefix_caching = enable_prefix_caching
        self.prefix_hit_tokens = 0  # prompt tokens vLLM took from its prefix cache (RequestOutput.num_cached_tokens)
        self.max_model_len = self._context_length(max_model_len)
        self._defaults = default_sampling(_generation_config(location, hf_revision))

    def _context_length(self, configured: int | None) -> int | None:
        """The engine's context length (what vLLM checks prompts against)."""
        engine = getattr(self.llm, "llm_engine", None)
        found = getattr(getattr(engine, "model_config", None), "max_model_len", None)
        return int(found) if isinstance(found, int) else configured

    def default_sampling(self) -> dict:
        return dict(self._defaults)

    def _prompt_len(self, messages, **template) -> int:
        tok = self.llm.get_tokenizer()
        enc = tok.apply_chat_template(list(messages), tokenize=True, **template)
        return len(enc["input_ids"] if hasattr(enc, "keys") else enc)

    def _too_long(self, n: int) -> str | None:
        """Why vLLM would refuse a prompt of ``n`` tokens (and with it the whole batch), or None."""
        if self.max_model_len and n >= self.max_model_len:
            return (
                f"prompt of {n} tokens does not fit the model's context of {self.max_model_len} "
                f"(max_model_len); shorten the conversation or raise max_model_len"
            )
        return None

    def _chat_each(self, items: list, params, **kw) -> list:
        """``LLM.chat`` over ``items`` (message lists); if the batch raises, each request alone, so one
        bad request fails by itself (its slot holds the exception) and the rest still answer."""
        try:
            return list(self.llm.chat(items, sampling_params=params, use_tqdm=False, **kw))
        except Exception as e:  # noqa: BLE001 - vLLM raises ValueError subclasses, template errors, ...
            if len(items) == 1:
                return [e]
            log.warning(
                "vLLM refused a batch of %d (%s: %s); retrying its requests one by one",
                len(items),
                type(e).__name__,
                str(e)[:200],
            )
            out = []
            for j, m in enumerate(items):
                one = params[j] if isinstance(params, list) else params
                out += self._chat_each([m], [one] if isinstance(params, list) else one, **kw)
            return out

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
        if self.prompt_tokens:
            log.info(
                "vLLM %s: %d of %d prompt tokens came from its prefix cache (prefix caching %s)",
                self.model_id,
                self.prefix_hit_tokens,
                self.prompt_tokens,
                "on" if self.prefix_caching else "off",
            )
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
        return {
            **super().describe(),
            "tensor_parallel_size": self.tensor_parallel_size,
            "prefix_caching": self.prefix_caching,
        }

    def _params(self, r: ChatRequest):
        s, seed = r.sampling, r.sampling.seed * 1000 + r.sample_index
        temperature, top_p = s.temperature, s.top_p
        if s.model_default:  # resolved from the generation config as the transformers engine does
            temperature, top_p = self._defaults["temperature"], self._defaults["top_p"]
        return self._vllm.SamplingParams(temperature=temperature, top_p=top_p, max_tokens=s.max_tokens, seed=seed)

    def _generate(self, requests: list[ChatRequest]) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        todo = []
        for i, r in enumerate(requests):
            why = self._too_long(self._prompt_len(r.messages, add_generation_prompt=True))
            if why:
                results[i] = Completion(None, error=why)
            else:
                todo.append(i)
        outs = self._chat_each([list(requests[i].messages) for i in todo], [self._params(requests[i]) for i in todo])
        for i, o in zip(todo, outs):
            if isinstance(o, Exception):
                results[i] = Completion(None, error=f"vLLM refused the request: {type(o).__name__}: {str(o)[:300]}")
                continue
            c = o.outputs[0]
            n = len(c.token_ids)
            self.generated_tokens += n
            read = self._read(o)  # kept with the answer, so a later cache hit credits what it read
            results[i] = Completion(
                c.text.strip(), finish_reason=c.finish_reason, completion_tokens=n, prompt_tokens=read or None
            )
        return results  # type: ignore[return-value]

    def _score(self, requests: list[ProbRequest]) -> list[CandidateLogprobs]:
        """One-token candidates ("1".."5"): the next token's top-k list, the log-probabilities of ids
        that decode to the same text summed. A request with a longer candidate (a whole reply, for
        the likelihood judge) is scored exactly instead: the candidate is appended as the
        assistant's message and vLLM's prompt log-probabilities of its tokens are summed. Its token
        count is the rendered prompt's length with the reply minus without it, checked by decoding
        those tokens back to the reply; a mismatch fails that request with a message."""
        tok = self.llm.get_tokenizer()
        ntok = [{c: len(tok(c, add_special_tokens=False)["input_ids"]) for c in r.candidates} for r in requests]
        results: list[CandidateLogprobs | None] = [None] * len(requests)
        lens = [self._prompt_len(r.messages, add_generation_prompt=True) for r in requests]  # measured once
        for i, r in enumerate(requests):
            why = self._too_long(lens[i])
            if why:
                results[i] = CandidateLogprobs({c: None for c in r.candidates}, error=why)
        live = [i for i in range(len(requests)) if results[i] is None]
        exact = [i for i in live if max(ntok[i].values()) > 1]
        topk = [i for i in live if i not in set(exact)]
        if topk:
            self._score_topk(requests, topk, results)
        if exact:  # every candidate of every such request in one batch
            self._score_exact(requests, exact, lens, tok, results)
        return results  # type: ignore[return-value]

    def _score_topk(self, requests: list[ProbRequest], topk: list[int], results: list) -> None:
        """One-token candidates: the next token's top-k list, ids that decode to the same text summed."""
        params = self._vllm.SamplingParams(temperature=0.0, max_tokens=1, logprobs=self.top_logprobs)
        outs = self._chat_each([list(requests[i].messages) for i in topk], params)
        for i, o in zip(topk, outs):
            if isinstance(o, Exception):
                results[i] = CandidateLogprobs(
                    {c: None for c in requests[i].candidates},
                    error=f"vLLM refused the request: {type(o).__name__}: {o}",
                )
                continue
            step = (o.outputs[0].logprobs or [{}])[0]
            read = self._read(o)
            top: dict[str, float] = {}
            for lp in step.values():  # two ids may decode to the same text: sum, not overwrite
                if lp.decoded_token is not None:
                    prev = top.get(lp.decoded_token)
                    top[lp.decoded_token] = lp.logprob if prev is None else _logaddexp(prev, lp.logprob)
            results[i] = CandidateLogprobs(
                match_candidates(top, requests[i].candidates), exact=False, prompt_tokens=read or None
            )

    def _score_exact(self, requests: list[ProbRequest], exact: list[int], lens: list[int], tok, results: list) -> None:
        """Whole-reply candidates: each appended as the assistant's message, its prompt
        log-probabilities summed; a candidate over the context fails its request with the reason."""
        template = {"add_generation_prompt": False, "continue_final_message": True}
        got: dict[int, dict[str, tuple[float, int] | str]] = {i: {} for i in exact}
        pairs = []
        for i in exact:
            for c in requests[i].candidates:
                msgs = list(requests[i].messages) + [{"role": "assistant", "content": c}]
                why = self._too_long(self._prompt_len(msgs, **template))
                if why:
                    got[i][c] = why
                else:
                    pairs.append((i, c, msgs))
        params = self._vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outs = self._chat_each([m for _, _, m in pairs], params, **template) if pairs else []
        for (i, c, _), o in zip(pairs, outs):
            got[i][c] = self._reply_logprob(c, o, lens[i], tok)
        for i in exact:
            errors = [v for v in got[i].values() if isinstance(v, str)]
            cands = requests[i].candidates
            self.prompt_tokens += 0 if errors else lens[i]  # the prompt, as the transformers engine counts it
            results[i] = (
                CandidateLogprobs({c: None for c in cands}, error=errors[0])
                if errors
                else CandidateLogprobs(
                    {c: got[i][c][0] for c in cands},
                    exact=True,
                    tokens={c: got[i][c][1] for c in cands},
                    prompt_tokens=lens[i],
                )
            )

    def _read(self, o) -> int:
        """Count one answered request's prompt tokens, and those vLLM took from its prefix cache."""
        read = len(getattr(o, "prompt_token_ids", None) or [])
        self.prompt_tokens += read
        self.prefix_hit_tokens += int(getattr(o, "num_cached_tokens", None) or 0)
        return read

    @staticmethod
    def _reply_logprob(reply: str, o, without: int, tok) -> tuple[float, int] | str:
        """(summed log-probability, token count) of ``reply`` at the end of the rendered prompt, or
        why it cannot be read there."""
        if isinstance(o, Exception):
            return f"vLLM refused the request: {type(o).__name__}: {str(o)[:300]}"
        n = len(o.prompt_token_ids) - without  # the reply's tokens, as rendered in this prompt
        tail = tok.decode(o.prompt_token_ids[-n:], skip_special_tokens=True) if n > 0 else ""
        if n <= 0 or tail.strip() != reply.strip():
            return (
                f"the reply's tokens could not be located in the rendered prompt ({n} tokens decode to "
                f"{tail.strip()[:60]!r}, not the reply): the chat template changes the reply"
            )
        ids, lps = o.prompt_token_ids[-n:], o.prompt_logprobs[-n:]
        return float(sum(lp[t].logprob for t, lp in zip(ids, lps))), n


def _logaddexp(a: float, b: float) -> float:
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))
