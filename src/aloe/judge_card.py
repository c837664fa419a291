"""Judge validation on every evaluation run: the *judge card*.

Every number the benchmark prints rests on one judge, so each run checks that judge on
**known answers**, pairs whose right order is known by construction and that do not depend on
the models under test, and says plainly whether it is fit to rank models:

(K1) **tailored pairs**: for each benchmark persona and ``k1_messages`` of the run's user
     messages, a writer model answers once with the persona in its prompt (the oracle's prompt)
     and once without. The judge must score the tailored reply higher under its own persona than
     under a mismatched one (``min_discrimination``, with the mean gap's CI above ``min_gap``), and
     above the plain reply under the own persona (``min_tailored``). The writer is the
     ``responder`` role; where that is the judge's own model (a likelihood judge scores its own
     samples higher by construction) another role's model writes, and where every role is the
     judge's model K1 is marked not independent and does not count;
(K2) **preference pairs**: a reply of this run that satisfies a checkable preference the user had
     revealed, against a minimal edit of it that violates that preference (emoji added, bullets
     joined, a question appended, ...), both scored under the persona; the satisfying one must win
     (``min_preference``). Its agreement with the rules judge on the run's replies is reported;
**independence**: a judge that is the policy (same model) is not independent and cannot pass.

Each rate comes with a cluster-bootstrap CI over personas and the mean score gap. What the card
also reports, as information that does not decide ``fit``:

(a) persona discrimination on the run's own replies, per model: how much persona they carry;
(c) position consistency of the trees' pair judge; (d) length bias (Spearman of score with
words; |r| above ``max_length_corr`` fails the card); (e) re-judge stability (deterministic
judges); (f) agreement with the judges in ``judge_card.compare``.

The ``rules`` judge (aloe.preferences) is exact: its card runs K2 as a check of the edits and
says so; K1 does not apply to it (it reads only the checkable preferences).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from aloe import preferences, prompts
from aloe.backends import ChatRequest, Sampling
from aloe.config import EvaluateConfig
from aloe.conversation import history_before, judge_persona
from aloe.io import read_jsonl
from aloe.judging import Reply, score_replies
from aloe.metrics import fmt_ci as _ci


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
    per_model = {
        m: sorted(((m, c, t) for c in convs for t in c["turns"] if t["score"] is not None), key=lambda x: x[2]["turn"])
        for m, convs in convs_of.items()
    }
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


def position_consistency(cfg: EvaluateConfig) -> dict:
    """(c) from the tree stage's pair-judged nodes, where there are any."""
    if not cfg.paths.trees.exists():
        return {"value": None, "n": 0, "why": "no trees in this experiment"}
    nodes = [n for t in read_jsonl(cfg.paths.trees) for n in t["turns"] if n.get("consistent") is not None]
    if not nodes:
        return {"value": None, "n": 0, "why": "no pair judgments in the trees (likelihood judge or none usable)"}
    return {
        "value": sum(bool(n["consistent"]) for n in nodes) / len(nodes),
        "n": len(nodes),
        "why": "share of tree nodes whose two orders picked the same reply (the trees' pair judge)",
    }


def _engine(roles, name: str):
    """A role's engine from a Roles mapping, or the one backend given for every role (tests, scripts)."""
    if hasattr(roles, "chat"):
        return roles
    return roles[name] if name in roles else None


def _same_model(a, b) -> bool:
    """The same weights, whatever serves them: the same model and revision. A judge on transformers
    and a writer on vLLM (or in int8) of one checkpoint are one model, not two."""
    if a is None or b is None:
        return False
    ia, ib = a.identity(), b.identity()
    return a is b or (ia.get("model"), ia.get("revision")) == (ib.get("model"), ib.get("revision"))


def independence(cfg: EvaluateConfig, roles) -> dict:
    """Is the judge a different model from the policy? A judge that is the policy grades itself."""
    judge, policy = _engine(roles, "judge"), _engine(roles, "policy")
    jc, pc = cfg.role("judge"), cfg.role("policy")
    same = (jc.model, jc.revision) == (pc.model, pc.revision) or _same_model(judge, policy)
    return {
        "value": not same,
        "why": "the judge is the policy (same model): it grades its own replies"
        if same
        else "the judge is a different model from the policy",
    }


def k1_writer(cfg: EvaluateConfig, roles) -> tuple[object, str, bool]:
    """(engine, role, independent) of the model that writes K1's replies: the responder, or another
    role's model when the responder is the judge's model."""
    judge = _engine(roles, "judge")
    for role in ("responder", "simulator", "policy"):
        e = _engine(roles, role)
        if e is not None and not _same_model(e, judge):
            return e, role, True
    return _engine(roles, "responder") or judge, "responder", False


def _messages_for_k1(convs_of: dict[str, list[dict]], pairs: list[dict], per_persona: int) -> list[tuple]:
    """(pair, history, message) for each persona: its first ``per_persona`` turns in the first
    model's conversations (the user's messages; the replies do not matter)."""
    first = next(iter(convs_of.values()), [])
    by_persona = {c["persona_id"]: c for c in first}
    out = []
    for p in pairs:
        c = by_persona.get(p["id"])
        if c is None:
            continue
        for t in c["turns"][:per_persona]:
            out.append((p, history_before(c, t["turn"]), t["user"]))
    return out


def _k1_requests(items: list[tuple], samp: Sampling) -> list[ChatRequest]:
    """Two requests per (persona, history, message): the oracle's prompt (tailored) then the plain one."""
    oracle, plain = prompts.get("responder_oracle"), prompts.get("responder_plain")
    reqs = []
    for p, h, m in items:
        profile, personality = judge_persona(p)
        system = oracle.render("system", profile=profile, personality=personality)
        reqs.append(
            ChatRequest(
                [{"role": "system", "content": system}, *h, {"role": "user", "content": m}],
                samp,
                prompt_version=oracle.tag,
            )
        )
        reqs.append(
            ChatRequest(
                [{"role": "system", "content": plain.render("system")}, *h, {"role": "user", "content": m}],
                samp,
                prompt_version=plain.tag,
            )
        )
    return reqs


def _k1_tally(ok: list[tuple], scores: list, n_boot: int, seed: int) -> tuple[dict, dict]:
    """Discrimination (own vs mismatched) and tailored (tailored vs plain) rates from the judge's
    scores, three per usable item: own, mismatched, plain."""
    disc, tail_w, disc_gap, tail_gap, groups_d, groups_t = [], [], [], [], [], []
    for i, (p, *_rest) in enumerate(ok):
        own, mis, pla = scores[3 * i : 3 * i + 3]
        if own is not None and mis is not None:
            disc.append(win(own, mis))
            disc_gap.append(own - mis)
            groups_d.append(p["id"])
        if own is not None and pla is not None:
            tail_w.append(win(own, pla))
            tail_gap.append(own - pla)
            groups_t.append(p["id"])
    return _rate(disc, disc_gap, groups_d, n_boot, seed), _rate(tail_w, tail_gap, groups_t, n_boot, seed + 1)


def known_tailored(cfg: EvaluateConfig, roles, pairs: list[dict], convs_of: dict[str, list[dict]]) -> dict:
    """K1: tailored vs plain replies written by a model that is not the judge's."""
    card_cfg = cfg.judge_card
    writer, role, independent = k1_writer(cfg, roles)
    judge = _engine(roles, "judge")
    other = mismatched(pairs)
    items = [(p, h, m) for p, h, m in _messages_for_k1(convs_of, pairs, card_cfg.k1_messages) if p["id"] in other]
    reqs = _k1_requests(items, Sampling(temperature=0.0, max_tokens=cfg.max_new_tokens, seed=cfg.seed))
    got = writer.chat(reqs) if reqs else []
    ok = [
        (p, h, m, got[2 * i].text.strip(), got[2 * i + 1].text.strip())
        for i, (p, h, m) in enumerate(items)
        if got[2 * i].ok and got[2 * i + 1].ok and got[2 * i].text.strip() and got[2 * i + 1].text.strip()
    ]
    replies = []
    for p, h, m, tail, pl in ok:
        replies += [Reply(p, h, m, tail), Reply(other[p["id"]], h, m, tail), Reply(p, h, m, pl)]
    scores = [s for s, _ in score_replies(cfg, judge, replies)]
    d, t = _k1_tally(ok, scores, card_cfg.n_boot, cfg.seed)
    return {
        "discrimination": d,
        "tailored": t,
        "writer": {"role": role, **writer.describe()},
        "independent": independent,
        "calls": {"writer": len(reqs), "judge": len(replies)},
        "why": (
            "the writer (" + role + ") is a different model from the judge"
            if independent
            else "every role that could write is the judge's own model: a likelihood judge scores its own "
            "samples higher by construction, so K1 does not count"
        ),
    }


def known_preferences(
    cfg: EvaluateConfig, judge, pairs: list[dict], convs_of: dict[str, list[dict]], judge_kind: str | None = None
) -> dict:
    """K2: a run reply that satisfies a revealed checkable preference against its minimal violating
    edit, both scored under the persona by ``judge_kind`` (default: the run's judge)."""
    by_id = {p["id"]: p for p in pairs}
    cases = []
    for _, c, t in judged_turns(convs_of, 10**9):
        p = by_id.get(c["persona_id"])
        if p is None or not t.get("preferences"):
            continue
        items = {i["id"]: i for i in p.get("preferences") or []}
        for pid in t["preferences"]["revealed"]:
            if preferences.check(items[pid], t["reply"]) != preferences.SATISFIED:
                continue
            edited = preferences.violate(items[pid], t["reply"])
            if edited is not None:
                cases.append((p, c, t, pid, edited))
                break  # one pair per reply
        if len(cases) >= cfg.judge_card.max_k2_pairs:
            break
    replies = []
    for p, c, t, pid, edited in cases:
        h, rev = history_before(c, t["turn"]), tuple(t["preferences"]["revealed"])
        replies += [Reply(p, h, t["user"], t["reply"], rev), Reply(p, h, t["user"], edited, rev)]
    scores = [s for s, _ in score_replies(cfg, judge, replies, judge_kind)]
    wins, gaps, groups, by_pref = [], [], [], {}
    for i, (p, c, t, pid, _) in enumerate(cases):
        a, b = scores[2 * i], scores[2 * i + 1]
        if a is None or b is None:
            continue
        wins.append(win(a, b))
        gaps.append(a - b)
        groups.append(p["id"])
        by_pref.setdefault(pid, []).append(wins[-1])
    out = _rate(wins, gaps, groups, cfg.judge_card.n_boot, cfg.seed + 2)
    out["by_preference"] = {k: {"value": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_pref.items())}
    out["calls"] = {"judge": len(replies)}
    out["why"] = (
        "the run's replies that satisfy a preference the user had revealed, against a minimal edit that violates it"
        if cases
        else "no reply of this run satisfies a revealed checkable preference (or the personas carry none)"
    )
    return out


def _rate(wins: list[float], gaps: list[float], groups: list[str], n_boot: int, seed: int) -> dict:
    v, lo, hi = cluster_rate(wins, groups, n_boot, seed)
    g, glo, ghi = cluster_rate(gaps, groups, n_boot, seed)
    return {
        "value": v,
        "ci_low": lo,
        "ci_high": hi,
        "n": len(wins),
        "personas": len(set(groups)),
        "gap": g,
        "gap_ci_low": glo,
        "gap_ci_high": ghi,
    }


def rules_agreement(convs_of: dict[str, list[dict]]) -> dict:
    """Spearman of the run's judge with the rules judge, on the run's replies that have both."""
    both = [
        (t["score"], t["rules"]["score"])
        for convs in convs_of.values()
        for c in convs
        for t in c["turns"]
        if t.get("rules") and t["score"] is not None and t["rules"].get("score") is not None
    ]
    return {"spearman": spearman([a for a, _ in both], [b for _, b in both]), "n": len(both)}


def _thresholds(card_cfg) -> dict:
    return {
        "min_discrimination": card_cfg.min_discrimination,
        "min_tailored": card_cfg.min_tailored,
        "min_preference": card_cfg.min_preference,
        "max_length_corr": card_cfg.max_length_corr,
        "ci_above": 0.5,
        "min_gap": card_cfg.min_gap,
    }


def _rules_card(cfg: EvaluateConfig, pairs: list[dict], convs_of: dict[str, list[dict]]) -> dict:
    """The exact judge's card: K2 runs as a check of the edits and checkers, K1 does not apply."""
    k2 = known_preferences(cfg, None, pairs, convs_of, "rules")
    reasons = (
        []
        if k2["value"] in (None, 1.0)
        else [
            f"the rules judge preferred a violating edit in {1 - k2['value']:.0%} of K2 pairs: an edit or a checker "
            f"is wrong (a bug, not a property of the judge)"
        ]
    )
    return {
        "judge": "rules",
        "judge_model": preferences.judge_description(),
        "exact": True,
        "independent": True,
        "fit": not reasons,
        "reasons": reasons,
        "thresholds": _thresholds(cfg.judge_card),
        "known_answers": {
            "K1": {
                "value": None,
                "n": 0,
                "counts": False,
                "why": "the rules judge reads only the checkable preferences",
            },
            "K2": {**k2, "counts": True},
        },
        "persona_discrimination": None,
        "persona_discrimination_ci_low": None,
        "persona_discrimination_ci_high": None,
        "n_discrimination": 0,
        "why": "exact: each checkable preference is checked by a program, so the score is known, not "
        "estimated; it measures only what the checkable preferences cover",
    }


def _k1_reasons(k1: dict, card_cfg) -> list[str]:
    """Why K1 fails, if it counts (its writer is independent of the judge)."""
    if not k1["independent"]:
        return []
    d, t = k1["discrimination"], k1["tailored"]
    reasons = []
    if d["value"] is None:
        reasons.append("K1 could not be measured (no usable tailored replies or scores)")
    else:
        reasons += _shortfall(
            "K1: the tailored reply scores higher under its own persona than a mismatched one",
            d["value"],
            d["ci_low"],
            d["ci_high"],
            card_cfg.min_discrimination,
        )
        if d["gap_ci_low"] is not None and d["gap_ci_low"] <= card_cfg.min_gap:
            reasons.append(
                f"K1: the persona moves the score by {d['gap']:+.3f} points on average (own minus "
                f"mismatched), interval [{d['gap_ci_low']:+.3f}, {d['gap_ci_high']:+.3f}] not above "
                f"{card_cfg.min_gap:g}"
            )
    if t["value"] is not None:
        reasons += _shortfall(
            "K1: tailored beats plain under the own persona",
            t["value"],
            t["ci_low"],
            t["ci_high"],
            card_cfg.min_tailored,
        )
    return reasons


def _fit_reasons(indep: dict, k1: dict, k2: dict, length_corr, card_cfg) -> list[str]:
    """Every reason the card fails; an empty list is a pass."""
    reasons = [] if indep["value"] else [indep["why"] + "; its card cannot pass"]
    reasons += _k1_reasons(k1, card_cfg)
    if k2["value"] is not None:
        reasons += _shortfall(
            "K2: a reply that keeps a revealed preference beats its violating edit",
            k2["value"],
            k2["ci_low"],
            k2["ci_high"],
            card_cfg.min_preference,
        )
    if not k1["independent"] and k2["value"] is None:
        reasons.append("no known-answer check counts (K1 not independent, K2 not measurable)")
    if length_corr is not None and abs(length_corr) > card_cfg.max_length_corr:
        reasons.append(
            f"scores follow reply length (Spearman {length_corr:+.2f}, limit ±{card_cfg.max_length_corr:.2f})"
        )
    return reasons


def build(cfg: EvaluateConfig, roles, pairs: list[dict], convs_of: dict[str, list[dict]]) -> dict:
    """The judge card of one evaluation run (see the module docstring). ``roles``: the stage's Roles
    (judge, policy, and for K1 the responder), or one backend that plays every role."""
    if cfg.score_judge == "rules":
        return _rules_card(cfg, pairs, convs_of)
    judge = _engine(roles, "judge")
    indep = independence(cfg, roles)
    k1 = known_tailored(cfg, roles, pairs, convs_of)
    k2 = known_preferences(cfg, judge, pairs, convs_of)
    info = run_reply_checks(cfg, judge, pairs, convs_of)
    reasons = _fit_reasons(indep, k1, k2, info["length_corr"], cfg.judge_card)
    calls = k1["calls"]["writer"] + k1["calls"]["judge"] + k2["calls"]["judge"] + info.pop("calls")
    return {
        "judge": cfg.score_judge,
        "judge_model": judge.describe(),
        "exact": False,
        "independent": indep["value"],
        "independence": indep,
        "fit": not reasons,
        "reasons": reasons,
        "thresholds": _thresholds(cfg.judge_card),
        "known_answers": {"K1": {**k1, "counts": k1["independent"]}, "K2": {**k2, "counts": k2["value"] is not None}},
        "rules_agreement": rules_agreement(convs_of),
        "calls": calls,
        **info,
    }


def run_reply_checks(cfg: EvaluateConfig, judge, pairs: list[dict], convs_of: dict[str, list[dict]]) -> dict:
    """Information about the run's own replies (does not decide fit): (a) persona discrimination per
    model, its gap, (c) position consistency, (d) length bias, (e) re-judging, (f) agreement."""
    card_cfg = cfg.judge_card
    other = mismatched(pairs)
    by_id = {p["id"]: p for p in pairs}
    sample = [(m, c, t) for m, c, t in judged_turns(convs_of, card_cfg.max_replies) if c["persona_id"] in other]
    replies = [Reply(other[c["persona_id"]], history_before(c, t["turn"]), t["user"], t["reply"]) for _, c, t in sample]
    against_other = score_replies(cfg, judge, replies)
    wins, gaps, groups, by_model = [], [], [], {}
    for (m, c, t), (s_other, _) in zip(sample, against_other):
        if s_other is not None:
            wins.append(win(t["score"], s_other))
            gaps.append(t["score"] - s_other)
            groups.append(c["persona_id"])
            by_model.setdefault(m, []).append(wins[-1])
    disc, disc_lo, disc_hi = cluster_rate(wins, groups, card_cfg.n_boot, cfg.seed)
    gap, gap_lo, gap_hi = cluster_rate(gaps, groups, card_cfg.n_boot, cfg.seed)
    own = [t["score"] for _, _, t in sample]
    length_corr = spearman(own, [words(t["reply"]) for _, _, t in sample])
    agreement, calls = {}, len(replies)
    for kind in card_cfg.compare:
        if kind == cfg.score_judge:
            continue
        theirs = score_replies(
            cfg,
            judge,
            [Reply(by_id[c["persona_id"]], history_before(c, t["turn"]), t["user"], t["reply"]) for _, c, t in sample],
            kind,
        )
        calls += len(sample) if kind != "rules" else 0
        both = [(a, b) for a, (b, _) in zip(own, theirs) if b is not None]
        agreement[kind] = {"spearman": spearman([a for a, _ in both], [b for _, b in both]), "n": len(both)}
    methods = {t["judge"].get("method") for _, _, t in sample}
    return {
        "persona_discrimination": disc,
        "persona_discrimination_ci_low": disc_lo,
        "persona_discrimination_ci_high": disc_hi,
        "n_discrimination": len(wins),
        "persona_gap": {
            "mean": gap,
            "ci_low": gap_lo,
            "ci_high": gap_hi,
            "median": float(np.median(gaps)) if gaps else None,
            "why": "own persona's score minus the mismatched one's, same reply (1-5 scale)",
        },
        "persona_discrimination_by_model": {m: {"value": sum(w) / len(w), "n": len(w)} for m, w in by_model.items()},
        "position_consistency": position_consistency(cfg),
        "length_corr": length_corr,
        "n_length": len(own),
        "rejudge": {
            "applicable": False,
            "why": f"judgments by {', '.join(sorted(map(str, methods))) or 'none'}: probabilities, likelihoods "
            f"and greedy text are deterministic, so re-judging the same input gives the same score",
        },
        "agreement": agreement,
        "calls": calls,
    }


def _shortfall(what: str, value: float, lo: float, hi: float, minimum: float) -> list[str]:
    if value < minimum:
        return [f"{what} is {value:.2f} [{lo:.2f}, {hi:.2f}], below the {minimum:.2f} required"]
    if lo <= 0.5:
        return [f"{what} is {value:.2f} but not above chance: its interval [{lo:.2f}, {hi:.2f}] reaches 0.5"]
    return []


def _row(check: str, value=None, interval: str = "", n=None, needed: str = "(information)") -> dict:
    return {"check": check, "value": value, "interval": interval, "n": n, "needed": needed}


def _fmt(v):
    return None if v is None else round(v, 3)


def _rate_row(check: str, r: dict, needed: str) -> dict:
    gap = f" gap {r['gap']:+.2f} {_ci(r.get('gap_ci_low'), r.get('gap_ci_high'))}" if r.get("gap") is not None else ""
    return _row(check, _fmt(r.get("value")), _ci(r.get("ci_low"), r.get("ci_high")) + gap, r.get("n", 0), needed)


def _known_answer_rows(card: dict) -> list[dict]:
    th, ka = card["thresholds"], card["known_answers"]
    k1, k2 = ka["K1"], ka["K2"]
    rows = []
    if "discrimination" in k1:
        counts = "" if k1["counts"] else " (does not count: " + k1["why"] + ")"
        rows.append(
            _rate_row(
                "K1 own persona above a mismatched one, tailored reply",
                k1["discrimination"],
                f">= {th['min_discrimination']}, CI above 0.5, gap CI above {th['min_gap']:g}{counts}",
            )
        )
        rows.append(
            _rate_row(
                "K1 tailored above plain, own persona", k1["tailored"], f">= {th['min_tailored']}, CI above 0.5{counts}"
            )
        )
    else:
        rows.append(_row("K1 tailored pairs", n=0, needed=k1["why"]))
    rows.append(
        _rate_row(
            "K2 keeps a revealed preference above its violating edit",
            k2,
            f">= {th['min_preference']}, CI above 0.5" if k2.get("value") is not None else k2["why"],
        )
    )
    rows += [_row(f"K2 ... {pid}", _fmt(v["value"]), n=v["n"]) for pid, v in (k2.get("by_preference") or {}).items()]
    return rows


def _run_reply_rows(card: dict) -> list[dict]:
    th, ra, pc = card["thresholds"], card.get("rules_agreement") or {}, card["position_consistency"]
    rows = [
        _row(
            "agreement with the rules judge on the run's replies (Spearman)", _fmt(ra.get("spearman")), n=ra.get("n", 0)
        ),
        _row(
            "(a) run's replies: own persona above a mismatched one",
            _fmt(card["persona_discrimination"]),
            _ci(card["persona_discrimination_ci_low"], card["persona_discrimination_ci_high"]),
            card["n_discrimination"],
            "(information: how much persona the replies carry)",
        ),
    ]
    rows += [
        _row(f"(a) ... on {m}'s replies", _fmt(v["value"]), n=v["n"])
        for m, v in card.get("persona_discrimination_by_model", {}).items()
    ]
    rows += [
        _row("(c) pair judge: both orders agree", _fmt(pc["value"]), n=pc["n"], needed="(information) " + pc["why"]),
        _row(
            "(d) score vs reply length (Spearman)",
            _fmt(card["length_corr"]),
            n=card["n_length"],
            needed=f"|r| <= {th['max_length_corr']}",
        ),
        _row("(e) re-judge stability", n=0, needed=card["rejudge"]["why"]),
    ]
    rows += [
        _row(f"(f) agreement with the {kind} judge (Spearman)", _fmt(a["spearman"]), n=a["n"])
        for kind, a in card["agreement"].items()
    ]
    rows.append(_row("cost of this card", card.get("calls"), needed="(calls: K1 writer and judge, K2, (a), (f))"))
    return rows


def card_rows(card: dict) -> list[dict]:
    """The card as a readable table: check, value, interval, n, what is needed."""
    rows = [_row("independent: the judge is not the policy", card["independent"], needed="true")]
    if card.get("exact"):
        rows.append(_row("exact: scored by a program (aloe.preferences)", True, needed="(the rules judge)"))
    rows += _known_answer_rows(card)
    return rows if card.get("exact") else rows + _run_reply_rows(card)
