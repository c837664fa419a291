"""The one backend interface every engine implements.

Two calls, both batched and order-preserving (result i answers request i):

* ``chat(requests)``: chat completion with explicit sampling parameters and seed.
* ``logprobs(requests)``: log-probabilities of given candidate continuations of the
  assistant turn ("1".."5", "first"/"second"); judges read these instead of parsing text.

Every call goes through the SQLite :class:`~aloe.cache.CallCache`. Subclasses only
implement ``_generate`` and ``_score`` for the cache misses. A per-request failure
comes back as a result with ``error`` set (never cached, never fake text); a failure
that dooms every request (server unreachable, bad API key) raises BackendError.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Sequence

from aloe.cache import CallCache, cache_key

log = logging.getLogger(__name__)
_calls = threading.local()


@contextlib.contextmanager
def quiet_calls():
    """In this thread, log each call at debug level: conversations scheduled one by one make
    thousands of one-request calls, and their stage logs its own progress lines instead."""
    _calls.quiet = True
    try:
        yield
    finally:
        _calls.quiet = False


Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass(frozen=True)
class Sampling:
    """Explicit sampling parameters. ``temperature=None`` (and ``top_p=None``) means the
    model's own default (its generation config; on a server, whatever it does when the
    request does not say), which the paper's evaluation protocol uses for the model under test."""

    temperature: float | None = 0.0
    top_p: float | None = 1.0
    max_tokens: int = 128
    seed: int = 0

    @property
    def model_default(self) -> bool:
        return self.temperature is None


# Generation-config keys no local engine here applies (the transformers engine's sampler knows
# temperature and top_p only), so the vLLM engine is not given them either: both sample alike.
_NOT_APPLIED = ("top_k", "min_p", "typical_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def default_sampling(generation_config) -> dict:
    """ "The model's own default sampling", resolved once from its generation config (a
    ``GenerationConfig`` or the dict of ``generation_config.json``) into explicit values that every
    local engine applies the same way: greedy unless ``do_sample`` is true, else its temperature and
    top_p (1.0 where unset). What it sets that no engine here applies is listed under ``ignored``."""
    if generation_config is None:
        given = {}
    elif isinstance(generation_config, dict):
        given = dict(generation_config)
    elif hasattr(generation_config, "to_diff_dict"):
        given = generation_config.to_diff_dict()  # only what the file sets, not the library's defaults
    else:
        given = dict(vars(generation_config))
    sample = bool(given.get("do_sample", False))
    out = {
        "do_sample": sample,
        "temperature": float(given.get("temperature") or 1.0) if sample else 0.0,
        "top_p": float(given.get("top_p") or 1.0) if sample else 1.0,
    }
    ignored = {k: given[k] for k in _NOT_APPLIED if given.get(k) is not None}
    if ignored:
        out["ignored"] = ignored
    return out


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]
    sampling: Sampling = field(default_factory=Sampling)
    sample_index: int = 0  # distinguishes repeated samples of the same prompt and seed
    prompt_version: str = ""  # e.g. "judge_pair@v1": bumping it invalidates cached answers

    def __post_init__(self):
        object.__setattr__(self, "messages", tuple(dict(m) for m in self.messages))


@dataclass
class Completion:
    text: str | None
    error: str | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None
    cached: bool = False
    prompt_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


@dataclass(frozen=True)
class ProbRequest:
    messages: tuple[Message, ...]
    candidates: tuple[str, ...]
    prompt_version: str = ""

    def __post_init__(self):
        object.__setattr__(self, "messages", tuple(dict(m) for m in self.messages))
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if len(set(self.candidates)) != len(self.candidates) or not self.candidates:
            raise ValueError(f"candidates must be distinct and non-empty: {self.candidates!r}")


@dataclass
class CandidateLogprobs:
    """Log-probability of each candidate as the start of the assistant reply.

    ``logprobs[c]`` is None when the backend did not report that candidate (an HTTP
    server returns only its top-k tokens). ``exact`` is True when the values are full
    continuation log-likelihoods (local model), False when they come from next-token
    top-k lists (first token of each candidate): those say nothing about a candidate's
    later tokens, so a likelihood judge refuses them.
    """

    logprobs: dict[str, float | None]
    exact: bool = True
    error: str | None = None
    cached: bool = False
    tokens: dict[str, int] | None = None  # tokens per candidate, where the values are exact (per-token means)
    prompt_tokens: int | None = None  # tokens the request read and generated, where the engine knows:
    completion_tokens: int | None = None  # kept in the cache, so a cached answer counts what it saved

    @property
    def ok(self) -> bool:
        return self.error is None and any(v is not None for v in self.logprobs.values())

    def probabilities(self) -> dict[str, float]:
        """Softmax over the candidates that were observed (renormalized to sum to 1)."""
        seen = {c: v for c, v in self.logprobs.items() if v is not None}
        if not seen:
            return {}
        m = max(seen.values())
        z = sum(math.exp(v - m) for v in seen.values())
        return {c: math.exp(v - m) / z for c, v in seen.items()}


def match_candidates(top: dict[str, float], candidates: Sequence[str]) -> dict[str, float | None]:
    """Map next-token top-k log-probabilities onto candidate continuations.

    A token counts for a candidate when, stripped of surrounding whitespace and
    compared case-insensitively, it equals the candidate or is a prefix that no other
    candidate shares ("fir" -> "first"). Several matching tokens (" 1", "1") are
    summed in probability space.
    """
    out: dict[str, float | None] = {}
    lowered = [c.strip().lower() for c in candidates]
    for cand, low in zip(candidates, lowered):
        total = 0.0
        for tok, lp in top.items():
            t = tok.strip().lower()
            if not t:
                continue
            if t == low or (low.startswith(t) and sum(o.startswith(t) for o in lowered) == 1):
                total += math.exp(lp)
        out[cand] = math.log(total) if total > 0 else None
    return out


class ChatBackend(ABC):
    """Base class: caching, bookkeeping; subclasses implement _generate/_score."""

    kind: str = "abstract"

    def __init__(self, model_id: str, revision: str, cache: CallCache | None = None):
        self.model_id = model_id
        self.revision = revision
        self.cache = cache if cache is not None else CallCache(None)  # an empty cache is falsy (__len__)
        self.failures = 0
        self.generated_tokens = 0  # engines add what they generate and read (where they know it)
        self.prompt_tokens = 0
        self.sent = 0  # requests sent to the engine (cache misses), chat and log-probability alike
        self.from_cache = 0  # requests answered from the cache
        self.cached_prompt_tokens = 0  # the tokens those cached answers cost when they were made
        self.cached_completion_tokens = 0
        self.replies: dict[str, list[int]] = {}  # prompt version -> [replies generated, their tokens]
        # conversations scheduled one by one (aloe.trees) call one engine from many threads
        self._book_lock = threading.Lock()

    # -- cache keys
    def key_identity(self) -> dict:
        """Engine settings besides model and revision that change answers (dtype, the model a
        server reports); subclasses add theirs. Part of every cache key."""
        return {}

    def prob_key_extra(self) -> dict:
        """Settings that change log-probability answers only (how many top tokens come back)."""
        return {}

    def _key(self, call: str, payload: dict) -> str:
        return cache_key(
            {
                "backend": self.kind,
                "model": self.model_id,
                "revision": self.revision,
                "engine": self.key_identity(),
                "call": call,
                **payload,
            }
        )

    def chat_key(self, r: ChatRequest) -> str:
        return self._key(
            "chat",
            {
                "messages": list(r.messages),
                "sampling": asdict(r.sampling),
                "sample_index": r.sample_index,
                "prompt_version": r.prompt_version,
            },
        )

    def prob_key(self, r: ProbRequest) -> str:
        return self._key(
            "logprobs",
            {
                "messages": list(r.messages),
                "candidates": list(r.candidates),
                "prompt_version": r.prompt_version,
                **self.prob_key_extra(),
            },
        )

    # Engines whose answers arrive one by one (HTTP) take ``done`` in _generate/_score and call
    # it with each result as it arrives, so it reaches the cache then, not when the batch ends.
    streams_results = False

    def _fresh(self, call, todo: list, keys: list[str], ok) -> list:
        """Run ``call`` (self._generate or self._score) on ``todo``. Where the engine streams its
        results, every good one is committed to the cache as it arrives (the cache runs SQLite in
        WAL mode with synchronous=NORMAL: a commit costs no fsync), so a SIGKILL loses at most the
        calls in flight and an interrupted batch keeps what arrived; else the batch's good results
        are committed when it returns."""
        if not todo:
            return []
        if not self.streams_results:
            fresh = call(todo)
            self.cache.put_many({k: asdict(r) for k, r in zip(keys, fresh) if ok(r)})
            return fresh
        return call(todo, done=lambda i, r: self.cache.put_many({keys[i]: asdict(r)}) if ok(r) else None)

    def _book_hits(self, keys: list[str], found: dict[str, dict]) -> None:
        """Count the requests the cache answered, and the tokens each answer cost when it was made
        (under ``_book_lock``)."""
        for k in keys:
            if k in found:
                self.from_cache += 1
                self.cached_prompt_tokens += found[k].get("prompt_tokens") or 0
                self.cached_completion_tokens += found[k].get("completion_tokens") or 0

    # -- public, cached calls
    def chat(self, requests: Sequence[ChatRequest]) -> list[Completion]:
        keys = [self.chat_key(r) for r in requests]
        found = self.cache.get_many(keys)
        todo = [i for i, k in enumerate(keys) if k not in found]
        # Identical requests in one batch are generated once.
        uniq: dict[str, int] = {}
        for i in todo:
            uniq.setdefault(keys[i], i)
        fresh = self._fresh(self._generate, [requests[i] for i in uniq.values()], list(uniq), lambda c: c.ok)
        by_key = dict(zip(uniq.keys(), fresh))
        out = []
        with self._book_lock:
            self.sent += len(uniq)
            self._book_hits(keys, found)
            for k in keys:
                if k in found:
                    out.append(Completion(**{**found[k], "cached": True}))
                else:
                    c = by_key[k]
                    if not c.ok:
                        self.failures += 1
                    out.append(c)
            for r, c in zip((requests[i] for i in uniq.values()), fresh):
                if c.ok and c.completion_tokens is not None:
                    tally = self.replies.setdefault(r.prompt_version, [0, 0])
                    tally[0] += 1
                    tally[1] += c.completion_tokens
        # one line per batch; the small calls of conversations scheduled one by one only in debug
        log.log(
            logging.DEBUG if getattr(_calls, "quiet", False) else logging.INFO,
            "%s chat: %d requests, %d cached, %d generated, %d failed",
            self.kind,
            len(requests),
            len(requests) - len(todo),
            len(uniq),
            sum(1 for c in fresh if not c.ok),
        )
        return out

    def logprobs(self, requests: Sequence[ProbRequest]) -> list[CandidateLogprobs]:
        keys = [self.prob_key(r) for r in requests]
        found = self.cache.get_many(keys)
        uniq: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in found:
                uniq.setdefault(k, i)
        fresh = self._fresh(self._score, [requests[i] for i in uniq.values()], list(uniq), lambda c: c.error is None)
        with self._book_lock:
            self.sent += len(uniq)
            self._book_hits(keys, found)
        by_key = dict(zip(uniq.keys(), fresh))
        out = []
        for k in keys:
            if k in found:
                out.append(CandidateLogprobs(**{**found[k], "cached": True}))
            else:
                out.append(by_key[k])
        return out

    def identity(self) -> dict:
        """What the cache keys know of this engine: kind, model, revision and the settings that
        change answers. Resumable files record it, so work made by another engine is not reused."""
        return {"kind": self.kind, "model": self.model_id, "revision": self.revision, **self.key_identity()}

    def describe(self) -> dict:
        return self.identity()

    def usage(self) -> dict:
        """What this engine was asked and did: requests sent and answered from the cache, prompt
        tokens read and tokens generated (as far as the engine reports them)."""
        return {
            "calls": self.sent,
            "cached_calls": self.from_cache,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.generated_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "cached_completion_tokens": self.cached_completion_tokens,
            # the replies' lengths per prompt: what `aloe estimate --replies-from` sizes replies by
            "replies": {v: {"calls": n, "completion_tokens": t} for v, (n, t) in sorted(self.replies.items())},
        }

    def default_sampling(self) -> dict | None:
        """What ``Sampling(temperature=None)`` (the model's own default) means on this engine, as
        explicit values (see :func:`default_sampling`); None where the engine decides (a server)."""
        return None

    def close(self) -> None:  # pragma: no cover - overridden where there is something to free
        pass

    @abstractmethod
    def _generate(self, requests: list[ChatRequest]) -> list[Completion]: ...

    @abstractmethod
    def _score(self, requests: list[ProbRequest]) -> list[CandidateLogprobs]: ...
