"""Persona pool: seeds written by this project, growth (aloe.growth), official ALOE
pool import, and (profile, personality) pairs with a train / eval split.

Evaluation personas never enter training data: they are excluded from the training
pool by id, and they take part in the growth filter's similarity check so that no
generated item comes within the threshold of one.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from aloe.config import PersonasConfig
from aloe.cost import with_cost
from aloe.errors import AloeError
from aloe.io import write_json, write_jsonl, write_manifest
from aloe.lock import stage as stage_guard
from aloe.preferences import assign
from aloe.records import item_id, load_seeds, make_pairs, pool_records, read_aloe_pool

ROLES = ("generator",)

__all__ = ["item_id", "load_seeds", "make_pairs", "pool_records", "read_aloe_pool", "run", "needs_growth"]


def _official(cfg: PersonasConfig) -> tuple[list[str], list[str], list[str], list[str]]:
    d = Path(cfg.official_dir)
    files = ("profile", "personality", "profile_eval", "personality_eval")
    return tuple(read_aloe_pool(d / f"{f}.jsonl") for f in files)  # type: ignore[return-value]


@stage_guard("personas")
def run(cfg: PersonasConfig, roles=None) -> dict:
    """Build the pool (seeds + growth, or the official files), pair it, write files + manifest.

    ``roles`` (a Roles mapping with ``generator``, or one backend) is needed only when a
    target exceeds the seeds (growth); see :func:`roles_used`."""
    from aloe.roles import Roles, as_roles

    started = time.time()
    paths = cfg.paths
    out = paths.stage("personas")
    if roles is not None and not isinstance(roles, Roles):
        roles = as_roles(roles, ROLES)  # one backend given: it is the generator
    backend = roles["generator"] if roles is not None and "generator" in roles else None
    source = "imported" if cfg.source == "official" else "seed"
    if cfg.source == "official":
        profs, perss, eprofs, eperss = _official(cfg)
    else:
        profs, perss = load_seeds("profiles"), load_seeds("personalities")
        eprofs, eperss = load_seeds("eval_profiles"), load_seeds("eval_personalities")
    eval_prof = pool_records(eprofs, "profile", source, "eval")
    eval_pers = pool_records(eperss[: cfg.n_eval_personalities], "personality", source, "eval")
    pools, stops, rounds_log = _grow_pools(cfg, backend, source, (profs, perss), eval_prof, eval_pers)
    profiles, personalities = pools["profile"], pools["personality"]
    pairs = make_pairs(profiles, personalities, cfg.pairs_per_profile, cfg.seed, "train") + make_pairs(
        eval_prof, eval_pers, len(eval_pers), cfg.seed, "eval"
    )
    # checkable preferences (aloe.preferences): drawn per persona id by a seeded rule, persona text unchanged
    pairs = assign(pairs, cfg.preferences, cfg.seed, cfg.source)
    write_jsonl(paths.pool, profiles + personalities + eval_prof + eval_pers)
    write_jsonl(paths.pairs, pairs)
    write_json(paths.growth, {"stopped": stops, "rounds": rounds_log})
    counts = {
        "profiles": len(profiles),
        "personalities": len(personalities),
        "eval_profiles": len(eval_prof),
        "eval_personalities": len(eval_pers),
        "train_pairs": sum(p["split"] == "train" for p in pairs),
        "eval_pairs": sum(p["split"] == "eval" for p in pairs),
        "generated": sum(r["source"] == "generated" for r in profiles + personalities),
        "with_preferences": sum(bool(p.get("preferences")) for p in pairs),
    }
    write_manifest(
        out,
        stage="personas",
        parameters=cfg,
        started=started,
        counts=counts,
        roles={"generator": backend.describe()} if backend is not None else {},
        extra={
            "stopped": stops,
            "usage": with_cost(
                [{"roles": ["generator"], "kind": backend.kind, "model": backend.model_id, **backend.usage()}]
                if backend is not None
                else [],
                cfg.prices,
            ),
        },
    )
    return counts


def _grow_pools(
    cfg: PersonasConfig, backend, source: str, texts: tuple[list, list], eval_prof: list[dict], eval_pers: list[dict]
) -> tuple[dict, dict, list[dict]]:
    """The training pools of profiles and personalities: seeds, grown where the target exceeds them
    (the benchmark items blocked); with why each stopped and the rounds' log."""
    from aloe.embedding import shared_embedder
    from aloe.growth import GrowthSettings, grow_pool

    eval_ids = {r["id"] for r in eval_prof + eval_pers}
    stops, rounds_log, pools = {}, [], {}
    embedder = shared_embedder()  # also annotates seeds with their nearest neighbour when nothing grows
    for kind, kind_texts, target, blocked in (
        ("profile", texts[0], cfg.target_profiles, eval_prof),
        ("personality", texts[1], cfg.target_personalities, eval_pers),
    ):
        seeds = [r for r in pool_records(kind_texts, kind, source, "train") if r["id"] not in eval_ids]
        grow = cfg.source == "ours" and target > len(seeds)
        if grow and backend is None:
            raise AloeError(f"growing the {kind} pool to {target} needs an LLM backend")
        # the growth knobs share their names with the stage config's keys
        shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(GrowthSettings) if hasattr(cfg, f.name)}
        settings = GrowthSettings(**{**shared, "target": target, "max_rounds": cfg.max_rounds if grow else 0})
        pools[kind], rounds, stops[kind] = grow_pool(
            kind, seeds, blocked, backend, embedder, settings, cfg.paths.growth_rounds
        )
        if not grow:
            stops[kind] = "imported (no growth)" if cfg.source == "official" else "seeds reach the target (no growth)"
        rounds_log += [
            {k: v for k, v in r.items() if k != "accepted"} | {"accepted": len(r["accepted"])} for r in rounds
        ]
    return pools, stops, rounds_log


def roles_used(cfg: PersonasConfig) -> tuple[str, ...]:
    """The generator when the pool grows; no model at all otherwise."""
    return ROLES if needs_growth(cfg) else ()


def needs_growth(cfg: PersonasConfig) -> bool:
    """True when a target exceeds the seeds, i.e. the stage needs an LLM backend."""
    if cfg.source == "official":
        return False
    return cfg.target_profiles > len(load_seeds("profiles")) or cfg.target_personalities > len(
        load_seeds("personalities")
    )
