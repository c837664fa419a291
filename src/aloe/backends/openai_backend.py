"""Any OpenAI-compatible HTTP server: OpenAI, ``vllm serve``, llama.cpp's server.

Requests run concurrently (at most ``max_concurrency`` in flight on each server), spread
round-robin over one or more base URLs (a pool of servers). A server that fails several times in a
row (refused, timed out, 5xx) leaves the rotation for a cool-down, doubled each time it fails again
when it comes back; its requests go to the others. ``rpm`` and ``tpm`` keep the run under a
provider's limits before the provider enforces them (a token bucket; a 429 halves the rate for a
while). 429, 5xx, timeouts
and refused connections are retried with exponential backoff and jitter; any other
4xx fails at once with the server's message, since retrying cannot fix it. The
API key comes from the environment variable named in the config, never from a
parameter file.

Every answer is checked before it is used: one parser per call type (``_chat_reply``,
``_top_logprobs``) checks the response's shape, and anything unexpected (a list body, a
string message, an empty reply, a non-finite or positive logprob, a top-k list that holds
no candidate) becomes a failed result for that request, never a crashed batch and never a
cached answer. ``Retry-After`` is honoured; each request has an overall deadline across its
retries. A batch whose every request failed to reach a server (refused connections, timeouts,
5xx to the end) raises BackendError: an outage stops the stage instead of filling it with holes.
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed, wait

import httpx

from aloe.backends.base import CandidateLogprobs, ChatBackend, ChatRequest, Completion, ProbRequest, match_candidates
from aloe.backends.http_safety import check_settings, redact_url
from aloe.cache import CallCache
from aloe.errors import BackendError, ConfigError, Unreachable

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


SETUP_STATUS = {401, 403, 404}  # wrong key, wrong URL or model: every request would fail the same way
UNREACHABLE = "unreachable: "  # prefix of a request that never got an answer (connection, timeout, 5xx)


class RateLimiter:
    """Requests and tokens per minute, as token buckets that start empty and hold at most one
    request (and one second's tokens), so the rate never runs ahead of the limit: ``acquire``
    waits until a request of ``tokens`` fits both. A 429 (``slow_down``) halves both rates for
    ``penalty_s``; they then return to the configured ones."""

    def __init__(self, rpm: float | None, tpm: float | None, penalty_s: float = 30.0):
        self.rpm, self.tpm, self.penalty_s = rpm, tpm, penalty_s
        self._lock = threading.Lock()
        self._req = 1.0  # what the buckets hold now
        self._tok = 0.0
        self._at = time.monotonic()
        self._slow_until = 0.0

    def _rates(self, now: float) -> tuple[float, float]:
        f = 0.5 if now < self._slow_until else 1.0
        return (self.rpm or 0) / 60 * f, (self.tpm or 0) / 60 * f

    def acquire(self, tokens: int) -> None:
        if not (self.rpm or self.tpm):
            return
        while True:
            with self._lock:
                now = time.monotonic()
                r, t = self._rates(now)
                dt, self._at = now - self._at, now
                self._req = min(1.0, self._req + r * dt)
                self._tok = min(max(t, tokens), self._tok + t * dt)
                need_r = 0.0 if not self.rpm else max(0.0, 1 - self._req) / r
                need_t = 0.0 if not self.tpm else max(0.0, tokens - self._tok) / t
                if need_r <= 0 and need_t <= 0:
                    if self.rpm:
                        self._req -= 1
                    if self.tpm:
                        self._tok -= tokens
                    return
                wait_s = max(need_r, need_t)
            time.sleep(min(wait_s, 1.0))

    def slow_down(self) -> None:
        with self._lock:
            self._slow_until = time.monotonic() + self.penalty_s


class _Pool:
    """The servers of one engine and their slots (``per_url`` requests in flight on each).

    A request takes a slot on the least busy server that is up, so a server that has stopped
    answering, whose slots fill with requests that wait for their timeout, stops getting new ones
    even before it is taken out. ``fail_after`` failures in a row take a server out for a cool-down,
    doubled each time it fails again right after returning; once the cool-down is over it gets one
    request, the probe, and the rest of its slots only when the probe is answered; the requests it
    had in flight when it was taken out do not count against it again. When every
    server is out, requests go to the first one back, so an outage of the whole pool fails the
    requests (and stops the stage) instead of leaving them waiting."""

    def __init__(self, urls: tuple[str, ...], per_url: int = 8, fail_after: int = 3, cool_down_s: float = 30.0):
        self.urls, self.per_url, self.fail_after, self.cool_down_s = urls, per_url, fail_after, cool_down_s
        self._cond = threading.Condition()
        self._busy = {u: 0 for u in urls}
        self._fails = {u: 0 for u in urls}
        self._down_until = {u: 0.0 for u in urls}
        self._cool = {u: cool_down_s for u in urls}
        self._probation = {u: False for u in urls}  # back from a cool-down, not yet answered
        self._epoch = {u: 0 for u in urls}  # how many times each was taken out
        self._turn = 0  # round-robin among equally busy servers

    def _open(self, u: str, now: float) -> bool:
        if self._busy[u] >= self.per_url or self._down_until[u] > now:
            return False
        return not self._probation[u] or self._busy[u] == 0  # a probe goes alone

    def _choose(self, now: float) -> str | None:
        n = len(self.urls)
        order = [self.urls[(self._turn + i) % n] for i in range(n)]
        open_ = [u for u in order if self._open(u, now)]
        if open_:
            self._turn += 1
            return min(open_, key=lambda u: self._busy[u])
        if all(self._down_until[u] > now for u in self.urls):  # the whole pool is out
            first = [u for u in sorted(self.urls, key=lambda u: self._down_until[u]) if self._busy[u] < self.per_url]
            return first[0] if first else None
        return None

    def acquire(self, timeout: float) -> tuple[str, int] | None:
        """(a server with a slot taken for one request, the server's epoch to give back with it), or
        None when no slot frees within ``timeout``."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                u = self._choose(now)
                if u is not None:
                    self._busy[u] += 1
                    return u, self._epoch[u]
                if now >= end:
                    return None
                back = [t - now for t in self._down_until.values() if t > now]
                self._cond.wait(min([end - now, 0.5, *back]))

    def release(self, url: str, epoch: int, outcome: str | None) -> None:
        """Give the slot back; ``outcome`` "ok", "failed" (refused, timed out, 5xx) or None (says
        nothing about the server: a 429, a 4xx). A failure of a request sent before the server was
        last taken out is already counted."""
        with self._cond:
            self._busy[url] -= 1
            if outcome == "ok":
                self._fails[url], self._cool[url], self._probation[url] = 0, self.cool_down_s, False
            elif outcome == "failed" and epoch == self._epoch[url]:
                self._failed(url)
            self._cond.notify_all()

    def _failed(self, url: str) -> None:
        self._fails[url] += 1
        if self._fails[url] >= self.fail_after and len(self.urls) > 1:
            self._down_until[url] = time.monotonic() + self._cool[url]
            log.warning(
                "%s failed %d times in a row: out of the pool for %.0f s, then probed with one request",
                redact_url(url),
                self._fails[url],
                self._cool[url],
            )
            self._cool[url] *= 2
            self._fails[url] = self.fail_after - 1  # one more failure after it returns: out again
            self._probation[url] = True
            self._epoch[url] += 1

    def down(self) -> list[str]:
        now = time.monotonic()
        return [u for u in self.urls if self._down_until[u] > now]


class _Fatal(Exception):
    """A response that dooms every request (a refused key, a wrong URL): the batch stops."""


class _Shape(Exception):
    """A 200 response whose body is not what the API promises."""


class _GaveUp(Exception):
    """No usable answer within the retries or the deadline."""


class OpenAIBackend(ChatBackend):
    kind = "openai"
    streams_results = True  # every answer reaches the cache as it arrives
    interrupt_grace_s = 30.0  # on Ctrl-C, how long the requests in flight may finish

    def __init__(
        self,
        base_url: str | tuple[str, ...],
        served_model: str,
        model_id: str,
        revision: str,
        cache: CallCache | None = None,
        api_key_env: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 6,
        top_logprobs: int = 20,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 8.0,
        deadline_s: float | None = None,
        rpm: float | None = None,
        tpm: float | None = None,
        allow_insecure_key: bool = False,
    ):
        check_settings(base_url, api_key_env, allow_insecure_key)  # before any request, whoever opens it
        super().__init__(model_id, revision, cache)
        urls = (base_url,) if isinstance(base_url, str) else tuple(base_url)
        self.base_urls = tuple(u.rstrip("/") for u in urls)
        self.pool = _Pool(self.base_urls, max_concurrency)
        self._count_lock = threading.Lock()
        self.limiter = RateLimiter(rpm, tpm)
        self.served_model = served_model
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.top_logprobs = top_logprobs
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        # one request's whole life, retries and waits included
        self.deadline_s = deadline_s if deadline_s is not None else timeout_s * (max_retries + 1) + 60
        self.retries = 0
        headers = {}
        self._secrets: list[str] = []
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ConfigError(f"backend.api_key_env: environment variable {api_key_env!r} is not set")
            if not key.isascii() or not key.isprintable() or key != key.strip():
                # an HTTP header cannot carry it; say so without echoing the key
                raise ConfigError(
                    f"backend.api_key_env: the key in environment variable {api_key_env!r} is "
                    f"malformed (it holds a newline, a space at either end, a control or a non-ASCII "
                    f"character); set it again without them"
                )
            headers["Authorization"] = f"Bearer {key}"
            self._secrets.append(key)
        self.client = httpx.Client(
            timeout=timeout_s,
            headers=headers,
            limits=httpx.Limits(max_connections=max_concurrency * len(self.base_urls)),
        )
        # max_concurrency applies to each server, however many threads call this engine at once (the
        # pool's slots; aloe.trees schedules trees one by one)
        self.workers = max_concurrency * len(self.base_urls)
        self.server_model: str | None = None  # what the server says it serves under served_model (check())

    def key_identity(self) -> dict:
        # The model the server reports is the best identity (vLLM's `root` is the weights it
        # loaded); a server that does not list it is identified by its URLs instead.
        return {
            "served_model": self.served_model,
            "server": self.server_model or sorted(redact_url(u) for u in self.base_urls),
        }

    def prob_key_extra(self) -> dict:
        return {"top_logprobs": self.top_logprobs}

    def describe(self) -> dict:
        return {**super().describe(), "base_urls": [redact_url(u) for u in self.base_urls]}

    def close(self) -> None:
        self.client.close()

    def check(self) -> None:
        """Fail early, clearly, when a server is unreachable or refuses the key."""
        for url in self.base_urls:
            try:
                r = self.client.get(f"{url}/models", timeout=10)
            except httpx.HTTPError as e:
                raise BackendError(
                    f"cannot reach the OpenAI-compatible server at {redact_url(url)}: {self._redact(str(e))}"
                ) from None
            if r.status_code in (401, 403):
                raise BackendError(f"{redact_url(url)} refused the API key (HTTP {r.status_code}): {self._excerpt(r)}")
            reported = _reported_model(r, self.served_model)
            if reported and self.server_model and reported != self.server_model:
                raise BackendError(
                    f"the servers of one pool serve different models under {self.served_model!r}: "
                    f"{self.server_model!r} and {reported!r} ({url})"
                )
            self.server_model = self.server_model or reported

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def _excerpt(self, r: httpx.Response, n: int = 160) -> str:
        """A server's error body, shortened and with anything key-like removed: it is recorded."""
        try:
            text = r.text
        except (httpx.HTTPError, UnicodeDecodeError):
            return "(unreadable body)"
        return self._redact(text[:n].replace("\n", " "))

    # -- one request with retries
    def _post(self, payload: dict):
        """The parsed JSON body of a 200 answer; retries 408/409/425/429/5xx, timeouts, broken
        connections and unreadable bodies, within ``deadline_s``; honours Retry-After. A request
        waiting to retry holds no slot."""
        start = time.monotonic()
        last = ""
        for attempt in range(self.max_retries + 1):
            remaining = self.deadline_s - (time.monotonic() - start)
            if remaining <= 0:
                last = f"deadline of {self.deadline_s:g} s passed; last: {last}"
                break
            data, last, wait = self._attempt(payload, remaining)
            if data is not None:
                return data
            if attempt < self.max_retries:
                self.retries += 1
                backoff = min(self.backoff_max_s, self.backoff_base_s * 2**attempt) * (0.5 + random.random())
                delay = max(backoff, wait or 0.0)
                if time.monotonic() - start + delay > self.deadline_s:
                    last = f"deadline of {self.deadline_s:g} s would pass waiting {delay:.1f} s; last: {last}"
                    break
                log.warning("retry %d/%d in %.1fs after %s", attempt + 1, self.max_retries, delay, last)
                time.sleep(delay)
        raise _GaveUp(f"{UNREACHABLE}gave up after {attempt + 1} attempt(s): {last}")

    def _attempt(self, payload: dict, remaining: float) -> tuple[dict | None, str, float | None]:
        """One try on one server: (the answer's body, "", None), or (None, why, the seconds the
        server asked to wait). Raises _Fatal for a refused key or a wrong URL, _GaveUp for a 4xx
        that retrying cannot mend."""
        self.limiter.acquire(_tokens(payload))
        got = self.pool.acquire(remaining)
        if got is None:
            return None, f"no server had a free slot within {remaining:.0f} s", None
        url, epoch = got
        outcome = None
        try:
            r = self.client.post(f"{url}/chat/completions", json=payload, timeout=min(self.timeout_s, remaining))
            if r.status_code == 200:
                outcome = "ok"
                try:
                    return r.json(), "", None
                except ValueError as e:
                    return None, f"HTTP 200 with an unreadable body ({type(e).__name__})", None
            if r.status_code in SETUP_STATUS:
                raise _Fatal(f"{redact_url(url)} answered HTTP {r.status_code}: {self._excerpt(r)}")
            if r.status_code not in RETRY_STATUS:
                raise _GaveUp(f"HTTP {r.status_code}: {self._excerpt(r)}")  # this request only
            if r.status_code == 429:
                self.limiter.slow_down()
            else:
                outcome = "failed"
            return None, f"HTTP {r.status_code}: {self._excerpt(r)}", retry_after(r.headers.get("Retry-After"))
        except httpx.HTTPError as e:  # timeouts, refused or broken connections, broken gzip
            outcome = "failed"
            return None, f"{type(e).__name__}: {self._redact(str(e))[:160]}", None
        finally:
            self.pool.release(url, epoch, outcome)

    def _generate(self, requests: list[ChatRequest], done=None) -> list[Completion]:
        def one(r: ChatRequest) -> Completion:
            s = r.sampling
            payload = {
                "model": self.served_model,
                "messages": list(r.messages),
                "max_tokens": s.max_tokens,
                # distinct samples of one prompt need distinct seeds on the server
                "seed": s.seed * 1000 + r.sample_index,
            }
            if not s.model_default:  # otherwise the server's (the model's) own defaults apply
                payload.update(temperature=s.temperature, top_p=s.top_p)
            try:
                data = self._post(payload)
                text, finish, n = _chat_reply(data)
            except (_GaveUp, _Shape) as e:
                return Completion(None, error=str(e))
            prompt = _usage(data, "prompt_tokens")
            with self._count_lock:
                self.generated_tokens += n or 0
                self.prompt_tokens += prompt or 0
            return Completion(text, finish_reason=finish, completion_tokens=n, prompt_tokens=prompt)

        out = self._map(one, requests, done)
        _raise_if_all_unreachable(out, self.base_urls)
        return out

    def _score(self, requests: list[ProbRequest], done=None) -> list[CandidateLogprobs]:
        def one(r: ProbRequest) -> CandidateLogprobs:
            payload = {
                "model": self.served_model,
                "messages": list(r.messages),
                "temperature": 0.0,
                "max_tokens": 1,
                "logprobs": True,
                "top_logprobs": self.top_logprobs,
                "seed": 0,
            }
            failed = CandidateLogprobs({c: None for c in r.candidates}, exact=False)
            try:
                data = self._post(payload)
                read, wrote = _usage(data, "prompt_tokens"), _usage(data, "completion_tokens")
                with self._count_lock:  # a server bills the one token it answers, too
                    self.prompt_tokens += read or 0
                    self.generated_tokens += wrote or 0
                matched = match_candidates(_top_logprobs(data), r.candidates)
            except (_GaveUp, _Shape) as e:
                failed.error = str(e)
                return failed
            if all(v is None for v in matched.values()):  # an answer that says nothing: not cached
                failed.error = f"no candidate ({', '.join(r.candidates)}) among the top {self.top_logprobs} tokens"
                return failed
            return CandidateLogprobs(matched, exact=False, prompt_tokens=read, completion_tokens=wrote)

        out = self._map(one, requests, done)
        _raise_if_all_unreachable(out, self.base_urls)
        return out

    def _map(self, fn, items, done=None):
        """``fn`` over ``items`` with at most ``max_concurrency`` in flight, results in order; each
        result goes to ``done(index, result)`` as it arrives (the cache keeps it then). Ctrl-C
        (KeyboardInterrupt) stops sending new requests at once, waits up to ``interrupt_grace_s``
        for those in flight (their answers are kept) and raises it again."""
        out: list = [None] * len(items)
        kept: set[int] = set()  # results handed to ``done`` (a Ctrl-C inside ``done`` leaves one out)
        pool = ThreadPoolExecutor(max_workers=self.workers)
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        try:
            for f in as_completed(futures):
                i = futures[f]
                out[i] = f.result()
                if done is not None:
                    done(i, out[i])
                    kept.add(i)
        except _Fatal as e:
            pool.shutdown(wait=False, cancel_futures=True)
            raise BackendError(str(e)) from None
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            running = [f for f in futures if not f.cancelled()]
            log.warning(
                "interrupted: no new requests; waiting up to %.0f s for %d in flight",
                self.interrupt_grace_s,
                sum(not f.done() for f in running),
            )
            finished, _ = wait(running, timeout=self.interrupt_grace_s)
            for f in finished:
                if done is not None and futures[f] not in kept and f.exception() is None:
                    done(futures[f], f.result())
            raise
        pool.shutdown(wait=True)
        return out


def _tokens(payload: dict) -> int:
    """What a request will count against a tokens-per-minute limit: its prompt (about 4 characters
    a token) and the most it may generate."""
    chars = sum(
        len(m.get("content") or "") if isinstance(m.get("content"), str) else 0 for m in payload.get("messages", [])
    )
    return chars // 4 + int(payload.get("max_tokens") or 0)


def _chat_reply(data) -> tuple[str, str | None, int | None]:
    """(text, finish_reason, completion tokens) of a chat completion body, or _Shape."""
    choice = _first_choice(data)
    message = choice.get("message")
    if not isinstance(message, dict):
        raise _Shape(f"malformed answer: choices[0].message is {type(message).__name__}, not an object")
    content = message.get("content")
    if isinstance(content, list):  # content parts: keep the text ones
        if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
            raise _Shape("malformed answer: content parts are not objects with text")
        content = "".join(p.get("text", "") for p in content if p.get("type", "text") == "text")
    if not isinstance(content, str):
        raise _Shape(f"malformed answer: message content is {type(content).__name__}, not text")
    if not content.strip():
        raise _Shape("empty reply")
    finish = choice.get("finish_reason")
    return content.strip(), finish if isinstance(finish, str) else None, _usage(data, "completion_tokens")


def _usage(data, key: str) -> int | None:
    """A token count from the body's ``usage``, or None where the server gives none (or nonsense)."""
    usage = data.get("usage") if isinstance(data, dict) else None
    n = usage.get(key) if isinstance(usage, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


def _top_logprobs(data) -> dict[str, float]:
    """{token: logprob} of the first generated token and its top-k list, each checked."""
    logprobs = _first_choice(data).get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not content or not isinstance(content[0], dict):
        raise _Shape("the server returned no logprobs")
    first = content[0]
    entries = [first, *(first.get("top_logprobs") or [])]
    top: dict[str, float] = {}
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("token"), str):
            raise _Shape("malformed logprobs: an entry without a token")
        lp = e.get("logprob")
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp) or lp > 1e-6:
            raise _Shape(f"malformed logprobs: {lp!r} for token {e['token'][:20]!r} is not a log-probability")
        top.setdefault(e["token"], min(float(lp), 0.0))  # rounding can give +1e-9
    return top


def _first_choice(data) -> dict:
    if not isinstance(data, dict):
        raise _Shape(f"malformed answer: the body is {type(data).__name__}, not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Shape("malformed answer: no choices")
    return choices[0]


def retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta seconds or an HTTP date), capped at 120."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), 120.0) if math.isfinite(seconds) else None


_KEYLIKE = re.compile(r"(Bearer\s+)\S+|\b(sk|hf|key|api)[-_][A-Za-z0-9_-]{8,}", re.IGNORECASE)


def redact(text: str, secrets=()) -> str:
    """``text`` with the given secrets and anything that looks like a key replaced by ***."""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return _KEYLIKE.sub(lambda m: (m.group(1) or "") + "***", text)


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


def _raise_if_all_unreachable(results, urls) -> None:
    """Individual failures are results; every request of a batch failing to get any answer
    (refused connections, timeouts, 5xx to the end) is an outage, and stops the stage."""
    errors = [r.error for r in results]
    if errors and all(e and e.startswith(UNREACHABLE) for e in errors):
        raise Unreachable(
            f"cannot reach the OpenAI-compatible server at {', '.join(redact_url(u) for u in urls)}: "
            f"all {len(errors)} requests failed; first: {errors[0][len(UNREACHABLE) :]}"
        )
