"""How close `aloe estimate` came to a finished run: tokens and calls per stage, estimated against
what the run's manifests say it used.

    .venv/bin/python scripts/estimate_vs_run.py parameters/default.yaml [--sample 8] [--replies-from data/pilot]
    .venv/bin/python scripts/estimate_vs_run.py parameters/default.yaml --study /tmp/estudy

Run the first after `aloe run` of the same file on an empty call cache (a run that took answers from
the cache used fewer tokens than it would have from scratch; the manifests count only calls sent).
With --replies-from, the estimate sizes replies by another finished run's (a pilot's) lengths, as
`aloe estimate --replies-from` does.

--study DIR does the whole comparison from nothing, in DIR: the file as it is (its data and call
cache in DIR, both empty at the start), and a pilot of it: --pilot-personas in trees and evaluation
(default: the fewest that give each trees prompt 30 replies, 30 / turns; `aloe estimate` warns below
that), every seed plus one, no training (the trained variants are left out of evaluation; the
estimate sizes them by the policy's lengths). It runs both with `aloe run`, then prints the
estimate's tokens over the run's per stage: replies at their cap, sized by the pilot, and sized by
the run's own lengths.

Tokens "used" are those sent to an engine. A run also asks requests its call cache answers (the
opening user message is the same for every model under test; models that reply alike make the
simulator's next turns alike): calls and tokens "asked" count those too (at what they cost when
made), and the estimate's own cache hits likewise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from aloe.config import load_experiment
from aloe.estimate import against_run, measure, pilot_personas, reply_lengths

STAGES = ("personas", "trees", "evaluate")


def compare(params, sample: int = 8, replies_from=None) -> dict:
    exp = load_experiment(params)
    replies = reply_lengths(replies_from) if replies_from else None
    rows = measure(exp, sample=sample, replies=replies)
    out = {}
    for stage, both in against_run(rows, exp.stages["trees"].paths.root).items():
        run, est = both["run"], both["estimate"]
        keys = ("calls", "prompt_tokens", "completion_tokens")
        out[stage] = {
            "used": {k: run[k] for k in keys},
            "estimated": {k: round(est[k]) for k in keys},
            "tokens_ratio": _ratio(est["tokens"], run["tokens"]),
            # the requests the stage asked: those sent plus those the call cache answered, at what
            # they cost when made (a judge's cached log-probability answers count theirs from 0390338)
            "asked_calls": {"used": run["asked_calls"], "estimated": round(est["asked_calls"])},
            "asked_tokens_ratio": _ratio(est["asked_tokens"], run["asked_tokens"]),
        }
    return out


def _ratio(a, b):
    return round(a / b, 3) if b else None


def _copies(params: Path, where: Path, pilot_personas: int) -> tuple[Path, Path]:
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
                    s["n_personas"] = pilot_personas
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


def study(params: Path, where: Path, sample: int, pilot_personas: int) -> dict:
    where.mkdir(parents=True, exist_ok=True)
    full, pilot = _copies(params, where, pilot_personas)
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
    ap.add_argument(
        "--pilot-personas", type=int, help="the pilot's personas in trees and evaluation (default: 30 / turns)"
    )
    args = ap.parse_args()
    if not args.study:
        print(json.dumps(compare(args.params, args.sample, args.replies_from), indent=2))
        return
    n = args.pilot_personas or pilot_personas(load_experiment(args.params))
    print(f"pilot: {n} personas in trees and evaluation", file=sys.stderr)
    result = study(Path(args.params), Path(args.study), args.sample, n)
    print(json.dumps(result, indent=2))
    for key, what in (("tokens_ratio", "used (sent)"), ("asked_tokens_ratio", "asked (sent + call cache)")):
        print(f"\ntokens estimated / {what} | " + " | ".join(STAGES))
        for label, stages in result.items():
            print(f"replies {label} | " + " | ".join(f"{stages[s][key]}" for s in STAGES if s in stages))
    first = next(iter(result.values()))  # calls do not depend on reply lengths
    sent = ", ".join(f"{s} {v['estimated']['calls']} / {v['used']['calls']}" for s, v in first.items())
    asked = ", ".join(f"{s} {v['asked_calls']['estimated']} / {v['asked_calls']['used']}" for s, v in first.items())
    print(f"calls sent, estimated / run: {sent}\ncalls asked (sent + call cache), estimated / run: {asked}")


if __name__ == "__main__":
    main()
