"""Kill tests: SIGKILL the real stages at chosen points, rerun, compare with an uninterrupted run.

Personas, trees and evaluation run their real code in a child process on the scripted engine, whose
answers depend only on the request (so every run can give the same outputs) and which kills its
own process at its n-th call (``ALOE_SCRIPTED_KILL_AFTER``): three points per stage, drawn with a
fixed seed over the calls an uninterrupted run makes. Training runs TRL on a tiny model and is
killed just after a checkpoint appears. Each killed run is rerun to the end and its outputs must
equal the uninterrupted run's: the same ids and counts, the same content.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import signal
import time
import types

import pytest

from aloe.io import read_json, read_jsonl

pytestmark = pytest.mark.integration

PARAMS = """experiment: k
data_root: {root}/data
cache_path: {root}/cache.sqlite
backend: {{kind: scripted, model: s}}
stages:
  personas: {{target_profiles: 30, target_personalities: 12, max_rounds: 2, requests_per_round: 2,
             items_per_round: 4}}
  trees: {{n_personas: 4, turns: 2, pair_judge: likelihood}}
  evaluate: {{n_personas: 4, turns: 2, models: [base, oracle], score_judge: likelihood, n_boot: 50,
             judge_card: {{max_replies: 8, n_boot: 50}}}}
"""


# Each run is a fresh process forked from a server that has imported aloe, torch and MiniLM's
# library once (about 10 s per process otherwise): the kill is a real SIGKILL of a real process.
_FORK = multiprocessing.get_context("forkserver")
_FORK.set_forkserver_preload(
    [
        "aloe.personas",
        "aloe.trees",
        "aloe.evaluation",
        "aloe.backends.scripted",
        "aloe.embedding",
        "sentence_transformers",
        "aloe.training",
        "trl",
        "peft",
    ]
)


def _to(log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def _run_stage(params: str, stage: str, kill_after: int | None, log: str) -> None:
    """The child: run one stage on the scripted engine, its output to ``log``, then print its calls."""
    _to(log)
    os.environ.pop("ALOE_SCRIPTED_KILL_AFTER", None)
    if kill_after:
        os.environ["ALOE_SCRIPTED_KILL_AFTER"] = str(kill_after)
    import aloe.evaluation
    import aloe.personas
    import aloe.trees
    from aloe.backends.scripted import ScriptedBackend, calls_made
    from aloe.config import load_experiment

    run = {"personas": aloe.personas.run, "trees": aloe.trees.run, "evaluate": aloe.evaluation.run}[stage]
    run(load_experiment(params).stages[stage], ScriptedBackend("s"))
    print("calls", calls_made(), flush=True)


def _train(root: str, model: str, sft: dict, log: str) -> None:
    """The child: LoRA SFT of ``model`` for sft's max_steps, checkpointing every step (test_training.FAST)."""
    _to(log)
    import aloe.training
    from aloe.config import TrainConfig

    cfg = TrainConfig(
        experiment="t", data_root=root, roles={"policy": {"model": model}}, variants=("sft_preferred",), sft=sft
    )
    print(aloe.training.run(cfg)["sft_preferred"]["global_step"], flush=True)


def _stage(root, stage, kill_after=None):
    params = root / "p.yaml"
    if not params.exists():
        params.write_text(PARAMS.format(root=root))
    log = root / f"{stage}-{kill_after or 'full'}.log"
    proc = _FORK.Process(target=_run_stage, args=(str(params), stage, kill_after, str(log)))
    proc.start()
    proc.join(600)
    out = log.read_text() if log.exists() else ""
    return types.SimpleNamespace(returncode=proc.exitcode, stdout=out, stderr=out)


def _outputs(root, stage):
    d = root / "data" / "k" / stage
    if stage == "personas":
        return {f: (d / f).read_text() for f in ("personas.jsonl", "pairs.jsonl")}
    if stage == "trees":
        trees = [{k: v for k, v in t.items() if k != "provenance"} for t in read_jsonl(d / "trees.jsonl")]
        return {"trees": trees, **{f: (d / f).read_text() for f in ("dpo.jsonl", "sft_preferred.jsonl")}}
    metrics = read_json(d / "metrics.json")
    convs = {
        m: [{k: v for k, v in c.items() if k != "settings"} for c in read_jsonl(d / "conversations" / f"{m}.jsonl")]
        for m in ("base", "oracle")
    }
    return {"models": metrics["models"], "convs": convs, "card": read_json(d / "judge_card.json")["fit"]}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of the three stages, and the calls each made."""
    root = tmp_path_factory.mktemp("straight")
    calls = {}
    for stage in ("personas", "trees", "evaluate"):
        r = _stage(root, stage)
        assert r.returncode == 0, r.stderr[-2000:]
        calls[stage] = int(r.stdout.split("calls")[-1])
    return root, calls


@pytest.mark.parametrize("stage", ["personas", "trees", "evaluate"])
def test_sigkill_at_three_points_then_rerun_equals_an_uninterrupted_run(straight, tmp_path, stage):
    base, calls = straight
    assert calls[stage] >= 4, calls
    want = _outputs(base, stage)
    points = sorted(random.Random(stage).sample(range(1, calls[stage]), 3))
    for k in points:
        root = tmp_path / f"kill{k}"
        shutil.copytree(base / "data", root / "data")
        shutil.rmtree(root / "data" / "k" / stage)
        # the earlier stages' calls are not in this cache: the stage generates what it needs
        killed = _stage(root, stage, kill_after=k)
        assert killed.returncode == -signal.SIGKILL, (k, killed.stderr[-1500:])
        assert not (root / "data" / "k" / stage / "manifest.json").exists()
        again = _stage(root, stage)
        assert again.returncode == 0, (k, again.stderr[-2000:])
        assert _outputs(root, stage) == want, f"{stage}: killed at call {k} of {calls[stage]}, rerun differs"
        assert not list((root / "data").rglob("*.tmp"))


def test_sigkill_during_training_then_rerun_finishes_the_same_steps(tiny_model, tmp_path):
    from test_training import FAST, _rows, _setup

    straight = tmp_path / "straight"
    _setup(straight, _rows(8))

    def train(root):
        proc = _FORK.Process(
            target=_train, args=(str(root), tiny_model, {**FAST, "max_steps": 6}, str(root / "train.log"))
        )
        proc.start()
        return proc

    def finish(proc, root):
        proc.join(600)
        return proc.exitcode, (root / "train.log").read_text()

    code, log = finish(train(straight), straight)
    assert code == 0, log[-2000:]
    want = read_json(straight / "t" / "train" / "sft_preferred" / "metrics.json")
    rng = random.Random(0)
    for after in (1, 3, 5):
        root = tmp_path / f"kill{after}"
        _setup(root, _rows(8))
        ckpts = root / "t" / "train" / "sft_preferred" / "checkpoints"
        p = train(root)
        while p.is_alive() and not (ckpts / f"checkpoint-{after}").exists():
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3))  # anywhere from mid-save of that checkpoint to the next step
        p.kill()  # SIGKILL
        p.join()
        assert not (root / "t" / "train" / "sft_preferred" / "done.json").exists() or p.exitcode == 0
        code, log = finish(train(root), root)
        assert code == 0, (after, log[-2000:])
        got = read_json(root / "t" / "train" / "sft_preferred" / "metrics.json")
        assert got["global_step"] == want["global_step"] == 6 and got["rows"] == want["rows"]
        losses = {e["step"]: e["loss"] for e in got["log_history"] if "loss" in e}
        assert sorted(losses)[-1] == 6
        assert (root / "t" / "train" / "sft_preferred" / "merged" / "config.json").exists()
        assert (root / "t" / "train" / "sft_preferred" / "done.json").exists()
