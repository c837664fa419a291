"""ALOE evaluation: simulated-user conversations scored turn by turn.

For every model under test and benchmark persona, a simulated user (the tree stage's
user simulator) talks with the model for ``turns`` turns. The model sees only the
conversation, never the persona, except the *oracle* baseline, whose system prompt
holds it (an upper reference). After each reply a judge that knows the persona
scores it 1-5 on the paper's three criteria: the probability-weighted expected score
over "1".."5" where the backend gives log-probabilities, else a strictly parsed digit
with bounded retries. An unusable judgment is missing (never a 1, never a crash) and
every mean is reported with its n.

Roles (``aloe.roles``): the ``simulator`` plays the user, the ``judge`` scores, and the
``policy`` (the student) is the model under test for ``base``, ``oracle`` and
``reminder``; a trained variant is the policy's merged model from the train stage.

Protocols: ``aloe`` (default) gives every model under test a short system prompt
and greedy decoding capped at ``max_new_tokens``; ``paper`` follows the paper's
evaluation code: no system prompt (the oracle and reminder keep theirs, which are
what they are), the model's own default sampling and a 2048-token cap.

Engine: one model at a time (a GPU holds one model under test beside the judge);
inside a model, every persona's call for one role goes to the backend as one batch.
Each model's conversations are checkpointed after every turn
(``evaluate/conversations/<model>.jsonl``), so a killed run resumes where it stopped;
the call cache makes repeated calls free.
"""

from __future__ import annotations

import csv
import dataclasses
import gc
import logging
import math
import time
from pathlib import Path

from aloe import prompts
from aloe.backends import ChatBackend, ChatRequest, ProbRequest, Sampling, open_backend
from aloe.config import EvaluateConfig
from aloe.conversation import clean_user_message, simulator_messages
from aloe.errors import AloeError
from aloe.io import atomic_path, read_jsonl, write_json, write_jsonl, write_manifest
from aloe.judging import SCORES, expected_score, judge, parse_score_choice
from aloe.metrics import summarize
from aloe.records import make_pairs, pool_records, read_aloe_pool
from aloe.roles import Roles, as_roles
from aloe.trees import dialogue_text
from aloe.variants import BASELINES

log = logging.getLogger(__name__)

ROLES = ("simulator", "judge", "policy")
# The paper's evaluation code generates with the model's defaults and max_new_tokens=2048.
PAPER_MAX_NEW_TOKENS = 2048


def benchmark_pairs(cfg: EvaluateConfig) -> list[dict]:
    """The benchmark personas, ordered so that the first n cover as many profiles and
    personalities as possible (profile j with personality (j + r) mod 5 in round r)."""
    if cfg.official_dir:
        d = Path(cfg.official_dir)
        profiles = pool_records(read_aloe_pool(d / "profile_eval.jsonl"), "profile", "imported", "eval")
        # the benchmark pairs every eval profile with the first 5 eval personalities (20 x 5 = 100)
        personalities = pool_records(read_aloe_pool(d / "personality_eval.jsonl")[:5], "personality", "imported",
                                     "eval")
        pairs = make_pairs(profiles, personalities, len(personalities), 0, "eval")
    else:
        src = cfg.paths.pairs
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


def _prompt_name(model: str) -> str:
    return BASELINES.get(model, BASELINES["base"])  # trained variants are asked like the base model


def _system(cfg: EvaluateConfig, model: str, pair: dict) -> str | None:
    """The model under test's system prompt; None (no system message) for base and trained
    variants under the paper protocol."""
    role = prompts.get(_prompt_name(model))
    if model == "oracle":
        return role.render("system", profile=pair["profile"], personality=pair["personality"])
    if cfg.protocol == "paper" and _prompt_name(model) == BASELINES["base"]:
        return None
    return role.render("system")


def under_test_sampling(cfg: EvaluateConfig) -> Sampling:
    if cfg.protocol == "paper":
        return Sampling(temperature=None, top_p=None, max_tokens=PAPER_MAX_NEW_TOKENS, seed=cfg.seed)
    return Sampling(temperature=0.0, max_tokens=cfg.max_new_tokens, seed=cfg.seed)


def trained_path(cfg: EvaluateConfig, model: str) -> Path:
    """The merged model the train stage wrote for a variant (checked before anything runs)."""
    path = cfg.paths.merged(model)
    if not (path / "config.json").exists():
        raise AloeError(f"{path}: no trained model for {model!r}; run the train stage with this variant, "
                        f"or remove it from stages.evaluate.models")
    return path


def _open_trained(cfg: EvaluateConfig, model: str) -> ChatBackend:
    """A trained variant: the policy's engine settings with the variant's merged folder as the model.
    Trained folders load locally (vLLM when the policy runs on vLLM); an HTTP server cannot be
    told to load our folder, so an HTTP policy's variants run on transformers."""
    policy = cfg.role("policy")
    kind = policy.kind if policy.kind in ("transformers", "vllm") else "transformers"
    bc = dataclasses.replace(policy, kind=kind, model=str(trained_path(cfg, model)), revision=None,
                             served_model=None, base_url=None, api_key_env=None)
    return open_backend(bc, cfg.cache_path)


def run_model(cfg: EvaluateConfig, model: str, pairs: list[dict], roles: Roles, under_test: ChatBackend,
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
    model_samp = under_test_sampling(cfg)
    simulator, judge_engine = roles["simulator"], roles["judge"]
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

        users = simulator.chat([ChatRequest(simulator_messages(p["profile"], p["personality"], history(c)), user_samp,
                                         sample_index=turn, prompt_version=sim.tag) for c, p in active])
        msgs = [clean_user_message(u.text) if u.ok else "" for u in users]
        asked = [(c, p, m) for (c, p), m in zip(active, msgs) if m]
        def under_test_messages(c, p, m):
            system = _system(cfg, model, p)
            return ([{"role": "system", "content": system}] if system is not None else []) + [
                *history(c), {"role": "user", "content": m}]

        replies = under_test.chat([ChatRequest(under_test_messages(c, p, m), model_samp,
                                               prompt_version=prompts.get(_prompt_name(model)).tag)
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
                            judge(judge_engine, jreqs, parse_score_choice, method=cfg.judge_method,
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


def run(cfg: EvaluateConfig, roles: Roles | ChatBackend, *, progress: bool = True) -> dict:
    """The ALOE protocol for every model in ``cfg.models``; ``roles`` gives the simulator, the
    judge and the policy (one backend plays all three when a single backend is passed)."""
    started = time.time()
    roles = as_roles(roles, ROLES)
    paths = cfg.paths
    pairs = benchmark_pairs(cfg)
    for m in cfg.models:  # fail before any conversation if a trained model is missing
        if m not in BASELINES:
            trained_path(cfg, m)
    convs_of, metrics, timings, under_test_of = {}, {}, {}, {}
    # Baselines first, on the policy's engine; it is closed before the trained variants load
    # (unless the simulator or judge shares it), so a GPU holds one model under test at a time.
    for model in sorted(cfg.models, key=lambda m: m not in BASELINES):
        t0 = time.time()
        if model in BASELINES:
            under_test = roles["policy"]
        else:
            if not any(roles.shared("policy", r) for r in ("simulator", "judge")):
                roles.release("policy")
            under_test = _open_trained(cfg, model)
        under_test_of[model] = under_test.describe()
        convs_of[model] = run_model(cfg, model, pairs, roles, under_test, paths.conversations(model), progress)
        if model not in BASELINES:
            under_test.close()
            del under_test
            gc.collect()
        timings[model] = round(time.time() - t0, 2)
    all_convs = []
    for model in cfg.models:  # results in the order the parameter file lists the models
        convs = convs_of[model]
        scores = {c["persona_id"]: {t["turn"]: t["score"] for t in c["turns"]} for c in convs}
        metrics[model] = summarize(scores, cfg.turns, n_boot=cfg.n_boot, seed=cfg.seed)
        all_convs += convs
    rows = [{"model": c["model"], "persona": c["persona_id"], "turn": t["turn"], "score": t["score"],
             "judge_method": t["judge"]["method"], "judge_raw": " | ".join(t["judge"].get("raw") or []),
             "judge_error": t["judge"].get("error")} for c in all_convs for t in c["turns"]]
    write_jsonl(paths.transcripts, all_convs)
    with atomic_path(paths.scores) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["model"])
        w.writeheader()
        w.writerows(rows)
    turns_done = sum(len(c["turns"]) for c in all_convs)
    described = roles.describe()
    result = {"turns": cfg.turns, "personas": len(pairs), "judge": cfg.judge, "protocol": cfg.protocol,
              "models": metrics, "roles": {r: described[r] for r in ROLES}, "under_test": under_test_of,
              "seconds_per_model": timings,
              "turns_per_second": {m: round(len(pairs) * cfg.turns / s, 4) if s else None
                                   for m, s in timings.items()}}
    write_json(paths.eval_metrics, _jsonable(result))
    counts = {"personas": len(pairs), "turns": cfg.turns, "models": len(cfg.models), "judgments": len(rows),
              "missing": sum(r["score"] is None for r in rows), "conversation_turns": turns_done,
              **roles.cache_stats()}
    write_manifest(paths.stage("evaluate"), stage="evaluate", parameters=cfg, started=started,
                   roles=result["roles"], models={"under_test": under_test_of}, counts=counts)
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
