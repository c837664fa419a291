"""Diversity filter speed: ours (embed each text once, growing matrix) vs the paper's
naive loop (re-embed the whole pool for every candidate).

    .venv/bin/python scripts/bench_filter.py [--pool-dir ../shared/aloe-official] [--n 300] [--big 3310]

Candidates are real persona texts: the official ALOE pool files when --pool-dir exists,
otherwise this project's seeds. Both filters see the same candidates in the same order
and must make the same decisions; the script checks that and prints both times.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from aloe.embedding import Embedder
from aloe.growth import DiversityFilter
from aloe.personas import load_seeds, read_aloe_pool


def candidates(pool_dir: Path) -> list[str]:
    if pool_dir.exists():
        texts = []
        for f in ("profile", "personality", "profile_eval", "personality_eval"):
            texts += read_aloe_pool(pool_dir / f"{f}.jsonl")
        return texts
    return sum((load_seeds(n) for n in ("profiles", "personalities", "eval_profiles", "eval_personalities")), [])


def ours(emb: Embedder, seeds: list[str], cands: list[str], threshold: float) -> tuple[list[bool], float]:
    t = time.perf_counter()
    f = DiversityFilter(threshold)
    for i, e in enumerate(emb.encode(seeds)):
        f.add(f"s{i}", e)
    decisions = [f.offer(f"c{i}", e)[0] for i, e in enumerate(emb.encode(cands))]
    return decisions, time.perf_counter() - t


def naive(emb: Embedder, seeds: list[str], cands: list[str], threshold: float) -> tuple[list[bool], float]:
    t = time.perf_counter()
    pool = list(seeds)
    decisions = []
    for c in cands:
        vecs = emb.encode(pool + [c])  # the paper's code: the whole pool again, every time
        ok = float(np.max(vecs[:-1] @ vecs[-1])) <= threshold + 1e-6
        decisions.append(ok)
        if ok:
            pool.append(c)
    return decisions, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "aloe-official"))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--big", type=int, default=3310)
    ap.add_argument("--threshold", type=float, default=0.6)
    args = ap.parse_args()
    texts = candidates(Path(args.pool_dir))
    seeds, cands = texts[:5], texts[5 : 5 + args.n]
    emb = Embedder()
    emb.encode(["warm-up"])
    d1, t1 = ours(emb, seeds, cands, args.threshold)
    d2, t2 = naive(emb, seeds, cands, args.threshold)
    # the 3,310-candidate case: the text pool cycled with a numbered suffix (distinct strings)
    big = [f"{texts[i % len(texts)]} (variant {i // len(texts)})" for i in range(args.big)]
    _, t3 = ours(emb, seeds, big, args.threshold)
    print(
        json.dumps(
            {
                "candidates": len(cands),
                "ours_s": round(t1, 2),
                "naive_s": round(t2, 2),
                "ratio": round(t2 / t1, 1),
                "same_decisions": d1 == d2,
                "accepted": sum(d1),
                "big_candidates": len(big),
                "big_ours_s": round(t3, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
