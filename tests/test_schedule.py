"""Trees scheduled one by one over HTTP (``stages.trees.schedule``): against a real loopback server
whose answers depend only on the request and arrive in a scrambled order, the scheduled path grows
the same trees as the lockstep path; one tree whose calls hang does not hold up the others; a
crash mid-run loses no finished turn, and the rerun equals an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time

import pytest
from conftest import JsonHandler, LoopbackServer

import aloe.personas
import aloe.trees
from aloe.backends.scripted import ScriptedBackend
from aloe.config import stage_config
from aloe.errors import ConfigError
from aloe.io import read_jsonl
from aloe.records import spread
from aloe.roles import open_roles

# Replies that keep or break different checkable preferences, so the rules judge labels nodes.
REPLIES = [
    "Sure! Here are some ideas:\n- a walk\n- a book\n- a call with a friend",
    "A short walk after dinner helps. It costs nothing.",
    "Great question 😊 What do you usually enjoy?",
    "I would try a lentil soup; it takes 20 minutes and about 2 dollars.",
    "You're right, it's hard. Start small, then build up over a week or two, and keep notes.",
    "Let me think about that. Honestly, the best first step is to write down what matters most to you.",
]


class EchoServer(LoopbackServer):
    """An OpenAI-compatible server whose answer is a function of the request alone (messages and
    seed), after a random delay, so answers arrive in a different order on every run. ``hold``:
    requests whose text contains this string wait until ``release`` is set."""

    def __init__(self, max_delay_s: float = 0.02):
        self.lock, self.answered, self.max_delay_s = threading.Lock(), 0, max_delay_s
        self.hold: str | None = None
        self.release = threading.Event()
        srv = self

        class Handler(JsonHandler):
            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                blob = json.dumps([req["messages"], req.get("seed")], sort_keys=True)
                if srv.hold and any(srv.hold in str(m.get("content")) for m in req["messages"]):
                    srv.release.wait(30)
                time.sleep(random.random() * srv.max_delay_s)
                text = REPLIES[int(hashlib.sha256(blob.encode()).hexdigest(), 16) % len(REPLIES)]
                self._send(
                    {
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                        ],
                        "usage": {"prompt_tokens": len(blob) // 4, "completion_tokens": len(text) // 4},
                    }
                )
                with srv.lock:
                    srv.answered += 1

        self.start(Handler)

    def close(self):
        self.release.set()
        super().close()


@pytest.fixture
def echo():
    s = EchoServer()
    yield s
    s.close()


def _setup(root, url, schedule, n=6, turns=3, concurrency=4):
    common = dict(experiment="s", data_root=str(root), cache_path=str(root / "c.sqlite"))
    aloe.personas.run(
        stage_config(
            "personas",
            **common,
            backend={"kind": "scripted", "model": "s"},
            target_profiles=6,
            target_personalities=6,
            preferences=[2, 3],
        ),
        ScriptedBackend(),
    )
    http = {"kind": "openai", "model": "m", "base_url": url, "max_concurrency": concurrency, "max_retries": 1}
    return stage_config(
        "trees", **common, backend=http, n_personas=n, turns=turns, pair_judge="rules", schedule=schedule
    )


def _view(path):
    keep = ("turn", "user", "verdict", "preferred", "rejected", "followed", "followed_text", "inferred", "rules")
    return sorted((t["id"], t["failed"], [{k: n.get(k) for k in keep} for n in t["turns"]]) for t in read_jsonl(path))


def test_the_scheduled_path_grows_the_same_trees_as_the_lockstep_path(echo, tmp_path):
    got = {}
    for schedule in ("lockstep", "conversation"):
        cfg = _setup(tmp_path / schedule, echo.url, schedule)
        roles = open_roles(cfg, aloe.trees.ROLES)
        assert aloe.trees.schedule_of(cfg, roles) == schedule
        counts = aloe.trees.run(cfg, roles, progress=False)
        assert counts["trees"] == 6 and counts["failed_trees"] == 0 and counts["turns"] == 18
        assert not cfg.paths.tree_steps.exists()  # folded into trees.jsonl
        got[schedule] = (_view(cfg.paths.trees), [read_jsonl(cfg.paths.export(e)) for e in ("dpo", "sft_preferred")])
    assert got["conversation"] == got["lockstep"]
    assert any(n["verdict"] == "preferred" for _, _, ns in got["lockstep"][0] for n in ns)  # the test can tell


def test_auto_schedules_conversations_only_where_every_engine_is_a_server(echo, tmp_path):
    cfg = _setup(tmp_path, echo.url, "auto")
    assert aloe.trees.schedule_of(cfg, open_roles(cfg, aloe.trees.ROLES)) == "conversation"
    mixed = stage_config(
        "trees",
        experiment="s",
        data_root=str(tmp_path),
        pair_judge="pair",
        backend={"kind": "openai", "model": "m", "base_url": echo.url},
        roles={"judge": {"kind": "scripted", "model": "j"}},
    )
    assert aloe.trees.schedule_of(mixed, open_roles(mixed, aloe.trees.ROLES)) == "lockstep"
    with pytest.raises(ConfigError, match="schedule: 'conversation'.*local engine"):
        stage_config(
            "trees",
            experiment="s",
            data_root=str(tmp_path),
            schedule="conversation",
            backend={"kind": "transformers", "model": "smollm2-135m"},
        )


def test_one_tree_whose_calls_hang_does_not_hold_up_the_others(echo, tmp_path):
    cfg = _setup(tmp_path, echo.url, "conversation", n=6, turns=3, concurrency=4)
    roles = open_roles(cfg, aloe.trees.ROLES)
    grown = spread([p for p in read_jsonl(cfg.paths.pairs) if p["split"] == "train"], cfg.n_personas, cfg.seed)
    echo.hold = grown[0]["profile"]  # every request that carries this persona's profile waits
    result = {}
    runner = threading.Thread(target=lambda: result.update(counts=aloe.trees.run(cfg, roles, progress=False)))
    runner.start()
    deadline = time.time() + 60
    while time.time() < deadline:  # every other tree finishes all its turns while that one waits
        steps = read_jsonl(cfg.paths.tree_steps, allow_torn_tail=True) if cfg.paths.tree_steps.exists() else []
        if sum(1 for s in steps[1:] if "node" in s) >= 5 * 3:
            break
        time.sleep(0.05)
    done = [s for s in steps[1:] if "node" in s]
    assert len(done) >= 15, f"the other trees are held up: {len(done)} turns done"
    assert runner.is_alive()  # the held tree is still waiting
    echo.release.set()
    runner.join(60)
    assert result["counts"]["trees"] == 6 and result["counts"]["turns"] == 18


def test_a_crash_mid_run_keeps_every_finished_turn_and_the_rerun_equals_an_uninterrupted_run(echo, tmp_path):
    whole = _setup(tmp_path / "whole", echo.url, "conversation")
    aloe.trees.run(whole, open_roles(whole, aloe.trees.ROLES), progress=False)

    cfg = _setup(tmp_path / "cut", echo.url, "conversation")
    roles = open_roles(cfg, aloe.trees.ROLES)
    calls = {"n": 0}
    responder = roles["responder"]
    real = responder._generate

    def crash_after_some(requests, done=None):  # a crash that stops the process mid-run, as a kill would
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        return real(requests, done)

    responder._generate = crash_after_some
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        aloe.trees.run(cfg, roles, progress=False)
    # it waits for the steps under way only, not for the grace time (30 s) on steps never started
    assert time.monotonic() - started < 20
    kept = sum(len(t["turns"]) for t in read_jsonl(cfg.paths.trees))
    assert 0 < kept < 18
    counts = aloe.trees.run(cfg, open_roles(cfg, aloe.trees.ROLES), progress=False)
    assert counts["resumed_turns"] == kept and counts["turns"] == 18
    assert _view(cfg.paths.trees) == _view(whole.paths.trees)
