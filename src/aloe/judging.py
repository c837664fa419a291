"""Every judge, in one place: the pair judge and the rubric score judge (probabilities where the
engine gives them, strictly parsed text otherwise), the likelihood-ratio judge, and the rules
judge (exact, from ``aloe.preferences``); ``score_replies`` scores replies by any of them, for
evaluation, the trees' pointwise tie-break and the judge card alike. The card that validates a
judge on known answers is ``aloe.judge_card``.

The embedded 135M model almost never writes a usable number, but its next-token
distribution over "1".."5" (or "1"/"2") still carries signal. Where a backend gives
log-probabilities we use them; text is parsed only with a strict grammar, and an
unusable judgment is returned as None (missing), never as a made-up verdict.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from aloe import preferences, prompts
from aloe.backends.base import CandidateLogprobs, ChatRequest, ProbRequest, Sampling
from aloe.conversation import dialogue_text, judge_persona, likelihood_prompts

SCORES = ("1", "2", "3", "4", "5")
_SCORE_RE = re.compile(
    r"^\s*(?:(?:score|rating)\s*[:=]?\s*)?\**([1-5])\**\s*(?:/\s*5|out of 5)?\s*[.!]?\s*$", re.IGNORECASE
)


def expected_score(lp: "CandidateLogprobs | Judged") -> float | None:
    """Probability-weighted score over "1".."5" (renormalized over those seen)."""
    if not lp.ok:
        return None
    probs = lp.probabilities()
    if not probs:
        return None
    return sum(int(c) * p for c, p in probs.items())


def parse_score(text: str | None) -> int | None:
    """Strict: a bare digit 1-5, optionally 'Score: 4', '4/5', '**4**'. Anything else is None."""
    if not text:
        return None
    m = _SCORE_RE.match(text.strip())
    return int(m.group(1)) if m else None


def parse_score_choice(text: str | None) -> str | None:
    """parse_score as a candidate string ("1".."5") for :func:`ask`."""
    s = parse_score(text)
    return None if s is None else str(s)


@dataclass
class PairVerdict:
    p_a: float | None  # probability that candidate A is better, averaged over both orders
    consistent: bool | None  # both orders prefer the same candidate
    p_a_first: float | None  # P(A) when A was shown first
    p_a_second: float | None  # P(A) when A was shown second

    @property
    def preferred(self) -> str | None:
        if self.p_a is None:
            return None
        return "a" if self.p_a >= 0.5 else "b"


def pair_verdict(a_first: "CandidateLogprobs | Judged", a_second: "CandidateLogprobs | Judged") -> PairVerdict:
    """Combine the two orders. ``a_first`` asked "1 or 2" with A as reply 1; ``a_second`` with A as reply 2."""
    p1 = a_first.probabilities() if a_first.ok else {}
    p2 = a_second.probabilities() if a_second.ok else {}
    pa1 = p1.get("1") if len(p1) == 2 else None
    pa2 = p2.get("2") if len(p2) == 2 else None
    if pa1 is None or pa2 is None:
        return PairVerdict(None, None, pa1, pa2)
    return PairVerdict((pa1 + pa2) / 2, (pa1 >= 0.5) == (pa2 >= 0.5), pa1, pa2)


_CHOICE_RE = re.compile(r"^\s*(?:(?:reply|answer|response)\s*[:#]?\s*)?\**([12])\**\s*[.!]?\s*$", re.IGNORECASE)


def parse_choice(text: str | None) -> str | None:
    """Strict: "1", "2", "Reply 2", "**1**", "Answer: 2." Anything else is None."""
    if not text:
        return None
    m = _CHOICE_RE.match(text.strip())
    return m.group(1) if m else None


@dataclass
class Judged:
    """One judgment, however it was obtained; keeps what the judge actually returned.

    ``method`` is "logprobs" (probabilities over the candidates), "text" (a strictly
    parsed reply, stored one-hot) or "none" (unusable: ``probs`` is None and the
    judgment is missing, never a verdict).
    """

    method: str
    probs: dict[str, float] | None
    raw: list[str] = field(default_factory=list)
    logprobs: dict[str, float | None] | None = None
    error: str | None = None
    missing: list[str] | None = None  # candidates the engine did not report (outside its top-k)

    @property
    def ok(self) -> bool:
        return bool(self.probs)

    def probabilities(self) -> dict[str, float]:
        return dict(self.probs or {})

    def to_json(self) -> dict:
        out = {
            "method": self.method,
            "probs": self.probs,
            "raw": self.raw,
            "logprobs": self.logprobs,
            "error": self.error,
        }
        if self.missing:  # the probabilities are renormalized over the candidates that were seen
            out["missing"] = self.missing
        return out


def _from_logprobs(lps: list, requests: Sequence[ProbRequest], method: str, require_all: bool) -> list:
    """Each request's judgment from its log-probabilities; None where text must decide instead."""
    out: list[Judged | None] = []
    for lp, req in zip(lps, requests):
        seen = {c for c, v in lp.logprobs.items() if v is not None}
        if lp.ok and (not require_all or seen == set(req.candidates)):
            out.append(
                Judged(
                    "logprobs",
                    lp.probabilities(),
                    logprobs=lp.logprobs,
                    missing=[c for c in req.candidates if c not in seen] or None,
                )
            )
        elif method == "logprobs":
            out.append(
                Judged(
                    "none",
                    None,
                    logprobs=lp.logprobs,
                    error=lp.error or f"log-probabilities cover {sorted(seen)} of {list(req.candidates)}",
                )
            )
        else:
            out.append(None)
    return out


def _from_text(
    backend,
    requests: Sequence[ProbRequest],
    parse,
    todo: list[int],
    lps: list,
    out: list,
    retries: int,
    max_tokens: int,
) -> None:
    """Fill ``out[i]`` for each ``i`` in ``todo`` by parsing text: greedy first, then sampled retries."""
    raws: dict[int, list[str]] = {i: [] for i in todo}
    for attempt in range(retries + 1):
        if not todo:
            break
        # First try greedy; retries sample, so they can say something different.
        samp = Sampling(temperature=0.0 if attempt == 0 else 0.7, max_tokens=max_tokens, seed=attempt)
        comps = backend.chat(
            [
                ChatRequest(requests[i].messages, samp, sample_index=attempt, prompt_version=requests[i].prompt_version)
                for i in todo
            ]
        )
        still = []
        for i, c in zip(todo, comps):
            raws[i].append(c.text if c.ok else f"<error: {c.error}>")
            ans = parse(c.text) if c.ok else None
            if ans is not None and ans in requests[i].candidates:
                out[i] = Judged(
                    "text",
                    {cand: float(cand == ans) for cand in requests[i].candidates},
                    raws[i],
                    lps[i].logprobs if lps[i] is not None else None,
                )
            else:
                still.append(i)
        todo = still
    for i in todo:
        out[i] = Judged(
            "none",
            None,
            raws[i],
            lps[i].logprobs if lps[i] is not None else None,
            f"no parsable answer in {retries + 1} tries",
        )


def ask(
    backend,
    requests: Sequence[ProbRequest],
    parse: Callable[[str | None], str | None],
    *,
    method: str = "auto",
    retries: int = 2,
    max_tokens: int = 8,
    require_all: bool = False,
) -> list[Judged]:
    """Ask a judge; read probabilities where the backend gives them, else parse text.

    ``method``: "logprobs" (probabilities only), "text" (parse only) or "auto"
    (probabilities, falling back to text for any request whose probabilities are
    unusable). Text is parsed strictly and retried up to ``retries`` more times with
    sampling; a request that still has no usable answer comes back with method
    "none". ``require_all``: a probability judgment counts only when every
    candidate was observed (a pair judge needs both "1" and "2").
    """
    n = len(requests)
    out: list[Judged | None] = [None] * n
    lps: list = [None] * n
    if method in ("auto", "logprobs"):
        lps = backend.logprobs(list(requests))
        out = _from_logprobs(lps, requests, method, require_all)
    _from_text(backend, requests, parse, [i for i in range(n) if out[i] is None], lps, out, retries, max_tokens)
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- likelihood-ratio judge


@dataclass
class LikelihoodJudged:
    """How much more probable a persona makes a reply, under the judge model.

    ``llr`` is the per-token mean of log P(reply | persona-aware prompt) - log P(reply | plain
    prompt): positive when knowing the user makes this reply more likely. It has no position
    and parses no text. None (missing, never a made-up value) when either side failed or
    the backend's log-probabilities are not exact continuation likelihoods.
    """

    llr: float | None
    aware: float | None = None
    plain: float | None = None
    tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.llr is not None

    def to_json(self) -> dict:
        return {
            "method": "likelihood",
            "llr": self.llr,
            "aware": self.aware,
            "plain": self.plain,
            "tokens": self.tokens,
            "error": self.error,
        }


def likelihood_ratios(
    backend, items: Sequence[tuple[Sequence[dict], Sequence[dict], str]], prompt_version: str
) -> list[LikelihoodJudged]:
    """Score replies by the likelihood ratio: ``items`` are (persona-aware messages, plain
    messages, reply); both prompt sides end with the user's message the reply answers."""
    reqs = []
    for aware, plain, reply in items:
        reqs += [
            ProbRequest(aware, (reply,), prompt_version=prompt_version),
            ProbRequest(plain, (reply,), prompt_version=prompt_version),
        ]
    got = backend.logprobs(reqs) if reqs else []
    out = []
    for k, (_, _, reply) in enumerate(items):
        a, p = got[2 * k], got[2 * k + 1]
        if not (a.ok and p.ok):
            out.append(LikelihoodJudged(None, error=a.error or p.error or "no log-probability"))
        elif not (a.exact and p.exact and a.tokens):
            out.append(
                LikelihoodJudged(
                    None,
                    error=f"{getattr(backend, 'kind', 'this')} backend gives next-token "
                    f"top-k log-probabilities, not a reply's likelihood",
                )
            )
        else:
            n = a.tokens[reply]
            la, lp = a.logprobs[reply], p.logprobs[reply]
            out.append(LikelihoodJudged((la - lp) / n, la, lp, n))
    return out


def likelihood_score(llr: float | None, scale: float) -> float | None:
    """The likelihood ratio on the rubric's 1-5 scale, for AL(k): 1 + 4 * sigmoid(llr / scale).
    A reply the persona neither helps nor hurts scores 3; ``scale`` (nats per token) is the
    ratio that moves it to 1 + 4 * sigmoid(1) = 3.92."""
    if llr is None:
        return None
    return 1.0 + 4.0 / (1.0 + math.exp(-llr / scale))


# --------------------------------------------------------------------------- scoring replies


@dataclass(frozen=True)
class Reply:
    """One reply to judge: the persona it is judged against, the conversation before the
    user's message, the message and the reply."""

    persona: dict
    history: list
    message: str
    text: str
    revealed: tuple = ()  # checkable preferences revealed by this turn (the rules judge's second number)


def pair_requests(persona: dict, message: str, a: str, b: str) -> list[ProbRequest]:
    """The pair judge's two requests for replies ``a`` and ``b`` to ``message``: (a, b) and (b, a)."""
    pair = prompts.get("judge_pair")
    return [
        ProbRequest(
            [
                {"role": "system", "content": pair.render("system")},
                {
                    "role": "user",
                    "content": pair.render(
                        "user",
                        profile=judge_persona(persona)[0],
                        personality=persona["personality"],
                        message=message,
                        first=first.strip(),
                        second=second.strip(),
                    ),
                },
            ],
            ("1", "2"),
            prompt_version=pair.tag,
        )
        for first, second in ((a, b), (b, a))
    ]


def rubric_requests(replies: Sequence[Reply], kind: str = "paper") -> list[ProbRequest]:
    """The rubric score judge's requests: ``paper`` (the paper's rubric on the current message) or
    ``history`` (the same rubric with the conversation so far)."""
    rubric = prompts.get("judge_score" if kind == "paper" else "judge_score_history")
    # the "paper" rubric ignores {dialogue}; the "history" rubric shows it
    return [
        ProbRequest(
            [
                {"role": "system", "content": rubric.render("system")},
                {
                    "role": "user",
                    "content": rubric.render(
                        "user",
                        profile=judge_persona(r.persona)[0],
                        personality=r.persona["personality"],
                        message=r.message,
                        reply=r.text,
                        dialogue=dialogue_text(r.history, r.message),
                    ),
                },
            ],
            SCORES,
            prompt_version=rubric.tag,
        )
        for r in replies
    ]


def score_replies(cfg, engine, replies: list[Reply], judge_kind: str | None = None) -> list[tuple[float | None, dict]]:
    """(score on 1-5 or None, the judgment as recorded) per reply, by ``judge_kind`` (default
    ``cfg.score_judge``): ``paper`` (the rubric on the current message), ``history`` (the rubric with
    the conversation), ``likelihood`` (the persona's likelihood ratio, mapped to 1-5 by
    ``cfg.likelihood_scale``) or ``rules`` (exact; no engine). ``cfg`` gives the judge's method and
    retries (an ``EvaluateConfig``)."""
    kind = judge_kind or cfg.score_judge
    if not replies:
        return []
    if kind == "rules":
        got = [preferences.rules_score(r.persona.get("preferences") or [], r.text, list(r.revealed)) for r in replies]
        return [(g["score"], g) for g in got]
    if kind == "likelihood":
        items, tag = [], ""
        for r in replies:
            aware, plain, tag = likelihood_prompts(*judge_persona(r.persona), r.history, r.message)
            items.append((aware, plain, r.text))
        return [
            (likelihood_score(j.llr, cfg.likelihood_scale), j.to_json()) for j in likelihood_ratios(engine, items, tag)
        ]
    return [
        (expected_score(j), j.to_json())
        for j in ask(
            engine,
            rubric_requests(replies, kind),
            parse_score_choice,
            method=cfg.judge_method,
            retries=cfg.judge_retries,
        )
    ]
