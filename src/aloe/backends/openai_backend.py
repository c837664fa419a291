"""Any OpenAI-compatible HTTP server: OpenAI, ``vllm serve``, llama.cpp's server.

Requests run concurrently (at most ``max_concurrency`` in flight), spread
round-robin over one or more base URLs (a pool of servers). 429, 5xx, timeouts
and refused connections are retried with exponential backoff and jitter; any other
4xx fails at once with the server's message, since retrying cannot fix it. The
API key comes from the environment variable named in the config, never from a
parameter file.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from aloe.backends.base import (CandidateLogprobs, ChatBackend, ChatRequest, Completion, ProbRequest,
                                match_candidates)
from aloe.cache import CallCache
from aloe.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class _Fatal(Exception):
    """A response that retrying cannot fix (4xx other than 408/409/425/429)."""


class OpenAIBackend(ChatBackend):
    kind = "openai"

    def __init__(self, base_url: str | tuple[str, ...], served_model: str, model_id: str, revision: str,
                 cache: CallCache | None = None, api_key_env: str | None = None, max_concurrency: int = 8,
                 timeout_s: float = 120.0, max_retries: int = 6, top_logprobs: int = 20,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 8.0):
        super().__init__(model_id, revision, cache)
        urls = (base_url,) if isinstance(base_url, str) else tuple(base_url)
        self.base_urls = tuple(u.rstrip("/") for u in urls)
        self._next_url = itertools.cycle(self.base_urls)
        self._url_lock = threading.Lock()
        self.served_model = served_model
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.top_logprobs = top_logprobs
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.retries = 0
        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ConfigError(f"backend.api_key_env: environment variable {api_key_env!r} is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(timeout=timeout_s, headers=headers,
                                   limits=httpx.Limits(max_connections=max_concurrency * len(self.base_urls)))
        self.server_model: str | None = None  # what the server says it serves under served_model (check())

    def key_identity(self) -> dict:
        # The model the server reports is the best identity (vLLM's `root` is the weights it
        # loaded); a server that does not list it is identified by its URLs instead.
        return {"served_model": self.served_model,
                "server": self.server_model or sorted(self.base_urls)}

    def prob_key_extra(self) -> dict:
        return {"top_logprobs": self.top_logprobs}

    def describe(self) -> dict:
        return {**super().describe(), "base_urls": list(self.base_urls)}

    def close(self) -> None:
        self.client.close()

    def check(self) -> None:
        """Fail early, clearly, when a server is unreachable or refuses the key."""
        for url in self.base_urls:
            try:
                r = self.client.get(f"{url}/models", timeout=10)
            except httpx.HTTPError as e:
                raise BackendError(f"cannot reach the OpenAI-compatible server at {url}: {e}") from None
            if r.status_code in (401, 403):
                raise BackendError(f"{url} refused the API key (HTTP {r.status_code}): {_excerpt(r)}")
            reported = _reported_model(r, self.served_model)
            if reported and self.server_model and reported != self.server_model:
                raise BackendError(f"the servers of one pool serve different models under {self.served_model!r}: "
                                   f"{self.server_model!r} and {reported!r} ({url})")
            self.server_model = self.server_model or reported

    # -- one request with retries
    def _post(self, payload: dict) -> dict:
        last = ""
        for attempt in range(self.max_retries + 1):
            with self._url_lock:
                url = next(self._next_url)
            try:
                r = self.client.post(f"{url}/chat/completions", json=payload)
                if r.status_code == 200:
                    return r.json()
                if r.status_code not in RETRY_STATUS:
                    raise _Fatal(f"{url} answered HTTP {r.status_code}: {_excerpt(r)}")
                last = f"HTTP {r.status_code}: {_excerpt(r)}"
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = f"{type(e).__name__}: {e}"
            if attempt < self.max_retries:
                self.retries += 1
                delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** attempt) * (0.5 + random.random())
                log.warning("retry %d/%d in %.1fs after %s", attempt + 1, self.max_retries, delay, last)
                time.sleep(delay)
        raise RuntimeError(f"gave up after {self.max_retries + 1} attempts: {last}")

    def _map(self, fn, items):
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(fn, items))

    def _generate(self, requests: list[ChatRequest]) -> list[Completion]:
        def one(r: ChatRequest) -> Completion:
            s = r.sampling
            payload = {"model": self.served_model, "messages": list(r.messages), "max_tokens": s.max_tokens,
                       # distinct samples of one prompt need distinct seeds on the server
                       "seed": s.seed * 1000 + r.sample_index}
            if not s.model_default:  # otherwise the server's (the model's) own defaults apply
                payload.update(temperature=s.temperature, top_p=s.top_p)
            try:
                data = self._post(payload)
                choice = data["choices"][0]
                text = choice["message"].get("content")
                usage = data.get("usage") or {}
                n = usage.get("completion_tokens")
                if n:
                    self.generated_tokens += n
                if text is None:
                    return Completion(None, error="server returned no content")
                return Completion(text.strip(), finish_reason=choice.get("finish_reason"), completion_tokens=n)
            except _Fatal as e:
                raise BackendError(str(e)) from None
            except (RuntimeError, KeyError, IndexError, ValueError) as e:
                return Completion(None, error=str(e))

        out = self._map(one, requests)
        _raise_if_all_unreachable(out, self.base_urls)
        return out

    def _score(self, requests: list[ProbRequest]) -> list[CandidateLogprobs]:
        def one(r: ProbRequest) -> CandidateLogprobs:
            payload = {"model": self.served_model, "messages": list(r.messages), "temperature": 0.0,
                       "max_tokens": 1, "logprobs": True, "top_logprobs": self.top_logprobs, "seed": 0}
            try:
                data = self._post(payload)
                content = ((data["choices"][0].get("logprobs") or {}).get("content")) or []
                if not content:
                    return CandidateLogprobs({c: None for c in r.candidates}, exact=False,
                                             error="server returned no logprobs")
                top = {t["token"]: t["logprob"] for t in content[0].get("top_logprobs") or []}
                first = content[0]
                top.setdefault(first["token"], first["logprob"])
                return CandidateLogprobs(match_candidates(top, r.candidates), exact=False)
            except _Fatal as e:
                raise BackendError(str(e)) from None
            except (RuntimeError, KeyError, IndexError, ValueError, TypeError) as e:
                return CandidateLogprobs({c: None for c in r.candidates}, exact=False, error=str(e))

        out = self._map(one, requests)
        _raise_if_all_unreachable(out, self.base_urls)
        return out


def _reported_model(r: httpx.Response, served: str) -> str | None:
    """The identity a ``/models`` listing gives the served model: vLLM's ``root`` (the weights'
    path or hub id) when present, else its ``id``; None when the listing does not name it."""
    try:
        entries = r.json().get("data") or []
    except (ValueError, AttributeError):
        return None
    for e in entries:
        if isinstance(e, dict) and e.get("id") == served:
            return str(e.get("root") or e["id"])
    return None


def _excerpt(r: httpx.Response, n: int = 300) -> str:
    return r.text[:n].replace("\n", " ")


def _raise_if_all_unreachable(results, urls) -> None:
    """Individual failures are data; every request failing to connect is a setup error."""
    errors = [r.error for r in results]
    if errors and all(e and ("ConnectError" in e or "Connection refused" in e) for e in errors):
        raise BackendError(f"cannot reach the OpenAI-compatible server at {', '.join(urls)}: {errors[0]}")
