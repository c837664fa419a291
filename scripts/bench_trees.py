"""Tree synthesis throughput: the lockstep engine vs one call at a time (the paper's loop).

    .venv/bin/python scripts/bench_trees.py [--params parameters/default.yaml] [--personas 16] [--turns 2]
                                            [--batch-size N]

Both runs do the same workload: the same training personas (this project's seeds),
turns, model, backend, seed, with the call cache off. Every tree setting (message cap,
temperature, inference mode, judging) and the batch size come from the parameter file,
the default run's by default; --personas and --turns override its size. The naive run wraps the same
backend so that every request goes alone (batch of one), exactly as a loop over
conversations and roles would send it; the lockstep run sends each role's calls for
all conversations together. Prints conversation-turns per second for both and the ratio,
and writes the numbers to data/bench/bench_trees.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import aloe.trees
from aloe.backends import open_backend
from aloe.config import BackendConfig, TreesConfig, load_experiment
from aloe.embedding import shared_embedder
from aloe.io import write_json, write_jsonl
from aloe.preferences import assign
from aloe.records import load_seeds, make_pairs, pool_records


class OneAtATime:
    """Forwards every request on its own: what the paper's code does."""

    def __init__(self, inner):
        self.inner, self.cache = inner, inner.cache

    def chat(self, requests):
        return [self.inner.chat([r])[0] for r in requests]

    def logprobs(self, requests):
        return [self.inner.logprobs([r])[0] for r in requests]

    def describe(self):
        return self.inner.describe()


def tree_settings(params: str) -> tuple[dict, int]:
    """The parameter file's trees settings (its size left out) and backend batch size."""
    exp = load_experiment(params)
    settings = {k: v for k, v in exp.raw_sections["trees"].items() if k not in ("n_personas", "turns")}
    return settings, exp.stages["trees"].backend.batch_size


def run_trees(engine, settings: dict, personas: int, turns: int) -> dict:
    """Tree synthesis on the first `personas` seed profiles, in a throwaway folder."""
    with tempfile.TemporaryDirectory() as root:
        profiles = pool_records(load_seeds("profiles")[:personas], "profile", "seed", "train")
        personalities = pool_records(load_seeds("personalities"), "personality", "seed", "train")
        # checkable preferences as the default study draws them (the rules judge needs them)
        pairs = assign(make_pairs(profiles, personalities, 1, 0, "train"), (2, 3), 0, "ours")
        write_jsonl(Path(root) / "b" / "personas" / "pairs.jsonl", pairs)
        cfg = TreesConfig(experiment="b", data_root=root, n_personas=personas, turns=turns, **settings)
        return aloe.trees.run(cfg, engine, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="parameters/default.yaml", help="tree settings come from its trees stage")
    ap.add_argument("--personas", type=int, default=16)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the parameter file's backend batch_size")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    settings, default_batch = tree_settings(args.params)
    args.batch_size = args.batch_size or default_batch

    backend = open_backend(BackendConfig(kind="transformers", model=args.model, batch_size=args.batch_size), None)
    shared_embedder()  # load MiniLM once, outside both timings
    results = {}
    for mode in ("lockstep", "naive"):
        engine = backend if mode == "lockstep" else OneAtATime(backend)
        t = time.perf_counter()
        counts = run_trees(engine, settings, args.personas, args.turns)
        wall = time.perf_counter() - t
        results[mode] = {
            "wall_s": round(wall, 2),
            "turns": counts["turns"],
            "turns_per_s": round(counts["turns"] / wall, 4),
        }
        print(
            f"{mode:9s} {counts['turns']} conversation-turns in {wall:7.1f} s = {counts['turns'] / wall:.3f} turns/s",
            flush=True,
        )
    ratio = results["lockstep"]["turns_per_s"] / results["naive"]["turns_per_s"]
    print(f"ratio lockstep / naive: {ratio:.2f}x")
    report = {
        "args": vars(args),
        "trees_settings": settings,
        "backend": backend.describe(),
        **results,
        "ratio": round(ratio, 2),
    }
    write_json(Path("data/bench/bench_trees.json"), report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
