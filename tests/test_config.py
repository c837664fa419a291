import subprocess
import sys

import pytest
from conftest import REPO

from aloe.config import load_experiment, stage_config
from aloe.errors import ConfigError
from aloe.models import resolve_model


def write(tmp_path, text, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", ["ci", "ci-vllm", "default", "cpu-large", "paper", "paper-open"])
def test_committed_parameter_files_are_valid(name):
    exp = load_experiment(REPO / "parameters" / f"{name}.yaml")
    assert exp.name == name and set(exp.stages) == {"personas", "trees", "train", "evaluate", "report"}


@pytest.mark.parametrize(
    "text,match",
    [
        ("stages:\n  trees:\n    turns: [1\n", r"exp.yaml: line \d+, column \d+: invalid YAML"),
        (
            "stages:\n  trees:\n    turnz: 3\n",
            r"exp.yaml: stages.trees: unknown key 'turnz' \(did you mean 'turns'\?\); allowed keys:",
        ),
        ("stages:\n  trees:\n    turns: three\n", r"exp.yaml: stages.trees.turns: expected an integer, got 'three'"),
        ("stages:\n  trees:\n    turns: 0\n", r"stages.trees.turns: 0 is out of range; allowed 1 to 100"),
        (
            "stages:\n  evaluation: {}\n",
            r"unknown stage 'evaluation'; allowed stages: personas, trees, train, evaluate, report",
        ),
        (
            "backend:\n  kind: tgi\n",
            r"exp.yaml: backend.kind: 'tgi' is not allowed; allowed: one of 'transformers', 'openai', 'vllm'",
        ),
        ("backend:\n  kind: openai\n", r"backend.base_url: required when kind is 'openai'"),
        ("backends: {}\n", r"unknown top-level key 'backends' \(did you mean 'backend'\?\)"),
        (
            "stages:\n  train:\n    variants: [sft_best]\n",
            r"stages.train.variants\[0\]: 'sft_best' is not allowed; allowed: one of 'sft_preferred'",
        ),
        ("stages:\n  trees:\n    backend: {}\n", r"stages.trees.backend: 'backend' is set at the top level"),
        ("- a\n- b\n", r"expected a mapping at the top level"),
    ],
)
def test_bad_parameter_files(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_experiment(write(tmp_path, text))


def test_notebook_side_uses_same_checks():
    with pytest.raises(ConfigError, match="trees: unknown key 'turnz'"):
        stage_config("trees", experiment="x", turnz=3)
    cfg = stage_config("train", experiment="x", variants=["dpo"])
    assert cfg.variants == ("dpo",)


def test_unknown_model_lists_known_names(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"unknown model 'smollm9'.*known names: smollm2-135m, llama3-8b, mistral-7b, qwen2-7b, olmo-7b",
    ):
        resolve_model("smollm9")
    assert resolve_model("llama3-8b").hf_id == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert resolve_model("olmo-7b").hf_id == "allenai/OLMo-7B-0724-Instruct-hf"
    assert resolve_model("someorg/some-model").source == "hf"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)).source == "local"
    with pytest.raises(ConfigError, match="a folder without config.json"):  # a folder, but not a model
        resolve_model(str(REPO / "notebooks"))
    for bad in ("../../..", "a/b/c", "../x", "org/..", "/abs"):
        with pytest.raises(ConfigError):
            resolve_model(bad)


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "aloe", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.integration  # runs aloe or a pipeline in a subprocess
def test_cli_user_errors_exit_2_without_traceback(tmp_path):
    bad = write(tmp_path, "stages:\n  trees:\n    turnz: 3\n")
    r = run_cli("run", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "configuration error" in r.stderr and "turnz" in r.stderr
    r = run_cli("run", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "parameter file not found" in r.stderr
    r = run_cli("prepare-model", "smollm9")
    assert r.returncode == 2 and "known names" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("run", "parameters/ci.yaml", "--only", "nope")
    assert r.returncode == 2 and "allowed stages" in r.stderr
    r = run_cli("check", "parameters/default.yaml")
    assert r.returncode == 0, r.stderr


def test_runner_rejects_key_missing_from_notebook(tmp_path):
    """A config key the notebook does not declare is an error, not Papermill's warning."""
    import json
    import shutil

    from aloe.runner import check_notebook_parameters

    nbdir = tmp_path / "nb"
    shutil.copytree(REPO / "notebooks", nbdir)
    nb = json.loads((nbdir / "02_trees.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    src = "".join(cell["source"])
    cell["source"] = "\n".join(l for l in src.splitlines() if not l.startswith("turns ="))
    (nbdir / "02_trees.ipynb").write_text(json.dumps(nb))
    exp = load_experiment(REPO / "parameters" / "ci.yaml")
    with pytest.raises(ConfigError, match=r"stages.trees.turns: notebook 02_trees.ipynb has no parameter 'turns'"):
        check_notebook_parameters(exp, ["trees"], nbdir)


def test_evaluating_an_untrained_variant_is_refused_up_front(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("stages:\n  train:\n    variants: [sft_preferred]\n  evaluate:\n    models: [base, dpo]\n")
    with pytest.raises(
        ConfigError,
        match=r"stages.evaluate.models: 'dpo' is never trained; add it to "
        r"stages.train.variants \(now \['sft_preferred'\]\)",
    ):
        load_experiment(p)
    p.write_text("stages:\n  train:\n    variants: [sft_then_dpo]\n  evaluate:\n    models: [sft_preferred]\n")
    assert load_experiment(p).stages["evaluate"].models == ("sft_preferred",)
