"""Damaged files, full disks, paths and URLs that cannot work: each named in one clear message,
found before anything is spent, and never a second traceback from the error path."""

from __future__ import annotations

import errno
import os
import sqlite3

import pytest
from test_reliability import _deterministic, _personas

from aloe.backends.http_safety import check_url, redact_url
from aloe.config import stage_config
from aloe.errors import AloeError, ConfigError
from aloe.io import JsonlAppender, read_json, read_jsonl, write_json, write_text

# --------------------------------------------------------------------------- bytes that are not UTF-8


def test_bytes_that_are_not_utf8_name_file_line_and_byte(tmp_path):
    f = tmp_path / "trees.jsonl"
    f.write_bytes(b'{"a": 1}\n{"b": "x\xff"}\n')
    with pytest.raises(
        AloeError,
        match=r"trees\.jsonl: line 2, byte 9: not UTF-8 text \(byte 0xff\); "
        r"the file is damaged: restore it",
    ):
        read_jsonl(f)
    j = tmp_path / "m.json"
    j.write_bytes(b'{\n"a": "\xfe"}\n')
    with pytest.raises(AloeError, match=r"m\.json: line 2, byte 7: not UTF-8"):
        read_json(j)


def test_a_torn_tail_cut_inside_a_character_is_dropped_only_where_torn_tails_are_allowed(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_bytes('{"a": 1}\n{"b": "é'.encode()[:-1])  # a crash mid-append cut the two-byte é
    assert read_jsonl(f, allow_torn_tail=True) == [{"a": 1}]
    with pytest.raises(AloeError, match="line 2"):
        read_jsonl(f)


def test_the_runner_error_path_never_raises_again(tmp_path, monkeypatch, capsys):
    import aloe.runner

    def broken(*a, **k):
        raise AloeError("trees.jsonl: line 3: not UTF-8 text")

    monkeypatch.setattr(aloe.runner, "_write_index", broken)
    monkeypatch.setattr(aloe.runner, "_render", broken)
    aloe.runner._record_failure(tmp_path / "02_trees.ipynb", tmp_path, None, {})  # does not raise
    err = capsys.readouterr().err
    assert err.count("could not update the reports after the failure") == 2 and "trees.jsonl: line 3" in err


# --------------------------------------------------------------------------- checked before anything is spent


def test_a_damaged_trees_file_fails_evaluation_before_any_call_and_keeps_the_manifest(tmp_path):
    import aloe.evaluation
    from aloe.backends.scripted import ScriptedBackend

    root = tmp_path / "exp"
    _personas(root)
    cfg = stage_config(
        "evaluate",
        experiment="rel",
        data_root=str(root),
        cache_path=str(root / "c.sqlite"),
        backend={"kind": "scripted", "model": "s"},
        n_personas=2,
        turns=1,
        models=["base"],
        score_judge="likelihood",
        n_boot=20,
    )
    cfg.paths.trees.parent.mkdir(parents=True)
    cfg.paths.trees.write_bytes(b'{"id": "tree-1", "turns": []}\n{"id": "tree-2", "turns": [\xff]}\n')
    write_json(cfg.paths.manifest("evaluate"), {"stage": "evaluate"})
    engine = ScriptedBackend(texts=_deterministic())
    with pytest.raises(AloeError, match=r"trees\.jsonl: line 2, byte 28: not UTF-8"):
        aloe.evaluation.run(cfg, engine)
    assert engine.calls == [] and cfg.paths.manifest("evaluate").exists()
    assert not cfg.paths.conversations("base").exists()


def test_a_run_checks_the_files_its_stages_read_except_those_an_earlier_stage_rewrites(tmp_path):
    from aloe.config import load_experiment
    from aloe.runner import check_data_files

    params = tmp_path / "p.yaml"
    params.write_text(
        f"experiment: x\ndata_root: {tmp_path / 'data'}\ncache_path: {tmp_path / 'c.sqlite'}\n"
        "backend: {kind: scripted, model: s}\n"
    )
    exp = load_experiment(params)
    pairs = exp.stages["trees"].paths.pairs
    pairs.parent.mkdir(parents=True)
    pairs.write_text('{"id": 1}\n{"id": \n')
    with pytest.raises(AloeError, match=r"pairs\.jsonl: line 2: invalid JSON"):
        check_data_files(exp, ["trees", "train"])
    check_data_files(exp, ["personas", "trees"])  # the personas stage writes pairs.jsonl anew first


# --------------------------------------------------------------------------- a model's revision


def test_a_model_folder_revision_depends_on_what_it_computes_with_not_on_cards_or_times(tmp_path):
    from aloe.models import _folder_fingerprint

    m = tmp_path / "merged"
    m.mkdir()
    (m / "model.safetensors").write_bytes(b"\x01" * 64)
    (m / "config.json").write_text('{"hidden_size": 8}')
    (m / "README.md").write_text("card v1")
    first = _folder_fingerprint(m)
    (m / "README.md").write_text("card with this run's numbers, longer")  # evaluation rewrites the card
    (m / "training_args.bin").write_bytes(b"pickled")
    os.utime(m / "model.safetensors", (1, 1))
    assert _folder_fingerprint(m) == first
    (m / "model.safetensors").write_bytes(b"\x02" * 64)  # other weights, same size
    assert _folder_fingerprint(m) != first
    (m / "model.safetensors").write_bytes(b"\x01" * 64)
    (m / "generation_config.json").write_text('{"do_sample": true}')
    assert _folder_fingerprint(m) != first


# --------------------------------------------------------------------------- keys in URLs


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1?api_key=sk-abcdefgh123", "http://h/v1#key=sk-abcdefgh1"])
def test_a_key_in_a_base_url_query_or_fragment_is_refused_without_echoing_it(url):
    with pytest.raises(ConfigError, match="query string or fragment") as e:
        check_url(url, "backend.base_url")
    assert "sk-" not in str(e.value)
    assert "sk-" not in redact_url(url) and redact_url(url).startswith("http")
    assert redact_url("http://h:8/v1") == "http://h:8/v1"


def test_the_http_engine_itself_refuses_a_key_over_plain_http_however_it_is_opened():
    # the rule lives in the HTTP engine: a caller that builds it directly, past `aloe check`, meets it too
    from aloe.backends.openai_backend import OpenAIBackend

    with pytest.raises(ConfigError, match="api_key_env: the key would be sent over plain http"):
        OpenAIBackend("http://example.org/v1", "m", "m", "served", None, api_key_env="OPENAI_API_KEY")
    with pytest.raises(ConfigError, match="query string or fragment"):
        OpenAIBackend(("https://example.org/v1", "https://h/v1?key=x"), "m", "m", "served", None)


def test_aloe_check_names_the_role_whose_url_is_unsafe(tmp_path):
    from aloe.cli import main

    f = tmp_path / "p.yaml"
    f.write_text(
        "experiment: x\nbackend: {kind: transformers, model: smollm2-135m}\n"
        "roles: {judge: {kind: openai, model: m, base_url: 'http://example.org/v1', "
        "api_key_env: OPENAI_API_KEY}}\n"
    )
    with pytest.raises(ConfigError, match=r"p.yaml: roles.judge.api_key_env: the key would be sent over plain http"):
        from aloe.config import load_experiment
        from aloe.runner import check_experiment

        check_experiment(load_experiment(f), ["trees"])
    assert main(["check", str(f)]) == 2


# --------------------------------------------------------------------------- caches and full disks


def test_a_cache_path_that_is_not_a_database_names_the_file(tmp_path):
    from aloe.cache import CallCache

    f = tmp_path / "params.yaml"
    f.write_text("experiment: x\n" * 100)
    with pytest.raises(AloeError, match=r"params\.yaml: cannot use it as the call cache"):
        CallCache(f)


def test_a_full_disk_names_the_file_that_could_not_be_written(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(AloeError, match=r"pairs\.jsonl: cannot write it: No space left on device \([\d,]+ MiB free"):
        write_text(tmp_path / "pairs.jsonl", "x")
    assert list(tmp_path.iterdir()) == []  # the temp file is gone too
    monkeypatch.undo()

    app = JsonlAppender(tmp_path / "trees.jsonl")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(AloeError, match=r"trees\.jsonl: cannot write it"):
        app.append({"a": 1})
    app.close()


def test_a_full_disk_under_the_call_cache_names_the_cache(tmp_path, monkeypatch):
    from aloe.cache import CallCache

    cache = CallCache(tmp_path / "c.sqlite")
    con = cache._con()

    class Full:
        def __init__(self, con):
            self.con = con

        def execute(self, sql, *a):
            if sql.startswith("BEGIN"):
                raise sqlite3.OperationalError("database or disk is full")
            return self.con.execute(sql, *a)

    cache._local.con = Full(con)
    with pytest.raises(AloeError, match=r"c\.sqlite: cannot write it: the call cache: database or disk is full"):
        cache.put_many({"k": {"text": "x"}})


# --------------------------------------------------------------------------- a killed run's leftovers


def test_kernel_connection_files_live_in_the_experiment_and_the_next_run_removes_them(tmp_path):
    import tempfile

    from aloe.config import load_experiment
    from aloe.runner import _kernel_runtime_dir, _temp_dir

    params = tmp_path / "p.yaml"
    params.write_text(f"experiment: x\ndata_root: {tmp_path / 'data'}\nbackend: {{kind: scripted, model: s}}\n")
    exp = load_experiment(params)
    runtime = _kernel_runtime_dir(exp)
    with _temp_dir(runtime):
        fd, left = tempfile.mkstemp(".json")  # what jupyter_client does for a kernel's connection file
        os.close(fd)
    assert os.path.dirname(left) == str(runtime) and tempfile.gettempdir() != str(runtime)
    assert _kernel_runtime_dir(exp) == runtime and list(runtime.iterdir()) == []  # a SIGKILLed run's, gone
