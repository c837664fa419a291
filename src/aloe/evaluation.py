"""ALOE evaluation (thin foundation version).

A simulated user talks with the model under test for K turns; the model sees only
the conversation, never the persona. After each reply a judge that knows the
persona scores it 1-5; the score is the probability-weighted expected value over
"1".."5" (no text parsing), and a judgment with no usable probabilities is missing,
never a 1. Foundation limits, filled in by the evaluation issue: one model (the
configured backend), one judge variant, no baselines yet.
"""

from __future__ import annotations

import csv
import time

from aloe import prompts
from aloe.backends import ChatBackend, ChatRequest, ProbRequest, Sampling
from aloe.config import EvaluateConfig
from aloe.conversation import clean_user_message, simulator_messages
from aloe.io import atomic_path, read_jsonl, write_json, write_jsonl, write_manifest
from aloe.judging import SCORES, expected_score
from aloe.metrics import al_table, improvement_rate, normalized_improvement_rate, normalized_r2


def run(cfg: EvaluateConfig, backend: ChatBackend) -> dict:
    started = time.time()
    out = cfg.stage_dir_root / "evaluate"
    pairs = [p for p in read_jsonl(cfg.stage_dir_root / "personas" / "pairs.jsonl") if p["split"] == "eval"]
    pairs = pairs[:cfg.n_personas]
    sim, plain, judge = prompts.get("user_simulator"), prompts.get("responder_plain"), prompts.get("judge_score")
    user_samp = Sampling(temperature=0.7, max_tokens=cfg.max_new_tokens, seed=cfg.seed)
    model_samp = Sampling(temperature=0.0, max_tokens=cfg.max_new_tokens, seed=cfg.seed)
    hist = {p["id"]: [] for p in pairs}
    scores: dict[str, dict[int, float | None]] = {p["id"]: {} for p in pairs}
    rows = []
    for turn in range(1, cfg.turns + 1):
        users = backend.chat([ChatRequest(simulator_messages(p["profile"], p["personality"], hist[p["id"]]), user_samp,
                                          sample_index=turn, prompt_version=sim.tag) for p in pairs])
        msgs = [clean_user_message(u.text) if u.ok else "" for u in users]
        replies = backend.chat([ChatRequest([{"role": "system", "content": plain.render("system")}, *hist[p["id"]],
                                             {"role": "user", "content": m}], model_samp, prompt_version=plain.tag)
                                for p, m in zip(pairs, msgs)])
        judged = backend.logprobs([ProbRequest(
            [{"role": "system", "content": judge.render("system")},
             {"role": "user", "content": judge.render("user", profile=p["profile"], personality=p["personality"],
                                                      message=m, reply=r.text or "")}], SCORES,
            prompt_version=judge.tag) for p, m, r in zip(pairs, msgs, replies)])
        for p, m, r, j in zip(pairs, msgs, replies, judged):
            usable = bool(m) and r.ok
            s = expected_score(j) if usable else None
            scores[p["id"]][turn] = s
            rows.append({"model": backend.model_id, "persona": p["id"], "turn": turn, "score": s,
                         "user": m, "reply": r.text, "judge_logprobs": j.logprobs, "judge_error": j.error})
            if usable:
                hist[p["id"]] += [{"role": "user", "content": m}, {"role": "assistant", "content": r.text}]
    table = al_table({k: {t: v for t, v in s.items() if v is not None} for k, s in scores.items()}, cfg.turns)
    al = [r["al"] for r in table]
    metrics = {"model": backend.model_id, "turns": cfg.turns, "personas": len(pairs), "al": table,
               "avg": sum(al) / len(al) if al else None}
    if len(al) >= 2 and all(a == a for a in al):
        metrics.update(ir=improvement_rate(al), n_ir=normalized_improvement_rate(al), n_r2=normalized_r2(al))
    write_jsonl(out / "transcripts.jsonl", rows)
    with atomic_path(out / "scores.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "persona", "turn", "score", "judge_error"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    write_json(out / "metrics.json", metrics)
    counts = {"personas": len(pairs), "turns": cfg.turns, "judgments": len(rows),
              "missing": sum(r["score"] is None for r in rows), "cache_hits": backend.cache.hits,
              "cache_misses": backend.cache.misses}
    write_manifest(out, stage="evaluate", parameters=cfg, started=started, models={"backend": backend.describe()},
                   counts=counts)
    return metrics
