"""The one table of what can be trained and evaluated.

Config validation, training, the tree exports and evaluation all read these names
from here, so adding a variant is one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

# The tree stage's TRL exports (data/<experiment>/trees/<name>.jsonl).
EXPORTS = ("sft_preferred", "sft_rejected", "dpo")


@dataclass(frozen=True)
class Variant:
    name: str
    kind: Literal["sft", "dpo"]  # which TRL trainer
    data: str  # which export it trains on (one of EXPORTS)
    start_from: Optional[str] = None  # another variant whose merged model it starts from (None: the policy)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("sft_preferred", "sft", "sft_preferred"),
        Variant("sft_rejected", "sft", "sft_rejected"),  # the control: SFT on the replies the judge rejected
        Variant("dpo", "dpo", "dpo"),
        Variant("sft_then_dpo", "dpo", "dpo", start_from="sft_preferred"),
    )
}

# Evaluation baselines, all played by the policy model without training, and the
# responder prompt each one gets: base (a plain prompt), oracle (the persona in the
# system prompt: an upper reference), reminder (told to infer the user and adapt).
BASELINES: dict[str, str] = {"base": "responder_plain", "oracle": "responder_oracle", "reminder": "responder_reminder"}

EVALUATED = tuple(BASELINES) + tuple(VARIANTS)


def needed(variants: tuple[str, ...] | list[str]) -> list[str]:
    """The variants to train, in order, with every variant's starting point before it."""
    out: list[str] = []

    def add(name: str) -> None:
        start = VARIANTS[name].start_from
        if start:
            add(start)
        if name not in out:
            out.append(name)

    for v in variants:
        add(v)
    return out
