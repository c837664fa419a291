"""Tree synthesis: flattening, verdict logic, garbage judges, kill-and-resume on the real model."""

import dataclasses
import json
import math

import pytest

from aloe.backends.base import CandidateLogprobs, ChatBackend, Completion
from aloe.backends.scripted import ScriptedBackend
from aloe.config import TreesConfig
from aloe.errors import AloeError
from aloe.io import read_json, read_jsonl, write_jsonl
from aloe.judging import Judged, ask, parse_choice
from aloe.trees import decide, export_rows

SYS = "You are a friendly assistant."


def _node(turn, user, preferred, rejected, followed, verdict="preferred"):
    text = {"preferred": preferred, "rejected": rejected}.get(followed) or preferred
    return {
        "turn": turn,
        "user": user,
        "verdict": verdict,
        "preferred": preferred if verdict == "preferred" else None,
        "rejected": rejected if verdict == "preferred" else None,
        "followed": followed,
        "followed_text": text,
    }


def test_export_rows_exact():
    tree = {
        "id": "tree-x",
        "turns": [
            _node(1, "u1", "p1", "r1", "rejected"),
            _node(2, "u2", "p2", "r2", "preferred"),
            _node(3, "u3", None, None, None, verdict="tie") | {"followed_text": "t3"},
            _node(4, "u4", "p4", "r4", "preferred"),
        ],
    }
    rows = export_rows([tree], SYS)
    s = {"role": "system", "content": SYS}

    def u(x):
        return {"role": "user", "content": x}

    def a(x):
        return {"role": "assistant", "content": x}

    p1 = [s, u("u1")]
    p2 = [s, u("u1"), a("r1"), u("u2")]  # the followed branch was the rejected reply
    p4 = [s, u("u1"), a("r1"), u("u2"), a("p2"), u("u3"), a("t3"), u("u4")]  # the tie is history, not a row
    assert rows["dpo"] == [
        {"id": "tree-x-t1", "prompt": p1, "chosen": [a("p1")], "rejected": [a("r1")]},
        {"id": "tree-x-t2", "prompt": p2, "chosen": [a("p2")], "rejected": [a("r2")]},
        {"id": "tree-x-t4", "prompt": p4, "chosen": [a("p4")], "rejected": [a("r4")]},
    ]
    assert rows["sft_preferred"] == [
        {"id": r["id"], "prompt": r["prompt"], "completion": r["chosen"]} for r in rows["dpo"]
    ]
    assert rows["sft_rejected"] == [
        {"id": r["id"], "prompt": r["prompt"], "completion": r["rejected"]} for r in rows["dpo"]
    ]
    # every prompt ends with that turn's own user message
    assert [r["prompt"][-1]["content"] for r in rows["dpo"]] == ["u1", "u2", "u4"]


def _j(p1):
    return Judged("logprobs", {"1": p1, "2": 1 - p1})


CANDS = [{"id": "a", "text": "hinted reply", "hinted": True}, {"id": "b", "text": "plain reply", "hinted": False}]


def _cfg(**kw):
    return TreesConfig(experiment="t", **kw)


def test_decide_consistent_and_branch_policies():
    # hinted shown first: P(1)=.8; hinted shown second: P(2)=.7 -> both orders prefer hinted
    for branch, want in (("preferred", "hinted reply"), ("rejected", "plain reply")):
        n = decide(_cfg(branch=branch), "t", 1, CANDS, _j(0.8), _j(0.3))
        assert n["verdict"] == "preferred" and n["decided_by"] == "pair" and n["consistent"] is True
        assert n["preferred"] == "hinted reply" and n["rejected"] == "plain reply" and n["preferred_is_hinted"]
        assert n["followed_text"] == want
    # random: seeded per (seed, tree, turn): the same call gives the same branch, and both occur
    picks = {decide(_cfg(), f"t{i}", 1, CANDS, _j(0.8), _j(0.3))["followed"] for i in range(20)}
    assert picks == {"preferred", "rejected"}
    assert decide(_cfg(), "t3", 2, CANDS, _j(0.8), _j(0.3)) == decide(_cfg(), "t3", 2, CANDS, _j(0.8), _j(0.3))


def test_decide_inconsistent_policies():
    biased = (_j(0.9), _j(0.85))  # says "1" whatever is shown first: orders disagree
    n = decide(_cfg(inconsistent="average"), "t", 1, CANDS, *biased)
    assert n["consistent"] is False and n["decided_by"] == "average"
    assert n["p_hinted"] == pytest.approx((0.9 + 0.15) / 2) and n["preferred_is_hinted"] is True
    n = decide(_cfg(inconsistent="tie"), "t", 1, CANDS, *biased)
    assert n["verdict"] == "tie" and n["preferred"] is None and n["followed"] is None
    assert n["followed_text"] in ("hinted reply", "plain reply")
    assert decide(_cfg(inconsistent="drop"), "t", 1, CANDS, *biased)["verdict"] == "drop"
    n = decide(_cfg(inconsistent="pointwise"), "t", 1, CANDS, *biased, pointwise=(2.1, 3.4))
    assert n["decided_by"] == "pointwise" and n["preferred"] == "plain reply" and n["preferred_is_hinted"] is False
    assert decide(_cfg(inconsistent="pointwise"), "t", 1, CANDS, *biased, pointwise=(2.5, None))["verdict"] == "tie"
    # one order unusable: no verdict, never a made-up one
    n = decide(_cfg(), "t", 1, CANDS, _j(0.8), Judged("none", None, ["hmm"], error="no parsable answer"))
    assert n["verdict"] == "unusable" and n["preferred"] is None


def Scripted(texts):
    """Replays given judge texts and reports no log-probabilities (like a server without them)."""
    return ScriptedBackend(texts=texts, logprobs=False)


@pytest.mark.parametrize(
    "text,want",
    [
        ("1", "1"),
        (" 2.", "2"),
        ("Reply 2", "2"),
        ("**1**", "1"),
        ("Answer: 1", "1"),
        ("", None),
        ("1 or 2", None),
        ("Reply 1 is better", None),
        ("3", None),
        ("12", None),
    ],
)
def test_parse_choice_strict(text, want):
    assert parse_choice(text) == want


def test_garbage_judge_retries_then_unusable():
    from aloe.backends import ProbRequest

    req = ProbRequest([{"role": "user", "content": "1 or 2?"}], ("1", "2"))
    # garbage, then a valid answer on the first retry
    be = Scripted(["Both replies are lovely!", "2"])
    (j,) = ask(be, [req], parse_choice, retries=2, require_all=True)
    assert j.method == "text" and j.probs == {"1": 0.0, "2": 1.0} and j.raw == ["Both replies are lovely!", "2"]
    # garbage every time: missing, with every raw reply kept, never a verdict
    be = Scripted(["¯\\_(ツ)_/¯", "I think 1 or maybe 2", "<html>"])
    (j,) = ask(be, [req], parse_choice, retries=2, require_all=True)
    assert j.method == "none" and j.probs is None and len(j.raw) == 3 and "3 tries" in j.error
    assert [c for c, _ in be.calls].count("chat") == 3


def _write_pairs(root, n=2):
    from aloe.records import load_seeds, make_pairs, pool_records

    profiles = pool_records(load_seeds("profiles")[:n], "profile", "seed", "train")
    personalities = pool_records(load_seeds("personalities"), "personality", "seed", "train")
    write_jsonl(root / "personas" / "pairs.jsonl", make_pairs(profiles, personalities, 1, 0, "train"))


@pytest.mark.integration
def test_kill_and_resume_equals_uninterrupted(tmp_path, smollm):
    """Real embedded model, 2 personas x 2 turns: a crash in turn 2 loses nothing and the
    resumed run ends with exactly the trees of an uninterrupted run."""
    import aloe.trees
    from aloe.cache import CallCache

    results = {}
    for name in ("straight", "killed"):
        root = tmp_path / name
        _write_pairs(root / "t")
        cfg = TreesConfig(experiment="t", data_root=str(root), n_personas=2, turns=2, max_new_tokens=12)
        smollm.cache = CallCache(str(root / "cache.sqlite"))
        if name == "killed":
            real = smollm.logprobs
            calls = {"n": 0}

            def crash_in_turn_2(reqs):
                calls["n"] += 1
                if calls["n"] == 3:  # turn 1: pair judge + pointwise; the third call is in turn 2
                    raise KeyboardInterrupt
                return real(reqs)

            smollm.logprobs = crash_in_turn_2
            with pytest.raises(KeyboardInterrupt):
                aloe.trees.run(cfg, smollm, progress=False)
            del smollm.logprobs
            saved = read_jsonl(root / "t" / "trees" / "trees.jsonl")
            assert [len(t["turns"]) for t in saved] == [1, 1]  # turn 1 was checkpointed
            assert not (root / "t" / "trees" / "manifest.json").exists()
            counts = aloe.trees.run(cfg, smollm, progress=False)
            assert counts["resumed_turns"] == 2
        else:
            counts = aloe.trees.run(cfg, smollm, progress=False)
        assert counts["turns"] == 4 and counts["failed_trees"] == 0
        results[name] = (root / "t" / "trees" / "trees.jsonl").read_text()
        for f in ("sft_preferred", "sft_rejected", "dpo"):
            results[name, f] = (root / "t" / "trees" / f"{f}.jsonl").read_text()
    assert results["killed"] == results["straight"]
    for f in ("sft_preferred", "sft_rejected", "dpo"):
        assert results["killed", f] == results["straight", f]
    trees = [json.loads(line) for line in results["straight"].splitlines()]
    for t in trees:
        assert [n["turn"] for n in t["turns"]] == [1, 2]
        assert t["provenance"]["prompts"]["judge_pair"].startswith("judge_pair@")
        for n in t["turns"]:
            assert n["user"] and n["inferred"]["text"] and {c["hinted"] for c in n["candidates"]} == {True, False}
            assert [j["order"] for j in n["judgments"]] == [["a", "b"], ["b", "a"]]
            assert all(j["method"] == "logprobs" and math.isclose(sum(j["probs"].values()), 1) for j in n["judgments"])
            assert 0 <= n["disclosure"]["revealed"] <= 1 and 0 <= n["disclosure"]["recovered"] <= 1
    # exports load as the datasets TRL consumes
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(tmp_path / "straight" / "t" / "trees" / "dpo.jsonl"), split="train")
    assert set(ds.column_names) == {"id", "prompt", "chosen", "rejected"} and len(ds) == 4
    smollm.cache = CallCache(None)


def test_resume_refuses_other_settings(tmp_path, smollm):
    import aloe.trees
    from aloe.errors import AloeError

    root = tmp_path / "d"
    _write_pairs(root / "t")
    cfg = TreesConfig(experiment="t", data_root=str(root), n_personas=1, turns=1, max_new_tokens=8)
    prov = aloe.trees.provenance(cfg, smollm)
    write_jsonl(
        root / "t" / "trees" / "trees.jsonl",
        [{"id": "tree-x", "provenance": {**prov, "seed": 7}, "turns": [], "failed": None}],
    )
    with pytest.raises(AloeError, match=r"different settings \(seed: 7 -> 0\).*delete"):
        aloe.trees.run(dataclasses.replace(cfg), smollm, progress=False)


class OneFails(ChatBackend):
    """Every call succeeds except the user simulator's for one persona (contains `bad`)."""

    kind = "scripted"

    def __init__(self, bad):
        super().__init__("scripted", "0")
        self.bad = bad

    def _generate(self, requests):
        return [
            Completion(text=None, error="HTTP 500: boom")
            if self.bad in r.messages[0]["content"] and r.prompt_version.startswith("user_simulator")
            else Completion(text=f"Hello number {i}.")
            for i, r in enumerate(requests)
        ]

    def _score(self, requests):
        return [
            CandidateLogprobs(
                {c: math.log(0.6 if c == "1" else 0.4 / max(1, len(r.candidates) - 1)) for c in r.candidates}
            )
            for r in requests
        ]


def test_a_failing_tree_is_recorded_and_the_others_go_on(tmp_path):
    import aloe.trees

    _write_pairs(tmp_path / "t", n=3)
    pairs = read_jsonl(tmp_path / "t" / "personas" / "pairs.jsonl")
    cfg = TreesConfig(
        experiment="t", data_root=str(tmp_path), n_personas=3, turns=2, max_new_tokens=8, inconsistent="average"
    )
    # one tree of three is more than the default max_failed_share (0.1): the stage fails, naming why
    with pytest.raises(AloeError, match=r"1 of 3 trees failed.*1 x user_simulator: HTTP 500: boom"):
        aloe.trees.run(cfg, OneFails(pairs[1]["profile"]), progress=False)
    assert not cfg.paths.manifest("trees").exists()
    # a file that tolerates it: the failure is recorded, the others go on
    cfg = dataclasses.replace(cfg, max_failed_share=0.5)
    counts = aloe.trees.run(cfg, OneFails(pairs[1]["profile"]), progress=False)
    trees = read_jsonl(tmp_path / "t" / "trees" / "trees.jsonl")
    assert counts["failed_trees"] == 1 and counts["turns"] == 4
    (bad,) = [t for t in trees if t["failed"]]
    assert bad["profile"] == pairs[1]["profile"]
    assert bad["failed"] == {"turn": 1, "role": "user_simulator", "error": "HTTP 500: boom"}
    assert sorted(len(t["turns"]) for t in trees) == [0, 2, 2]
    assert counts["dpo_rows"] == 4 and not any(
        r["id"].startswith(bad["id"]) for r in read_jsonl(tmp_path / "t" / "trees" / "dpo.jsonl")
    )


def test_the_manifest_counts_each_engine_s_calls_and_tokens(tmp_path, caplog):
    import logging

    import aloe.trees
    from aloe.backends.scripted import ScriptedBackend

    caplog.set_level(logging.INFO, logger="aloe.trees")

    _write_pairs(tmp_path / "t", n=2)
    cfg = TreesConfig(
        experiment="t", data_root=str(tmp_path), n_personas=2, turns=2, max_new_tokens=8, inconsistent="average"
    )
    engine = ScriptedBackend(texts=lambda r: "A reply of five words.")
    aloe.trees.run(cfg, engine, progress=False)
    (used,) = read_json(cfg.paths.manifest("trees"))["usage"]
    assert set(used["roles"]) == {"simulator", "inferrer", "responder", "judge"}
    # every request the engine saw (identical requests of one batch are asked once), none from the cache
    assert used["calls"] == len(engine.calls) > 0 and used["cached_calls"] == 0
    assert used["cost_usd"] == 0.0 and used["saved_usd"] == 0.0  # a local engine costs nothing but time
    assert "trees: 2/4 done" in caplog.text and "trees: 4/4 done" in caplog.text and "cost so far $0.00" in caplog.text
    aloe.trees.run(cfg, ScriptedBackend(texts=lambda r: "A reply of five words."), progress=False)
    assert read_json(cfg.paths.manifest("trees"))["usage"][0]["calls"] == 0  # resumed: nothing asked again


def test_tree_summary_frames_for_the_notebook():
    """02_trees' tables come from aloe.reporting.summary (hand-worked values on two trees)."""
    import pandas as pd

    import aloe.trees
    from aloe.reporting import summary

    def node(turn, verdict, by, revealed, recovered, hinted):
        return {
            "turn": turn,
            "verdict": verdict,
            "decided_by": by,
            "preferred_is_hinted": hinted,
            "consistent": True,
            "p_hinted": None,
            "judgments": [{"method": "rules"}],
            "user": "a b c",
            "candidates": [{"hinted": True, "text": "x y"}, {"hinted": False, "text": "z"}],
            "disclosure": {"revealed": revealed, "recovered": recovered},
        }

    trees = [
        {"id": "t1", "turns": [node(1, "preferred", "rules", 0.5, 0.0, True), node(2, "tie", None, 1.0, 0.5, None)]},
        {"id": "t2", "turns": [node(1, "preferred", "rules", 0.0, 0.5, False), node(2, "tie", None, 0.5, 0.5, None)]},
    ]
    nodes = pd.DataFrame(aloe.trees.node_table(trees))
    verdicts = summary.tree_verdicts(nodes)["nodes"].to_dict()
    assert verdicts[("preferred", "rules")] == 2 and sum(verdicts.values()) == 4
    curve = summary.tree_disclosure(nodes)
    assert curve.loc[1].tolist() == [0.25, 0.25] and curve.loc[2].tolist() == [0.75, 0.5]
    turns = summary.tree_turns(nodes)
    assert turns.loc[1, "labelled"] == 2 and turns.loc[1, "hinted_preferred"] == 0.5 and turns.loc[2, "labelled"] == 0
