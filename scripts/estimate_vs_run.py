"""How close `aloe estimate` came to a finished run: tokens and calls per stage, estimated against
what the run's manifests say it used.

    .venv/bin/python scripts/estimate_vs_run.py parameters/default.yaml [--sample 8]

Run it after `aloe run` of the same file on an empty call cache (a run that took answers from the
cache used fewer tokens than it would have from scratch; the manifests count only calls sent).
"""

from __future__ import annotations

import argparse
import json

from aloe.config import load_experiment
from aloe.estimate import measure
from aloe.io import read_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("params")
    ap.add_argument("--sample", type=int, default=8)
    args = ap.parse_args()
    exp = load_experiment(args.params)
    rows = measure(exp, sample=args.sample)
    out = {}
    for stage in ("personas", "trees", "evaluate"):
        manifest = exp.stages[stage].paths.manifest(stage)
        if not manifest.exists():  # a stage the run has not made (yet)
            continue
        used = read_json(manifest).get("usage") or []
        real = {k: sum(u[k] for u in used) for k in ("calls", "prompt_tokens", "completion_tokens")}
        est = {k: round(sum(r[k] for r in rows if r["stage"] == stage)) for k in real}
        tokens = (real["prompt_tokens"] + real["completion_tokens"], est["prompt_tokens"] + est["completion_tokens"])
        out[stage] = {
            "used": real,
            "estimated": est,
            "tokens_ratio": round(tokens[1] / tokens[0], 3) if tokens[0] else None,
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
