"""Reliability: one writer per experiment, stages that start clean, files with normal modes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest
from conftest import REPO

import aloe.io
from aloe.config import stage_config
from aloe.errors import AloeError
from aloe.io import write_json
from aloe.lock import ExperimentBusy, experiment_lock


def _params(tmp_path, name):
    f = tmp_path / f"{name}.yaml"
    f.write_text(
        f"experiment: {name}\ndata_root: {tmp_path / 'data'}\ncache_path: {tmp_path / 'c.sqlite'}\n"
        "backend: {kind: scripted, model: s}\n"
        "stages:\n  personas: {target_profiles: 3, target_personalities: 3}\n"
    )
    return f


def _hold_lock(root, seconds):
    """A separate process holding the experiment's lock, as a running `aloe run` would."""
    code = (
        f"import time, aloe.lock\nwith aloe.lock.experiment_lock({str(root)!r}):\n"
        f"    print('held', flush=True)\n    time.sleep({seconds})\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_stage_launched_directly_is_refused_while_another_holds_the_experiment(tmp_path):
    import aloe.personas

    cfg = stage_config(
        "personas",
        experiment="busy",
        data_root=str(tmp_path / "data"),
        cache_path=str(tmp_path / "c.sqlite"),
        backend={"kind": "scripted", "model": "s"},
    )
    holder = _hold_lock(cfg.paths.root, 60)
    try:
        with pytest.raises(ExperimentBusy, match=rf"experiment 'busy' is in use by pid {holder.pid} on .*started"):
            aloe.personas.run(cfg)
        assert not cfg.paths.pool.exists()
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the dead holder's lock: no stale lock to clear by hand
    aloe.personas.run(cfg)
    assert cfg.paths.manifest("personas").exists()


@pytest.mark.e2e  # runs `aloe run` (the Papermill pipeline) in a subprocess
def test_two_runs_on_one_experiment_the_second_is_refused_the_first_unharmed(tmp_path):
    f = _params(tmp_path, "lock-test")
    lock = tmp_path / "data" / "lock-test" / ".lock"
    cmd = [sys.executable, "-m", "aloe", "run", str(f), "--only", "personas"]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and str(first.pid) in lock.read_text()):
        time.sleep(0.05)
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=600)
    assert second.returncode == 2, second.stderr
    assert f"in use by pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert len(second.stderr.strip().splitlines()) <= 2
    assert first.returncode == 0, err[-2000:]
    m = json.loads((tmp_path / "data" / "lock-test" / "personas" / "manifest.json").read_text())
    assert m["counts"]["eval_pairs"] == 100
    # after the first finished, the same command runs
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]


def test_a_stage_removes_its_manifest_and_leftovers_when_it_starts(tmp_path):
    import aloe.trees
    from aloe.backends.scripted import ScriptedBackend

    cfg = stage_config(
        "trees",
        experiment="clean",
        data_root=str(tmp_path / "data"),
        cache_path=str(tmp_path / "c.sqlite"),
        backend={"kind": "scripted", "model": "s"},
    )
    stage_dir = cfg.paths.stage("trees")
    write_json(cfg.paths.manifest("trees"), {"stage": "trees", "counts": {"trees": 99}})
    leftover = stage_dir / ".trees.jsonl.abc123.tmp"
    leftover.write_text("half a record")
    with pytest.raises(AloeError):  # no persona pool: the stage fails ...
        aloe.trees.run(cfg, ScriptedBackend())
    # ... and no longer looks finished; the killed writer's temp file is gone
    assert not cfg.paths.manifest("trees").exists() and not leftover.exists()


def test_lock_is_reentrant_for_the_notebooks_a_run_starts(tmp_path):
    with experiment_lock(tmp_path / "e") as path:
        assert os.environ["ALOE_LOCK"] == str(path)
        # a kernel started by the run inherits ALOE_LOCK and proceeds
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import aloe.lock\nwith aloe.lock.experiment_lock({str(tmp_path / 'e')!r}):\n    print('ok')",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.stdout.strip() == "ok", r.stderr
        # without it (another process), refused
        env = {k: v for k, v in os.environ.items() if k != "ALOE_LOCK"}
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import aloe.lock\nwith aloe.lock.experiment_lock({str(tmp_path / 'e')!r}):\n    print('ok')",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert r.returncode != 0 and "ExperimentBusy" in r.stderr and f"pid {os.getpid()}" in r.stderr
    assert "ALOE_LOCK" not in os.environ


def test_atomically_written_files_get_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "x.json", {"a": 1})
        plain = tmp_path / "y.txt"
        plain.write_text("b")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "x.json").stat().st_mode)
    assert mode == stat.S_IMODE(plain.stat().st_mode) == 0o644


# --------------------------------------------------------------------------- failures are never data


def _deterministic(fail=lambda r: False):
    """Scripted answers that depend only on the request (so an interrupted and resumed run can
    be compared with an uninterrupted one), with ``fail(request)`` -> a failed call."""
    import hashlib

    def text(r):
        if fail(r):
            return None
        return f"I like topic {hashlib.sha256(json.dumps(r.messages).encode()).hexdigest()[:8]}."

    return text


def _personas(root):
    import aloe.personas
    from aloe.backends.scripted import ScriptedBackend

    cfg = stage_config(
        "personas",
        experiment="rel",
        data_root=str(root),
        cache_path=str(root / "c.sqlite"),
        backend={"kind": "scripted", "model": "s"},
        target_profiles=4,
        target_personalities=4,
    )
    aloe.personas.run(cfg, ScriptedBackend())


def _tree_view(path):
    from aloe.io import read_jsonl

    return [
        (t["id"], [(n["turn"], n["user"], [c["text"] for c in n.get("candidates", [])]) for n in t["turns"]])
        for t in read_jsonl(path)
    ]


def test_a_failed_tree_is_retried_on_resume_and_ends_as_an_uninterrupted_run(tmp_path):
    import aloe.trees
    from aloe.backends.scripted import ScriptedBackend

    views = {}
    for name in ("straight", "interrupted"):
        root = tmp_path / name
        _personas(root)
        cfg = stage_config(
            "trees",
            experiment="rel",
            data_root=str(root),
            cache_path=str(root / "c.sqlite"),
            backend={"kind": "scripted", "model": "s"},
            n_personas=4,
            turns=2,
        )
        target = None
        if name == "interrupted":
            target = aloe.io.read_jsonl(cfg.paths.pairs)[0]["profile"]  # any persona: fail its user at turn 2
            flaky = ScriptedBackend(
                texts=_deterministic(lambda r: r.prompt_version.startswith("user_simulator") and r.sample_index == 2)
            )
            with pytest.raises(AloeError, match=r"trees: 4 of 4 trees failed, more than max_failed_share 0.1"):
                aloe.trees.run(cfg, flaky)
            assert not cfg.paths.manifest("trees").exists()
            recs = aloe.io.read_jsonl(cfg.paths.trees)
            assert all(t["failed"]["turn"] == 2 and len(t["turns"]) == 1 for t in recs)  # turn 1 kept
            assert not cfg.paths.export("dpo").exists()
        counts = aloe.trees.run(cfg, ScriptedBackend(texts=_deterministic()))
        assert counts["trees"] == 4 and counts["failed_trees"] == 0 and counts["turns"] == 8
        views[name] = _tree_view(cfg.paths.trees)
        assert target is None or counts["resumed_turns"] == 4
    assert views["interrupted"] == views["straight"]


def test_a_failed_evaluation_turn_is_retried_not_counted_done(tmp_path):
    import aloe.evaluation
    from aloe.backends.scripted import ScriptedBackend

    metrics = {}
    for name in ("straight", "interrupted"):
        root = tmp_path / name
        _personas(root)
        cfg = stage_config(
            "evaluate",
            experiment="rel",
            data_root=str(root),
            cache_path=str(root / "c.sqlite"),
            backend={"kind": "scripted", "model": "s"},
            n_personas=4,
            turns=2,
            models=["base", "oracle"],
            score_judge="likelihood",
            n_boot=50,
            judge_card={"enabled": False},
        )
        if name == "interrupted":
            # the model under test fails every reply at turn 2: not recorded, the stage fails
            flaky = ScriptedBackend(
                texts=_deterministic(lambda r: r.prompt_version.startswith("responder_") and len(r.messages) > 3)
            )
            with pytest.raises(AloeError, match=r"8 of 8 conversations stopped before turn 2"):
                aloe.evaluation.run(cfg, flaky)
            assert not cfg.paths.eval_metrics.exists() and not cfg.paths.manifest("evaluate").exists()
            convs = aloe.io.read_jsonl(cfg.paths.conversations("base"))
            assert all(len(c["turns"]) == 1 and c["turns"][0]["reply"] for c in convs)
            # then the judge fails every judgment: replies kept, unscored, the stage fails again
            blind = ScriptedBackend(texts=_deterministic(), logprobs=lambda r: {c: None for c in r.candidates})
            with pytest.raises(AloeError, match=r"8 of 16 replies have no score \(8 x no log-probability\)"):
                aloe.evaluation.run(cfg, blind)
        healthy = ScriptedBackend(texts=_deterministic())
        aloe.evaluation.run(cfg, healthy)
        metrics[name] = json.loads(cfg.paths.eval_metrics.read_text())["models"]
        if name == "interrupted":  # nothing generated again: only the judgments were redone
            assert ("chat", "") not in healthy.calls and not any(c == "chat" for c, _ in healthy.calls)
    assert metrics["interrupted"] == metrics["straight"]


def test_conversations_made_with_other_settings_are_not_resumed(tmp_path, caplog):
    import aloe.evaluation
    from aloe.backends.scripted import ScriptedBackend

    _personas(tmp_path)
    common = dict(
        experiment="rel",
        data_root=str(tmp_path),
        cache_path=str(tmp_path / "c.sqlite"),
        backend={"kind": "scripted", "model": "s"},
        n_personas=2,
        turns=1,
        models=["base"],
        score_judge="likelihood",
        n_boot=50,
        judge_card={"enabled": False},
    )
    aloe.evaluation.run(stage_config("evaluate", **common), ScriptedBackend(texts=_deterministic()))
    # the same settings: resumed, nothing asked again
    same = ScriptedBackend(texts=_deterministic())
    aloe.evaluation.run(stage_config("evaluate", **common), same)
    assert not same.calls
    # the judge's scale changed: the old conversations (and their scores) are not reused
    cfg = stage_config("evaluate", **common | {"likelihood_scale": 0.5})
    changed = ScriptedBackend(texts=_deterministic())
    with caplog.at_level("WARNING", logger="aloe.evaluation"):
        aloe.evaluation.run(cfg, changed)
    assert "made with other settings (likelihood_scale); starting it afresh" in caplog.text
    assert any(c == "chat" for c, _ in changed.calls)
    assert all(c["settings"]["likelihood_scale"] == 0.5 for c in aloe.io.read_jsonl(cfg.paths.conversations("base")))


def _profiles_text(r):
    """A scripted generator that writes distinct, long-enough profile lines per request."""
    import hashlib

    h = hashlib.sha256(json.dumps(r.messages).encode() + str(r.sample_index).encode()).hexdigest()
    jobs = ["baker", "pilot", "nurse", "welder", "botanist", "actuary", "drummer", "glassblower"]
    return "\n".join(
        f"- I am a {40 + i} year old {jobs[(int(h[i], 16) + i) % len(jobs)]} from town {h[i : i + 6]} "
        f"who collects {h[i + 6 : i + 12]} stamps and has {i} children."
        for i in range(5)
    )


def test_growth_never_stores_a_round_with_failed_requests_and_replays_only_matching_rounds(tmp_path, caplog):
    from aloe.backends.scripted import ScriptedBackend
    from aloe.embedding import Embedder
    from aloe.growth import GrowthSettings, grow_pool
    from aloe.records import load_seeds, pool_records

    seeds = pool_records(load_seeds("profiles")[:6], "profile", "seed", "train")
    emb, state = Embedder(), tmp_path / "rounds.jsonl"
    s = GrowthSettings(target=100, items_per_round=5, requests_per_round=2, max_rounds=2, min_chars=40, threshold=0.95)
    # every generation request fails: no round is written, the stage fails naming why
    down = ScriptedBackend(texts=lambda r: None)
    with pytest.raises(AloeError, match=r"round 1: 2 of 2 generation requests failed after 3 tries"):
        grow_pool("profile", seeds, [], down, emb, s, state)
    assert not state.exists() or aloe.io.read_jsonl(state) == []
    # healthy: two rounds, then a rerun with the same settings replays them and asks nothing
    pool, rounds, _ = grow_pool("profile", seeds, [], ScriptedBackend(texts=_profiles_text), emb, s, state)
    assert [r["round"] for r in rounds] == [1, 2] and len(pool) > len(seeds)
    again = ScriptedBackend(texts=_profiles_text)
    pool2, _, _ = grow_pool("profile", seeds, [], again, emb, s, state)
    assert [p["id"] for p in pool2] == [p["id"] for p in pool] and not again.calls
    # another threshold: the old rounds are not this pool's; they are dropped, not replayed
    other = GrowthSettings(**{**s.__dict__, "threshold": 0.9})
    with caplog.at_level("WARNING", logger="aloe.growth"):
        _, rounds3, _ = grow_pool("profile", seeds, [], ScriptedBackend(texts=_profiles_text), emb, other, state)
    assert "2 profile round(s) made with other settings (threshold) are dropped" in caplog.text
    assert all(r["settings"]["threshold"] == 0.9 for r in aloe.io.read_jsonl(state))
    # growth off (max_rounds 0, as when the seeds reach the target or the source is official): nothing replayed
    off = GrowthSettings(**{**s.__dict__, "max_rounds": 0})
    seeds_only, rounds4, _ = grow_pool("profile", seeds, [], None, emb, off, state)
    assert rounds4 == [] and [p["id"] for p in seeds_only] == [p["id"] for p in seeds]


def test_system_errors_get_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    import errno

    import aloe.runner
    from aloe.cli import main

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "data" / "x.jsonl"))

    monkeypatch.setattr(aloe.runner, "run_experiment", disk_full)
    assert main(["run", "whatever.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"aloe: error: No space left on device: {tmp_path / 'data' / 'x.jsonl'}"

    def deep(*a, **k):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(aloe.runner, "run_experiment", deep)
    assert main(["run", "whatever.yaml"]) == 2
    assert "Traceback" not in capsys.readouterr().err
