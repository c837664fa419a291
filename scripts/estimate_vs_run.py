"""How close `aloe estimate` came to a finished run: tokens and calls per stage, estimated against
what the run's manifests say it used.

    .venv/bin/python scripts/estimate_vs_run.py parameters/default.yaml [--sample 8] [--replies-from data/pilot]
    .venv/bin/python scripts/estimate_vs_run.py parameters/default.yaml --study /tmp/estudy

Run the first after `aloe run` of the same file on an empty call cache (a run that took answers from
the cache used fewer tokens than it would have from scratch; the manifests count only calls sent).
With --replies-from, the estimate sizes replies by another finished run's (a pilot's) lengths, as
`aloe estimate --replies-from` does.

--study DIR does the whole comparison from nothing, in DIR: the file as it is (its data and call
cache in DIR, both empty at the start), and a pilot of it: 2 personas in trees and evaluation, every
seed plus one, no training (the trained variants are left out of evaluation; the estimate sizes them
by the policy's lengths). It runs both with `aloe run`, then prints the estimate's tokens over the
run's per stage: replies at their cap, sized by the pilot, and sized by the run's own lengths.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from aloe.config import load_experiment
from aloe.estimate import measure, reply_lengths
from aloe.io import read_json

STAGES = ("personas", "trees", "evaluate")
PILOT_PERSONAS = 2


def compare(params, sample: int = 8, replies_from=None) -> dict:
    exp = load_experiment(params)
    replies = reply_lengths(replies_from) if replies_from else None
    rows = measure(exp, sample=sample, replies=replies)
    out = {}
    for stage in STAGES:
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
    return out


def _copies(params: Path, where: Path) -> tuple[Path, Path]:
    """The file with its data and cache in ``where``, and its pilot."""
    base = yaml.safe_load(params.read_text())
    name = base["experiment"]
    files = []
    for kind in ("full", "pilot"):
        doc = json.loads(json.dumps(base))
        doc.update(experiment=f"{name}-{kind}", data_root=str(where / "data"), cache_path=str(where / f"{kind}.sqlite"))
        stages = doc.setdefault("stages", {})
        if kind == "pilot":
            for stage in STAGES:
                s = stages.setdefault(stage, {}) or {}
                stages[stage] = s
                s["seed"] = int(s.get("seed", 0)) + 1
                if stage != "personas":
                    s["n_personas"] = min(PILOT_PERSONAS, int(s.get("n_personas", PILOT_PERSONAS)))
            ev = stages["evaluate"]
            ev["models"] = [m for m in ev.get("models", ["base", "oracle"]) if m in ("base", "oracle")]
        path = where / f"{name}-{kind}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        files.append(path)
    return files[0], files[1]


def _run(path: Path, stages: tuple[str, ...] | None = None) -> None:
    only = [a for s in stages for a in ("--only", s)] if stages else []
    print(f"aloe run {path} {' '.join(only)}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "aloe", "run", str(path), *only], check=True)


def study(params: Path, where: Path, sample: int) -> dict:
    where.mkdir(parents=True, exist_ok=True)
    full, pilot = _copies(params, where)
    for kind in ("full", "pilot"):
        if (where / f"{kind}.sqlite").exists():
            sys.exit(f"{where / f'{kind}.sqlite'}: the study starts from an empty call cache; give a new folder")
    _run(full)
    _run(pilot, STAGES)
    data = {k: load_experiment(p).stages["trees"].paths.root for k, p in (("full", full), ("pilot", pilot))}
    sized = {"at the cap": None, "by the pilot": data["pilot"], "by the run's own lengths": data["full"]}
    return {label: compare(full, sample, src) for label, src in sized.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("params")
    ap.add_argument("--sample", type=int, default=8)
    ap.add_argument("--replies-from", help="a pilot's data folder: size replies by its lengths")
    ap.add_argument("--study", metavar="DIR", help="run the file and its pilot in DIR, then compare")
    args = ap.parse_args()
    if not args.study:
        print(json.dumps(compare(args.params, args.sample, args.replies_from), indent=2))
        return
    result = study(Path(args.params), Path(args.study), args.sample)
    print(json.dumps(result, indent=2))
    print("\ntokens estimated / used | " + " | ".join(STAGES))
    for label, stages in result.items():
        print(f"replies {label} | " + " | ".join(f"{stages[s]['tokens_ratio']}" for s in STAGES if s in stages))


if __name__ == "__main__":
    main()
