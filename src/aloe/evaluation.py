"""ALOE evaluation: simulated-user conversations scored turn by turn.

For every model under test and benchmark persona, a simulated user (the tree stage's
user simulator) talks with the model for ``turns`` turns. The model sees only the
conversation, never the persona, except the *oracle* baseline, whose system prompt
holds it (an upper reference). After each reply a judge that knows the persona
scores it 1-5 on the paper's three criteria: the probability-weighted expected score
over "1".."5" where the backend gives log-probabilities, else a strictly parsed digit
with bounded retries. An unusable judgment is missing (never a 1, never a crash) and
every mean is reported with its n.

Engine: one model at a time (a GPU holds one model under test beside the judge);
inside a model, every persona's call for one role goes to the backend as one batch.
Each model's conversations are checkpointed after every turn
(``evaluate/conversations/<model>.jsonl``), so a killed run resumes where it stopped;
the call cache makes repeated calls free.
"""

from __future__ import annotations

import csv
import gc
import logging
import math
import time
from pathlib import Path

from aloe import prompts
from aloe.backends import ChatBackend, ChatRequest, ProbRequest, Sampling, open_backend
from aloe.config import BackendConfig, EvaluateConfig
from aloe.conversation import clean_user_message, simulator_messages
from aloe.errors import AloeError
from aloe.io import atomic_path, read_jsonl, write_json, write_jsonl, write_manifest
from aloe.judging import SCORES, expected_score, judge, parse_score_choice
from aloe.metrics import summarize
from aloe.trees import dialogue_text

log = logging.getLogger(__name__)

BASELINES = {"base": "responder_plain", "oracle": "responder_oracle", "reminder": "responder_reminder"}
TRAINED = ("sft_preferred", "sft_rejected", "dpo", "sft_then_dpo")


def benchmark_pairs(cfg: EvaluateConfig) -> list[dict]:
    """The benchmark personas, ordered so that the first n cover as many profiles and
    personalities as possible (profile j with personality (j + r) mod 5 in round r)."""
    if cfg.official_dir:
        from aloe.personas import _records, make_pairs, read_aloe_pool

        d = Path(cfg.official_dir)
        profiles = _records(read_aloe_pool(d / "profile_eval.jsonl"), "profile", "imported", "eval")
        # the benchmark pairs every eval profile with the first 5 eval personalities (20 x 5 = 100)
        personalities = _records(read_aloe_pool(d / "personality_eval.jsonl")[:5], "personality", "imported", "eval")
        pairs = make_pairs(profiles, personalities, len(personalities), 0, "eval")
    else:
        src = cfg.stage_dir_root / "personas" / "pairs.jsonl"
        pairs = [p for p in read_jsonl(src) if p["split"] == "eval"]
        if not pairs:
            raise AloeError(f"{src}: no evaluation personas")
    profiles = list(dict.fromkeys(p["profile_id"] for p in pairs))
    pers = list(dict.fromkeys(p["personality_id"] for p in pairs))
    by = {(p["profile_id"], p["personality_id"]): p for p in pairs}
    ordered = []
    for r in range(len(pers)):
        for j, prof in enumerate(profiles):
            p = by.get((prof, pers[(j + r) % len(pers)]))
            if p is not None:
                ordered.append(p)
    if cfg.n_personas > len(ordered):
        raise AloeError(f"n_personas: {cfg.n_personas} asked, but there are {len(ordered)} benchmark personas")
    return ordered[:cfg.n_personas]


def _system(model: str, pair: dict) -> str:
    role = prompts.get(BASELINES.get(model, "responder_plain"))
    if model == "oracle":
        return role.render("system", profile=pair["profile"], personality=pair["personality"])
    return role.render("system")


def _trained_path(cfg: EvaluateConfig, model: str) -> Path:
    from aloe.training import variant_model

    path = variant_model(cfg, model)
    if not (path / "config.json").exists():
        raise AloeError(f"{path}: no trained model for {model!r}; run the train stage with this variant, "
                        f"or remove it from stages.evaluate.models")
    return path


def _open_under_test(cfg: EvaluateConfig, model: str, shared: ChatBackend) -> ChatBackend:
    if model in BASELINES:
        return shared
    path = _trained_path(cfg, model)
    # Trained variants load locally (vLLM when the experiment uses vLLM); an HTTP backend's
    # server cannot be told to load our folder, so those runs use transformers for them.
    kind = cfg.backend.kind if cfg.backend.kind in ("transformers", "vllm") else "transformers"
    bc = BackendConfig(kind=kind, model=str(path), batch_size=cfg.backend.batch_size, dtype=cfg.backend.dtype,
                       device=cfg.backend.device, tensor_parallel_size=cfg.backend.tensor_parallel_size,
                       gpu_memory_utilization=cfg.backend.gpu_memory_utilization)
    return open_backend(bc, cfg.cache_path)


def run_model(cfg: EvaluateConfig, model: str, pairs: list[dict], shared: ChatBackend, under_test: ChatBackend,
              path: Path, progress: bool = True) -> list[dict]:
    """K lockstep turns for one model over all personas; checkpointed per turn."""
    from tqdm.auto import tqdm

    done = {c["persona_id"]: c for c in read_jsonl(path, allow_torn_tail=True)} if path.exists() else {}
    convs = [done.get(p["id"]) or {"model": model, "persona_id": p["id"], "profile": p["profile"],
                                   "personality": p["personality"], "turns": []} for p in pairs]
    for c in convs:
        c["turns"] = [t for t in c["turns"] if t["turn"] <= cfg.turns]
    sim = prompts.get("user_simulator")
    rubric = prompts.get("judge_score" if cfg.judge == "paper" else "judge_score_history")
    user_samp = Sampling(temperature=cfg.user_temperature, max_tokens=cfg.max_new_tokens, seed=cfg.seed)
    model_samp = Sampling(temperature=0.0, max_tokens=cfg.max_new_tokens, seed=cfg.seed)
    bar = tqdm(total=len(convs) * cfg.turns, initial=sum(len(c["turns"]) for c in convs), desc=f"evaluate {model}",
               unit="turn", disable=not progress)
    for turn in range(1, cfg.turns + 1):
        active = [(c, p) for c, p in zip(convs, pairs) if len(c["turns"]) == turn - 1]
        if not active:
            continue

        def history(c):  # the conversation so far; a turn without a usable exchange is not part of it
            out = []
            for t in c["turns"]:
                if t["user"] and t["reply"]:
                    out += [{"role": "user", "content": t["user"]}, {"role": "assistant", "content": t["reply"]}]
            return out

        users = shared.chat([ChatRequest(simulator_messages(p["profile"], p["personality"], history(c)), user_samp,
                                         sample_index=turn, prompt_version=sim.tag) for c, p in active])
        msgs = [clean_user_message(u.text) if u.ok else "" for u in users]
        asked = [(c, p, m) for (c, p), m in zip(active, msgs) if m]
        replies = under_test.chat([ChatRequest([{"role": "system", "content": _system(model, p)}, *history(c),
                                                {"role": "user", "content": m}], model_samp,
                                               prompt_version=prompts.get(BASELINES.get(model, "responder_plain")).tag)
                                   for c, p, m in asked])
        got = {id(c): (m, r) for (c, p, m), r in zip(asked, replies)}
        scored = [(c, p, m, r.text.strip()) for (c, p, m), r in zip(asked, replies) if r.ok and r.text.strip()]
        # the "paper" rubric ignores {dialogue}; the "history" rubric shows it
        jreqs = [ProbRequest([{"role": "system", "content": rubric.render("system")},
                              {"role": "user", "content": rubric.render(
                                  "user", profile=p["profile"], personality=p["personality"], message=m, reply=r,
                                  dialogue=dialogue_text(history(c), m))}], SCORES, prompt_version=rubric.tag)
                 for c, p, m, r in scored]
        verdicts = dict(zip((id(c) for c, *_ in scored),
                            judge(shared, jreqs, parse_score_choice, method=cfg.judge_method,
                                  retries=cfg.judge_retries)))
        for c, p in active:
            m, r = got.get(id(c), ("", None))
            j = verdicts.get(id(c))
            reason = None if j else ("user simulator failed" if not m else
                                     f"model failed: {r.error if r is not None else 'no reply'}"
                                     if r is None or not r.ok else "empty reply")
            c["turns"].append({"turn": turn, "user": m, "reply": (r.text.strip() if r is not None and r.ok else None),
                               "score": expected_score(j) if j else None,
                               "judge": j.to_json() if j else {"method": "none", "error": reason}})
        write_jsonl(path, convs)
        bar.update(len(active))
    bar.close()
    return convs


def run(cfg: EvaluateConfig, backend: ChatBackend, *, progress: bool = True) -> dict:
    started = time.time()
    out = cfg.stage_dir_root / "evaluate"
    pairs = benchmark_pairs(cfg)
    for m in cfg.models:  # fail before any conversation if a trained model is missing
        if m not in BASELINES:
            _trained_path(cfg, m)
    all_convs, metrics, timings = [], {}, {}
    for model in cfg.models:
        t0 = time.time()
        under_test = _open_under_test(cfg, model, backend)
        convs = run_model(cfg, model, pairs, backend, under_test, out / "conversations" / f"{model}.jsonl",
                          progress)
        if under_test is not backend:
            under_test.close()
            del under_test
            gc.collect()
        timings[model] = round(time.time() - t0, 2)
        scores = {c["persona_id"]: {t["turn"]: t["score"] for t in c["turns"]} for c in convs}
        metrics[model] = summarize(scores, cfg.turns, n_boot=cfg.n_boot, seed=cfg.seed)
        all_convs += convs
    rows = [{"model": c["model"], "persona": c["persona_id"], "turn": t["turn"], "score": t["score"],
             "judge_method": t["judge"]["method"], "judge_raw": " | ".join(t["judge"].get("raw") or []),
             "judge_error": t["judge"].get("error")} for c in all_convs for t in c["turns"]]
    write_jsonl(out / "transcripts.jsonl", all_convs)
    with atomic_path(out / "scores.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["model"])
        w.writeheader()
        w.writerows(rows)
    turns_done = sum(len(c["turns"]) for c in all_convs)
    result = {"turns": cfg.turns, "personas": len(pairs), "judge": cfg.judge, "models": metrics,
              "judge_model": backend.describe(), "seconds_per_model": timings,
              "turns_per_second": {m: round(len(pairs) * cfg.turns / s, 4) if s else None
                                   for m, s in timings.items()}}
    write_json(out / "metrics.json", _jsonable(result))
    counts = {"personas": len(pairs), "turns": cfg.turns, "models": len(cfg.models), "judgments": len(rows),
              "missing": sum(r["score"] is None for r in rows), "conversation_turns": turns_done,
              "cache_hits": backend.cache.hits, "cache_misses": backend.cache.misses}
    write_manifest(out, stage="evaluate", parameters=cfg, started=started, models={"backend": backend.describe()},
                   counts=counts)
    return result


def _jsonable(x):
    """NaN is not JSON: a turn with no usable judgment is null in metrics.json."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def al_frame(metrics: dict):
    """Long table: model, turn, al, n, ci_low, ci_high (for the AL(k) plot)."""
    import pandas as pd

    return pd.DataFrame([{"model": m, **row} for m, s in metrics["models"].items() for row in s["al"]])


def metrics_frame(metrics: dict):
    import pandas as pd

    rows = []
    for m, s in metrics["models"].items():
        rows.append({"model": m, "AVG": s["avg"], "IR": s["ir"], "IR 95% CI": _ci(s["ir_ci_low"], s["ir_ci_high"]),
                     "N-IR": s["n_ir"], "N-R2": s["n_r2"], "missing": s["missing"], "personas": s["n_personas"]})
    return pd.DataFrame(rows).set_index("model")


def _ci(lo, hi) -> str:
    return "" if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]"


def separation(metrics: dict, a: str, b: str) -> list[dict]:
    """Per turn, whether model a's and model b's 95% intervals are disjoint (and which is higher)."""
    ms = metrics["models"]
    if a not in ms or b not in ms:
        return []
    out = []
    for ra, rb in zip(ms[a]["al"], ms[b]["al"]):
        if None in (ra["ci_low"], rb["ci_low"]):
            out.append({"turn": ra["turn"], "separated": None})
            continue
        sep = ra["ci_low"] > rb["ci_high"] or rb["ci_low"] > ra["ci_high"]
        out.append({"turn": ra["turn"], "separated": sep, "higher": a if ra["al"] > rb["al"] else b,
                    "diff": ra["al"] - rb["al"]})
    return out
