"""Judge validation on every evaluation run: the *judge card*.

Every number the benchmark prints rests on one LLM judge, so each run checks, on its own
benchmark personas and replies, that the judge can tell a reply that fits this user from
one that does not, and says plainly whether it is fit to rank models:

(a) **persona discrimination**: the same reply scored against its own persona and against a
    mismatched one (another profile *and* another personality); the share of replies whose
    own score is higher (ties count half) with a bootstrap CI over personas. The reply is
    held fixed, so length and quality cannot explain it;
(b) **tailored vs untailored**: for each of ``base``'s turns, the policy also answers the
    same message with the persona in its system prompt (the oracle's prompt); the share of
    those tailored replies that score above the plain one, with a CI, and the same after
    removing what reply length explains;
(c) **position consistency** of the pair judge, from the tree stage's nodes (both orders
    agree), where pairs were judged;
(d) **length bias**: Spearman correlation of the score with the reply's length in words;
(e) **re-judge stability**: not applicable to this project's judges, which read
    probabilities or decode greedily, so the same input always gets the same score (said so);
(f) **agreement** with the other judges named in ``judge_card.compare`` (Spearman, same replies).

``fit`` is true when (a) reaches ``min_discrimination`` with its CI above 0.5, (b) (where
measured) reaches ``min_tailored`` with its CI above 0.5, and |(d)| is at most
``max_length_corr``. The thresholds come from the parameter file and are written into the card.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from aloe import prompts
from aloe.backends import ChatRequest
from aloe.config import EvaluateConfig
from aloe.conversation import history_before
from aloe.io import read_jsonl


def mismatched(pairs: list[dict]) -> dict[str, dict]:
    """For each persona, another benchmark persona with a different profile and personality
    (the first such one from half-way round the list: fixed, no randomness)."""
    out = {}
    n = len(pairs)
    for i, p in enumerate(pairs):
        for step in range(n // 2, n // 2 + n):
            q = pairs[(i + step) % n]
            if q["profile_id"] != p["profile_id"] and q["personality_id"] != p["personality_id"]:
                out[p["id"]] = q
                break
    return out


def judged_turns(convs_of: dict[str, list[dict]], limit: int) -> list[tuple[str, dict, dict]]:
    """(model, conversation, turn) of scored replies, spread round-robin over models,
    personas and turns, at most ``limit``."""
    # turn by turn, personas in order within a turn (sorted is stable)
    per_model = {m: sorted(((m, c, t) for c in convs for t in c["turns"] if t["score"] is not None),
                           key=lambda x: x[2]["turn"]) for m, convs in convs_of.items()}
    out, i = [], 0
    while len(out) < limit and any(i < len(v) for v in per_model.values()):
        for v in per_model.values():
            if i < len(v) and len(out) < limit:
                out.append(v[i])
        i += 1
    return out


def cluster_rate(wins: list[float], groups: list[str], n_boot: int, seed: int) -> tuple:
    """Mean of ``wins`` and a percentile bootstrap CI resampling groups (personas), since the
    replies of one persona are not independent."""
    if not wins:
        return None, None, None
    df = pd.DataFrame({"w": wins, "g": groups})
    sums = df.groupby("g")["w"].agg(["sum", "count"])
    s, c = sums["sum"].to_numpy(), sums["count"].to_numpy()
    idx = np.random.default_rng(seed).integers(0, len(s), size=(n_boot, len(s)))
    boots = s[idx].sum(axis=1) / c[idx].sum(axis=1)
    return float(np.mean(wins)), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def win(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def spearman(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None
    rx, ry = pd.Series(x).rank(), pd.Series(y).rank()
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def words(text: str) -> int:
    return len(text.split())


def tailored_probe(cfg: EvaluateConfig, policy, judge_engine, pairs: list[dict], base_convs: list[dict]) -> list[dict]:
    """(b): the policy answers each of base's scored turns again, told the persona (the oracle's
    prompt), and the judge scores that tailored reply against the persona."""
    from aloe.evaluation import Reply, score_replies, under_test_sampling

    by_id = {p["id"]: p for p in pairs}
    oracle = prompts.get("responder_oracle")
    todo = [(c, t) for c in base_convs for t in c["turns"] if t["score"] is not None][:cfg.judge_card.max_replies]
    reqs = []
    for c, t in todo:
        p = by_id[c["persona_id"]]
        system = oracle.render("system", profile=p["profile"], personality=p["personality"])
        reqs.append(ChatRequest([{"role": "system", "content": system}, *history_before(c, t["turn"]),
                                 {"role": "user", "content": t["user"]}], under_test_sampling(cfg),
                                prompt_version=oracle.tag))
    replies = policy.chat(reqs)
    ok = [(c, t, r.text.strip()) for (c, t), r in zip(todo, replies) if r.ok and r.text.strip()]
    scores = score_replies(cfg, judge_engine, [Reply(by_id[c["persona_id"]], history_before(c, t["turn"]), t["user"],
                                                     text) for c, t, text in ok])
    return [{"persona_id": c["persona_id"], "turn": t["turn"], "plain": t["reply"], "plain_score": t["score"],
             "tailored": text, "tailored_score": s} for (c, t, text), (s, _) in zip(ok, scores) if s is not None]


def position_consistency(cfg: EvaluateConfig) -> dict:
    """(c) from the tree stage's pair-judged nodes, where there are any."""
    if not cfg.paths.trees.exists():
        return {"value": None, "n": 0, "why": "no trees in this experiment"}
    nodes = [n for t in read_jsonl(cfg.paths.trees) for n in t["turns"] if n.get("consistent") is not None]
    if not nodes:
        return {"value": None, "n": 0, "why": "no pair judgments in the trees (likelihood judge or none usable)"}
    return {"value": sum(bool(n["consistent"]) for n in nodes) / len(nodes), "n": len(nodes),
            "why": "share of tree nodes whose two orders picked the same reply (the trees' pair judge)"}


def build(cfg: EvaluateConfig, judge_engine, pairs: list[dict], convs_of: dict[str, list[dict]],
          probe: list[dict] | None) -> dict:
    """The judge card of one evaluation run (see the module docstring)."""
    from aloe.evaluation import Reply, score_replies

    card_cfg = cfg.judge_card
    other = mismatched(pairs)
    by_id = {p["id"]: p for p in pairs}
    sample = [(m, c, t) for m, c, t in judged_turns(convs_of, card_cfg.max_replies) if c["persona_id"] in other]
    replies = [Reply(other[c["persona_id"]], history_before(c, t["turn"]), t["user"], t["reply"]) for _, c, t in sample]
    against_other = score_replies(cfg, judge_engine, replies)
    wins, gaps, groups, by_model = [], [], [], {}
    for (m, c, t), (s_other, _) in zip(sample, against_other):
        if s_other is not None:
            wins.append(win(t["score"], s_other))
            gaps.append(t["score"] - s_other)
            groups.append(c["persona_id"])
            by_model.setdefault(m, []).append(wins[-1])
    disc, disc_lo, disc_hi = cluster_rate(wins, groups, card_cfg.n_boot, cfg.seed)
    # the win rate counts directions only; the gap says how far the persona moves the score. A judge
    # whose gaps are mostly near 0 is decided by small systematic effects, whichever way they lean
    gap, gap_lo, gap_hi = cluster_rate(gaps, groups, card_cfg.n_boot, cfg.seed)

    own = [t["score"] for _, _, t in sample]
    lengths = [words(t["reply"]) for _, _, t in sample]
    length_corr = spearman(own, lengths)

    tailored = {"value": None, "ci_low": None, "ci_high": None, "n": 0, "length_adjusted": None,
                "why": "base is not among the evaluated models" if probe is None else "no usable probe replies"}
    if probe:
        tw = [win(r["tailored_score"], r["plain_score"]) for r in probe]
        v, lo, hi = cluster_rate(tw, [r["persona_id"] for r in probe], card_cfg.n_boot, cfg.seed + 1)
        # what length explains, removed: residuals of one least-squares line of score on words
        x = np.array([words(r["tailored"]) for r in probe] + [words(r["plain"]) for r in probe], dtype=float)
        y = np.array([r["tailored_score"] for r in probe] + [r["plain_score"] for r in probe], dtype=float)
        slope = float(np.polyfit(x, y, 1)[0]) if x.std() > 0 else 0.0
        res = y - slope * x
        adj = float(np.mean([win(a, b) for a, b in zip(res[:len(probe)], res[len(probe):])]))
        tailored = {"value": v, "ci_low": lo, "ci_high": hi, "n": len(probe), "length_adjusted": adj,
                    "mean_gap": float(np.mean([r["tailored_score"] - r["plain_score"] for r in probe])),
                    "why": "the policy told the persona vs the plain base reply, same message"}

    agreement = {}
    for kind in card_cfg.compare:
        if kind == cfg.judge:
            continue
        theirs = score_replies(cfg, judge_engine, [Reply(by_id[c["persona_id"]], history_before(c, t["turn"]),
                                                         t["user"], t["reply"]) for _, c, t in sample], kind)
        both = [(a, b) for a, (b, _) in zip(own, theirs) if b is not None]
        agreement[kind] = {"spearman": spearman([a for a, _ in both], [b for _, b in both]), "n": len(both)}

    methods = {t["judge"].get("method") for _, _, t in sample}
    rejudge = {"applicable": False,
               "why": f"judgments by {', '.join(sorted(methods)) or 'none'}: probabilities, likelihoods and greedy "
                      f"text are deterministic, so re-judging the same input gives the same score"}

    reasons = []
    if disc is None:
        reasons.append("persona discrimination could not be measured (no usable mismatched scores)")
    else:
        reasons += _shortfall("persona discrimination (own persona scores above a mismatched one)", disc, disc_lo,
                              disc_hi, card_cfg.min_discrimination)
    if gap is not None and gap_lo <= card_cfg.min_gap:
        reasons.append(f"the persona moves the score by {gap:+.3f} points on average (own minus mismatched), "
                       f"interval [{gap_lo:+.3f}, {gap_hi:+.3f}] not above {card_cfg.min_gap:g}")
    if tailored["value"] is not None:
        reasons += _shortfall("tailored replies beating plain ones", tailored["value"], tailored["ci_low"],
                              tailored["ci_high"], card_cfg.min_tailored)
    if length_corr is not None and abs(length_corr) > card_cfg.max_length_corr:
        reasons.append(f"scores follow reply length (Spearman {length_corr:+.2f}, limit "
                       f"±{card_cfg.max_length_corr:.2f})")
    return {
        "judge": cfg.judge, "judge_model": judge_engine.describe(), "fit": not reasons, "reasons": reasons,
        "thresholds": {"min_discrimination": card_cfg.min_discrimination, "min_tailored": card_cfg.min_tailored,
                       "max_length_corr": card_cfg.max_length_corr, "discrimination_ci_above": 0.5,
                       "min_gap": card_cfg.min_gap},
        "persona_discrimination": disc, "persona_discrimination_ci_low": disc_lo,
        "persona_discrimination_ci_high": disc_hi, "n_discrimination": len(wins),
        "persona_gap": {"mean": gap, "ci_low": gap_lo, "ci_high": gap_hi,
                        "median": float(np.median(gaps)) if gaps else None,
                        "why": "own persona's score minus the mismatched one's, same reply (1-5 scale)"},
        # split by whose replies were judged: a judge that is also the policy may recognise the replies it
        # wrote with the persona in its prompt (the oracle's) rather than read the persona
        "persona_discrimination_by_model": {m: {"value": sum(w) / len(w), "n": len(w)} for m, w in by_model.items()},
        "tailored": tailored, "position_consistency": position_consistency(cfg),
        "length_corr": length_corr, "n_length": len(own), "rejudge": rejudge, "agreement": agreement,
    }


def _shortfall(what: str, value: float, lo: float, hi: float, minimum: float) -> list[str]:
    if value < minimum:
        return [f"{what} is {value:.2f} [{lo:.2f}, {hi:.2f}], below the {minimum:.2f} required"]
    if lo <= 0.5:
        return [f"{what} is {value:.2f} but not above chance: its interval [{lo:.2f}, {hi:.2f}] reaches 0.5"]
    return []


def card_rows(card: dict) -> list[dict]:
    """The card as a readable table: check, value, interval, n, pass."""
    t, pc = card["tailored"], card["position_consistency"]
    th = card["thresholds"]

    def fmt(v):
        return None if v is None else round(v, 3)

    rows = [
        {"check": "(a) persona discrimination: own persona scores higher than a mismatched one",
         "value": fmt(card["persona_discrimination"]),
         "interval": _ci(card["persona_discrimination_ci_low"], card["persona_discrimination_ci_high"]),
         "n": card["n_discrimination"], "needed": f">= {th['min_discrimination']}, CI above 0.5"},
        *([{"check": "(a') own minus mismatched score (1-5 points), mean (median)",
            "value": fmt(card["persona_gap"]["mean"]),
            "interval": _ci(card["persona_gap"]["ci_low"], card["persona_gap"]["ci_high"])
            + f" (median {card['persona_gap']['median']:+.3f})",
            "n": card["n_discrimination"], "needed": f"CI low > {th.get('min_gap', 0.0):g}"}]
          if card.get("persona_gap", {}).get("mean") is not None else []),
        *[{"check": f"(a) ... on {m}'s replies", "value": fmt(v["value"]), "interval": "", "n": v["n"],
           "needed": "(information)"} for m, v in card.get("persona_discrimination_by_model", {}).items()],
        {"check": "(b) tailored (persona in prompt) beats plain, same message", "value": fmt(t["value"]),
         "interval": _ci(t["ci_low"], t["ci_high"]), "n": t["n"],
         "needed": f">= {th['min_tailored']}, CI above 0.5" if t["value"] is not None else t["why"]},
        {"check": "(b') the same, length removed", "value": fmt(t["length_adjusted"]), "interval": "", "n": t["n"],
         "needed": "(information)"},
        {"check": "(c) pair judge: both orders agree", "value": fmt(pc["value"]), "interval": "", "n": pc["n"],
         "needed": "(information) " + pc["why"]},
        {"check": "(d) score vs reply length (Spearman)", "value": fmt(card["length_corr"]), "interval": "",
         "n": card["n_length"], "needed": f"|r| <= {th['max_length_corr']}"},
        {"check": "(e) re-judge stability", "value": None, "interval": "", "n": 0, "needed": card["rejudge"]["why"]},
    ]
    for kind, a in card["agreement"].items():
        rows.append({"check": f"(f) agreement with the {kind} judge (Spearman)", "value": fmt(a["spearman"]),
                     "interval": "", "n": a["n"], "needed": "(information)"})
    return rows


def _ci(lo, hi) -> str:
    return "" if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]"
