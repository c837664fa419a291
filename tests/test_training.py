"""Training with TRL + PEFT on a tiny random Llama (fast) and under accelerate with 2 CPU processes."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO

from aloe.config import TrainConfig
from aloe.errors import ConfigError
from aloe.io import read_json, write_jsonl

SYS = {"role": "system", "content": "You are a friendly assistant."}


def _rows(n=6):
    rows = []
    for i in range(n):
        prompt = [SYS, {"role": "user", "content": f"I just got back from my {i}th swim of the week."}]
        rows.append(
            {
                "id": f"r{i}",
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": "Nice! Cold water this time of year?"}],
                "rejected": [{"role": "assistant", "content": "Swimming is a sport done in water."}],
            }
        )
    return rows


def _setup(root, rows):
    trees = root / "t" / "trees"
    write_jsonl(trees / "dpo.jsonl", rows)
    for name, key in (("sft_preferred", "chosen"), ("sft_rejected", "rejected")):
        write_jsonl(
            trees / f"{name}.jsonl", [{"id": r["id"], "prompt": r["prompt"], "completion": r[key]} for r in rows]
        )


FAST = {"max_steps": 2, "max_length": 64, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "save_steps": 1}


def _cfg(root, model, **kw):
    # the model trained is the policy role
    return TrainConfig(
        experiment="t",
        data_root=str(root),
        roles={"policy": {"model": model}},
        **{"sft": FAST, "dpo": {**FAST, "beta": 0.1}, **kw},
    )


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_unknown_trl_and_peft_keys_are_rejected(tmp_path):
    from aloe.training import validate

    with pytest.raises(ConfigError, match=r"stages.train.sft: unknown key 'max_seq_length'.*trl.SFTConfig"):
        validate(TrainConfig(experiment="t", sft={"max_seq_length": 512}))
    with pytest.raises(ConfigError, match=r"unknown key 'betta' \(did you mean 'beta'\?\)"):
        validate(TrainConfig(experiment="t", dpo={"betta": 0.9}))
    with pytest.raises(ConfigError, match=r"stages.train.peft: unknown key 'rank'.*peft.LoraConfig"):
        validate(TrainConfig(experiment="t", peft={"rank": 8}))
    with pytest.raises(ConfigError, match="output_dir: set by aloe"):
        validate(TrainConfig(experiment="t", sft={"output_dir": "/tmp/x"}))
    validate(
        TrainConfig(experiment="t", sft={"max_length": 256, "learning_rate": 1e-5}, dpo={"beta": 0.9}, peft={"r": 8})
    )


def test_sft_format_trl_receives_puts_loss_on_the_reply_only(tiny_model, tmp_path):
    """Our conversational prompt/completion rows become input_ids + completion_mask in TRL,
    and the mask covers exactly the assistant reply's tokens."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    _setup(tmp_path, _rows(2))
    ds = load_dataset("json", data_files=str(tmp_path / "t" / "trees" / "sft_preferred.jsonl"), split="train")
    assert set(ds.column_names) == {"id", "prompt", "completion"}
    tok = AutoTokenizer.from_pretrained(tiny_model)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model),
        processing_class=tok,
        train_dataset=ds.remove_columns(["id"]),
        args=SFTConfig(output_dir=str(tmp_path / "o"), use_cpu=True, bf16=False, report_to="none"),
    )
    row = trainer.train_dataset[0]
    # TRL 1.16 builds labels: -100 (no loss) on the prompt, the token ids on the reply
    mask = [int(label != -100) for label in row["labels"]]
    assert 0 in mask and 1 in mask and mask == sorted(mask)  # prompt first, then the reply
    assert [t for t, m in zip(row["input_ids"], mask) if m] == [x for x in row["labels"] if x != -100]
    reply = tok.decode([t for t, m in zip(row["input_ids"], mask) if m])
    assert reply.startswith("Nice! Cold water this time of year?")
    prompt = tok.decode([t for t, m in zip(row["input_ids"], mask) if not m])
    assert "swim" in prompt and "Nice!" not in prompt


def test_trees_that_exported_no_rows_stop_training_with_a_message(tiny_model, tmp_path):
    from aloe import training
    from aloe.errors import AloeError

    _setup(tmp_path, [])  # every node a tie: the trees stage writes empty files
    with pytest.raises(AloeError, match=r"sft_preferred\.jsonl: no rows to train on: .*verdict_\* counts"):
        training.run(_cfg(tmp_path, tiny_model, variants=("sft_preferred",)))


def test_sft_trains_changes_weights_and_skips_when_done(tiny_model, tmp_path):
    from aloe import training

    _setup(tmp_path, _rows())
    cfg = _cfg(tmp_path, tiny_model, variants=("sft_preferred", "sft_rejected"))
    results = training.run(cfg)
    for v in ("sft_preferred", "sft_rejected"):
        m = results[v]
        assert m["global_step"] == 2 and math.isfinite(m["train_loss"])
        assert all(math.isfinite(e["loss"]) for e in m["log_history"] if "loss" in e)
        out = tmp_path / "t" / "train" / v
        assert (out / "adapter" / "adapter_config.json").exists() and (out / "done.json").exists()
        base, merged = _weights(tiny_model), _weights(out / "merged")
        changed = [k for k in base if k in merged and not (base[k].float() - merged[k].float()).abs().max() < 1e-6]
        assert changed, "merging the trained adapter changed no weight"
        assert read_json(out / "metrics.json")["variant"] == v
        # weights get the mode a plain open() gives (safetensors alone leaves them 0600)
        import os

        mask = os.umask(0)
        os.umask(mask)
        modes = {
            f.relative_to(out): f.stat().st_mode & 0o777
            for d in ("adapter", "merged")
            for f in (out / d).rglob("*")
            if f.is_file()
        }
        assert any(str(f).endswith(".safetensors") for f in modes) and set(modes.values()) == {0o666 & ~mask}, modes
    manifest = read_json(tmp_path / "t" / "train" / "manifest.json")
    assert manifest["counts"]["sft_preferred_steps"] == 2
    # a rerun with the same settings and data trains nothing
    stamp = (tmp_path / "t" / "train" / "sft_preferred" / "done.json").stat().st_mtime_ns
    training.run(cfg)
    assert (tmp_path / "t" / "train" / "sft_preferred" / "done.json").stat().st_mtime_ns == stamp


def test_dpo_and_sft_then_dpo_log_rewards(tiny_model, tmp_path):
    from aloe import training

    _setup(tmp_path, _rows())
    results = training.run(_cfg(tmp_path, tiny_model, variants=("dpo", "sft_then_dpo")))
    assert set(results) == {"dpo", "sft_preferred", "sft_then_dpo"}
    for v in ("dpo", "sft_then_dpo"):
        logged = [e for e in results[v]["log_history"] if "loss" in e]
        assert logged and all(math.isfinite(e["rewards/margins"]) and 0 <= e["rewards/accuracies"] <= 1 for e in logged)
    assert results["sft_then_dpo"]["base"].endswith(os.path.join("sft_preferred", "merged"))


def test_resume_from_checkpoint_after_a_crash(tiny_model, tmp_path):
    from transformers import TrainerCallback

    from aloe import training

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 2:
                raise KeyboardInterrupt  # checkpoint-2 is on disk when on_save runs

    _setup(tmp_path, _rows())
    cfg = _cfg(tmp_path, tiny_model, variants=("sft_preferred",), sft={**FAST, "max_steps": 3})
    with pytest.raises(KeyboardInterrupt):
        training.run(cfg, callbacks=[Crash()])
    out = tmp_path / "t" / "train" / "sft_preferred"
    assert (out / "checkpoints" / "checkpoint-2").exists() and not (out / "done.json").exists()
    # a later checkpoint cut short by a kill mid-save (no completion mark) is never resumed from
    partial = out / "checkpoints" / "checkpoint-9"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    m = training.run(cfg)["sft_preferred"]
    assert m["resumed_from"].endswith("checkpoint-2") and m["global_step"] == 3
    assert [e["step"] for e in m["log_history"] if "loss" in e][-1] == 3
    assert not partial.exists()


def test_checkpoints_of_other_settings_are_not_resumed_and_evaluation_needs_finished_training(tiny_model, tmp_path):
    from transformers import TrainerCallback

    from aloe import training
    from aloe.config import EvaluateConfig
    from aloe.errors import AloeError
    from aloe.evaluation import trained_path

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 2:
                raise KeyboardInterrupt

    _setup(tmp_path, _rows())
    cfg = _cfg(tmp_path, tiny_model, variants=("sft_preferred",), sft={**FAST, "max_steps": 3})
    training.run(cfg)
    ecfg = EvaluateConfig(experiment="t", data_root=str(tmp_path), models=("base", "sft_preferred"))
    assert trained_path(ecfg, "sft_preferred").exists()
    # retraining with another learning rate is killed mid-way: its done.json is gone, so evaluation
    # refuses the merged folder on disk (the old model's), and the killed run's checkpoints
    # (other settings) are not what a run with the first settings resumes from
    other = _cfg(tmp_path, tiny_model, variants=("sft_preferred",), sft={**FAST, "max_steps": 3, "learning_rate": 5e-3})
    import shutil

    shutil.rmtree(tmp_path / "t" / "train" / "sft_preferred" / "checkpoints")
    with pytest.raises(KeyboardInterrupt):
        training.run(other, callbacks=[Crash()])
    with pytest.raises(AloeError, match="training of 'sft_preferred' did not finish"):
        trained_path(ecfg, "sft_preferred")
    m = training.run(cfg)["sft_preferred"]
    assert m["resumed_from"] is None and m["global_step"] == 3
    assert trained_path(ecfg, "sft_preferred").exists()


@pytest.mark.integration
def test_accelerate_launch_two_cpu_processes(tiny_model, tmp_path):
    _setup(tmp_path, _rows(8))
    params = tmp_path / "p.yaml"
    params.write_text(
        json.dumps(
            {
                "experiment": "t",
                "data_root": str(tmp_path),
                "roles": {"policy": {"model": tiny_model}},
                "stages": {"train": {"variants": ["sft_preferred"], "sft": FAST}},
            }
        )
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "-m",
            "aloe.training",
            str(params),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "t" / "train" / "sft_preferred"
    m = read_json(out / "metrics.json")
    assert m["world_size"] == 2 and m["global_step"] == 2 and math.isfinite(m["train_loss"])
    assert (out / "merged" / "model.safetensors").exists() and (out / "adapter" / "adapter_config.json").exists()
    assert "2 process(es)" in r.stdout


def test_full_fine_tuning_without_adapters(tiny_model, tmp_path):
    from aloe import training

    _setup(tmp_path, _rows())
    m = training.run(_cfg(tmp_path, tiny_model, variants=("sft_preferred",), lora=False))["sft_preferred"]
    out = tmp_path / "t" / "train" / "sft_preferred"
    assert m["lora"] is False and not (out / "adapter").exists()
    base, merged = _weights(tiny_model), _weights(out / "merged")
    assert any((base[k].float() - merged[k].float()).abs().max() > 1e-6 for k in base if k in merged)
    with pytest.raises(ConfigError, match="lora is false"):
        training.validate(TrainConfig(experiment="t", lora=False, peft={"r": 8}))


def test_train_fine_tunes_the_policy_and_evaluation_loads_its_result(tiny_model, tmp_path):
    """The train stage trains roles.policy; evaluating a variant runs the merged model that the
    train stage wrote for it, while base runs the policy itself; simulator and judge stay theirs."""
    from pathlib import Path

    import aloe.evaluation
    from aloe import training
    from aloe.config import EvaluateConfig
    from aloe.records import load_seeds, make_pairs, pool_records
    from aloe.roles import open_roles

    _setup(tmp_path, _rows())
    m = training.run(_cfg(tmp_path, tiny_model, variants=("sft_preferred",)))["sft_preferred"]
    assert m["policy"]["model"] == str(Path(tiny_model).resolve()) and m["started_from"] == "policy"
    assert read_json(tmp_path / "t" / "train" / "manifest.json")["roles"]["policy"] == m["policy"]

    evals = make_pairs(
        pool_records(load_seeds("eval_profiles")[:1], "profile", "seed", "eval"),
        pool_records(load_seeds("eval_personalities")[:1], "personality", "seed", "eval"),
        1,
        0,
        "eval",
    )
    write_jsonl(tmp_path / "t" / "personas" / "pairs.jsonl", evals)
    cfg = EvaluateConfig(
        experiment="t",
        data_root=str(tmp_path),
        cache_path=str(tmp_path / "cache.sqlite"),
        n_personas=1,
        turns=1,
        max_new_tokens=4,
        n_boot=10,
        models=("sft_preferred", "base"),
        protocol="paper",
        roles={
            "simulator": {"kind": "scripted", "model": "sim"},
            "judge": {"kind": "scripted", "model": "judge"},
            "policy": {"model": tiny_model, "batch_size": 2},
        },
    )
    engines = open_roles(cfg, aloe.evaluation.ROLES)
    metrics = aloe.evaluation.run(cfg, engines, progress=False)
    assert metrics["under_test"]["base"]["model"] == str(Path(tiny_model).resolve())
    merged = tmp_path / "t" / "train" / "sft_preferred" / "merged"
    assert metrics["under_test"]["sft_preferred"]["model"] == str(merged.resolve())
    assert list(metrics["models"]) == ["sft_preferred", "base"]  # reported in the order asked
    assert metrics["protocol"] == "paper" and metrics["roles"]["judge"]["model"] == "judge"
    assert engines["simulator"].prompt_versions() == {"user_simulator"}
    assert engines["judge"].prompt_versions() <= {"judge_score"}
