"""How much of a persona a conversation has revealed: the measure trees and evaluation share.

A persona's *facts* are its sentences (and ", and"-joined clauses). A fact counts as
revealed once some sentence of some user message so far has MiniLM cosine at least
``threshold`` with it: a rough semantic-overlap proxy, not a fact checker. In
evaluation it tells a rising AL(k) apart from a simulated user who simply says more.
"""

from __future__ import annotations

import re

import numpy as np

from aloe.embedding import Embedder, shared_embedder


def facts(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?;])\s+|,\s+and\s+", text)
    return [p.strip() for p in parts if len(p.strip()) > 3]


def _best(emb: Embedder, fact_emb: np.ndarray, text: str) -> np.ndarray:
    """Per fact, its best cosine with any sentence of ``text``."""
    return (fact_emb @ emb.encode_each(facts(text) or [text]).T).max(axis=1)


def revealed_curve(
    profile: str,
    personality: str,
    user_messages: list[str],
    threshold: float,
    emb: Embedder | None = None,
    recovered_texts: list[str] | None = None,
) -> list[dict]:
    """After each user message, the share of the persona's facts revealed so far (each message
    embedded once: a running maximum); with ``recovered_texts`` (one per message), also the share
    each of those texts states (the tree inference step's recovery)."""
    emb = emb or shared_embedder()
    fs = facts(profile) + facts(personality)
    if not fs:
        return [{"facts": 0, "revealed": None} for _ in user_messages]
    fe = emb.encode_each(fs)
    best, out = None, []
    for k, msg in enumerate(user_messages):
        said = _best(emb, fe, msg) if msg else np.full(len(fs), -1.0)
        best = said if best is None else np.maximum(best, said)
        row = {"facts": len(fs), "revealed": float((best >= threshold).mean())}
        if recovered_texts is not None:
            row["recovered"] = float((_best(emb, fe, recovered_texts[k]) >= threshold).mean())
        out.append(row)
    return out
