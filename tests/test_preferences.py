"""The exact ruler: every checker on its hand-written examples and edge cases, the minimal edits,
the seeded draw and schedule, the detector, and the rules score worked out by hand."""

import pytest

from aloe import preferences as P

CAT = P.catalogue()
IDS = sorted(CAT.items)


def item(pid):
    return {"id": pid, "name": "Sam"} if pid == "name" else {"id": pid}


def test_catalogue_has_the_preferences_the_issue_names():
    form = {p for p, v in CAT.items.items() if v.kind == "form"}
    content = {p for p, v in CAT.items.items() if v.kind == "content"}
    assert {
        "short",
        "bullets",
        "no_questions",
        "ends_question",
        "no_emoji",
        "no_exclamation",
        "formal",
        "answer_first",
        "name",
    } <= form
    assert {"vegetarian", "budget", "metric"} <= content
    assert len(CAT.items) >= 12


@pytest.mark.parametrize("pid", IDS)
def test_checker_on_its_examples(pid):
    p = CAT[pid]
    assert P.check(item(pid), p.satisfies) == P.SATISFIED
    assert P.check(item(pid), p.violates) == P.VIOLATED


@pytest.mark.parametrize("pid", IDS)
def test_minimal_edit_violates_only_by_a_small_change(pid):
    p = CAT[pid]
    edited = P.violate(item(pid), p.satisfies)
    assert edited is not None and edited != p.satisfies
    assert P.check(item(pid), edited) == P.VIOLATED


@pytest.mark.parametrize("pid", IDS)
def test_every_phrasing_and_complaint_is_detected(pid):
    p = CAT[pid]
    for text in (*p.reveal, p.complaint):
        assert P.conveys(item(pid), text.format(name="Sam")), text
    # the satisfying example is a reply, not a request: it must not read as the user revealing it
    assert not P.conveys(item(pid), "Can you recommend something to do this weekend?")


@pytest.mark.parametrize("pid", IDS)
def test_empty_reply(pid):
    want = P.NA if CAT[pid].kind == "content" else P.VIOLATED
    assert P.check(item(pid), "") == want
    assert P.check(item(pid), "   \n") == want


def test_edge_cases_by_hand():
    c = P.check
    # emoji: Unicode pictographs, flags, variation selectors and text emoticons count; a colon does not
    assert c(item("no_emoji"), "Well done 👍") == P.VIOLATED
    assert c(item("no_emoji"), "Sunny ☀️ today") == P.VIOLATED
    assert c(item("no_emoji"), "Nice :)") == P.VIOLATED
    assert c(item("no_emoji"), "Note: it is 10:30 now.") == P.SATISFIED
    # lists: numbered lists count, one item is not a list
    assert c(item("bullets"), "Steps:\n1. boil water\n2. add pasta") == P.SATISFIED
    assert c(item("bullets"), "Steps:\n- boil water") == P.VIOLATED
    assert c(item("bullets"), "```\n- not a list\n- inside code\n```") == P.VIOLATED
    # code blocks are not prose
    assert c(item("no_questions"), "Use this:\n```python\nx = a if b else c  # why?\n```\nDone.") == P.SATISFIED
    assert c(item("no_exclamation"), "Write `x != y` to compare.") == P.SATISFIED
    assert c(item("formal"), "Run `don't_touch()` first.") == P.SATISFIED
    # questions
    assert c(item("ends_question"), "Try it. Does that help?") == P.SATISFIED
    assert c(item("ends_question"), "Does that help? Try it.") == P.VIOLATED
    assert c(item("ends_question"), 'She asked "why?"') == P.SATISFIED
    # contractions and possessives
    assert c(item("formal"), "John's car is red.") == P.SATISFIED
    assert c(item("formal"), "It’s red.") == P.VIOLATED  # typographic apostrophe
    # answer first
    assert c(item("answer_first"), "Sure, here it is. Boil it for ten minutes.") == P.VIOLATED
    assert c(item("answer_first"), "Why not try tea? It helps.") == P.VIOLATED
    assert c(item("answer_first"), "Boil it for ten minutes.") == P.SATISFIED
    # the name, with word boundaries and case
    assert c({"id": "name", "name": "Sam"}, "sam, try this.") == P.SATISFIED
    assert c({"id": "name", "name": "Sam"}, "Samples are ready.") == P.VIOLATED
    assert c({"id": "name", "name": "Tomás"}, "Tomás, here you go.") == P.SATISFIED
    # length cap counts every word
    assert c(item("short"), " ".join(["word"] * 50)) == P.SATISFIED
    assert c(item("short"), " ".join(["word"] * 51)) == P.VIOLATED
    # content preferences apply only when the topic comes up
    assert c(item("vegetarian"), "Go for a walk.") == P.NA
    assert c(item("vegetarian"), "Try a meat-free chili for dinner.") == P.SATISFIED
    assert c(item("vegetarian"), "Grill some salmon tonight.") == P.VIOLATED
    assert c(item("budget"), "Feel free to rest.") == P.NA
    assert c(item("budget"), "A gym membership is 50 euros.") == P.VIOLATED
    assert c(item("budget"), "The park gym is free.") == P.SATISFIED
    assert c(item("metric"), "Read a book.") == P.NA
    assert c(item("metric"), "Run 5 km.") == P.SATISFIED
    assert c(item("metric"), "Run 3 miles.") == P.VIOLATED
    assert c(item("metric"), "Bake at 180°C.") == P.SATISFIED
    assert c(item("metric"), "Bake at 350°F.") == P.VIOLATED


def test_draw_is_seeded_exclusive_and_has_a_form_preference():
    for i in range(300):
        got = P.draw(f"pp-{i}", 2, 4, seed=0)
        ids = [g["id"] for g in got]
        assert 2 <= len(ids) <= 4 and len(set(ids)) == len(ids)
        assert not {"no_questions", "ends_question"} <= set(ids)
        assert any(CAT[x].kind == "form" for x in ids)
        assert all("name" in g for g in got if g["id"] == "name")
        assert P.draw(f"pp-{i}", 2, 4, seed=0) == got  # the same persona and seed draw the same
    assert [P.draw(f"pp-{i}", 2, 4, seed=1) for i in range(20)] != [P.draw(f"pp-{i}", 2, 4, seed=0) for i in range(20)]


def test_assign_keeps_the_persona_text_and_records_the_draw():
    pairs = [{"id": "pp-a", "profile": "P.", "personality": "Q."}]
    out = P.assign(pairs, (2, 3), 0, "official")
    assert out[0]["profile"] == "P." and out[0]["personality"] == "Q."
    assert out[0]["preference_draw"]["source"] == "official" and 2 <= len(out[0]["preferences"]) <= 3
    assert P.assign(pairs, (), 0, "official") == pairs


def test_schedule_reveals_at_most_one_new_preference_per_turn():
    items = [{"id": "short"}, {"id": "no_emoji"}, {"id": "formal"}]
    for turns in (1, 2, 3, 10):
        s = P.schedule("pp-x", items, turns)
        assert len(s) == min(3, turns) and all(1 <= t <= turns for t in s)
        assert len(set(s.values())) == len(s)


def test_a_preference_is_never_revealed_before_the_turn_that_revealed_it():
    pair = {"id": "pp-y", "preferences": [{"id": "short"}, {"id": "no_emoji"}, {"id": "formal"}]}
    turns = 5
    when = P.schedule(pair["id"], pair["preferences"], turns)
    revealed, seen_at = [], {}
    for turn in range(1, turns + 1):
        plan = P.plan_turn(pair, turns, turn, 0, revealed, None)
        # a simulator that says nothing of the preference: only the fallback reveals it
        msg, rec = P.settle_message(pair, plan, "I had a long day.", revealed, fallback=True)
        for pid in rec["revealed"]:
            seen_at.setdefault(pid, turn)
        revealed = rec["revealed"]
    assert seen_at == {pid: t for t, pid in when.items()}
    # without the fallback a message that did not convey it reveals nothing
    plan = P.plan_turn(pair, turns, min(when), 0, [], None)
    msg, rec = P.settle_message(pair, plan, "I had a long day.", [], fallback=False)
    assert rec["revealed"] == [] and rec["conveyed"] is False and msg == "I had a long day."


def test_complaint_names_a_revealed_preference_the_last_reply_violated():
    pair = {"id": "pp-z", "preferences": [{"id": "no_emoji"}, {"id": "short"}]}
    plan = P.plan_turn(pair, 10, 99, 0, ["no_emoji"], "Great 🎉")
    assert plan.complaint == "no_emoji" and "emoji" in plan.directive
    assert P.plan_turn(pair, 10, 99, 0, ["no_emoji"], "Great.").complaint is None


def test_rules_score_by_hand():
    items = [{"id": "short"}, {"id": "no_emoji"}, {"id": "vegetarian"}, {"id": "name", "name": "Sam"}]
    # 4 preferences; vegetarian does not apply (no food); short and no_emoji satisfied; name violated
    got = P.rules_score(items, "Go for a walk.", revealed=["name"])
    assert got["n_applicable"] == 3 and got["share"] == pytest.approx(2 / 3)
    assert got["score"] == pytest.approx(1 + 4 * 2 / 3)
    assert got["revealed_share"] == 0.0
    assert P.rules_score(items, "Sam, go for a walk.", revealed=[])["score"] == 5.0
    assert P.rules_score(items, "Sam, go for a walk.", revealed=[])["revealed_share"] is None
