"""Preference conversations (thin foundation version).

Per training persona and turn: the user simulator speaks; a *plain* and a *hinted*
responder answer; a judge that knows the persona compares them in both orders by
the probability of "1" vs "2"; a seeded random branch continues. All personas'
calls for one role go to the backend as one batch (lockstep).

Foundation limits, filled in by the tree-synthesis issue: the hint is the true
persona (no inference step yet), no per-turn resume (the call cache makes a rerun
cheap), and exports are written at the end.
"""

from __future__ import annotations

import random
import time

from aloe import prompts
from aloe.backends import ChatBackend, ChatRequest, ProbRequest, Sampling
from aloe.config import TreesConfig
from aloe.conversation import clean_user_message, simulator_messages
from aloe.io import read_jsonl, write_jsonl, write_manifest
from aloe.judging import pair_verdict


def run(cfg: TreesConfig, backend: ChatBackend) -> dict:
    started = time.time()
    out = cfg.stage_dir_root / "trees"
    pairs = [p for p in read_jsonl(cfg.stage_dir_root / "personas" / "pairs.jsonl") if p["split"] == "train"]
    pairs = pairs[:cfg.n_personas]
    rng = random.Random(cfg.seed)
    hist = {p["id"]: [] for p in pairs}
    trees = {p["id"]: {"id": f"tree-{p['id']}", "persona_id": p["id"], "profile": p["profile"],
                       "personality": p["personality"], "turns": [], "failed": None} for p in pairs}
    sim, plain, hinted, judge = (prompts.get(n) for n in ("user_simulator", "responder_plain", "responder_hinted",
                                                          "judge_pair"))
    samp = Sampling(temperature=cfg.temperature, max_tokens=cfg.max_new_tokens, seed=cfg.seed)
    for turn in range(1, cfg.turns + 1):
        active = [p for p in pairs if trees[p["id"]]["failed"] is None]
        users = backend.chat([ChatRequest(simulator_messages(p["profile"], p["personality"], hist[p["id"]]), samp,
                                          sample_index=turn, prompt_version=sim.tag) for p in active])
        live = []
        for p, u in zip(active, users):
            msg = clean_user_message(u.text) if u.ok else ""
            if not msg:
                trees[p["id"]]["failed"] = {"turn": turn, "role": "user_simulator", "error": u.error or "empty message"}
            else:
                live.append((p, msg))
        def reply_req(p, msg, hint):
            system = (hinted.render("system", hint=f"{p['profile']} {p['personality']}") if hint
                      else plain.render("system"))
            tag = hinted.tag if hint else plain.tag
            return ChatRequest([{"role": "system", "content": system}, *hist[p["id"]], {"role": "user", "content": msg}],
                               samp, sample_index=turn, prompt_version=tag)
        replies = backend.chat([reply_req(p, m, h) for p, m in live for h in (True, False)])
        jreqs = []
        for i, (p, m) in enumerate(live):
            a, b = replies[2 * i].text or "", replies[2 * i + 1].text or ""
            for first, second in ((a, b), (b, a)):
                jreqs.append(ProbRequest([{"role": "system", "content": judge.render("system")},
                                          {"role": "user", "content": judge.render(
                                              "user", profile=p["profile"], personality=p["personality"],
                                              message=m, first=first, second=second)}],
                                         ("1", "2"), prompt_version=judge.tag))
        judged = backend.logprobs(jreqs)
        for i, (p, m) in enumerate(live):
            ra, rb = replies[2 * i], replies[2 * i + 1]
            if not (ra.ok and rb.ok):
                trees[p["id"]]["failed"] = {"turn": turn, "role": "responder", "error": ra.error or rb.error}
                continue
            v = pair_verdict(judged[2 * i], judged[2 * i + 1])
            hinted_wins = v.preferred == "a"
            preferred, rejected = (ra.text, rb.text) if hinted_wins else (rb.text, ra.text)
            followed = rng.choice(["preferred", "rejected"])
            trees[p["id"]]["turns"].append({
                "turn": turn, "user": m,
                "candidates": [{"text": ra.text, "hinted": True}, {"text": rb.text, "hinted": False}],
                "judgment": {"p_hinted": v.p_a, "consistent": v.consistent, "p_hinted_first": v.p_a_first,
                             "p_hinted_second": v.p_a_second},
                "preferred": preferred, "rejected": rejected, "preferred_is_hinted": hinted_wins,
                "followed": followed})
            hist[p["id"]] += [{"role": "user", "content": m},
                              {"role": "assistant", "content": preferred if followed == "preferred" else rejected}]
    records = list(trees.values())
    write_jsonl(out / "trees.jsonl", records)
    sft, dpo = export_rows(records)
    write_jsonl(out / "sft_preferred.jsonl", sft)
    write_jsonl(out / "dpo.jsonl", dpo)
    counts = {"trees": len(records), "failed_trees": sum(t["failed"] is not None for t in records),
              "turns": sum(len(t["turns"]) for t in records), "sft_rows": len(sft), "dpo_rows": len(dpo),
              "cache_hits": backend.cache.hits, "cache_misses": backend.cache.misses}
    write_manifest(out, stage="trees", parameters=cfg, started=started, models={"backend": backend.describe()},
                   counts=counts)
    return counts


def export_rows(trees: list[dict]) -> tuple[list[dict], list[dict]]:
    """SFT (prompt/completion, conversational) and DPO rows; each turn's prompt is the
    history along the followed branch plus *that turn's own* user message."""
    sft, dpo = [], []
    for t in trees:
        history: list[dict] = []
        for turn in t["turns"]:
            prompt = history + [{"role": "user", "content": turn["user"]}]
            rid = f"{t['id']}-t{turn['turn']}"
            sft.append({"id": rid, "prompt": prompt, "completion": [{"role": "assistant", "content": turn["preferred"]}]})
            dpo.append({"id": rid, "prompt": prompt, "chosen": [{"role": "assistant", "content": turn["preferred"]}],
                        "rejected": [{"role": "assistant", "content": turn["rejected"]}]})
            history = prompt + [{"role": "assistant", "content": turn[turn["followed"]]}]
    return sft, dpo
