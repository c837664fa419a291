"""What a run made, as tables: every stage's manifest and metrics read into rows and frames.

The notebooks (05_report above all) and the results page (:mod:`aloe.reporting.page`) draw
from these same functions, so the two never disagree."""

from __future__ import annotations

from pathlib import Path

from aloe import roles as roles_mod
from aloe.config import STAGES, ReportConfig
from aloe.cost import fmt_usd
from aloe.io import read_json, write_manifest
from aloe.metrics import excludes_zero, fmt_ci
from aloe.metrics import fmt as _fmt


def manifests(cfg: ReportConfig) -> dict[str, dict]:
    """Every finished stage's manifest (the report's own excluded), by stage."""
    out = {}
    for stage in STAGES[:-1]:
        p = cfg.paths.manifest(stage)
        if p.exists():
            out[stage] = read_json(p)
    return out


def role_table(cfg: ReportConfig) -> list[dict]:
    """Who played which role in this run, read from the stages' manifests."""
    return [{**r, "stages": ", ".join(r["stages"])} for r in roles_mod.role_rows(manifests(cfg))]


def self_judging(cfg: ReportConfig) -> str | None:
    """A warning when the judge is the policy itself (same model and revision), else None."""
    ms = manifests(cfg)
    stages = roles_mod.self_judging(ms)
    if not stages:
        return None
    judge = next(m["roles"]["judge"] for s, m in ms.items() if s in stages)
    return (
        f"SELF-JUDGING: the judge is the policy itself ({judge.get('model')}, revision {judge.get('revision')}) "
        f"in stage(s) {', '.join(stages)}. The student labels its own training data and grades its own replies, "
        f"so its scores measure agreement with itself, not alignment with the user. Give the judge role a "
        f"different, stronger model (roles.judge) for a result that means something."
    )


def stage_summary(cfg: ReportConfig) -> list[dict]:
    rows = []
    ms = manifests(cfg)
    for stage in STAGES[:-1]:
        if stage not in ms:
            rows.append({"stage": stage, "finished": False})
            continue
        m = ms[stage]
        models = sorted({f"{r}: {d.get('model')}" for r, d in (m.get("roles") or {}).items()})
        rows.append(
            {
                "stage": stage,
                "finished": True,
                "wall_seconds": m["wall_seconds"],
                "roles": "; ".join(models),
                "counts": ", ".join(f"{k}={v}" for k, v in m["counts"].items()),
            }
        )
    return rows


def evaluation_metrics(cfg: ReportConfig) -> dict | None:
    p = Path(cfg.paths.eval_metrics)
    return read_json(p) if p.exists() else None


def finish(cfg: ReportConfig, started: float) -> None:
    write_manifest(cfg.paths.stage("report"), stage="report", parameters=cfg, started=started)


def _read_jsonl_or_empty(path: Path) -> list[dict]:
    from aloe.io import read_jsonl

    return read_jsonl(path) if path.exists() else []


def dataset_summary(cfg: ReportConfig) -> dict:
    """Personas, trees and labels, from the files the stages wrote."""
    paths = cfg.paths
    pool = _read_jsonl_or_empty(paths.pool)
    pairs = _read_jsonl_or_empty(paths.pairs)
    trees = _read_jsonl_or_empty(paths.trees)
    nodes = [n for t in trees for n in t["turns"]]
    labelled = [n for n in nodes if n["verdict"] == "preferred"]
    judged = [n for n in nodes if n.get("consistent") is not None]
    return {
        "profiles": sum(p["kind"] == "profile" for p in pool),
        "personalities": sum(p["kind"] == "personality" for p in pool),
        "generated_items": sum(p["source"] == "generated" for p in pool),
        "train_personas": sum(p["split"] == "train" for p in pairs),
        "eval_personas": sum(p["split"] == "eval" for p in pairs),
        "trees": len(trees),
        "failed_trees": sum(t["failed"] is not None for t in trees),
        "nodes": len(nodes),
        "labelled_nodes": len(labelled),
        "hinted_preferred": (sum(bool(n["preferred_is_hinted"]) for n in labelled) / len(labelled))
        if labelled
        else None,
        "orders_agree": (sum(bool(n["consistent"]) for n in judged) / len(judged)) if judged else None,
        "decided_by_pointwise": sum(n.get("decided_by") == "pointwise" for n in nodes),
    }


def training_summary(cfg: ReportConfig) -> list[dict]:
    rows = []
    for p in sorted(cfg.paths.stage("train").glob("*/metrics.json")):
        m = read_json(p)
        logged = [e for e in m["log_history"] if "loss" in e]
        last = logged[-1] if logged else {}
        rows.append(
            {
                "variant": m["variant"],
                "rows": m["rows"],
                "steps": m["global_step"],
                "first_loss": logged[0]["loss"] if logged else None,
                "last_loss": last.get("loss"),
                "dpo_margin_last": last.get("rewards/margins"),
                "dpo_accuracy_last": last.get("rewards/accuracies"),
                "seconds_per_step": m["seconds_per_step"],
                "peak_rss_mb": m["peak_rss_mb"],
            }
        )
    return rows


def _tree_findings(ds: dict) -> list[str]:
    out = []
    if ds["orders_agree"] is not None:
        out.append(
            f"The pair judge's two orders agreed on {ds['orders_agree']:.0%} of the {ds['nodes']} tree nodes"
            + (
                ": its 1-or-2 answers follow position, not content, so those labels came from each reply's "
                f"own rubric score ({ds['decided_by_pointwise']} nodes)."
                if ds["orders_agree"] < 0.5
                else "."
            )
        )
    if ds["hinted_preferred"] is not None:
        out.append(
            f"Of {ds['labelled_nodes']} labelled nodes, the judge preferred the hinted reply in "
            f"{ds['hinted_preferred']:.0%} (50% is what a coin would give)."
        )
    return out


def _comparison_findings(ms: dict, n: int, fit: bool) -> list[str]:
    """Each model against base (paired), and whether the oracle clears base at all."""
    out = []
    for m, s in ms.items():
        vs = s.get("vs_base")
        if not vs or vs["avg_diff"] is None:
            continue
        head = (
            f"{m} vs base, paired over {vs['n_personas']} personas: AVG {vs['avg_diff']:+.3f} "
            f"[{vs['avg_diff_ci_low']:+.3f}, {vs['avg_diff_ci_high']:+.3f}]"
        )
        if vs.get("ir_diff") is not None:
            head += f", IR {vs['ir_diff']:+.4f} [{vs['ir_diff_ci_low']:+.4f}, {vs['ir_diff_ci_high']:+.4f}]"
        if not fit:
            out.append(head + ": not evidence, since the judge did not pass its validation.")
        elif excludes_zero(vs["avg_diff_ci_low"], vs["avg_diff_ci_high"]):
            out.append(
                head + f": {m} scores {'higher' if vs['avg_diff'] > 0 else 'lower'} than base "
                "(the interval excludes 0)."
            )
        else:
            out.append(head + ": the interval includes 0, so this run shows no difference.")
    if "oracle" in ms and "vs_base" in ms["oracle"] and fit:
        vs = ms["oracle"]["vs_base"]
        if not (excludes_zero(vs["avg_diff_ci_low"], vs["avg_diff_ci_high"]) and vs["avg_diff"] > 0):
            out.append(
                f"The oracle (told the persona) does not score above base with {n} personas: the benchmark "
                f"cannot tell a model that knows the user from one that does not at this size, so the other "
                f"models' differences are not evidence either."
            )
    return out


def _trend_findings(ms: dict) -> list[str]:
    out = []
    for m, s in ms.items():
        if s.get("ir") is None:
            out.append(f"{m}: IR undefined (fewer than 2 turns, or a turn without a usable judgment).")
            continue
        excl = excludes_zero(s["ir_ci_low"], s["ir_ci_high"])
        out.append(
            f"{m}: AVG {s['avg']:.3f}, IR {s['ir']:+.4f} per turn, 95% CI [{s['ir_ci_low']:+.4f}, "
            f"{s['ir_ci_high']:+.4f}]: "
            + ("the interval excludes 0." if excl else "the interval includes 0 (no detectable trend).")
        )
    missing = sum(s["missing"] for s in ms.values())
    if missing:
        out.append(f"{missing} judgments were unusable and are excluded (each mean's n says where).")
    return out


def findings(cfg: ReportConfig) -> list[str]:
    """'What this run shows and what it cannot show', written from the numbers."""
    warning = self_judging(cfg)
    out = [f"**{warning}**"] if warning else []
    out += _tree_findings(dataset_summary(cfg))
    metrics = evaluation_metrics(cfg)
    if not metrics:
        return out + ["No evaluation results yet."]
    out.append(
        f"Evaluation protocol: {metrics.get('protocol', 'aloe')} "
        + (
            "(the paper's: no system prompt for the model under test, its own default sampling, 2048-token cap)."
            if metrics.get("protocol") == "paper"
            else "(ours: a short system prompt and greedy decoding for every model under test)."
        )
    )
    card = judge_card(cfg)
    out.append(judge_verdict(card))
    ms = metrics["models"]
    return out + _comparison_findings(ms, metrics["personas"], bool(card and card["fit"])) + _trend_findings(ms)


def judge_card(cfg: ReportConfig) -> dict | None:
    p = cfg.paths.judge_card
    return read_json(p) if p.exists() else None


def judge_verdict(card: dict | None) -> str:
    """One plain sentence: is this judge fit to rank models, from its card's numbers."""
    if card is None:
        return (
            "**No judge validation ran (judge_card.enabled is false), so this run shows nothing about which "
            "model aligns better**: a comparison counts only with a judge whose validation passes."
        )
    if card.get("exact"):
        return (
            "The judge is the rules judge: exact, since a program checks each of the persona's checkable "
            "preferences on every reply. Paired differences below are evidence where their interval excludes 0; "
            "they measure the checkable preferences only, not the free-text profile and personality."
        )
    ka = card.get("known_answers") or {}
    parts = []
    k1 = ka.get("K1") or {}
    if (k1.get("discrimination") or {}).get("value") is not None:
        d = k1["discrimination"]
        parts.append(
            f"K1: it scores a tailored reply higher under its own persona than a mismatched one in "
            f"{d['value']:.0%} of {d['n']} cases [{d['ci_low']:.0%}, {d['ci_high']:.0%}]"
            + ("" if k1.get("counts") else " (not independent: does not count)")
        )
    k2 = ka.get("K2") or {}
    if k2.get("value") is not None:
        parts.append(
            f"K2: it prefers a reply that keeps a revealed preference over its violating edit in "
            f"{k2['value']:.0%} of {k2['n']} cases [{k2['ci_low']:.0%}, {k2['ci_high']:.0%}]"
        )
    known = "; ".join(parts) or "no known-answer check could be measured"
    if card["fit"]:
        return (
            f"The judge passed its known-answer card: {known}. Paired differences below are evidence where "
            f"their interval excludes 0."
        )
    return (
        f"**The judge failed its known-answer card ({'; '.join(card['reasons'])}). This run shows nothing about "
        f"which model aligns better**: {known}."
    )


def judge_warning(cfg: ReportConfig) -> str | None:
    """The warning every table after the judge card carries when the judge is not fit (or unvalidated)."""
    card = judge_card(cfg)
    if card is not None and card["fit"]:
        return None
    why = "failed its validation" if card is not None else "was not validated"
    return f"Not evidence: the judge {why}; the numbers below show nothing about which model aligns better."


# --------------------------------------------------------------------------- evaluation tables


def al_frame(metrics: dict):
    """Long table: model, turn, al, n, ci_low, ci_high (for the AL(k) plot)."""
    import pandas as pd

    return pd.DataFrame([{"model": m, **row} for m, s in metrics["models"].items() for row in s["al"]])


def metrics_frame(metrics: dict):
    """One row per model: AVG, IR, N-IR and N-R², each with its bootstrap interval over personas."""
    import pandas as pd

    rows = []
    for m, s in metrics["models"].items():
        rows.append(
            {
                "model": m,
                "AVG": s["avg"],
                "AVG 95% CI": fmt_ci(s.get("avg_ci_low"), s.get("avg_ci_high")),
                "IR": s["ir"],
                "IR 95% CI": fmt_ci(s["ir_ci_low"], s["ir_ci_high"]),
                "N-IR": s["n_ir"],
                "N-IR 95% CI": fmt_ci(s.get("n_ir_ci_low"), s.get("n_ir_ci_high")),
                "N-R2": s["n_r2"],
                "N-R2 95% CI": fmt_ci(s.get("n_r2_ci_low"), s.get("n_r2_ci_high")),
                "missing": s["missing"],
                "personas": s["n_personas"],
            }
        )
    return pd.DataFrame(rows).set_index("model")


def vs_base_frame(metrics: dict):
    """Paired differences against base (same personas): AVG and IR, and AL(k) per turn."""
    import pandas as pd

    rows = []
    for m, s in metrics["models"].items():
        vs = s.get("vs_base")
        if not vs:
            continue
        row = {
            "model": m,
            "AVG diff": vs["avg_diff"],
            "AVG diff 95% CI": fmt_ci(vs["avg_diff_ci_low"], vs["avg_diff_ci_high"]),
            "IR diff": vs["ir_diff"],
            "IR diff 95% CI": fmt_ci(vs["ir_diff_ci_low"], vs["ir_diff_ci_high"]),
            "personas": vs["n_personas"],
        }
        for t in vs["per_turn"]:
            row[f"AL({t['turn']}) diff"] = (
                f"{t['diff']:+.3f} {fmt_ci(t['ci_low'], t['ci_high'])}" if t["diff"] is not None else ""
            )
        rows.append(row)
    return pd.DataFrame(rows).set_index("model") if rows else pd.DataFrame()


def disclosure_frame(metrics: dict):
    """Long table: model, turn, revealed (share of the persona the simulated user has revealed)."""
    import pandas as pd

    return pd.DataFrame(
        [{"model": m, **r} for m, rows in (metrics.get("disclosure") or {}).items() for r in rows],
        columns=["model", "turn", "revealed", "n"],
    )


# --------------------------------------------------------------------------- persona and tree tables


def profile_ages(pool):
    """Profiles by age band (the age read from the text: "34-year-old", "is 34", "of 34"), split by
    split and source: how the pool spreads over ages."""
    import pandas as pd

    prof = pool[pool["kind"] == "profile"].copy()
    ages = prof["text"].str.extract(r"(\d{1,2})[- ]year|is (\d{2})\b|of (\d{2})\b").bfill(axis=1).iloc[:, 0]
    prof["age_band"] = pd.cut(
        ages.astype(float), [0, 19, 29, 39, 49, 59, 69, 120], labels=["<20", "20s", "30s", "40s", "50s", "60s", "70+"]
    )
    return pd.crosstab(prof["age_band"], [prof["split"], prof["source"]])


def tree_turns(nodes):
    """Per turn of the trees (``nodes``: trees.node_table as a frame): nodes, labelled ones, how often
    the judge's two orders agreed, the share of unusable judgments, words per message and reply, and
    how often the hinted reply was preferred."""
    labelled = nodes[nodes.verdict == "preferred"]
    per_turn = nodes.groupby("turn").agg(
        nodes=("tree", "size"),
        labelled=("verdict", lambda v: (v == "preferred").sum()),
        orders_agree=("orders_agree", "mean"),
        unusable_judgments=("judge_unusable", "sum"),
        judgments=("judgments", "sum"),
        user_words=("user_words", "mean"),
        hinted_words=("hinted_words", "mean"),
        plain_words=("plain_words", "mean"),
    )
    per_turn["hinted_preferred"] = labelled.groupby("turn")["hinted_preferred"].mean()
    per_turn["unusable_judgments"] = per_turn.unusable_judgments / per_turn.judgments.where(per_turn.judgments > 0)
    return per_turn


def tree_verdicts(nodes):
    """How the trees' nodes were decided: nodes per verdict and deciding route (none where tied)."""
    return nodes.groupby(["verdict", "decided_by"], dropna=False).size().rename("nodes").to_frame()


def tree_disclosure(nodes):
    """Per turn, the mean share of the persona's facts the user has revealed so far and the inference
    step has recovered (trees.node_table's ``revealed`` and ``recovered``)."""
    return nodes.groupby("turn")[["revealed", "recovered"]].mean()


# ---------------------------------------------------------------- rows the page and 05_report share


def headline_rows(metrics: dict) -> list[dict]:
    """One row per model: the ALOE summaries with their intervals and the paired difference to base."""
    rows = []
    for m, s in metrics["models"].items():
        vs = s.get("vs_base") or {}
        rows.append(
            {
                "model": m,
                "AL(k)": " ".join(_fmt(r["al"], 2) for r in s["al"]),
                "AVG": f"{_fmt(s['avg'])} {fmt_ci(s.get('avg_ci_low'), s.get('avg_ci_high'))}",
                "IR": f"{_fmt(s['ir'], 4, True)} {fmt_ci(s.get('ir_ci_low'), s.get('ir_ci_high'), 4, True)}",
                "N-IR": f"{_fmt(s['n_ir'])} {fmt_ci(s.get('n_ir_ci_low'), s.get('n_ir_ci_high'))}",
                "N-R²": f"{_fmt(s['n_r2'])} {fmt_ci(s.get('n_r2_ci_low'), s.get('n_r2_ci_high'))}",
                "minus base (AVG, paired)": (
                    f"{_fmt(vs.get('avg_diff'), 3, True)} "
                    f"{fmt_ci(vs.get('avg_diff_ci_low'), vs.get('avg_diff_ci_high'), 3, True)}"
                    if vs
                    else ""
                ),
            }
        )
    return rows


def stage_words(stage: str, m: dict) -> str:
    """A manifest's key counts as a sentence."""
    c = m.get("counts", {})
    if stage == "personas":
        return (
            f"{c.get('profiles')} profiles and {c.get('personalities')} personalities ({c.get('generated')} "
            f"generated); {c.get('train_pairs')} training and {c.get('eval_pairs')} benchmark personas"
        )
    if stage == "trees":
        return (
            f"{c.get('trees')} trees ({c.get('failed_trees')} failed), {c.get('turns')} nodes, "
            f"{c.get('dpo_rows')} preference pairs exported"
        )
    if stage == "train":
        steps = {k[:-6]: v for k, v in c.items() if k.endswith("_steps")}
        return ", ".join(f"{v}: {n} steps" for v, n in steps.items())
    if stage == "evaluate":
        return (
            f"{c.get('models')} models x {c.get('personas')} personas x {c.get('turns')} turns; "
            f"{c.get('missing')} of {c.get('judgments')} judgments missing"
        )
    return ""


def at_a_glance(cfg: ReportConfig) -> list[str]:
    """The results page's first lines (and 05_report's) for this run, from its files."""
    return glance(evaluation_metrics(cfg), judge_card(cfg), bool(self_judging(cfg)))


def glance(metrics: dict | None, card: dict | None, self_judged: bool) -> list[str]:
    """The page's first lines: what the run found and whether it can be trusted, from the numbers."""
    if not metrics:
        return ["No evaluation results yet: nothing to compare."]
    lines = []
    for m, s in (metrics.get("rules") or {}).items():  # the exact judge beside an LLM judge
        vs = s.get("vs_base")
        if vs and vs.get("avg_diff") is not None:
            lines.append(
                f"Exact (rules judge): {m} minus base, AVG (paired): {_fmt(vs['avg_diff'], 3, True)} "
                f"{fmt_ci(vs.get('avg_diff_ci_low'), vs.get('avg_diff_ci_high'), 3, True)}"
            )
    for m, s in metrics["models"].items():
        vs = s.get("vs_base")
        if not vs or vs.get("avg_diff") is None:
            continue
        lines.append(_paired_line(f"{m} minus base", "base", vs))
        ctl = s.get("vs_sft_rejected")
        if ctl and ctl.get("avg_diff") is not None:
            lines.append(
                _paired_line(
                    f"{m} minus sft_rejected (the control: same teacher, only the label differs)", "sft_rejected", ctl
                )
            )
    fit = card["fit"] if card else None
    if fit and card.get("exact"):
        trust = "the rules judge is exact (a program checks each checkable preference)"
    else:
        trust = {
            True: "the judge passed its known-answer card",
            False: f"the judge FAILED its known-answer card ({((card or {}).get('reasons') or ['?'])[0]})",
            None: "the judge was not validated (no judge card)",
        }[fit]
    if self_judged:
        trust += "; it is also the policy (self-judging)"
    can = fit is True and not self_judged
    lines.append(
        f"Can I trust it? {'Yes' if can else 'No'}: {trust}."
        + ("" if can else " This run shows nothing about which model aligns better.")
    )
    if can and not _any_separated(metrics):
        lines.append(
            "The judge can be trusted, but no paired interval above excludes 0: this run detects no "
            "difference between the models, and could only have seen one at least as large as each "
            "line's smallest detectable effect."
        )
    return lines


def _any_separated(metrics: dict) -> bool:
    """Whether some model's paired difference to base (or to the control) has an interval that excludes 0."""
    for s in metrics["models"].values():
        for d in (s.get("vs_base"), s.get("vs_sft_rejected")):
            lo, hi = (d or {}).get("avg_diff_ci_low"), (d or {}).get("avg_diff_ci_high")
            if lo is not None and hi is not None and (lo > 0 or hi < 0):
                return True
    return False


def _paired_line(what: str, ref: str, d: dict) -> str:
    """One paired AVG difference in words: value, interval, which side of ``ref``, smallest detectable."""
    lo, hi = d.get("avg_diff_ci_low"), d.get("avg_diff_ci_high")
    side = ("above" if lo > 0 else "below" if hi < 0 else "not separated from") if lo is not None else "vs"
    mde = f" (smallest detectable: {_fmt(d['avg_diff_mde'], 3)})" if d.get("avg_diff_mde") is not None else ""
    return f"{what}, AVG (paired): {_fmt(d['avg_diff'], 3, True)} {fmt_ci(lo, hi, 3, True)}: {side} {ref}{mde}"


def disclosure_rows(metrics: dict) -> list[dict]:
    """Per model: scheduled reveals, the disclosure rate in the simulator's own words, appended
    phrasings, complaints, and per turn the share of revealed preferences the reply kept."""
    rows = []
    for m, d in (metrics.get("preference_disclosure") or {}).items():
        row = {
            "model": m,
            "scheduled": d["scheduled"],
            "conveyed in its own words": f"{d['conveyed']} ({_fmt(d['rate'], 2)})",
            "appended": d["appended"],
            "complaints": d["complaints"],
        }
        for t in d["per_turn"]:
            row[f"kept by turn {t['turn']}"] = _fmt(t["kept"], 2)
        rows.append(row)
    return rows


def usage_rows(manifests: dict) -> list[dict]:
    """One row per stage and engine, from the manifests' ``usage``."""
    rows = []
    for stage in STAGES:
        for u in (manifests.get(stage) or {}).get("usage") or []:
            rows.append(
                {
                    "stage": stage,
                    "model": u["model"],
                    "roles": ", ".join(u["roles"]),
                    "kind": u["kind"],
                    "calls": f"{u['calls']:,}",
                    "from the cache": f"{u['cached_calls']:,}",
                    "prompt tokens": f"{u['prompt_tokens']:,}",
                    "generated tokens": f"{u['completion_tokens']:,}",
                    "cost": fmt_usd(u.get("cost_usd")) if "cost_usd" in u else "not recorded",
                    "the cache saved": fmt_usd(u.get("saved_usd")) if "saved_usd" in u else "not recorded",
                }
            )
    return rows
