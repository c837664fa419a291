"""The exact ruler wired through the stages: the rules judge labels trees exactly, evaluation scores
and records disclosure, the judge card is decided on known answers, and self-judging never passes."""

import pytest

import aloe.evaluation
import aloe.judge_card as jc
import aloe.trees
from aloe import preferences as P
from aloe.backends.scripted import ScriptedBackend
from aloe.config import stage_config
from aloe.errors import AloeError
from aloe.io import read_json, read_jsonl, write_jsonl
from aloe.records import load_seeds, make_pairs, pool_records
from aloe.roles import Roles

GOOD = "Take a short walk after lunch."  # satisfies short, no_emoji, no_exclamation
BAD = "Take a walk 🎉! " + " ".join(["really"] * 60)  # violates all three


def _pairs(split, n_prof, n_pers, prefs=(2, 3)):
    kind = "" if split == "train" else "eval_"
    profiles = pool_records(load_seeds(f"{kind}profiles")[:n_prof], "profile", "seed", split)
    personalities = pool_records(load_seeds(f"{kind}personalities")[:n_pers], "personality", "seed", split)
    pairs = make_pairs(profiles, personalities, n_pers if split == "eval" else 1, 0, split)
    return P.assign(pairs, prefs, 0, "ours") if prefs else pairs


def _fixed_prefs(pairs, items):
    return [{**p, "preferences": items} for p in pairs]


def responder(req):
    """Hinted replies (the hint names the revealed preferences) keep them; plain ones break them."""
    system = " ".join(m["content"] for m in req.messages if m["role"] == "system")
    if "What you know about this user" in system:
        return GOOD if "They asked:" in system else BAD
    return BAD if system.startswith("You are a friendly assistant chatting") else "I had a long day at work."


def test_rules_judge_labels_trees_exactly(tmp_path):
    items = [{"id": "short"}, {"id": "no_emoji"}, {"id": "no_exclamation"}]
    write_jsonl(tmp_path / "t" / "personas" / "pairs.jsonl", _fixed_prefs(_pairs("train", 3, 3, None), items))
    cfg = stage_config(
        "trees",
        experiment="t",
        data_root=str(tmp_path),
        cache_path=str(tmp_path / "c.sqlite"),
        n_personas=3,
        turns=3,
        pair_judge="rules",
        max_new_tokens=8,
    )
    engine = ScriptedBackend("s", texts=responder)
    counts = aloe.trees.run(cfg, engine, progress=False)
    trees = read_jsonl(cfg.paths.trees)
    assert engine.prompt_versions("logprobs") == set()  # no model judged
    for t in trees:
        seen = []
        for n in t["turns"]:
            # exact: the label is what the checkers say, node by node
            h, p = (P.rules_score(items, c["text"]) for c in n["candidates"])
            assert n["rules"]["hinted"]["share"] == h["share"] and n["rules"]["plain"]["share"] == p["share"]
            if h["share"] == p["share"]:
                assert n["verdict"] == "tie" and n["preferred"] is None
            else:
                assert n["verdict"] == "preferred" and n["decided_by"] == "rules"
                assert n["preferred_is_hinted"] == (h["share"] > p["share"])
            # at most one new preference per turn, never before its scheduled turn
            new = [r for r in n["preferences"]["revealed"] if r not in seen]
            assert len(new) <= 1 and new == ([n["preferences"]["meant"]] if n["preferences"]["meant"] else [])
            seen = n["preferences"]["revealed"]
    # hinted replies keep only once something is revealed: every labelled node with a hint prefers it
    labelled = [n for t in trees for n in t["turns"] if n["verdict"] == "preferred"]
    assert labelled and all(n["preferred_is_hinted"] for n in labelled if n["inferred"].get("asked"))
    rows = read_jsonl(cfg.paths.export("dpo"))
    assert len(rows) == counts["verdict_preferred"] == len(labelled)
    assert all(r["chosen"][0]["content"] == GOOD for r in rows)
    assert counts["preferences_scheduled"] == 9 and counts["preferences_appended"] == 9  # scripted user says none


def test_rules_judge_needs_personas_with_preferences(tmp_path):
    write_jsonl(tmp_path / "t" / "personas" / "pairs.jsonl", _pairs("train", 2, 2, None))
    cfg = stage_config(
        "trees", experiment="t", data_root=str(tmp_path), cache_path=str(tmp_path / "c.sqlite"), pair_judge="rules"
    )
    with pytest.raises(AloeError, match="checkable preferences.*stages.personas.preferences"):
        aloe.trees.run(cfg, ScriptedBackend(), progress=False)


def _eval_cfg(tmp_path, **kw):
    base = dict(
        experiment="e",
        data_root=str(tmp_path),
        cache_path=str(tmp_path / "c.sqlite"),
        backend={"kind": "scripted", "model": "s"},
        n_personas=6,
        turns=3,
        models=["base", "oracle"],
        n_boot=100,
        max_new_tokens=16,
    )
    return stage_config("evaluate", **{**base, **kw})


def test_evaluation_with_the_rules_judge(tmp_path):
    write_jsonl(tmp_path / "e" / "personas" / "pairs.jsonl", _pairs("eval", 3, 3))
    cfg = _eval_cfg(tmp_path, score_judge="rules")
    engine = ScriptedBackend(
        "s",
        texts=lambda r: (
            GOOD
            if "This is who the user is" in r.messages[0]["content"]
            else ("I want a quiet evening." if "role-playing" in r.messages[0]["content"] else BAD)
        ),
    )
    out = aloe.evaluation.run(cfg, engine, progress=False)
    convs = read_jsonl(cfg.paths.conversations("base"))
    for c in convs:
        for t in c["turns"]:
            assert t["score"] == P.rules_score(c["preferences"], t["reply"])["score"]
            assert t["judge"]["method"] == "rules"
    card = read_json(cfg.paths.judge_card)
    assert card["exact"] and card["fit"] and card["independent"]
    assert card["known_answers"]["K1"]["counts"] is False
    assert out["preference_disclosure"]["base"]["scheduled"] == 6 * 3 - sum(
        max(0, 3 - len(c["preferences"])) for c in convs
    )
    assert out["roles"]["judge"]["kind"] == "rules"
    import csv

    rows = list(csv.DictReader(open(cfg.paths.scores)))
    assert {"rules_score", "rules_revealed_share", "preferences_revealed"} <= set(rows[0])


def _card_pairs():
    items = [{"id": "no_emoji"}, {"id": "no_exclamation"}]
    return _fixed_prefs(_pairs("eval", 6, 3, None), items)


def _convs(pairs):
    convs = []
    for p in pairs:
        reply = " ".join(p["profile"].split()[:6]) + "."  # quotes its persona and keeps both preferences
        turns = [
            {
                "turn": k,
                "user": f"hello {k}. Please no emoji, and no exclamation marks.",
                "reply": reply,
                "score": 3.0,
                "judge": {"method": "logprobs"},
                "preferences": {
                    "meant": None,
                    "conveyed": None,
                    "appended": False,
                    "complaint": None,
                    "revealed": ["no_emoji", "no_exclamation"],
                },
                "rules": P.rules_score(p["preferences"], reply, ["no_emoji", "no_exclamation"]),
            }
            for k in (1, 2)
        ]
        convs.append(
            {
                "model": "base",
                "persona_id": p["id"],
                "profile": p["profile"],
                "preferences": p["preferences"],
                "personality": p["personality"],
                "turns": turns,
            }
        )
    return convs


def reads_all(req):
    """A rubric judge that reads the persona and the preferences: 5 when the reply quotes the profile
    in its prompt and keeps the preferences, 1 otherwise."""
    prompt = req.messages[-1]["content"]
    profile = prompt.split("The user's profile:")[1].split(" Wants:")[0].split("\n")[0].strip()
    reply = prompt.split('The reply: "')[1].rsplit('"', 1)[0]
    good = " ".join(profile.split()[:6]) in reply and "🙂" not in reply and "!" not in reply
    return {c: (0.0 if c == ("5" if good else "1") else -30.0) for c in req.candidates}


def writer(req):
    """Told the persona (the oracle's prompt), it quotes the profile; otherwise it writes plain words."""
    system = req.messages[0]["content"]
    if "This is who the user is:" in system:
        return " ".join(system.split("is:")[1].split()[:6]) + "."
    return "Plain words that fit nobody."


def test_card_decided_on_known_answers(tmp_path):
    pairs = _card_pairs()
    cfg = _eval_cfg(
        tmp_path,
        n_personas=18,
        score_judge="paper",
        roles={"judge": {"model": "j"}},
        judge_card={"n_boot": 200, "k1_messages": 1},
    )
    roles = Roles(
        {},
        None,
        {
            "judge": ScriptedBackend("j", logprobs=reads_all),
            "responder": ScriptedBackend("w", texts=writer),
            "simulator": ScriptedBackend("w", texts=writer),
            "policy": ScriptedBackend("s"),
        },
    )
    card = jc.build(cfg, roles, pairs, {"base": _convs(pairs)})
    k1, k2 = card["known_answers"]["K1"], card["known_answers"]["K2"]
    assert card["independent"] and k1["independent"] and k1["counts"]
    assert k1["discrimination"]["value"] == 1.0 and k1["tailored"]["value"] == 1.0
    assert k1["discrimination"]["gap"] == pytest.approx(4.0, abs=1e-6)
    # K2: the reply keeps both revealed preferences; its edit adds an emoji or an exclamation mark
    assert k2["n"] == 36 and k2["value"] == 1.0 and k2["gap"] == pytest.approx(4.0, abs=1e-6)
    assert card["fit"], card["reasons"]
    # the card states its cost: K1's writer (18 x 2) and judge (18 x 3), K2 (36 x 2), (a) (36)
    assert card["calls"] == 36 + 54 + 72 + 36
    assert {r["check"] for r in jc.card_rows(card)} >= {"independent: the judge is not the policy"}


def test_a_blind_judge_fails_the_known_answers(tmp_path):
    pairs = _card_pairs()
    cfg = _eval_cfg(
        tmp_path,
        n_personas=18,
        score_judge="paper",
        roles={"judge": {"model": "j"}},
        judge_card={"n_boot": 200, "k1_messages": 1},
    )
    roles = Roles(
        {},
        None,
        {
            "judge": ScriptedBackend("j", logprobs=lambda r: {c: -1.6 for c in r.candidates}),
            "responder": ScriptedBackend("w", texts=writer),
            "policy": ScriptedBackend("s"),
        },
    )
    card = jc.build(cfg, roles, pairs, {"base": _convs(pairs)})
    assert not card["fit"]
    assert any(r.startswith("K1: the tailored reply") for r in card["reasons"])
    assert any(r.startswith("K2: a reply that keeps") for r in card["reasons"])


def test_self_judging_never_passes_the_card(tmp_path):
    """The persona-reading judge that passes above, made the policy: the card fails, saying why."""
    pairs = _card_pairs()
    cfg = _eval_cfg(tmp_path, n_personas=18, score_judge="paper", judge_card={"n_boot": 200, "k1_messages": 1})
    same = ScriptedBackend("s", logprobs=reads_all, texts=writer)
    card = jc.build(cfg, same, pairs, {"base": _convs(pairs)})
    assert card["independent"] is False and not card["fit"]
    assert card["reasons"][0].startswith("the judge is the policy")
    # and K1 written by the judge's own model does not count
    assert card["known_answers"]["K1"]["counts"] is False


def test_k1_is_written_by_another_role_when_the_responder_is_the_judge(tmp_path):
    pairs = _card_pairs()
    cfg = _eval_cfg(
        tmp_path,
        n_personas=18,
        score_judge="paper",
        roles={"judge": {"model": "j"}},
        judge_card={"n_boot": 200, "k1_messages": 1},
    )
    judge = ScriptedBackend("j", logprobs=reads_all, texts=writer)
    roles = Roles(
        {},
        None,
        {
            "judge": judge,
            "responder": judge,
            "simulator": ScriptedBackend("w", texts=writer),
            "policy": ScriptedBackend("s"),
        },
    )
    card = jc.build(cfg, roles, pairs, {"base": _convs(pairs)})
    assert card["known_answers"]["K1"]["writer"]["role"] == "simulator" and card["known_answers"]["K1"]["counts"]


def test_sft_preferred_minus_sft_rejected_is_in_metrics(tmp_path):
    from aloe.metrics import paired_difference

    a = {f"p{i}": {1: 3.0 + (i % 3) * 0.1, 2: 3.5} for i in range(10)}
    b = {f"p{i}": {1: 3.0, 2: 3.0} for i in range(10)}
    d = paired_difference(a, b, 2, n_boot=200)
    assert d["avg_diff"] == pytest.approx(((0.0 + 0.1 + 0.2) * 3 + 0.0) / 10 / 2 + 0.25, abs=1e-9)
    assert d["avg_diff_mde"] is not None and d["avg_diff_mde"] > 0


def test_official_benchmark_gets_preferences_without_changing_its_text(tmp_path):
    from pathlib import Path

    official = Path(__file__).resolve().parents[2] / "shared" / "aloe-official"
    if not (official / "profile_eval.jsonl").exists():
        pytest.skip("the official files are not beside this checkout")
    from aloe.evaluation import benchmark_pairs
    from aloe.records import read_aloe_pool

    cfg = _eval_cfg(tmp_path, official_dir=str(official), preferences=[2, 4], n_personas=100)
    pairs = benchmark_pairs(cfg)
    texts = set(read_aloe_pool(official / "profile_eval.jsonl"))
    assert all(p["profile"] in texts for p in pairs)
    assert all(2 <= len(p["preferences"]) <= 4 and p["preference_draw"]["source"] == "official" for p in pairs)
    assert benchmark_pairs(cfg) == pairs


def test_paper_yaml_still_validates():
    from pathlib import Path

    from aloe.config import load_experiment

    root = Path(__file__).resolve().parents[1] / "parameters"
    for name in ("paper.yaml", "paper-open.yaml", "default.yaml", "ci.yaml", "cpu-study.yaml"):
        load_experiment(root / name)


def test_k1_gap_must_clear_min_gap(tmp_path):
    """The same passing judge with min_gap at its own gap (4 points): a win rate of 1.0 is not enough."""
    pairs = _card_pairs()
    cfg = _eval_cfg(
        tmp_path,
        n_personas=18,
        score_judge="paper",
        roles={"judge": {"model": "j"}},
        judge_card={"n_boot": 200, "k1_messages": 1, "min_gap": 4.0},
    )
    roles = Roles(
        {},
        None,
        {
            "judge": ScriptedBackend("j", logprobs=reads_all),
            "responder": ScriptedBackend("w", texts=writer),
            "policy": ScriptedBackend("s"),
        },
    )
    card = jc.build(cfg, roles, pairs, {"base": _convs(pairs)})
    assert not card["fit"] and any(r.startswith("K1: the persona moves the score by +4.000") for r in card["reasons"])
