"""Do two runs of an experiment give the same results? For checking that a refactor changes no behaviour.

    .venv/bin/python scripts/compare_runs.py DATA_A DATA_B      # e.g. data/default /tmp/other/data/default

Compares what the stages made, file by file: the personas (pairs.jsonl), the trees (trees.jsonl
without its provenance, which names engines and folders; the TRL exports), the evaluation's
scores (scores.csv) and metrics (metrics.json without wall times, speeds and the trained models'
folder paths). Prints one line per file, "same" or where it first differs, and exits 1 when
anything differs. Run the second experiment from the first one's call cache (a copy of it) and
every model answer is replayed, so what is compared is the code's own work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# metrics.json keys that measure the machine or name folders, not results
TIMING_KEYS = ("turns_per_second", "seconds_per_model")


def _jsonl(path: Path, drop: tuple[str, ...] = ()) -> list:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in drop} if isinstance(r, dict) else r for r in rows]


def _metrics(path: Path) -> dict:
    m = json.loads(path.read_text(encoding="utf-8"))
    for k in TIMING_KEYS:
        m.pop(k, None)
    for v in (m.get("under_test") or {}).values():
        if isinstance(v, dict):
            v.pop("model", None)  # a trained variant's folder: where it was written, not what it is
    return m


def first_difference(a, b, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = first_difference(a.get(k), b.get(k), f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{path}: {str(a)[:80]!r} vs {str(b)[:80]!r}"


FILES = {
    "personas/pairs.jsonl": lambda p: _jsonl(p),
    "trees/trees.jsonl": lambda p: _jsonl(p, ("provenance",)),
    "trees/sft_preferred.jsonl": lambda p: _jsonl(p),
    "trees/sft_rejected.jsonl": lambda p: _jsonl(p),
    "trees/dpo.jsonl": lambda p: _jsonl(p),
    "evaluate/scores.csv": lambda p: p.read_text(encoding="utf-8"),
    "evaluate/metrics.json": _metrics,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="one experiment's data folder, e.g. data/default")
    ap.add_argument("b", type=Path, help="the other's")
    args = ap.parse_args()
    differ = 0
    for rel, read in FILES.items():
        fa, fb = args.a / rel, args.b / rel
        if not fa.exists() and not fb.exists():
            continue
        if not (fa.exists() and fb.exists()):
            print(f"{rel}: only in {args.a if fa.exists() else args.b}")
            differ += 1
            continue
        d = first_difference(read(fa), read(fb))
        print(f"{rel}: {'same' if d is None else 'differs at ' + d}")
        differ += d is not None
    print("the same results" if not differ else f"{differ} file(s) differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
