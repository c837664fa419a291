"""How close the benchmark personas are to the training personas, by the pool filter's measure.

    .venv/bin/python scripts/seed_similarity.py [--official ../shared/aloe-official] [--threshold 0.6]

For our seeds (src/aloe/seeds) and, when the folder exists, the official ALOE pools: the highest
MiniLM cosine similarity between an evaluation item and a training item of the same kind, the
number of (eval, train) pairs above the threshold, and the share of eval items with at least one
training item above it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aloe.embedding import Embedder
from aloe.personas import load_seeds, read_aloe_pool


def report(emb: Embedder, name: str, train: list[str], evals: list[str], threshold: float) -> None:
    sim = emb.encode(evals) @ emb.encode(train).T
    print(
        f"{name:28s} train {len(train):4d} eval {len(evals):3d}  max {sim.max():.3f}  "
        f"pairs > {threshold}: {int((sim > threshold).sum()):4d}  "
        f"eval items with a train item > {threshold}: {(sim.max(axis=1) > threshold).mean():.0%}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", default="../shared/aloe-official")
    ap.add_argument("--threshold", type=float, default=0.6)
    args = ap.parse_args()
    emb = Embedder()
    report(emb, "ours: profiles", load_seeds("profiles"), load_seeds("eval_profiles"), args.threshold)
    report(emb, "ours: personalities", load_seeds("personalities"), load_seeds("eval_personalities"), args.threshold)
    d = Path(args.official)
    if d.exists():
        for kind in ("profile", "personality"):
            report(
                emb,
                f"official: {kind}",
                read_aloe_pool(d / f"{kind}.jsonl"),
                read_aloe_pool(d / f"{kind}_eval.jsonl"),
                args.threshold,
            )
    else:
        print(f"(official pools not found at {d})")


if __name__ == "__main__":
    main()
