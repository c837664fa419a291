"""Roles: a model per part (generator, simulator, inferrer, responder, judge, policy).

Config merging and refusals; each role's requests reach the engine it configures, in
trees and in evaluation (scripted engines that log every call); equal settings share
one engine; the report's role table and its self-judging warning; the notebooks'
parameter cells declare exactly their configs' fields; the paper files check without
an API key.
"""

import ast
import json

import pytest
from conftest import REPO

import aloe.evaluation
import aloe.reporting.summary
import aloe.trees
from aloe.config import STAGES, load_experiment, stage_config, stage_fields
from aloe.errors import ConfigError
from aloe.io import read_json, read_jsonl, write_jsonl
from aloe.records import load_seeds, make_pairs, pool_records
from aloe.roles import open_roles, self_judging

OFFICIAL = REPO.parent / "shared" / "aloe-official"

ROLES_YAML = """
experiment: r
data_root: {root}
cache_path: {root}/cache.sqlite
backend: {{kind: scripted, model: teacher, batch_size: 16}}
roles:
  simulator: {{model: sim}}
  judge: {{model: judge}}
  policy: {{model: student}}
stages:
  trees: {{n_personas: 3, turns: 2, max_new_tokens: 16}}
  evaluate: {{n_personas: 3, turns: 2, max_new_tokens: 16, models: [base, oracle, reminder], n_boot: 50}}
"""


def _write(tmp_path, text, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _pairs(root):
    train = make_pairs(
        pool_records(load_seeds("profiles")[:3], "profile", "seed", "train"),
        pool_records(load_seeds("personalities"), "personality", "seed", "train"),
        1,
        0,
        "train",
    )
    evals = make_pairs(
        pool_records(load_seeds("eval_profiles"), "profile", "seed", "eval"),
        pool_records(load_seeds("eval_personalities"), "personality", "seed", "eval"),
        5,
        0,
        "eval",
    )
    write_jsonl(root / "personas" / "pairs.jsonl", train + evals)


def test_roles_merge_over_backend(tmp_path):
    exp = load_experiment(_write(tmp_path, ROLES_YAML.format(root=tmp_path)))
    t = exp.stages["trees"]
    assert t.role("judge").kind == "scripted" and t.role("judge").model == "judge"
    assert t.role("judge").batch_size == 16  # inherited from backend
    assert t.role("inferrer") == t.role("responder") == t.role("generator") == t.backend
    assert exp.stages["train"].base_model == "student"
    # a role that names another model does not inherit that model's revision or served name
    p = _write(
        tmp_path,
        "backend: {kind: openai, base_url: 'http://127.0.0.1:9/v1', model: a, served_model: a-srv,"
        " revision: r1}\nroles:\n  judge: {model: b}\n  simulator: {max_concurrency: 2}\n",
        "m.yaml",
    )
    c = load_experiment(p).stages["evaluate"]
    assert (c.role("judge").served_model, c.role("judge").revision) == (None, None)
    assert (c.role("simulator").served_model, c.role("simulator").max_concurrency) == ("a-srv", 2)


@pytest.mark.parametrize(
    "text,match",
    [
        (
            "roles:\n  judgee: {model: x}\n",
            r"roles: unknown role 'judgee' \(did you mean 'judge'\?\); allowed roles: "
            r"generator, simulator, inferrer, responder, judge, policy",
        ),
        ("roles:\n  judge: {kind: tgi}\n", r"roles.judge.kind: 'tgi' is not allowed"),
        ("roles:\n  judge: gpt-4o\n", r"roles.judge: expected a mapping of backend settings"),
        ("roles:\n  judge: {kind: openai}\n", r"roles.judge.base_url: required when kind is 'openai'"),
        ("roles:\n  policy: {batch_size: 0}\n", r"roles.policy.batch_size: 0 is out of range"),
        ("stages:\n  train:\n    model: llama3-8b\n", r"stages.train.model: no longer a stage key; .*roles.policy"),
    ],
)
def test_bad_roles_are_refused(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_experiment(_write(tmp_path, text))


def test_train_model_refused_in_notebooks_too():
    with pytest.raises(ConfigError, match=r"train.model: no longer a stage key; .*roles.policy"):
        stage_config("train", experiment="x", model="llama3-8b")


def test_each_role_reaches_its_engine(tmp_path):
    exp = load_experiment(_write(tmp_path, ROLES_YAML.format(root=tmp_path)))
    _pairs(tmp_path / "r")

    tcfg = exp.stages["trees"]
    engines = open_roles(tcfg, aloe.trees.ROLES)
    counts = aloe.trees.run(tcfg, engines, progress=False)
    sim, inf, resp, judge = (engines[r] for r in ("simulator", "inferrer", "responder", "judge"))
    assert inf is resp and len(engines.engines()) == 3  # equal settings: one engine
    assert sim.model_id == "sim" and judge.model_id == "judge" and inf.model_id == "teacher"
    assert sim.prompt_versions() == {"user_simulator"}
    assert inf.prompt_versions() == {"infer_extract", "responder_hinted", "responder_plain"}
    assert "judge_pair" in judge.prompt_versions() <= {"judge_pair", "judge_score"}
    assert counts["turns"] == 6 and counts["failed_trees"] == 0
    trees = read_jsonl(tcfg.paths.trees)
    assert {t["provenance"]["roles"]["judge"]["model"] for t in trees} == {"judge"}
    assert read_json(tcfg.paths.manifest("trees"))["roles"]["simulator"]["model"] == "sim"

    ecfg = exp.stages["evaluate"]
    engines = open_roles(ecfg, aloe.evaluation.ROLES)
    metrics = aloe.evaluation.run(ecfg, engines, progress=False)
    policy, sim, judge = (engines[r] for r in ("policy", "simulator", "judge"))
    assert policy.prompt_versions() == {"responder_plain", "responder_oracle", "responder_reminder"}
    assert sim.prompt_versions() == {"user_simulator"}
    assert judge.prompt_versions() == {"judge_score"}
    # every reply of every baseline came from the policy (3 personas x 2 turns each); the judge
    # card's known-answer replies (K1) come from the responder, a model that is not the judge
    versions = [v.split("@")[0] for c, v in policy.calls if c == "chat"]
    assert versions.count("responder_plain") == versions.count("responder_reminder") == 6
    assert versions.count("responder_oracle") == 6
    k1 = [v.split("@")[0] for c, v in engines["responder"].calls if c == "chat"]
    assert k1.count("responder_oracle") == k1.count("responder_plain") == 3 * 2  # 3 personas x k1_messages 2
    assert metrics["roles"]["responder"]["model"] == "teacher"
    assert {m["model"] for m in metrics["under_test"].values()} == {"student"}
    assert metrics["roles"]["judge"]["model"] == "judge"

    rows = aloe.reporting.summary.role_table(exp.stages["report"])
    assert {(r["role"], r["model"]) for r in rows} >= {
        ("simulator", "sim"),
        ("judge", "judge"),
        ("policy", "student"),
        ("inferrer", "teacher"),
    }
    assert next(r for r in rows if r["role"] == "simulator")["stages"] == "trees, evaluate"
    assert aloe.reporting.summary.self_judging(exp.stages["report"]) is None


def test_self_judging_is_flagged(tmp_path):
    same = {"kind": "transformers", "model": "smollm2-135m", "revision": "abc"}
    ms = {
        "trees": {"roles": {"judge": same}},
        "train": {"roles": {"policy": same}},
        "evaluate": {"roles": {"judge": {**same, "revision": "other"}, "policy": {**same, "revision": "other"}}},
    }
    assert self_judging(ms) == ["trees", "evaluate"]
    assert (
        self_judging(
            {
                "evaluate": {
                    "roles": {"judge": {"model": "a", "revision": "1"}, "policy": {"model": "b", "revision": "1"}}
                }
            }
        )
        == []
    )
    # in the report: the default layout, where one model plays every role
    root = tmp_path / "d"
    for stage, roles in (("trees", {"judge": same}), ("evaluate", {"judge": same, "policy": same})):
        (root / stage).mkdir(parents=True)
        (root / stage / "manifest.json").write_text(json.dumps({"roles": roles, "counts": {}, "wall_seconds": 1}))
    cfg = stage_config("report", experiment="d", data_root=str(tmp_path))
    warning = aloe.reporting.summary.self_judging(cfg)
    assert warning.startswith("SELF-JUDGING") and "smollm2-135m" in warning
    assert aloe.reporting.summary.findings(cfg)[0] == f"**{warning}**"


def _parameters_cell(stage):
    import papermill

    from aloe.config import NOTEBOOKS

    return papermill.inspect_notebook(str(REPO / "notebooks" / NOTEBOOKS[stage]))


@pytest.mark.parametrize("stage", STAGES)
def test_notebook_parameters_declare_exactly_the_config_fields(stage):
    declared = _parameters_cell(stage)
    assert list(declared) == stage_fields(stage)
    # a notebook opened by hand runs the default study: its defaults are parameters/default.yaml's
    # values (scripts/sync_notebook_defaults.py writes them), else the config class defaults
    study = load_experiment(REPO / "parameters" / "default.yaml")
    expected = study.parameters_for(stage)
    assert study.raw_sections[stage], "default.yaml sets nothing for this stage: the test would compare little"
    for name, p in declared.items():
        assert ast.literal_eval(p["default"]) == expected[name], f"{stage}: notebook default of {name!r}"
    nb = json.loads((REPO / "notebooks" / __import__("aloe.config").config.NOTEBOOKS[stage]).read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert sum(f'aloe.config.from_namespace("{stage}", globals())' in c for c in code) == 1
    assert not any("stage_config(" in c for c in code)


def test_runs_inject_every_field_so_notebook_defaults_never_leak(tmp_path):
    # the notebooks default to the default study (a teacher model and roles); a file that sets
    # neither must still run every role on its own backend, with the class defaults
    f = tmp_path / "p.yaml"
    f.write_text("experiment: p\nbackend: {kind: transformers, model: smollm2-135m}\n")
    exp = load_experiment(f)
    for stage in STAGES:
        params = exp.parameters_for(stage)
        assert list(params) == stage_fields(stage)
        assert params["roles"] == {} and params["backend"] == {"kind": "transformers", "model": "smollm2-135m"}
        built = stage_config(stage, **params)
        assert built == exp.stages[stage]
    assert exp.parameters_for("evaluate")["judge_card"]["compare"] == []


@pytest.mark.skipif(not OFFICIAL.exists(), reason=f"official ALOE files not present at {OFFICIAL}")
@pytest.mark.parametrize("name", ["paper", "paper-open"])
def test_paper_files_check_without_an_api_key(tmp_path, name, monkeypatch, capsys):
    from aloe.cli import main

    # where the README tells users to put the official files: data/aloe-official/
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "aloe-official").symlink_to(OFFICIAL)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)

    def check(cwd):  # `aloe check` as a user types it, in this process (its imports are the suite's)
        monkeypatch.chdir(cwd)
        code = main(["check", str(REPO / "parameters" / f"{name}.yaml")])
        return code, capsys.readouterr().err

    code, err = check(tmp_path)
    assert code == 0, err
    # and without the files, the check names the folder
    code, err = check(tmp_path / "data")
    assert code == 2 and "official_dir: data/aloe-official: folder not found" in err


def test_paper_yaml_is_the_papers_configuration():
    exp = load_experiment(REPO / "parameters" / "paper.yaml")
    ev, tr, train = exp.stages["evaluate"], exp.stages["trees"], exp.stages["train"]
    for role in ("simulator", "inferrer", "responder", "judge"):
        assert ev.role(role).kind == "openai" and ev.role(role).model.startswith("gpt-4o-mini")
        assert ev.role(role).api_key_env == "OPENAI_API_KEY"
    assert ev.role("generator").model.startswith("gpt-4o-2024")
    assert (ev.role("policy").kind, ev.role("policy").model) == ("vllm", "llama3-8b")
    assert (ev.n_personas, ev.turns, ev.protocol, ev.official_dir) == (100, 10, "paper", "data/aloe-official")
    assert tr.n_personas == 3000 and tr.turns == 10
    sft = train.sft
    assert train.lora is False and sft["learning_rate"] == 1e-5 and sft["num_train_epochs"] == 1
    assert sft["per_device_train_batch_size"] * sft["gradient_accumulation_steps"] == 48


def test_trees_draw_across_the_whole_pool():
    from aloe.records import spread

    pairs = [{"id": f"{p}-{k}", "profile_id": p} for p in "abcdefghij" for k in range(10)]
    first = spread(pairs, 10, seed=0)
    assert len({p["profile_id"] for p in first}) == 10  # every profile once before any twice
    assert spread(pairs, 10, seed=0) == first and spread(pairs, 10, seed=1) != first
    assert len({p["id"] for p in spread(pairs, 100, seed=0)}) == 100


def test_usage_names_only_the_roles_that_asked_for_the_engine():
    """A stage whose judge is the rules judge never asks for the judge's engine: the usage row of the
    engine the judge would share must not say it judged (it did on the results page before)."""
    from aloe.backends.base import ChatRequest
    from aloe.backends.scripted import ScriptedBackend
    from aloe.roles import Roles

    roles = Roles.single(ScriptedBackend(), ["simulator", "judge"])
    assert "judge" in roles and "policy" not in roles  # a membership test asks for no engine
    roles["simulator"].chat([ChatRequest(({"role": "user", "content": "hi"},))])
    (row,) = roles.usage()
    assert row["roles"] == ["simulator"] and row["calls"] == 1
