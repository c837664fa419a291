"""Tree-structured preference conversations (the paper's dataset generator).

Per training persona, one tree of ``turns`` nodes. At every turn:

1. the *user simulator* (plays the persona, reveals it a little at a time) speaks;
2. the *inference* step states what the user has revealed so far (``extract``: it
   sees the true persona, as in the paper; ``blind``: the dialogue only);
3. two *responders* answer: ``hinted`` (given the inferred persona) and ``plain``;
4. a *judge* that knows the full persona compares them in both orders, from the
   probabilities of "1" and "2" where the backend gives them, else by strictly
   parsed text with bounded retries (:func:`aloe.judging.ask`); or, with ``pair_judge: rules``,
   the reply that satisfies more of the persona's checkable preferences wins (exact);
5. the *branch policy* picks which reply continues the conversation.

Checkable preferences (``aloe.preferences``): a persona that carries them reveals at most one
per turn on a seeded schedule (the simulator is told what to get across; a detector checks that
its message did), complains when a revealed one was ignored, and the hinted responder is told
the preferences revealed so far. Every node records what was meant and what was revealed.

Each part is a role (``aloe.roles``): ``simulator``, ``inferrer``, ``responder`` and
``judge`` may be four different models; the tree records who played which.

Lockstep: at each turn every live tree's calls for one role go to its engine as one
batch (a local model batches them; an HTTP backend sends them concurrently). A tree
whose call fails is recorded as failed and stops; the others go on.

Resume: ``trees.jsonl`` is rewritten atomically after every turn, so a killed run
restarts at the first unfinished turn of each tree; the call cache makes a repeated
call free. Exports for TRL are written from the finished trees.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import threading
import time
from pathlib import Path

from aloe import preferences, prompts
from aloe.backends import ChatBackend, ChatRequest, Sampling
from aloe.backends.base import quiet_calls
from aloe.cards import dataset_card
from aloe.config import TreesConfig
from aloe.conversation import (
    Outage,
    clean_user_message,
    dialogue_text,
    in_progress,
    judge_persona,
    likelihood_prompts,
    run_each,
    simulator_messages,
)
from aloe.cost import progress_line, with_cost
from aloe.disclosure import revealed_curve
from aloe.errors import AloeError, Unreachable
from aloe.io import JsonlAppender, read_jsonl, write_jsonl, write_manifest
from aloe.judging import (
    Judged,
    LikelihoodJudged,
    Reply,
    ask,
    expected_score,
    likelihood_ratios,
    pair_requests,
    pair_verdict,
    parse_choice,
    parse_score_choice,
    rubric_requests,
)
from aloe.lock import stage as stage_guard
from aloe.records import spread
from aloe.roles import Roles, as_roles
from aloe.variants import EXPORTS

log = logging.getLogger(__name__)

# The roles this stage uses (aloe.roles) and the prompts they speak with; ``pair_judge: rules`` needs no judge model.
ROLES = ("simulator", "inferrer", "responder", "judge")


def roles_used(cfg: TreesConfig) -> tuple[str, ...]:
    return tuple(r for r in ROLES if not (r == "judge" and cfg.pair_judge == "rules"))


PROMPTS = (
    "user_simulator",
    "infer_extract",
    "infer_blind",
    "responder_hinted",
    "responder_plain",
    "judge_pair",
    "judge_score",
    "judge_likelihood",
)
# Provenance keys that must match for a rerun to continue an existing trees.jsonl.
_RESUME_KEYS = (
    "roles",
    "prompts",
    "seed",
    "inference",
    "branch",
    "judge",
    "judge_method",
    "judge_retries",
    "inconsistent",
    "temperature",
    "max_new_tokens",
    "preferences",
    "disclosure_fallback",
)


def provenance(cfg: TreesConfig, roles: Roles | ChatBackend) -> dict:
    roles = as_roles(roles, roles_used(cfg))
    used = roles_used(cfg)
    described = {r: roles[r].describe() if r in used else preferences.judge_description() for r in ROLES}
    return {
        "roles": described,
        "prompts": {r: prompts.get(r).tag for r in PROMPTS},
        "preferences": preferences.catalogue().version,
        "disclosure_fallback": cfg.disclosure_fallback,
        "seed": cfg.seed,
        "inference": cfg.inference,
        "branch": cfg.branch,
        "judge": cfg.pair_judge,
        "judge_method": cfg.judge_method,
        "judge_retries": cfg.judge_retries,
        "inconsistent": cfg.inconsistent,
        "temperature": cfg.temperature,
        "max_new_tokens": cfg.max_new_tokens,
    }


def history_of(tree: dict) -> list[dict]:
    """The conversation along the followed branch (what the next turn's speakers see)."""
    msgs: list[dict] = []
    for t in tree["turns"]:
        msgs += [{"role": "user", "content": t["user"]}, {"role": "assistant", "content": t["followed_text"]}]
    return msgs


def _branch_rng(cfg: TreesConfig, tree_id: str, turn: int) -> random.Random:
    # One generator per (seed, tree, turn): a resumed run makes the same choices.
    return random.Random(f"{cfg.seed}/{tree_id}/{turn}")


def decide(
    cfg: TreesConfig,
    tree_id: str,
    turn: int,
    cands: list[dict],
    first: Judged,
    second: Judged,
    pointwise: tuple[float | None, float | None] | None = None,
) -> dict:
    """Verdict, preferred/rejected and the followed branch for one node.

    ``first`` judged (hinted, plain) in that order, ``second`` (plain, hinted).
    ``pointwise``: rubric scores (hinted, plain), used when the orders disagree and
    ``inconsistent`` is "pointwise".
    """
    v = pair_verdict(first, second)
    node = {
        "p_hinted": v.p_a,
        "p_hinted_first": v.p_a_first,
        "p_hinted_second": v.p_a_second,
        "consistent": v.consistent,
        "preferred": None,
        "rejected": None,
        "preferred_is_hinted": None,
        "decided_by": None,
    }
    hinted_wins = None
    if v.p_a is None:
        node["verdict"] = "unusable"
    elif v.consistent:
        hinted_wins, node["decided_by"] = v.preferred == "a", "pair"
    elif cfg.inconsistent == "average":
        hinted_wins, node["decided_by"] = v.preferred == "a", "average"
    elif cfg.inconsistent == "pointwise":
        sa, sb = pointwise or (None, None)
        node["pointwise"] = {"hinted": sa, "plain": sb}
        if sa is not None and sb is not None and sa != sb:
            hinted_wins, node["decided_by"] = sa > sb, "pointwise"
        else:
            node["verdict"] = "tie"
    else:
        node["verdict"] = cfg.inconsistent  # "tie" (kept, unlabelled) or "drop" (candidates removed)
    return _label_and_branch(cfg, tree_id, turn, cands, node, hinted_wins)


def decide_likelihood(
    cfg: TreesConfig, tree_id: str, turn: int, cands: list[dict], hinted_llr: float | None, plain_llr: float | None
) -> dict:
    """The likelihood judge's node: the reply the persona explains better (the larger
    per-token log-ratio) is preferred; equal or missing ratios give no label."""
    node = {
        "p_hinted": None,
        "p_hinted_first": None,
        "p_hinted_second": None,
        "consistent": None,
        "preferred": None,
        "rejected": None,
        "preferred_is_hinted": None,
        "decided_by": None,
        "likelihood": {"hinted": hinted_llr, "plain": plain_llr},
    }
    hinted_wins = None
    if hinted_llr is None or plain_llr is None:
        node["verdict"] = "unusable"
    elif hinted_llr == plain_llr:
        node["verdict"] = "tie"
    else:
        hinted_wins, node["decided_by"] = hinted_llr > plain_llr, "likelihood"
    return _label_and_branch(cfg, tree_id, turn, cands, node, hinted_wins)


def decide_rules(cfg: TreesConfig, tree_id: str, turn: int, cands: list[dict], hinted: dict, plain: dict) -> dict:
    """The rules judge's node: the reply with the larger share of the persona's applicable
    preferences satisfied is preferred; equal shares are a tie (not exported)."""
    node = {
        "p_hinted": None,
        "p_hinted_first": None,
        "p_hinted_second": None,
        "consistent": None,
        "preferred": None,
        "rejected": None,
        "preferred_is_hinted": None,
        "decided_by": None,
    }
    a, b = hinted["share"], plain["share"]
    hinted_wins = None
    if a is None or b is None or a == b:
        node["verdict"] = "tie"
    else:
        hinted_wins, node["decided_by"] = a > b, "rules"
    return _label_and_branch(cfg, tree_id, turn, cands, node, hinted_wins)


def _label_and_branch(
    cfg: TreesConfig, tree_id: str, turn: int, cands: list[dict], node: dict, hinted_wins: bool | None
) -> dict:
    rng = _branch_rng(cfg, tree_id, turn)
    hinted, plain = cands
    if hinted_wins is not None:
        win, lose = (hinted, plain) if hinted_wins else (plain, hinted)
        node.update(
            verdict="preferred", preferred=win["text"], rejected=lose["text"], preferred_is_hinted=win["hinted"]
        )
    if node["verdict"] == "preferred" and cfg.branch != "random":
        followed = cfg.branch
    elif node["verdict"] == "preferred":
        followed = rng.choice(["preferred", "rejected"])
    else:
        followed = None  # no preference to follow: a seeded coin picks the reply
    if followed is None:
        text = rng.choice([hinted["text"], plain["text"]])
    else:
        text = node[followed]
    node.update(followed=followed, followed_text=text)
    return node


class _Tree:
    __slots__ = ("rec",)

    def __init__(self, rec: dict):
        self.rec = rec

    @property
    def live(self) -> bool:
        return self.rec["failed"] is None

    def fail(self, turn: int, role: str, error: str | None) -> None:
        self.rec["failed"] = {"turn": turn, "role": role, "error": error or "empty reply"}


def _load_existing(path: Path, prov: dict) -> dict[str, dict]:
    if not path.exists():
        return {}
    existing = read_jsonl(path, allow_torn_tail=True)
    if not existing:
        return {}
    _same_settings(path, existing[0].get("provenance", {}), prov)
    return {t["id"]: t for t in existing}


def _same_settings(path: Path, old: dict, prov: dict) -> None:
    diff = [k for k in _RESUME_KEYS if old.get(k) != prov.get(k)]
    if diff:
        raise AloeError(
            f"{path}: made with different settings ({', '.join(diff)}: "
            f"{', '.join(f'{old.get(k)!r} -> {prov.get(k)!r}' for k in diff)}); "
            f"delete {path.parent} to start over, or restore the old settings to resume"
        )


@stage_guard("trees")
def run(cfg: TreesConfig, roles: Roles | ChatBackend, *, progress: bool = True) -> dict:
    """Grow one tree per training persona; ``roles`` gives the simulator, inferrer, responder
    and judge (one backend plays all four when a single backend is passed). Each turn the user
    speaks, the inferrer states what was revealed, the responder replies with and without that
    hint, and the judge labels the node. On local engines every live tree goes through a turn
    together (one batch per role; the turn is on disk before the next starts); on HTTP servers
    each tree advances on its own as its answers arrive (``schedule``), each finished turn on disk
    at once. The same seeds give the same trees either way."""
    started = time.time()
    roles = as_roles(roles, roles_used(cfg))
    trees, prov, resumed = _open_trees(cfg, roles)
    stats = {"judge_calls": 0, "judge_unusable": 0, "judge_text": 0}
    bar = _progress(cfg.turns * len(trees), resumed, progress)
    mode = schedule_of(cfg, roles)
    log.info("trees: %s schedule", mode)
    if mode == "conversation":
        _grow_each(cfg, roles, trees, prov, stats, bar, started, resumed)
    else:
        _grow_lockstep(cfg, roles, trees, stats, bar, started, resumed)
    bar.close()
    return _finish(cfg, roles, [t.rec for t in trees], prov, resumed, stats, started)


def schedule_of(cfg: TreesConfig, roles: Roles) -> str:
    """``cfg.schedule``, with "auto" resolved: each tree on its own where every engine the stage
    uses is an HTTP server, lockstep batches otherwise."""
    if cfg.schedule != "auto":
        return cfg.schedule
    engines = [roles[r] for r in roles_used(cfg)]
    return "conversation" if engines and all(e.kind == "openai" for e in engines) else "lockstep"


def _grow_lockstep(
    cfg: TreesConfig, roles: Roles, trees: list[_Tree], stats: dict, bar, started: float, resumed: int
) -> None:
    """Turn by turn, every live tree together: one batch per role; the turn is on disk before the
    next starts."""
    for turn in range(1, cfg.turns + 1):
        active = [t for t in trees if t.live and len(t.rec["turns"]) == turn - 1]
        if not active:
            continue
        said, disclosed = _user_turn(cfg, roles, active, turn)
        step = _infer(cfg, roles, said, disclosed, turn)
        judged_in = _respond(cfg, roles, step, turn)
        _judge_nodes(cfg, roles, judged_in, disclosed, turn, stats)
        write_jsonl(cfg.paths.trees, [t.rec for t in trees])  # checkpoint: this turn is on disk
        bar.update(len(judged_in))
        _log_progress(cfg, roles, trees, started, resumed)


def _log_progress(cfg: TreesConfig, roles: Roles, trees: list[_Tree], started: float, resumed: int) -> None:
    """The progress line: done and total, rate, time left, failures, cost so far."""
    done = sum(len(t.rec["turns"]) for t in trees)
    log.info(
        progress_line(
            "trees",
            done,
            cfg.turns * len(trees),
            done - resumed,
            started,
            sum(1 for t in trees if t.rec.get("failed")),
            roles.usage(),
            cfg.prices,
        )
    )


def _turn_of_one(cfg: TreesConfig, roles: Roles, t: _Tree, turn: int, stats: dict) -> None:
    """One tree's turn, on its own: the same steps as a lockstep turn, for a batch of one."""
    said, disclosed = _user_turn(cfg, roles, [t], turn)
    step = _infer(cfg, roles, said, disclosed, turn) if said else []
    judged_in = _respond(cfg, roles, step, turn) if step else []
    if judged_in:
        _judge_nodes(cfg, roles, judged_in, disclosed, turn, stats)


def _grow_each(
    cfg: TreesConfig, roles: Roles, trees: list[_Tree], prov: dict, stats: dict, bar, started: float, resumed: int
) -> None:
    """The scheduled path: up to ``workers`` trees in progress, each advancing as its own answers
    arrive, so one slow call holds up only its tree. Every finished turn is appended to
    ``trees.steps.jsonl`` at once. An outage (``workers`` trees in a row find no server) stops the
    stage; Ctrl-C stops starting new steps, lets those under way finish for a bounded time, and
    raises."""
    todo = [t for t in trees if t.live and len(t.rec["turns"]) < cfg.turns]
    new_file = not cfg.paths.tree_steps.exists()
    with JsonlAppender(cfg.paths.tree_steps) as steps:
        if new_file:
            steps.append({"provenance": prov})
        run = _Scheduled(cfg, roles, trees, stats, bar, started, resumed, steps)
        try:
            run_each(run.grow, todo, run.workers, run.outage.stop, "tree")
        finally:
            write_jsonl(cfg.paths.trees, [t.rec for t in trees])  # the steps, folded in
    cfg.paths.tree_steps.unlink(missing_ok=True)
    run.outage.raise_if_out()


class _Scheduled:
    """What the trees scheduled one by one share: the stage's counters, the steps log, the stop
    flag, and the count of trees in a row that found no server (an outage at ``workers``)."""

    def __init__(
        self,
        cfg: TreesConfig,
        roles: Roles,
        trees: list[_Tree],
        stats: dict,
        bar,
        started: float,
        resumed: int,
        steps: JsonlAppender,
    ):
        self.cfg, self.roles, self.trees, self.stats, self.bar = cfg, roles, trees, stats, bar
        self.started, self.resumed, self.steps = started, resumed, steps
        self.workers = in_progress(roles[r] for r in roles_used(cfg))
        self.lock, self.logged = threading.Lock(), 0.0
        self.outage = Outage(self.workers)

    def grow(self, t: _Tree) -> None:
        """One tree's remaining turns, one after the other, each recorded as it finishes."""
        with quiet_calls():
            for turn in range(len(t.rec["turns"]) + 1, self.cfg.turns + 1):
                if self.outage.stop.is_set() or not self._turn(t, turn) or t.rec["failed"]:
                    return

    def _turn(self, t: _Tree, turn: int) -> bool:
        own = dict.fromkeys(self.stats, 0)
        try:
            _turn_of_one(self.cfg, self.roles, t, turn, own)
        except Unreachable as e:
            t.fail(turn, "server", str(e))  # not recorded: a rerun tries this turn again
            self.outage.failed(e)
            return False
        self.outage.answered()
        with self.lock:
            for k, v in own.items():
                self.stats[k] += v
            self.steps.append(
                {"id": t.rec["id"], "failed": t.rec["failed"]}
                if t.rec["failed"]
                else {"id": t.rec["id"], "node": t.rec["turns"][-1]}
            )
            self.bar.update(0 if t.rec["failed"] else 1)
            self._progress()
        return True

    def _progress(self, every_s: float = 30.0) -> None:
        """The progress line every ``every_s`` seconds, and at the last turn."""
        now = time.time()
        last = all(len(t.rec["turns"]) == self.cfg.turns for t in self.trees)
        if now - self.logged >= every_s or last:
            self.logged = now
            _log_progress(self.cfg, self.roles, self.trees, self.started, self.resumed)


def _open_trees(cfg: TreesConfig, roles: Roles) -> tuple[list[_Tree], dict, int]:
    """The trees to grow (drawn across the whole pool), resumed from disk where they were made with
    these settings; a failed tree's failed turn is tried again, its done turns kept."""
    paths = cfg.paths
    pairs = [p for p in read_jsonl(paths.pairs) if p["split"] == "train"]
    if not pairs:
        raise AloeError(f"{paths.pairs}: no training personas")
    if cfg.pair_judge == "rules" and not any(p.get("preferences") for p in pairs):
        raise AloeError(
            f"{paths.pairs}: judge 'rules' needs personas with checkable preferences; set "
            f"stages.personas.preferences (e.g. [2, 4]) and rerun the personas stage"
        )
    pairs = spread(pairs, cfg.n_personas, cfg.seed)  # not the first few profiles' pairs
    prov = provenance(cfg, roles)
    existing = _fold_steps(_load_existing(paths.trees, prov), paths.tree_steps, prov)
    trees = []
    for p in pairs:
        tid = f"tree-{p['id']}"
        rec = existing.get(tid)
        if rec is None or rec.get("_partial"):  # new, or known only from the steps log
            rec = {
                "id": tid,
                "persona_id": p["id"],
                "profile_id": p.get("profile_id"),
                "personality_id": p.get("personality_id"),
                "profile": p["profile"],
                "personality": p["personality"],
                "preferences": p.get("preferences") or [],
                "provenance": prov,
                "turns": (rec or {}).get("turns", []),
                "failed": (rec or {}).get("failed"),
            }
        rec["turns"] = [t for t in rec["turns"] if t["turn"] <= cfg.turns]
        if rec.get("failed"):  # a failure is not data: the failed turn is tried again, the done ones kept
            rec["retried"] = rec.get("retried", 0) + 1
            rec["failed"] = None
        trees.append(_Tree(rec))
    resumed = sum(len(t.rec["turns"]) for t in trees)
    if resumed:
        log.info("resuming: %d turns of %d trees already done", resumed, len(trees))
    if paths.tree_steps.exists():  # folded in: trees.jsonl now holds every step, and the log starts over
        write_jsonl(paths.trees, [t.rec for t in trees])
        paths.tree_steps.unlink()
    return trees, prov, resumed


def _fold_steps(existing: dict[str, dict], path: Path, prov: dict) -> dict[str, dict]:
    """``existing`` trees with the turns the scheduled path appended to ``path`` since (each step
    applies once, in order: a node that is its tree's next turn, or the failure of that turn,
    which _open_trees then retries)."""
    if not path.exists():
        return existing
    lines = read_jsonl(path, allow_torn_tail=True)
    if not lines:
        return existing
    _same_settings(path, lines[0].get("provenance", {}), prov)
    for line in lines[1:]:
        tid = line.get("id")
        rec = existing.get(tid)
        if rec is None:  # a tree that trees.jsonl does not hold yet: _open_trees completes its record
            rec = existing[tid] = {"id": tid, "turns": [], "failed": None, "_partial": True}
        node, failed = line.get("node"), line.get("failed")
        if node is not None and node.get("turn") == len(rec["turns"]) + 1:
            rec["turns"].append(node)
        elif failed is not None and failed.get("turn") == len(rec["turns"]) + 1:
            rec["failed"] = failed
    return existing


def _sampling(cfg: TreesConfig) -> Sampling:
    return Sampling(temperature=cfg.temperature, max_tokens=cfg.max_new_tokens, seed=cfg.seed)


def _user_turn(cfg: TreesConfig, roles: Roles, active: list[_Tree], turn: int) -> tuple[list, dict]:
    """The simulated user's messages, each settled against the persona's checkable preferences
    (what it conveyed, what is revealed by now): [(tree, message)], {tree id: disclosure}."""
    sim = prompts.get("user_simulator")
    plans = {t.rec["id"]: _plan(cfg, t.rec, turn) for t in active}
    users = roles["simulator"].chat(
        [
            ChatRequest(
                simulator_messages(
                    t.rec["profile"], t.rec["personality"], history_of(t.rec), plans[t.rec["id"]].directive
                ),
                _sampling(cfg),
                sample_index=turn,
                prompt_version=sim.tag,
            )
            for t in active
        ]
    )
    said, disclosed = [], {}
    for t, u in zip(active, users):
        msg = clean_user_message(u.text) if u.ok else ""
        if msg:
            if t.rec["preferences"]:
                msg, disclosed[t.rec["id"]] = preferences.settle_message(
                    t.rec, plans[t.rec["id"]], msg, _revealed(t.rec), cfg.disclosure_fallback
                )
            said.append((t, msg))
        else:
            t.fail(turn, "user_simulator", u.error)
    return said, disclosed


def _infer(cfg: TreesConfig, roles: Roles, said: list, disclosed: dict, turn: int) -> list:
    """The inference step: what the user has revealed so far, as the hinted responder's hint."""
    infer = prompts.get(f"infer_{cfg.inference}")
    samp = Sampling(temperature=0.0, max_tokens=cfg.max_new_tokens, seed=cfg.seed)
    inferred = roles["inferrer"].chat(
        [
            ChatRequest(
                [
                    {"role": "system", "content": infer.render("system")},
                    {
                        "role": "user",
                        "content": infer.render(
                            "user",
                            profile=t.rec["profile"],
                            personality=t.rec["personality"],
                            dialogue=dialogue_text(history_of(t.rec), m),
                        ),
                    },
                ],
                samp,
                sample_index=turn,
                prompt_version=infer.tag,
            )
            for t, m in said
        ]
    )
    step = []
    for (t, m), inf in zip(said, inferred):
        if inf.ok:
            step.append((t, m, _hint(t.rec, inf.text.strip() or "Nothing yet.", disclosed.get(t.rec["id"]))))
        else:
            t.fail(turn, infer.name, inf.error)
    return step


def _respond(cfg: TreesConfig, roles: Roles, step: list, turn: int) -> list:
    """The hinted and the plain reply of every node: [(tree, message, inference, hinted, plain)]."""
    plain, hinted = prompts.get("responder_plain"), prompts.get("responder_hinted")

    def request(t, m, hint):
        # the hint changes every turn: it comes after the conversation, which stays a cacheable prefix
        if hint is None:
            head, tail, tag = plain.render("system"), [], plain.tag
        else:
            head, tag = hinted.render("system"), hinted.tag
            tail = [{"role": "system", "content": hinted.render("hint", hint=hint)}]
        return ChatRequest(
            [{"role": "system", "content": head}, *history_of(t.rec), *tail, {"role": "user", "content": m}],
            _sampling(cfg),
            sample_index=turn,
            prompt_version=tag,
        )

    replies = roles["responder"].chat([request(t, m, h) for t, m, inf in step for h in (inf["hint"], None)])
    judged_in = []
    for i, (t, m, inf) in enumerate(step):
        ra, rb = replies[2 * i], replies[2 * i + 1]
        if not (ra.ok and rb.ok and ra.text.strip() and rb.text.strip()):
            t.fail(turn, "responder", ra.error or rb.error or "empty reply")
            continue
        judged_in.append((t, m, inf, ra.text.strip(), rb.text.strip()))
    return judged_in


def _judge_nodes(cfg: TreesConfig, roles: Roles, judged_in: list, disclosed: dict, turn: int, stats: dict) -> None:
    """Judge every node's two replies (pair judge in both orders, likelihood ratios or the rules
    judge), decide preferred and rejected and the branch that continues, and record the node."""
    ratios, verdicts, pointwise = [], [], {}
    if cfg.pair_judge == "likelihood":
        ratios = _likelihood(roles["judge"], judged_in)
    elif cfg.pair_judge != "rules":
        jreqs = [r for t, m, _, a, b in judged_in for r in pair_requests(t.rec, m, a, b)]
        verdicts = ask(
            roles["judge"], jreqs, parse_choice, method=cfg.judge_method, retries=cfg.judge_retries, require_all=True
        )
        pointwise = _pointwise(cfg, roles["judge"], judged_in, verdicts)
    for i, (t, m, inf, a, b) in enumerate(judged_in):
        cands = [{"id": "a", "text": a, "hinted": True}, {"id": "b", "text": b, "hinted": False}]
        rec = {"turn": turn, "user": m, "inferred": {"mode": cfg.inference, "text": inf["text"]}}
        if inf["asked"]:
            rec["inferred"]["asked"] = inf["asked"]
        rules = None
        if t.rec["preferences"]:  # exact scores beside any judge's verdict
            revealed = disclosed[t.rec["id"]]["revealed"]
            rules = {
                "hinted": preferences.rules_score(t.rec["preferences"], a, revealed),
                "plain": preferences.rules_score(t.rec["preferences"], b, revealed),
            }
            rec.update(preferences=disclosed[t.rec["id"]], rules=rules)
        if cfg.pair_judge == "rules":
            node = decide_rules(cfg, t.rec["id"], turn, cands, rules["hinted"], rules["plain"])
            t.rec["turns"].append({**rec, "candidates": cands, **node})
        elif cfg.pair_judge == "likelihood":
            ja, jb = ratios[2 * i], ratios[2 * i + 1]
            stats["judge_calls"] += 2
            stats["judge_unusable"] += (not ja.ok) + (not jb.ok)
            node = decide_likelihood(cfg, t.rec["id"], turn, cands, ja.llr, jb.llr)
            rec.update(candidates=cands, judgments=[{"reply": "a", **ja.to_json()}, {"reply": "b", **jb.to_json()}])
            t.rec["turns"].append({**rec, **node})
        else:
            j1, j2 = verdicts[2 * i], verdicts[2 * i + 1]
            stats["judge_calls"] += 2
            stats["judge_unusable"] += (j1.method == "none") + (j2.method == "none")
            stats["judge_text"] += (j1.method == "text") + (j2.method == "text")
            node = decide(cfg, t.rec["id"], turn, cands, j1, j2, pointwise.get(i))
            if node["verdict"] != "drop":
                rec["candidates"] = cands
                rec["judgments"] = [{"order": ["a", "b"], **j1.to_json()}, {"order": ["b", "a"], **j2.to_json()}]
            t.rec["turns"].append({**rec, **node})


def _finish(
    cfg: TreesConfig, roles: Roles, records: list[dict], prov: dict, resumed: int, stats: dict, started: float
) -> dict:
    """Fail the stage when too many trees failed; otherwise the disclosure curves, the TRL exports,
    the dataset card and the manifest."""
    paths = cfg.paths
    failed = [t for t in records if t["failed"] is not None]
    if failed and len(failed) > cfg.max_failed_share * len(records):
        reasons = collections.Counter(f"{t['failed']['role']}: {str(t['failed']['error'])[:100]}" for t in failed)
        raise AloeError(
            f"trees: {len(failed)} of {len(records)} trees failed, more than max_failed_share "
            f"{cfg.max_failed_share:g} allows ({'; '.join(f'{n} x {r}' for r, n in reasons.most_common(3))}); "
            f"finished turns are kept in {paths.trees}: rerun to retry the failed ones"
        )
    add_disclosure(records, cfg.disclosure_threshold)
    write_jsonl(paths.trees, records)
    exports = export_rows(records, prompts.get("responder_plain").render("system"))
    for name, rows in exports.items():
        write_jsonl(paths.export(name), rows)
    dataset_card(paths, cfg.experiment, {k: len(v) for k, v in exports.items()}, prov)
    nodes = [n for t in records for n in t["turns"]]
    counts = {
        "trees": len(records),
        "failed_trees": sum(t["failed"] is not None for t in records),
        "turns": len(nodes),
        "resumed_turns": resumed,
        **{f"verdict_{v}": sum(n["verdict"] == v for n in nodes) for v in ("preferred", "tie", "drop", "unusable")},
        **{
            f"decided_by_{d}": sum(n.get("decided_by") == d for n in nodes)
            for d in ("pair", "average", "pointwise", "likelihood", "rules")
        },
        **preference_counts(nodes),
        **{f"{k}_rows": len(v) for k, v in exports.items()},
        **stats,
        **roles.cache_stats(),
    }
    write_manifest(
        paths.stage("trees"),
        stage="trees",
        parameters=cfg,
        started=started,
        roles=prov["roles"],
        counts=counts,
        extra={"provenance": prov, "usage": with_cost(roles.usage(), cfg.prices)},
    )
    return counts


def _plan(cfg: TreesConfig, rec: dict, turn: int) -> preferences.UserPlan:
    """What the simulated user is to get across this turn (checkable preferences only)."""
    last = rec["turns"][-1]["followed_text"] if rec["turns"] else None
    return preferences.plan_turn(rec, cfg.turns, turn, cfg.seed, _revealed(rec), last)


def _revealed(rec: dict) -> list[str]:
    """The preferences the user's messages have conveyed so far along the followed branch."""
    return list((rec["turns"][-1].get("preferences") or {}).get("revealed", [])) if rec["turns"] else []


def _hint(rec: dict, inferred: str, disclosed: dict | None) -> dict:
    """The hinted responder's hint: the inference step's text, plus the checkable preferences the
    user has revealed so far, stated exactly (they were said in the dialogue)."""
    by_id = {i["id"]: i for i in rec.get("preferences") or []}
    asked = preferences.described([by_id[r] for r in (disclosed or {}).get("revealed", [])])
    return {"text": inferred, "asked": asked, "hint": f"{inferred} They asked: {asked}" if asked else inferred}


def _likelihood(backend: ChatBackend, judged_in: list) -> list[LikelihoodJudged]:
    """Likelihood ratios of both replies of every node (hinted, plain, hinted, plain, ...)."""
    items, tag = [], ""
    for t, m, _, a, b in judged_in:
        aware, plain, tag = likelihood_prompts(*judge_persona(t.rec), history_of(t.rec), m)
        items += [(aware, plain, a), (aware, plain, b)]
    return likelihood_ratios(backend, items, tag)


def _pointwise(cfg: TreesConfig, backend: ChatBackend, judged_in: list, verdicts: list[Judged]) -> dict:
    """Rubric scores (1-5, no order) of both replies of every node whose two orders disagree.

    A small judge's pair answers are dominated by position (the 135M model gives the
    first reply the same probability whatever it says); a reply scored on its own has
    no position to prefer, so its score differences carry what content signal there is.
    """
    if cfg.inconsistent != "pointwise":
        return {}
    todo = [i for i in range(len(judged_in)) if pair_verdict(verdicts[2 * i], verdicts[2 * i + 1]).consistent is False]
    replies = [
        Reply(judged_in[i][0].rec, history_of(judged_in[i][0].rec), judged_in[i][1], reply)
        for i in todo
        for reply in judged_in[i][3:5]
    ]
    got = ask(
        backend,
        rubric_requests(replies, "paper"),
        parse_score_choice,
        method=cfg.judge_method,
        retries=cfg.judge_retries,
    )
    return {i: (expected_score(got[2 * k]), expected_score(got[2 * k + 1])) for k, i in enumerate(todo)}


def preference_counts(nodes: list[dict]) -> dict[str, int]:
    """Disclosure of checkable preferences over the nodes: scheduled reveals, how many the
    simulated user's own words conveyed, how many needed the catalogue's phrasing appended, and
    complaints about an ignored preference."""
    recs = [n["preferences"] for n in nodes if n.get("preferences")]
    if not recs:
        return {}
    c = preferences.disclosure_counts(recs)
    return {
        "preferences_scheduled": c["scheduled"],
        "preferences_conveyed": c["conveyed"],
        "preferences_appended": c["appended"],
        "preference_complaints": c["complaints"],
    }


def _progress(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="tree turns", unit="turn", disable=not enabled)


def add_disclosure(trees: list[dict], threshold: float) -> None:
    """Per turn, the share of the persona's facts that the user has *revealed* in their messages
    so far and that the inference step has *recovered* (``aloe.disclosure``)."""
    for t in trees:
        if all("disclosure" in n for n in t["turns"]):
            continue
        curve = revealed_curve(
            t["profile"],
            t["personality"],
            [n["user"] for n in t["turns"]],
            threshold,
            recovered_texts=[n["inferred"]["text"] for n in t["turns"]],
        )
        for n, row in zip(t["turns"], curve):
            n["disclosure"] = row


def export_rows(trees: list[dict], system: str | None = None) -> dict[str, list[dict]]:
    """TRL rows from finished trees, conversational format.

    Each turn's prompt is the history along the *followed* branch plus that turn's own
    user message (the paper's scripts repeated the first user message instead). SFT
    rows are prompt/completion, so TRL puts the loss on the assistant reply only.
    Only nodes with a preference are exported; ties, dropped and unusable nodes are not.
    """
    sft_pref, sft_rej, dpo = [], [], []
    for t in trees:
        history = [{"role": "system", "content": system}] if system else []
        for n in t["turns"]:
            prompt = history + [{"role": "user", "content": n["user"]}]
            if n["verdict"] == "preferred":
                rid = f"{t['id']}-t{n['turn']}"
                chosen = [{"role": "assistant", "content": n["preferred"]}]
                rejected = [{"role": "assistant", "content": n["rejected"]}]
                sft_pref.append({"id": rid, "prompt": prompt, "completion": chosen})
                sft_rej.append({"id": rid, "prompt": prompt, "completion": rejected})
                dpo.append({"id": rid, "prompt": prompt, "chosen": chosen, "rejected": rejected})
            history = prompt + [{"role": "assistant", "content": n["followed_text"]}]
    return dict(zip(EXPORTS, (sft_pref, sft_rej, dpo)))  # the names training reads (aloe.variants)


def node_table(trees: list[dict]) -> list[dict]:
    """One flat row per node, for the report's per-turn tables and plots."""
    rows = []
    for t in trees:
        for n in t["turns"]:
            cands = {c["hinted"]: c["text"] for c in n.get("candidates", [])}
            methods = [j["method"] for j in n.get("judgments", [])]
            rows.append(
                {
                    "tree": t["id"],
                    "turn": n["turn"],
                    "verdict": n["verdict"],
                    "decided_by": n.get("decided_by"),
                    "hinted_preferred": n["preferred_is_hinted"],
                    "orders_agree": n["consistent"],
                    "p_hinted": n["p_hinted"],
                    "judge_unusable": methods.count("none"),
                    "judge_text": methods.count("text"),
                    "judgments": len(methods),
                    "user_words": len(n["user"].split()),
                    "hinted_words": len(cands.get(True, "").split()),
                    "plain_words": len(cands.get(False, "").split()),
                    "revealed": (n.get("disclosure") or {}).get("revealed"),
                    "rules_hinted": ((n.get("rules") or {}).get("hinted") or {}).get("share"),
                    "rules_plain": ((n.get("rules") or {}).get("plain") or {}).get("share"),
                    "preferences_revealed": len((n.get("preferences") or {}).get("revealed") or []),
                    "recovered": (n.get("disclosure") or {}).get("recovered"),
                }
            )
    return rows


def tree_html(tree: dict) -> str:
    """One tree as readable HTML: persona, then per turn the user, the inference and both replies."""
    from html import escape as e

    parts = [
        f"<div style='font-family:sans-serif;max-width:60em'><h4>{e(tree['id'])}</h4>",
        f"<p><b>Profile:</b> {e(tree['profile'])}<br><b>Personality:</b> {e(tree['personality'])}</p>",
    ]
    for n in tree["turns"]:
        parts.append(
            f"<h5>Turn {n['turn']}: verdict {e(n['verdict'])}"
            f"{' by ' + e(n['decided_by']) if n.get('decided_by') else ''}</h5>"
        )
        parts.append(f"<p><b>User:</b> {e(n['user'])}</p>")
        parts.append(
            f"<p style='color:#555'><i>Inferred ({e(n['inferred']['mode'])}):</i> {e(n['inferred']['text'])}</p><ul>"
        )
        for c in n.get("candidates", []):
            won = n.get("preferred") == c["text"]
            mark = "preferred" if won else ("rejected" if n.get("rejected") == c["text"] else "")
            followed = " &larr; followed" if c["text"] == n["followed_text"] else ""
            parts.append(f"<li><b>{'hinted' if c['hinted'] else 'plain'}</b> {mark}{followed}: {e(c['text'])}</li>")
        parts.append("</ul>")
    if tree.get("failed"):
        parts.append(f"<p style='color:#a00'>Failed: {e(json.dumps(tree['failed']))}</p>")
    return "\n".join(parts + ["</div>"])
