"""Evaluation conversations scheduled one by one over HTTP (``stages.evaluate.schedule``): against
a real loopback server whose answers depend only on the request and arrive in a scrambled order,
each conversation advancing on its own gives the same conversations and scores as the lockstep
path, and a crash mid-run loses no answer: the rerun equals an uninterrupted run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from pathlib import Path

import pytest
from conftest import JsonHandler, LoopbackServer

import aloe.evaluation
from aloe.config import stage_config
from aloe.io import read_jsonl, write_jsonl
from aloe.roles import open_roles

REPLIES = [
    "Sure! Here are some ideas:\n- a walk\n- a book",
    "A short walk after dinner helps. It costs nothing.",
    "What do you usually enjoy doing on weekends?",
    "I would try a lentil soup; it takes 20 minutes.",
]


class ScoringServer(LoopbackServer):
    """Chat answers and 1-5 log-probabilities, each a function of the request alone, after a
    random delay (so answers arrive in a different order on every run)."""

    def __init__(self):
        self.keys: list[str] = []  # every request answered
        self.refuse: str | None = None  # requests whose text holds this get HTTP 503
        srv = self

        class Handler(JsonHandler):
            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                h = int(hashlib.sha256(json.dumps([req["messages"], req.get("seed")]).encode()).hexdigest(), 16)
                if srv.refuse and srv.refuse in json.dumps(req["messages"]):
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                time.sleep(random.random() * 0.02)
                choice = {"index": 0, "finish_reason": "stop"}
                if req.get("logprobs"):
                    ps = [1 + (h >> (8 * i)) % 7 for i in range(5)]
                    top = [{"token": str(i + 1), "logprob": math.log(p / sum(ps))} for i, p in enumerate(ps)]
                    best = max(top, key=lambda t: t["logprob"])
                    choice["message"] = {"role": "assistant", "content": best["token"]}
                    choice["logprobs"] = {"content": [{**best, "top_logprobs": top}]}
                else:
                    choice["message"] = {"role": "assistant", "content": REPLIES[h % len(REPLIES)]}
                self._send({"choices": [choice], "usage": {"prompt_tokens": 10, "completion_tokens": 5}})
                srv.keys.append(f"{h:x}")

        self.start(Handler)


@pytest.fixture
def scoring():
    s = ScoringServer()
    yield s
    s.close()


def _cfg(root: Path, url: str, schedule: str, concurrency: int = 3):
    from aloe.records import load_seeds, make_pairs, pool_records

    profiles = pool_records(load_seeds("eval_profiles"), "profile", "seed", "eval")
    personalities = pool_records(load_seeds("eval_personalities"), "personality", "seed", "eval")
    write_jsonl(root / "e" / "personas" / "pairs.jsonl", make_pairs(profiles, personalities, 5, 0, "eval"))
    http = {"kind": "openai", "model": "m", "base_url": url, "max_concurrency": concurrency, "max_retries": 1}
    return stage_config(
        "evaluate",
        experiment="e",
        data_root=str(root),
        cache_path=str(root / "c.sqlite"),
        backend=http,
        n_personas=5,
        turns=3,
        models=["base"],
        score_judge="paper",
        n_boot=50,
        judge_card={"enabled": False},
        schedule=schedule,
    )


def _view(cfg):
    keep = ("turn", "user", "reply", "score")
    return sorted(
        (c["persona_id"], [{k: t[k] for k in keep} for t in c["turns"]])
        for c in read_jsonl(cfg.paths.conversations("base"))
    )


def test_conversations_on_their_own_equal_the_lockstep_ones(scoring, tmp_path):
    got = {}
    for schedule in ("lockstep", "auto"):
        cfg = _cfg(tmp_path / schedule, scoring.url, schedule)
        roles = open_roles(cfg, aloe.evaluation.REQUIRED)
        assert aloe.evaluation.schedule_of(cfg, roles, roles["policy"]) == (
            "lockstep" if schedule == "lockstep" else "conversation"
        )
        out = aloe.evaluation.run(cfg, roles, progress=False)
        assert out["models"]["base"]["missing"] == 0
        got[schedule] = _view(cfg)
    assert got["auto"] == got["lockstep"]
    assert len(got["auto"]) == 5 and all(len(turns) == 3 for _, turns in got["auto"])
    assert len({t["score"] for _, turns in got["auto"] for t in turns}) > 1  # the test can tell scores apart


def test_a_crash_mid_run_loses_no_answer_and_the_rerun_equals_an_uninterrupted_run(scoring, tmp_path):
    whole = _cfg(tmp_path / "whole", scoring.url, "auto")
    aloe.evaluation.run(whole, open_roles(whole, aloe.evaluation.REQUIRED), progress=False)

    cfg = _cfg(tmp_path / "cut", scoring.url, "auto")
    roles = open_roles(cfg, aloe.evaluation.REQUIRED)
    engine = roles["policy"]
    real, calls = engine._generate, {"n": 0}

    def crash_after_some(requests, done=None):  # stops the process mid-run, as Ctrl-C would
        calls["n"] += 1
        if calls["n"] > 12:
            raise KeyboardInterrupt
        return real(requests, done)

    engine._generate = crash_after_some
    before = len(scoring.keys)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        aloe.evaluation.run(cfg, roles, progress=False)
    assert time.monotonic() - started < 20  # waits for the turns under way only
    kept = sum(len(c["turns"]) for c in read_jsonl(cfg.paths.conversations("base")))
    assert 0 < kept < 15  # every finished turn is on disk
    engine._generate = real
    paid = set(scoring.keys[before:])
    rerun_from = len(scoring.keys)
    aloe.evaluation.run(cfg, open_roles(cfg, aloe.evaluation.REQUIRED), progress=False)
    assert _view(cfg) == _view(whole)
    asked_again = paid & set(scoring.keys[rerun_from:])
    assert not asked_again, f"{len(asked_again)} answers of the crashed run were asked for again"


def test_a_server_that_answers_only_503_stops_the_stage_instead_of_leaving_holes(tmp_path):
    from aloe.errors import AloeError

    class Down(LoopbackServer):
        def __init__(self):
            class Handler(JsonHandler):
                def do_POST(self):
                    self.rfile.read(int(self.headers["Content-Length"]))
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            self.start(Handler)

    down = Down()
    try:
        cfg = _cfg(tmp_path, down.url, "auto", concurrency=1)  # 2 conversations in progress
        roles = open_roles(cfg, aloe.evaluation.REQUIRED)
        for e in roles.engines():
            e.backoff_base_s = e.backoff_max_s = 0.01
        assert aloe.evaluation.schedule_of(cfg, roles, roles["policy"]) == "conversation"
        started = time.monotonic()
        with pytest.raises(AloeError, match="HTTP 503"):
            aloe.evaluation.run(cfg, roles, progress=False)
        assert time.monotonic() - started < 30
        assert all(not c["turns"] for c in read_jsonl(cfg.paths.conversations("base")))
    finally:
        down.close()


def test_one_conversation_that_finds_no_server_stops_alone(scoring, tmp_path):
    cfg = dataclasses.replace(_cfg(tmp_path, scoring.url, "auto"), max_failed_share=0.5)
    pairs = aloe.evaluation.benchmark_pairs(cfg)
    scoring.refuse = pairs[0]["profile"]  # the simulator's requests for this persona get 503
    roles = open_roles(cfg, aloe.evaluation.REQUIRED)
    for e in roles.engines():
        e.backoff_base_s = e.backoff_max_s = 0.01
    aloe.evaluation.run(cfg, roles, progress=False)
    turns = {c["persona_id"]: len(c["turns"]) for c in read_jsonl(cfg.paths.conversations("base"))}
    assert turns.pop(pairs[0]["id"]) == 0 and set(turns.values()) == {3}  # the others finished
