"""Persona pool: seeds written by this project, official ALOE pool import, persona pairs.

Thin for now (foundation): the pool is the committed seeds; growth by LLM
self-generation with the embedding-diversity filter is the persona issue's work.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

from aloe.config import PersonasConfig
from aloe.errors import AloeError
from aloe.io import write_jsonl, write_manifest

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
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
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
            pairs.append({"id": f"pp-{prof['id'][5:]}-{pers['id'][5:]}", "profile_id": prof["id"],
                          "personality_id": pers["id"], "profile": prof["text"], "personality": pers["text"],
                          "split": split})
    return pairs


def _records(texts: list[str], kind: str, source: str, split: str) -> list[dict]:
    return [{"id": item_id(kind, t), "kind": kind, "text": t, "source": source, "split": split, "round": 0}
            for t in texts]


def run(cfg: PersonasConfig) -> dict:
    started = time.time()
    out = cfg.stage_dir_root / "personas"
    profiles = _records(load_seeds("profiles")[:cfg.n_profiles], "profile", "seed", "train")
    personalities = _records(load_seeds("personalities")[:cfg.n_personalities], "personality", "seed", "train")
    eval_prof = _records(load_seeds("eval_profiles"), "profile", "seed", "eval")
    eval_pers = _records(load_seeds("eval_personalities"), "personality", "seed", "eval")
    train_ids = {r["id"] for r in profiles + personalities}
    overlap = train_ids & {r["id"] for r in eval_prof + eval_pers}
    if overlap:
        raise AloeError(f"evaluation personas overlap the training pool: {sorted(overlap)}")
    pairs = (make_pairs(profiles, personalities, cfg.pairs_per_profile, cfg.seed, "train")
             + make_pairs(eval_prof, eval_pers, len(eval_pers), cfg.seed, "eval"))
    write_jsonl(out / "personas.jsonl", profiles + personalities + eval_prof + eval_pers)
    write_jsonl(out / "pairs.jsonl", pairs)
    counts = {"profiles": len(profiles), "personalities": len(personalities), "eval_profiles": len(eval_prof),
              "eval_personalities": len(eval_pers), "train_pairs": sum(p["split"] == "train" for p in pairs),
              "eval_pairs": sum(p["split"] == "eval" for p in pairs)}
    write_manifest(out, stage="personas", parameters=cfg, started=started, counts=counts)
    return counts

