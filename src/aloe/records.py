"""Persona records shared by the stages: stable ids, the official pool-file format,
pool records and (profile, personality) pairs.

The personas stage writes these records; growth, trees, evaluation and the scripts
read or build them with the helpers here, so no stage reaches into another.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from aloe.errors import AloeError
from aloe.io import read_text

SEEDS_DIR = Path(__file__).parent / "seeds"
_PREFIX = {"profile": "prof", "personality": "pers"}


def item_id(kind: str, text: str) -> str:
    """Stable id from the content: the same text always gets the same id."""
    return f"{_PREFIX[kind]}-{hashlib.sha1(text.strip().encode('utf-8')).hexdigest()[:10]}"


def read_aloe_pool(path: str | Path) -> list[str]:
    """Read one pool file in the official ALOE format: one JSON string per line.

    The published files have quirks handled here as a user's real input would be:
    blank lines are skipped, and a line holding several JSON strings back to back
    (``"..." "..."`` with or without a space) yields each of them. Anything that is
    not a JSON string is an error naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        raise AloeError(f"{path}: persona pool file not found")
    dec = json.JSONDecoder()
    items: list[str] = []
    for lineno, line in enumerate(read_text(path, encoding="utf-8-sig").splitlines(), 1):
        pos, line = 0, line.strip()
        while pos < len(line):
            try:
                value, end = dec.raw_decode(line, pos)
            except json.JSONDecodeError as e:
                raise AloeError(f"{path}: line {lineno}: not a JSON string ({e.msg} at column {e.colno})") from None
            if not isinstance(value, str):
                raise AloeError(f"{path}: line {lineno}: expected a JSON string, got {type(value).__name__}")
            if value.strip():
                items.append(value.strip())
            pos = end
            while pos < len(line) and line[pos] in " \t,":
                pos += 1
    return items


def load_seeds(name: str) -> list[str]:
    """Committed seeds: profiles, personalities, eval_profiles, eval_personalities."""
    return read_aloe_pool(SEEDS_DIR / f"{name}.jsonl")


def make_pairs(profiles: list[dict], personalities: list[dict], per_profile: int, seed: int, split: str) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for prof in profiles:
        chosen = personalities if per_profile >= len(personalities) else rng.sample(personalities, per_profile)
        for pers in chosen:
            pairs.append(
                {
                    "id": f"pp-{prof['id'][5:]}-{pers['id'][5:]}",
                    "profile_id": prof["id"],
                    "personality_id": pers["id"],
                    "profile": prof["text"],
                    "personality": pers["text"],
                    "split": split,
                }
            )
    return pairs


def pool_records(texts: list[str], kind: str, source: str, split: str) -> list[dict]:
    return [
        {"id": item_id(kind, t), "kind": kind, "text": t, "source": source, "split": split, "round": 0} for t in texts
    ]


def spread(pairs: list[dict], n: int, seed: int) -> list[dict]:
    """n pairs drawn across the whole pool: a seeded shuffle, then round-robin over profiles
    (every profile's first pair before any profile's second), so the first n cover as many
    profiles as there are, instead of the first few profiles' pairs."""
    shuffled = list(pairs)
    random.Random(seed).shuffle(shuffled)
    rank: dict[str, int] = {}
    keyed = []
    for i, p in enumerate(shuffled):
        r = rank.get(p["profile_id"], 0)
        rank[p["profile_id"]] = r + 1
        keyed.append((r, i, p))
    return [p for _, _, p in sorted(keyed, key=lambda t: t[:2])][:n]
