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

import collections
import csv
import dataclasses
import gc
import logging
import math
import threading
import time
from pathlib import Path
from typing import Callable

from aloe import judge_card, preferences, prompts
from aloe.backends import ChatBackend, ChatRequest, Sampling, open_backend
from aloe.backends.base import quiet_calls
from aloe.cards import write_model_card
from aloe.config import EvaluateConfig
from aloe.conversation import (
    Outage,
    clean_user_message,
    history_before,
    in_progress,
    run_each,
    simulator_messages,
    under_test_sampling,
)
from aloe.cost import progress_line, with_cost
from aloe.disclosure import revealed_curve
from aloe.errors import AloeError, Unreachable
from aloe.io import atomic_path, read_jsonl, write_json, write_jsonl, write_manifest
from aloe.judging import Reply, score_replies
from aloe.lock import stage as stage_guard
from aloe.metrics import paired_difference, summarize
from aloe.records import make_pairs, pool_records, read_aloe_pool
from aloe.roles import Roles, as_roles
from aloe.variants import BASELINES

log = logging.getLogger(__name__)

# responder: writes the judge card's known-answer replies (K1); used only when an LLM judge is carded
ROLES = ("simulator", "judge", "policy", "responder")
REQUIRED = ("simulator", "judge", "policy")


def benchmark_pairs(cfg: EvaluateConfig) -> list[dict]:
    """The benchmark personas, ordered so that the first n cover as many profiles and
    personalities as possible (profile j with personality (j + r) mod 5 in round r)."""
    if cfg.official_dir:
        d = Path(cfg.official_dir)
        profiles = pool_records(read_aloe_pool(d / "profile_eval.jsonl"), "profile", "imported", "eval")
        # the benchmark pairs every eval profile with the first 5 eval personalities (20 x 5 = 100)
        personalities = pool_records(
            read_aloe_pool(d / "personality_eval.jsonl")[:5], "personality", "imported", "eval"
        )
        pairs = preferences.assign(
            make_pairs(profiles, personalities, len(personalities), 0, "eval"), cfg.preferences, cfg.seed, "official"
        )
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
    return ordered[: cfg.n_personas]


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


def trained_path(cfg: EvaluateConfig, model: str) -> Path:
    """The merged model the train stage wrote for a variant (checked before anything runs)."""
    path = cfg.paths.merged(model)
    if not (path / "config.json").exists():
        raise AloeError(
            f"{path}: no trained model for {model!r}; run the train stage with this variant, "
            f"or remove it from stages.evaluate.models"
        )
    if not cfg.paths.train_done(model).exists():  # written last: without it, training did not finish
        raise AloeError(
            f"{path}: training of {model!r} did not finish ({cfg.paths.train_done(model).name} is "
            f"missing); rerun the train stage"
        )
    return path


def _open_trained(cfg: EvaluateConfig, model: str) -> ChatBackend:
    """A trained variant: the policy's engine settings with the variant's merged folder as the model.
    Trained folders load locally (vLLM when the policy runs on vLLM); an HTTP server cannot be
    told to load our folder, so an HTTP policy's variants run on transformers."""
    policy = cfg.role("policy")
    kind = policy.kind if policy.kind in ("transformers", "vllm") else "transformers"
    bc = dataclasses.replace(
        policy,
        kind=kind,
        model=str(trained_path(cfg, model)),
        revision=None,
        served_model=None,
        base_url=None,
        api_key_env=None,
    )
    return open_backend(bc, cfg.cache_path)


def conversation_settings(cfg: EvaluateConfig, model: str, roles: Roles, under_test: ChatBackend) -> dict:
    """Everything that made a conversation what it is. A conversation on disk made with other
    settings (another judge, sampling, simulator, or a retrained model) is not resumed."""
    judge_id = f"rules@{preferences.catalogue().version}" if cfg.score_judge == "rules" else roles["judge"].identity()
    return {
        "model": model,
        "under_test": under_test.identity(),
        "simulator": roles["simulator"].identity(),
        "judge": judge_id,
        "preferences": preferences.catalogue().version,
        "disclosure_fallback": cfg.disclosure_fallback,
        "judge_kind": cfg.score_judge,
        "judge_method": cfg.judge_method,
        "likelihood_scale": cfg.likelihood_scale,
        "protocol": cfg.protocol,
        "max_new_tokens": cfg.max_new_tokens,
        "user_temperature": cfg.user_temperature,
        "seed": cfg.seed,
        "prompts": [prompts.get(n).tag for n in ("user_simulator", _prompt_name(model))],
        # what "the model's own default sampling" (the paper protocol) resolved to on this engine
        **({"default_sampling": under_test.default_sampling()} if cfg.protocol == "paper" else {}),
    }


def _resumable(path: Path, settings: dict, pairs: list[dict]) -> dict[str, dict]:
    """The conversations on disk made with these settings (and the persona's same preferences);
    others start afresh (the call cache makes replaying what is still valid cheap), with a warning
    naming what changed."""
    if not path.exists():
        return {}
    out = {}
    prefs = {p["id"]: p.get("preferences") or [] for p in pairs}
    for c in read_jsonl(path, allow_torn_tail=True):
        old = c.get("settings")
        if old == settings and (c.get("preferences") or []) == prefs.get(c.get("persona_id"), []):
            out[c["persona_id"]] = c
        else:
            changed = sorted(k for k in settings if (old or {}).get(k) != settings[k]) if old else ["(no record)"]
            log.warning(
                "%s: conversation %s was made with other settings (%s); starting it afresh",
                path,
                c.get("persona_id"),
                ", ".join(changed),
            )
    return out


def run_model(
    cfg: EvaluateConfig,
    model: str,
    pairs: list[dict],
    roles: Roles,
    under_test: ChatBackend,
    path: Path,
    progress: bool = True,
) -> list[dict]:
    """K turns for one model over all personas. On local engines every conversation takes a turn
    together (one batch per role), checkpointed per turn; where every engine is an HTTP server each
    conversation advances on its own as its answers arrive (``schedule``), checkpointed every few
    seconds (the answers themselves are in the call cache as they arrive). Either way the same
    conversations. A turn whose user message or reply failed is not recorded: the conversation
    stops there and a rerun tries that turn again. A reply whose judgment failed is kept and
    re-judged on a rerun."""
    convs = _open_conversations(cfg, model, pairs, roles, under_test, path)
    judge_engine = roles["judge"] if cfg.score_judge != "rules" else None  # the rules judge needs no model
    _rejudge(cfg, judge_engine, convs, pairs)
    turns = _Turns(cfg, model, roles, under_test, judge_engine, convs, pairs, path, progress)
    mode = schedule_of(cfg, roles, under_test)
    log.info("evaluate %s: %s schedule", model, mode)
    try:
        turns.each() if mode == "conversation" else turns.lockstep()
    finally:
        turns.bar.close()
    return convs


def schedule_of(cfg: EvaluateConfig, roles: Roles, under_test: ChatBackend) -> str:
    """``cfg.schedule`` with "auto" resolved for one model: each conversation on its own where the
    simulator, the judge (unless it is the rules judge) and the model under test are HTTP servers."""
    if cfg.schedule != "auto":
        return cfg.schedule
    engines = [roles["simulator"], under_test] + ([roles["judge"]] if cfg.score_judge != "rules" else [])
    return "conversation" if all(e.kind == "openai" for e in engines) else "lockstep"


class _Turns:
    """One model's conversations and how they take their turns: all together, or each on its own."""

    def __init__(self, cfg, model, roles, under_test, judge_engine, convs, pairs, path, progress):
        from tqdm.auto import tqdm

        self.cfg, self.model, self.roles, self.under_test = cfg, model, roles, under_test
        self.judge_engine, self.convs, self.pairs, self.path = judge_engine, convs, pairs, path
        self.samp, self.version = under_test_sampling(cfg), prompts.get(_prompt_name(model)).tag
        self.started, self.initial = time.time(), sum(len(c["turns"]) for c in convs)
        self.bar = tqdm(
            total=len(convs) * cfg.turns,
            initial=self.initial,
            desc=f"evaluate {model}",
            unit="turn",
            disable=not progress,
        )
        self.lock, self.written, self.logged = threading.Lock(), time.time(), 0.0

    def ask(self, active: list, turn: int) -> tuple[dict, dict, dict]:
        """This turn's calls for ``active`` [(conversation, persona)]: the user's messages, the
        replies and their scores, keyed by id(conversation)."""
        cfg = self.cfg
        msgs, disclosed = _user_messages(cfg, self.roles["simulator"], active, turn)
        asked = [(c, p, m) for (c, p), m in zip(active, msgs) if m]
        replies = self.under_test.chat(
            [
                ChatRequest(
                    _under_test_messages(cfg, self.model, c, p, m, turn), self.samp, prompt_version=self.version
                )
                for c, p, m in asked
            ]
        )
        scored = [(c, p, m, r.text.strip()) for (c, p, m), r in zip(asked, replies) if r.ok and r.text.strip()]
        to_judge = [
            Reply(p, history_before(c, turn), m, r, tuple((disclosed.get(id(c)) or {}).get("revealed", ())))
            for c, p, m, r in scored
        ]
        verdicts = dict(zip((id(c) for c, *_ in scored), score_replies(cfg, self.judge_engine, to_judge)))
        return {id(c): (m, r) for (c, p, m), r in zip(asked, replies)}, verdicts, disclosed

    def lockstep(self) -> None:
        for turn in range(1, self.cfg.turns + 1):
            active = [(c, p) for c, p in zip(self.convs, self.pairs) if len(c["turns"]) == turn - 1]
            if not active:
                continue
            got, verdicts, disclosed = self.ask(active, turn)
            _record_turn(self.cfg, active, got, verdicts, disclosed, turn)
            write_jsonl(self.path, self.convs)
            self.bar.update(len(active))
            self._log(sum(1 for c, _ in active if len(c["turns"]) < turn), every_s=0.0)

    def each(self) -> None:
        """Up to twice the engines' slots of conversations in progress, each taking its turns one
        after the other. A turn that found no server ends its conversation (a rerun tries it again);
        as many in a row as there are conversations in progress is an outage and stops the stage.
        Ctrl-C stops starting new turns, lets those under way finish for a bounded time, saves, and
        raises."""
        self.failed = 0
        workers = in_progress((self.roles["simulator"], self.under_test, self.judge_engine))
        self.outage = Outage(workers)
        todo = [(c, p) for c, p in zip(self.convs, self.pairs) if len(c["turns"]) < self.cfg.turns]
        try:
            run_each(lambda cp: self._converse(*cp), todo, workers, self.outage.stop, "conversation")
        finally:
            with self.lock:
                write_jsonl(self.path, self.convs)
        self.outage.raise_if_out()
        self._log(self.failed, every_s=0.0)

    def _converse(self, c: dict, p: dict) -> None:
        with quiet_calls():
            for turn in range(len(c["turns"]) + 1, self.cfg.turns + 1):
                if self.outage.stop.is_set():
                    return
                try:
                    got, verdicts, disclosed = self.ask([(c, p)], turn)
                except Unreachable as e:
                    self.outage.failed(e)
                    with self.lock:
                        self.failed += 1
                    return
                self.outage.answered()
                with self.lock:
                    _record_turn(self.cfg, [(c, p)], got, verdicts, disclosed, turn)
                    self.bar.update(1)
                    if len(c["turns"]) < turn:
                        self.failed += 1
                    if time.time() - self.written >= 2.0:  # a checkpoint every few seconds
                        write_jsonl(self.path, self.convs)
                        self.written = time.time()
                    self._log(self.failed)
                if len(c["turns"]) < turn:
                    return  # this conversation stops here; a rerun tries the turn again

    def _log(self, failed: int, every_s: float = 30.0) -> None:
        """The progress line, at most every ``every_s`` seconds."""
        now = time.time()
        if now - self.logged < every_s:
            return
        self.logged = now
        done = sum(len(c["turns"]) for c in self.convs)
        log.info(
            progress_line(
                f"evaluate {self.model}",
                done,
                len(self.convs) * self.cfg.turns,
                done - self.initial,
                self.started,
                failed,
                _usage_with(self.roles, self.under_test),
                self.cfg.prices,
            )
        )


def _open_conversations(
    cfg: EvaluateConfig, model: str, pairs: list[dict], roles: Roles, under_test: ChatBackend, path: Path
) -> list[dict]:
    """One conversation per persona: the finished turns a resumable file holds (none past
    ``cfg.turns``), or a new record."""
    settings = conversation_settings(cfg, model, roles, under_test)
    done = _resumable(path, settings, pairs)
    convs = [
        done.get(p["id"])
        or {
            "model": model,
            "persona_id": p["id"],
            "profile": p["profile"],
            "personality": p["personality"],
            "preferences": p.get("preferences") or [],
            "settings": settings,
            "turns": [],
        }
        for p in pairs
    ]
    for c in convs:
        c["turns"] = [t for t in c["turns"] if t["turn"] <= cfg.turns]
    return convs


def _user_messages(cfg: EvaluateConfig, simulator: ChatBackend, active: list, turn: int) -> tuple[list[str], dict]:
    """The simulated user's message of this turn per active conversation ("" where it failed),
    and, for personas with checkable preferences, what each message disclosed (by id(conv))."""
    sim = prompts.get("user_simulator")
    user_samp = Sampling(temperature=cfg.user_temperature, max_tokens=cfg.max_new_tokens, seed=cfg.seed)
    plans = [_plan(cfg, c, p, turn) for c, p in active]
    users = simulator.chat(
        [
            ChatRequest(
                simulator_messages(p["profile"], p["personality"], history_before(c, turn), plan.directive),
                user_samp,
                sample_index=turn,
                prompt_version=sim.tag,
            )
            for (c, p), plan in zip(active, plans)
        ]
    )
    msgs = [clean_user_message(u.text) if u.ok else "" for u in users]
    disclosed = {}
    for i, ((c, p), plan) in enumerate(zip(active, plans)):
        if msgs[i] and p.get("preferences"):
            msgs[i], disclosed[id(c)] = preferences.settle_message(
                p, plan, msgs[i], _revealed(c, turn), cfg.disclosure_fallback
            )
    return msgs, disclosed


def _under_test_messages(cfg: EvaluateConfig, model: str, c: dict, p: dict, m: str, turn: int) -> list[dict]:
    system = _system(cfg, model, p)
    return ([{"role": "system", "content": system}] if system is not None else []) + [
        *history_before(c, turn),
        {"role": "user", "content": m},
    ]


def _record_turn(cfg: EvaluateConfig, active: list, got: dict, verdicts: dict, disclosed: dict, turn: int) -> None:
    """Append this turn to every conversation whose message and reply both arrived, with its
    score and, for checkable preferences, the rules judge's exact scores beside it."""
    for c, p in active:
        m, r = got.get(id(c), ("", None))
        if not m or r is None or not r.ok or not r.text.strip():
            continue  # not data: this conversation stops here, and a rerun tries the turn again
        score, j = verdicts.get(id(c), (None, None))
        rec = {
            "turn": turn,
            "user": m,
            "reply": r.text.strip(),
            "score": score,
            "judge": j or {"method": "none", "error": "judge failed"},
        }
        if id(c) in disclosed:
            rec["preferences"] = disclosed[id(c)]
            # the exact scores sit beside any LLM judge's (the rules judge's own are in "judge")
            rec["rules"] = (
                j
                if cfg.score_judge == "rules"
                else preferences.rules_score(p["preferences"], rec["reply"], disclosed[id(c)]["revealed"])
            )
        c["turns"].append(rec)


def _usage_with(roles: Roles, engine: ChatBackend) -> list[dict]:
    """The roles' usage rows, and the model under test's where it is not one of their engines."""
    own = any(e is engine for e in roles.engines())
    return roles.usage() + ([] if own else [{"kind": engine.kind, "model": engine.model_id, **engine.usage()}])


def _plan(cfg: EvaluateConfig, conv: dict, pair: dict, turn: int) -> "preferences.UserPlan":
    """What the simulated user is to get across this turn (checkable preferences only)."""
    before = [t for t in conv["turns"] if t["turn"] < turn]
    return preferences.plan_turn(
        pair, cfg.turns, turn, cfg.seed, _revealed(conv, turn), before[-1]["reply"] if before else None
    )


def _revealed(conv: dict, turn: int) -> list[str]:
    before = [t for t in conv["turns"] if t["turn"] < turn and t.get("preferences")]
    return list(before[-1]["preferences"]["revealed"]) if before else []


def _rejudge(cfg: EvaluateConfig, judge_engine: ChatBackend, convs: list[dict], pairs: list[dict]) -> None:
    """Judge again the replies whose judgment failed on an earlier run."""
    todo = [(c, p, t) for c, p in zip(convs, pairs) for t in c["turns"] if t["score"] is None]
    if not todo:
        return
    got = score_replies(
        cfg,
        judge_engine,
        [
            Reply(
                p,
                history_before(c, t["turn"]),
                t["user"],
                t["reply"],
                tuple((t.get("preferences") or {}).get("revealed", ())),
            )
            for c, p, t in todo
        ],
    )
    for (c, p, t), (score, j) in zip(todo, got):
        t["score"], t["judge"] = score, j
    log.info(
        "re-judged %d replies whose judgment had failed; %d now scored",
        len(todo),
        sum(score is not None for score, _ in got),
    )


def _check_inputs(cfg: EvaluateConfig, pairs: list[dict], trained) -> None:
    """Fail before any conversation: the rules judge without checkable preferences, or a missing
    trained model."""
    if cfg.score_judge == "rules" and not all(p.get("preferences") for p in pairs):
        raise AloeError(
            "evaluate: judge 'rules' needs benchmark personas with checkable preferences; set "
            "stages.personas.preferences (e.g. [2, 4]), or stages.evaluate.preferences with official_dir"
        )
    for m in cfg.models:
        if m not in BASELINES and trained is None:
            trained_path(cfg, m)


def _card(cfg: EvaluateConfig, roles: Roles, pairs: list[dict], repeats_of: dict) -> dict | None:
    """The judge card on repeat 0's conversations, written beside the metrics (None when disabled)."""
    if not cfg.judge_card.enabled:
        return None
    card = judge_card.build(cfg, roles, pairs, {m: reps[0] for m, reps in repeats_of.items()})
    write_json(cfg.paths.judge_card, _jsonable(card))
    return card


def _result(
    cfg: EvaluateConfig,
    roles: Roles,
    pairs: list[dict],
    repeats_of: dict,
    metrics: dict,
    card: dict | None,
    under_test_of: dict,
    timings: dict,
) -> dict:
    """metrics.json: per-model metrics, the judge's fit, disclosure, the roles and the timings."""
    described = roles.describe()
    if cfg.score_judge == "rules":
        described["judge"] = preferences.judge_description()
    every = {m: [c for cs in reps for c in cs] for m, reps in repeats_of.items()}
    return {
        "turns": cfg.turns,
        "personas": len(pairs),
        "judge": cfg.score_judge,
        "protocol": cfg.protocol,
        "judge_fit": card["fit"] if card else None,
        "models": metrics,
        "repeats": cfg.repeats,
        "disclosure": disclosure(cfg, every),
        "preference_disclosure": preference_disclosure(every),
        "rules": rules_beside(cfg, repeats_of) if cfg.score_judge != "rules" else None,
        "roles": {
            r: described[r] for r in ROLES if r in described and (r != "responder" or (card and not card.get("exact")))
        },
        "under_test": under_test_of,
        "seconds_per_model": timings,
        "turns_per_second": {m: round(len(pairs) * cfg.turns / s, 4) if s else None for m, s in timings.items()},
    }


@stage_guard("evaluate")
def run(
    cfg: EvaluateConfig,
    roles: Roles | ChatBackend,
    *,
    progress: bool = True,
    trained: Callable[[str], ChatBackend] | None = None,
) -> dict:
    """The ALOE protocol for every model in ``cfg.models``; ``roles`` gives the simulator, the
    judge and the policy (one backend plays all three when a single backend is passed).
    ``trained(variant)`` opens a trained variant's engine instead of the train stage's folder
    (``aloe estimate`` sizes a run before anything is trained)."""
    started = time.time()
    roles = as_roles(roles, REQUIRED)
    pairs = benchmark_pairs(cfg)
    _check_inputs(cfg, pairs, trained)
    repeats_of, under_test_of, timings, trained_usage = _converse(
        cfg, roles, pairs, progress, trained or (lambda m: _open_trained(cfg, m))
    )
    _check_failures(cfg, {f"{m} (repeat {r})": cs for m, reps in repeats_of.items() for r, cs in enumerate(reps)})
    metrics = _metrics(cfg, repeats_of)
    card = _card(cfg, roles, pairs, repeats_of)
    for model in cfg.models:  # trained variants' model cards gain this run's numbers
        if model not in BASELINES and trained is None:
            write_model_card(
                cfg.paths, cfg.experiment, model, {**metrics[model], "judge_fit": bool(card and card["fit"])}
            )
    rows = _write_transcripts(cfg, repeats_of)
    result = _result(cfg, roles, pairs, repeats_of, metrics, card, under_test_of, timings)
    write_json(cfg.paths.eval_metrics, _jsonable(result))
    counts = {
        "personas": len(pairs),
        "turns": cfg.turns,
        "models": len(cfg.models),
        "judgments": len(rows),
        "missing": sum(r["score"] is None for r in rows),
        "conversation_turns": sum(len(c["turns"]) for reps in repeats_of.values() for cs in reps for c in cs),
        **roles.cache_stats(),
    }
    write_manifest(
        cfg.paths.stage("evaluate"),
        stage="evaluate",
        parameters=cfg,
        started=started,
        roles=result["roles"],
        models={"under_test": under_test_of},
        counts=counts,
        extra={"usage": with_cost(roles.usage() + trained_usage, cfg.prices)},
    )
    return result


def _converse(
    cfg: EvaluateConfig, roles: Roles, pairs: list[dict], progress: bool, open_trained: Callable[[str], ChatBackend]
) -> tuple[dict, dict, dict, list]:
    """Every model's conversations, every repeat: ({model: [repeat's conversations]}, {model: its
    engine}, {model: seconds}, [what each trained variant's engine did]). Baselines first, on the policy's engine; the policy is closed
    before the trained variants load (unless the simulator or judge shares it), so a GPU holds one
    model under test at a time."""
    repeats_of: dict[str, list[list[dict]]] = {}
    under_test_of, timings, trained_usage = {}, {}, []

    def evaluate(model: str, under_test: ChatBackend) -> None:
        t0 = time.time()
        under_test_of[model] = {
            **under_test.describe(),
            **({"default_sampling": under_test.default_sampling()} if cfg.protocol == "paper" else {}),
        }
        # repeat r: the simulated user samples with seed + r (the model under test is greedy)
        repeats_of[model] = [
            run_model(
                dataclasses.replace(cfg, seed=cfg.seed + r),
                model,
                pairs,
                roles,
                under_test,
                cfg.paths.conversations(model, r),
                progress,
            )
            for r in range(cfg.repeats)
        ]
        for r, convs in enumerate(repeats_of[model]):
            for c in convs:
                c["repeat"] = r
        timings[model] = round(time.time() - t0, 2)

    for model in [m for m in cfg.models if m in BASELINES]:
        evaluate(model, roles["policy"])
    for model in [m for m in cfg.models if m not in BASELINES]:
        if not any(roles.shared("policy", r) for r in ("simulator", "judge")):
            roles.release("policy")
        under_test = open_trained(model)
        evaluate(model, under_test)
        trained_usage.append(
            {"roles": [f"under test: {model}"], "kind": under_test.kind, "model": model, **under_test.usage()}
        )
        under_test.close()
        local = under_test.kind in ("transformers", "vllm")
        del under_test
        if local:  # the weights' memory back before the next model loads
            gc.collect()
    return repeats_of, under_test_of, timings, trained_usage


def _metrics(cfg: EvaluateConfig, repeats_of: dict[str, list[list[dict]]]) -> dict[str, dict]:
    """Per model, in the order the parameter file lists them: the ALOE summaries, the paired
    differences against base and, for sft_preferred, against sft_rejected."""
    scores_of = {m: pooled_scores(repeats_of[m]) for m in cfg.models}
    metrics = {m: summarize(scores_of[m], cfg.turns, n_boot=cfg.n_boot, seed=cfg.seed) for m in cfg.models}
    _add_vs_base(cfg, metrics, scores_of)
    if "sft_preferred" in scores_of and "sft_rejected" in scores_of:
        # the built-in control: the same teacher wrote both replies; only the preference label differs
        metrics["sft_preferred"]["vs_sft_rejected"] = paired_difference(
            scores_of["sft_preferred"], scores_of["sft_rejected"], cfg.turns, n_boot=cfg.n_boot, seed=cfg.seed
        )
    return metrics


def _write_transcripts(cfg: EvaluateConfig, repeats_of: dict[str, list[list[dict]]]) -> list[dict]:
    """``transcripts.jsonl`` (every conversation) and ``scores.csv`` (one row per reply, the rules
    judge's scores beside any LLM judge's); returns the rows."""
    all_convs = [c for m in cfg.models for convs in repeats_of[m] for c in convs]
    rows = [
        {
            "model": c["model"],
            "repeat": c.get("repeat", 0),
            "persona": c["persona_id"],
            "turn": t["turn"],
            "score": t["score"],
            "judge_method": t["judge"]["method"],
            "judge_raw": " | ".join(t["judge"].get("raw") or []),
            "judge_error": t["judge"].get("error"),
            # the exact judge beside any LLM judge (empty where the persona has no checkable preferences)
            "rules_score": (t.get("rules") or {}).get("score"),
            "rules_share": (t.get("rules") or {}).get("share"),
            "rules_revealed_share": (t.get("rules") or {}).get("revealed_share"),
            "preferences_revealed": len((t.get("preferences") or {}).get("revealed") or []),
        }
        for c in all_convs
        for t in c["turns"]
    ]
    write_jsonl(cfg.paths.transcripts, all_convs)
    with atomic_path(cfg.paths.scores) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["model"])
        w.writeheader()
        w.writerows(rows)
    return rows


def pooled_scores(repeats: list[list[dict]]) -> dict[str, dict[int, float | None]]:
    """{persona: {turn: score}}, each the mean over the repeats that scored that turn: the persona
    stays the unit the bootstrap resamples, so repeats narrow each persona's noise without being
    counted as more personas."""
    got: dict[str, dict[int, list[float]]] = {}
    for convs in repeats:
        for c in convs:
            turns = got.setdefault(c["persona_id"], {})
            for t in c["turns"]:
                if t["score"] is not None:
                    turns.setdefault(t["turn"], []).append(t["score"])
                else:
                    turns.setdefault(t["turn"], [])
    return {p: {k: (sum(v) / len(v) if v else None) for k, v in turns.items()} for p, turns in got.items()}


def preference_disclosure(convs_of: dict[str, list[dict]]) -> dict[str, dict]:
    """Per model: how many checkable preferences the simulated user was told to reveal, how many its
    own words conveyed (the disclosure rate), how many needed the catalogue's phrasing appended, the
    complaints, and per turn the mean number revealed so far and the share of them the reply kept."""
    out = {}
    for model, convs in convs_of.items():
        recs = [
            (t["turn"], t["preferences"], t.get("rules") or {})
            for c in convs
            for t in c["turns"]
            if t.get("preferences")
        ]
        if not recs:
            continue
        counts = preferences.disclosure_counts([r for _, r, _ in recs])
        per_turn: dict[int, list] = {}
        for k, r, rules in recs:
            per_turn.setdefault(k, []).append((len(r["revealed"]), rules.get("revealed_share")))
        out[model] = {
            **counts,
            "rate": counts["conveyed"] / counts["scheduled"] if counts["scheduled"] else None,
            "per_turn": [
                {
                    "turn": k,
                    "revealed": sum(n for n, _ in v) / len(v),
                    "kept": _mean([s for _, s in v if s is not None]),
                    "n": len(v),
                }
                for k, v in sorted(per_turn.items())
            ],
        }
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def rules_beside(cfg: EvaluateConfig, repeats_of: dict[str, list[list[dict]]]) -> dict | None:
    """The rules judge's metrics beside an LLM judge's (personas with checkable preferences), with
    paired differences against base."""
    scores = {}
    for model, reps in repeats_of.items():
        swapped = [
            [
                {
                    **c,
                    "turns": [
                        {**t, "score": (t.get("rules") or {}).get("score")} for t in c["turns"] if t.get("rules")
                    ],
                }
                for c in convs
            ]
            for convs in reps
        ]
        scores[model] = {p: s for p, s in pooled_scores(swapped).items() if s}
    if not any(scores.values()):
        return None
    scores = {m: s for m, s in scores.items() if s}
    out = {m: summarize(s, cfg.turns, n_boot=cfg.n_boot, seed=cfg.seed) for m, s in scores.items()}
    _add_vs_base(cfg, out, scores)
    return out


def _add_vs_base(cfg: EvaluateConfig, metrics: dict[str, dict], scores_of: dict[str, dict]) -> None:
    """Each model's paired difference against base, on the same personas (where base ran)."""
    if "base" not in scores_of:
        return
    for model in scores_of:
        if model != "base":
            metrics[model]["vs_base"] = paired_difference(
                scores_of[model], scores_of["base"], cfg.turns, n_boot=cfg.n_boot, seed=cfg.seed
            )


def _check_failures(cfg: EvaluateConfig, convs_of: dict[str, list[dict]]) -> None:
    """Fail the stage, before any result is written, when too many conversations stopped short
    or too many replies went unjudged: a rerun retries exactly those."""
    convs = [c for cs in convs_of.values() for c in cs]
    short = [c for c in convs if len(c["turns"]) < cfg.turns]
    turns = [t for c in convs for t in c["turns"]]
    unjudged = [t for t in turns if t["score"] is None]
    limit = cfg.max_failed_share
    problems = []
    if short and len(short) > limit * len(convs):
        per_model = collections.Counter(c["model"] for c in short)
        problems.append(
            f"{len(short)} of {len(convs)} conversations stopped before turn {cfg.turns} "
            f"({', '.join(f'{m}: {n}' for m, n in per_model.items())}; the user simulator or the "
            f"model under test failed)"
        )
    if unjudged and len(unjudged) > limit * max(len(turns), 1):
        why = collections.Counter(str(t["judge"].get("error") or t["judge"].get("method"))[:80] for t in unjudged)
        problems.append(
            f"{len(unjudged)} of {len(turns)} replies have no score "
            f"({'; '.join(f'{n} x {r}' for r, n in why.most_common(2))})"
        )
    if problems:
        raise AloeError(
            f"evaluate: {'; '.join(problems)}: more than max_failed_share {limit:g} allows; what "
            f"finished is kept in {cfg.paths.stage('evaluate') / 'conversations'}: rerun to retry the rest"
        )


def disclosure(cfg: EvaluateConfig, convs_of: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Per model and turn, the mean share of the persona the simulated user has revealed so far
    (``aloe.disclosure``): a rising AL(k) means little if the user simply says more."""
    out = {}
    for model, convs in convs_of.items():
        per_turn: dict[int, list[float]] = {}
        for c in convs:
            curve = revealed_curve(
                c["profile"], c["personality"], [t["user"] for t in c["turns"]], cfg.disclosure_threshold
            )
            for t, row in zip(c["turns"], curve):
                if row["revealed"] is not None:
                    per_turn.setdefault(t["turn"], []).append(row["revealed"])
        out[model] = [{"turn": k, "revealed": sum(v) / len(v), "n": len(v)} for k, v in sorted(per_turn.items())]
    return out


def _jsonable(x):
    """NaN is not JSON: a turn with no usable judgment is null in metrics.json."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x
