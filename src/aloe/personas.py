"""Persona pool: seeds written by this project, growth (aloe.growth), official ALOE
pool import, and (profile, personality) pairs with a train / eval split.

Evaluation personas never enter training data: they are excluded from the training
pool by id, and they take part in the growth filter's similarity check so that no
generated item comes within the threshold of one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path

from aloe.config import PersonasConfig
from aloe.errors import AloeError
from aloe.io import write_json, write_jsonl, write_manifest

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


def _official(cfg: PersonasConfig) -> tuple[list[str], list[str], list[str], list[str]]:
    d = Path(cfg.official_dir)
    files = ("profile", "personality", "profile_eval", "personality_eval")
    return tuple(read_aloe_pool(d / f"{f}.jsonl") for f in files)  # type: ignore[return-value]


def run(cfg: PersonasConfig, backend=None) -> dict:
    """Build the pool (seeds + growth, or the official files), pair it, write files + manifest.

    ``backend`` is needed only when a target exceeds the seeds (growth)."""
    from aloe.growth import Embedder, GrowthSettings, grow_pool

    started = time.time()
    out = cfg.stage_dir_root / "personas"
    source = "imported" if cfg.source == "official" else "seed"
    if cfg.source == "official":
        profs, perss, eprofs, eperss = _official(cfg)
    else:
        profs, perss = load_seeds("profiles"), load_seeds("personalities")
        eprofs, eperss = load_seeds("eval_profiles"), load_seeds("eval_personalities")
    eval_prof = _records(eprofs, "profile", source, "eval")
    eval_pers = _records(eperss[:cfg.n_eval_personalities], "personality", source, "eval")
    eval_ids = {r["id"] for r in eval_prof + eval_pers}
    stops, rounds_log = {}, []
    pools = {}
    embedder = Embedder()  # also annotates seeds with their nearest neighbour when nothing grows
    for kind, texts, target, blocked in (("profile", profs, cfg.target_profiles, eval_prof),
                                         ("personality", perss, cfg.target_personalities, eval_pers)):
        seeds = [r for r in _records(texts, kind, source, "train") if r["id"] not in eval_ids]
        grow = cfg.source == "ours" and target > len(seeds)
        if grow and backend is None:
            raise AloeError(f"growing the {kind} pool to {target} needs an LLM backend")
        # the growth knobs share their names with the stage config's keys
        shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(GrowthSettings) if hasattr(cfg, f.name)}
        settings = GrowthSettings(**{**shared, "target": target, "max_rounds": cfg.max_rounds if grow else 0})
        pools[kind], rounds, stops[kind] = grow_pool(kind, seeds, blocked, backend, embedder, settings,
                                                     out / "rounds.jsonl")
        if not grow:
            stops[kind] = "imported (no growth)" if cfg.source == "official" else "seeds reach the target (no growth)"
        rounds_log += [{k: v for k, v in r.items() if k != "accepted"} | {"accepted": len(r["accepted"])}
                       for r in rounds]
    profiles, personalities = pools["profile"], pools["personality"]
    pairs = (make_pairs(profiles, personalities, cfg.pairs_per_profile, cfg.seed, "train")
             + make_pairs(eval_prof, eval_pers, len(eval_pers), cfg.seed, "eval"))
    write_jsonl(out / "personas.jsonl", profiles + personalities + eval_prof + eval_pers)
    write_jsonl(out / "pairs.jsonl", pairs)
    write_json(out / "growth.json", {"stopped": stops, "rounds": rounds_log})
    counts = {"profiles": len(profiles), "personalities": len(personalities), "eval_profiles": len(eval_prof),
              "eval_personalities": len(eval_pers), "train_pairs": sum(p["split"] == "train" for p in pairs),
              "eval_pairs": sum(p["split"] == "eval" for p in pairs),
              "generated": sum(r["source"] == "generated" for r in profiles + personalities)}
    models = {"backend": backend.describe()} if backend is not None else {}
    write_manifest(out, stage="personas", parameters=cfg, started=started, counts=counts, models=models,
                   extra={"stopped": stops})
    return counts


def needs_growth(cfg: PersonasConfig) -> bool:
    """True when a target exceeds the seeds, i.e. the stage needs an LLM backend."""
    if cfg.source == "official":
        return False
    return cfg.target_profiles > len(load_seeds("profiles")) or cfg.target_personalities > len(load_seeds("personalities"))
