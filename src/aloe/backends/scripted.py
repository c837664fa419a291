"""A scripted backend: canned, deterministic answers with no model behind them.

It is a registered engine (``kind: scripted``) so that tests, dry runs and the role
wiring can be exercised through the same ``open_backend`` / roles path as a real
model. Every call is logged in ``calls`` as (call type, prompt version), which is
how a test proves that each role's requests reached the engine it configured.

Answers:

* ``chat``: the next entry of ``texts`` when one is given (a judge that writes
  garbage, then a digit), else ``"<model>: reply <hash> (<prompt version>)."``, where the
  hash is of the request: the same request gets the same answer in every process, so a
  killed and resumed run can be compared with an uninterrupted one;
* ``logprobs``: none (like a server without log-probabilities) when ``logprobs`` is
  False; ``logprobs(request)`` when it is a function (a judge with a known answer);
  else a fixed pseudo-random distribution over the candidates, derived from a hash of
  the model id and the messages, so it is stable across runs and differs between
  prompts. Values count as exact, one token per word.

``ALOE_SCRIPTED_KILL_AFTER=<n>`` makes the process SIGKILL itself at its n-th call (chat or
log-probabilities, counted over every scripted engine in the process): the kill tests use it to
stop the real pipeline at chosen points between its steps.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
from typing import Callable

from aloe.backends.base import CandidateLogprobs, ChatBackend, ChatRequest, Completion, ProbRequest
from aloe.cache import CallCache

_CALLS = 0  # calls in this process, over every scripted engine (for ALOE_SCRIPTED_KILL_AFTER)


def _tick() -> None:
    global _CALLS
    _CALLS += 1
    kill_after = os.environ.get("ALOE_SCRIPTED_KILL_AFTER")
    if kill_after and _CALLS >= int(kill_after):
        os.kill(os.getpid(), signal.SIGKILL)


def calls_made() -> int:
    return _CALLS


class ScriptedBackend(ChatBackend):
    kind = "scripted"

    def __init__(
        self,
        model_id: str = "scripted",
        revision: str = "0",
        cache: CallCache | None = None,
        *,
        texts: list[str | None] | Callable[[ChatRequest], str | None] | None = None,
        logprobs: bool | Callable[[ProbRequest], dict[str, float]] = True,
    ):
        super().__init__(model_id, revision, cache)
        self.texts = list(texts) if isinstance(texts, (list, tuple)) else texts
        self.with_logprobs = logprobs
        self.calls: list[tuple[str, str]] = []

    def _text(self, r: ChatRequest) -> str | None:
        if callable(self.texts):
            return self.texts(r)
        if self.texts is not None:
            return self.texts.pop(0)
        digest = hashlib.sha256(
            repr((self.model_id, r.messages, r.sample_index, r.sampling.seed)).encode()
        ).hexdigest()[:8]
        return f"{self.model_id}: reply {digest} ({r.prompt_version or 'no prompt version'})."

    def _generate(self, requests: list[ChatRequest]) -> list[Completion]:
        out = []
        for r in requests:
            _tick()
            self.calls.append(("chat", r.prompt_version))
            text = self._text(r)
            out.append(Completion(text) if text is not None else Completion(None, error="scripted failure"))
        return out

    def _score(self, requests: list[ProbRequest]) -> list[CandidateLogprobs]:
        out = []
        for r in requests:
            _tick()
            self.calls.append(("logprobs", r.prompt_version))
            if not self.with_logprobs:
                out.append(CandidateLogprobs({c: None for c in r.candidates}, exact=False))
                continue
            tokens = {c: max(1, len(c.split())) for c in r.candidates}
            if callable(self.with_logprobs):
                out.append(CandidateLogprobs(self.with_logprobs(r), tokens=tokens))
                continue
            seed = hashlib.sha256(repr((self.model_id, r.messages)).encode()).digest()
            weights = [1 + seed[i % len(seed)] for i in range(len(r.candidates))]
            total = sum(weights)
            out.append(
                CandidateLogprobs({c: math.log(w / total) for c, w in zip(r.candidates, weights)}, tokens=tokens)
            )
        return out

    def prompt_versions(self, call: str | None = None) -> set[str]:
        """The prompt versions (names without @version) this engine was asked for."""
        return {pv.split("@")[0] for c, pv in self.calls if call is None or c == call}
