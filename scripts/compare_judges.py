"""Judge cards of candidate judges on the same conversations.

    .venv/bin/python scripts/compare_judges.py [--personas 20] [--turns 3]
        [--judges smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b] [--kinds paper likelihood]
        [--simulator qwen2.5-coder-0.5b] [--policy smollm2-135m]

The simulated user and the policy are held fixed (so are the personas, seeds and therefore
the conversations: after the first judge they come from the call cache); only the judge
changes. The benchmark personas carry 2-3 checkable preferences (the default study's draw).
For each judge model and kind (``paper``: the rubric score; ``likelihood``: the persona's
likelihood ratio) it runs the ALOE evaluation of ``base`` and ``oracle`` with a judge card and
prints the known-answer card: K1 (a tailored reply, written by the responder (the simulator's
model) or by another role's model when that is the judge's, scores higher under its own persona
than a mismatched one; and above the plain reply), K2 (a reply that keeps a revealed preference
beats its violating edit), independence (the judge is not the policy), each with its 95%
interval, the agreement with the rules judge, whether the card passes, and the seconds spent
judging. Writes data/bench/compare_judges.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import aloe.evaluation
from aloe.config import stage_config
from aloe.io import write_json, write_jsonl
from aloe.preferences import assign
from aloe.records import load_seeds, make_pairs, pool_records
from aloe.roles import open_roles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--personas", type=int, default=20)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--judges", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    ap.add_argument("--kinds", nargs="+", default=["paper", "likelihood"], choices=["paper", "history", "likelihood"])
    ap.add_argument("--simulator", default="qwen2.5-coder-0.5b")
    ap.add_argument("--policy", default="smollm2-135m")
    ap.add_argument("--root", default="data/bench/compare_judges")
    args = ap.parse_args()

    root = Path(args.root)
    pairs = make_pairs(
        pool_records(load_seeds("eval_profiles"), "profile", "seed", "eval"),
        pool_records(load_seeds("eval_personalities"), "personality", "seed", "eval"),
        5,
        0,
        "eval",
    )
    pairs = assign(pairs, (2, 3), 0, "ours")
    results = []
    for judge in args.judges:
        for kind in args.kinds:
            name = f"{judge}-{kind}"
            write_jsonl(root / name / "personas" / "pairs.jsonl", pairs)
            cfg = stage_config(
                "evaluate",
                experiment=name,
                data_root=str(root),
                cache_path=str(root / "cache.sqlite"),
                backend={"kind": "transformers", "model": args.simulator, "batch_size": 16},
                roles={"judge": {"model": judge}, "policy": {"model": args.policy, "batch_size": 32}},
                n_personas=args.personas,
                turns=args.turns,
                max_new_tokens=args.max_new_tokens,
                models=["base", "oracle"],
                score_judge=kind,
                n_boot=1000,
                judge_card={"n_boot": 1000},
            )
            engines = open_roles(cfg, aloe.evaluation.ROLES)
            judging = {"s": 0.0}
            real = engines["judge"].logprobs

            def timed(reqs, real=real):
                t0 = time.time()
                try:
                    return real(reqs)
                finally:
                    judging["s"] += time.time() - t0

            engines["judge"].logprobs = timed
            t0 = time.time()
            metrics = aloe.evaluation.run(cfg, engines, progress=False)
            card = json.loads(cfg.paths.judge_card.read_text())
            vs = metrics["models"]["oracle"]["vs_base"]
            k1, k2 = card["known_answers"]["K1"], card["known_answers"]["K2"]
            row = {
                "judge": judge,
                "kind": kind,
                "fit": card["fit"],
                "independent": card["independent"],
                "k1_writer": k1["writer"]["model"],
                "k1_counts": k1["counts"],
                "k1_discrimination": k1["discrimination"],
                "k1_tailored": k1["tailored"],
                "k2": {k: k2.get(k) for k in ("value", "ci_low", "ci_high", "n", "gap")},
                "rules_agreement": card.get("rules_agreement"),
                "card_calls": card.get("calls"),
                "discrimination": card["persona_discrimination"],
                "length_corr": card["length_corr"],
                "oracle_minus_base": vs["avg_diff"],
                "oracle_minus_base_ci": [vs["avg_diff_ci_low"], vs["avg_diff_ci_high"]],
                "persona_gap": card.get("persona_gap"),
                "discrimination_by_model": {
                    m: round(v["value"], 3) for m, v in card.get("persona_discrimination_by_model", {}).items()
                },
                "judge_seconds": round(judging["s"], 1),
                "wall_seconds": round(time.time() - t0, 1),
                "reasons": card["reasons"],
            }
            results.append(row)
            print(json.dumps(row), flush=True)
            engines.close()
    # one row per (judge, kind): a run with fewer judges updates its rows and keeps the others
    out = Path("data/bench/compare_judges.json")
    kept = json.loads(out.read_text())["results"] if out.exists() else []
    mine = {(r["judge"], r["kind"]) for r in results}
    write_json(out, {"args": vars(args), "results": [r for r in kept if (r["judge"], r["kind"]) not in mine] + results})

    def rate(r):
        if not r or r.get("value") is None:
            return "-"
        return f"{r['value']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] n={r['n']}"

    print(
        "\n| judge | kind | independent | K1 writer | K1 own > mismatched | K1 tailored > plain | K2 keeps > edit | "
        "rules agreement | card | judging s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ra = (r["rules_agreement"] or {}).get("spearman")
        print(
            f"| {r['judge']} | {r['kind']} | {r['independent']} | {r['k1_writer']}{'' if r['k1_counts'] else ' (no)'} | "
            f"{rate(r['k1_discrimination'])} | {rate(r['k1_tailored'])} | {rate(r['k2'])} | "
            f"{'-' if ra is None else f'{ra:+.2f}'} | {'pass' if r['fit'] else 'fail'} | {r['judge_seconds']} |"
        )


if __name__ == "__main__":
    main()
