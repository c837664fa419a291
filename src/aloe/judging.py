"""Judges that read probabilities instead of parsing text.

The embedded 135M model almost never writes a usable number, but its next-token
distribution over "1".."5" (or "1"/"2") still carries signal. Where a backend gives
log-probabilities we use them; text is parsed only with a strict grammar, and an
unusable judgment is returned as None (missing), never as a made-up verdict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aloe.backends.base import CandidateLogprobs

SCORES = ("1", "2", "3", "4", "5")
_SCORE_RE = re.compile(r"^\s*(?:(?:score|rating)\s*[:=]?\s*)?\**([1-5])\**\s*(?:/\s*5|out of 5)?\s*[.!]?\s*$",
                       re.IGNORECASE)


def expected_score(lp: CandidateLogprobs) -> float | None:
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


def pair_verdict(a_first: CandidateLogprobs, a_second: CandidateLogprobs) -> PairVerdict:
    """Combine the two orders. ``a_first`` asked "1 or 2" with A as reply 1; ``a_second`` with A as reply 2."""
    p1 = a_first.probabilities() if a_first.ok else {}
    p2 = a_second.probabilities() if a_second.ok else {}
    pa1 = p1.get("1") if len(p1) == 2 else None
    pa2 = p2.get("2") if len(p2) == 2 else None
    if pa1 is None or pa2 is None:
        return PairVerdict(None, None, pa1, pa2)
    return PairVerdict((pa1 + pa2) / 2, (pa1 >= 0.5) == (pa2 >= 0.5), pa1, pa2)
