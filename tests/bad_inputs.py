"""A catalogue of bad inputs, tried the way a new user would meet them, and how aloe answers.

    .venv/bin/python tests/bad_inputs.py      # counts: tried / clear / traceback / accepted / unclear
    .venv/bin/python tests/bad_inputs.py -v   # also one line per case

Each case is a parameter file (or a CLI call, or an environment setting) that must be refused
with one clear message: exit code 2, no traceback, at most three lines, naming what is wrong
(the key, file or variable in ``expect``). The answers are sorted into
- clear: refused that way;
- traceback: a raw Python exception escaped;
- accepted: exit 0, the bad input taken as valid;
- unclear: refused, but with the wrong exit code, a long message, or one that names nothing.
This file is the catalogue (the data, ``CASES``) and its runner; ``tests/test_bad_inputs.py`` runs the same catalogue and requires every case to be clear.
Cases run in-process through ``aloe.cli.main`` (fast: one import of TRL for all), with any
environment variable a case sets put in place for that call only.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import traceback
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

BASE = (
    "experiment: bad\ndata_root: {tmp}/data\ncache_path: {tmp}/cache.sqlite\n"
    "backend: {kind: transformers, model: smollm2-135m}\n"
)
OPENAI = (
    "experiment: bad\ndata_root: {tmp}/data\ncache_path: {tmp}/cache.sqlite\n"
    "backend: {kind: openai, model: m, base_url: {url}}\n"
)


def _stage(stage: str, body: str) -> str:
    return BASE + f"stages:\n  {stage}:\n" + "".join(f"    {line}\n" for line in body.split("\n"))


def _bomb() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        cur = chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    # nine levels of nine: 9**9 (387 million) values once expanded, from a dozen lines
    return (
        "\n".join(lines)
        + "\nexperiment: bad\nbackend:\n  kind: transformers\n  model: smollm2-135m\n  batch_size: *i\n"
    )


# Data files a run reads, damaged: bytes that are not UTF-8, a line that is not JSON.
NOT_UTF8 = b'{"id": "p1", "split": "train"}\n{"id": "p2", "profile": "caf\xff\xfe"}\n'
NOT_JSON = b'{"id": "p1", "split": "train"}\n{"id": "p2", "split": \n{"id": "p3"}\n'
PAIRS, CONVS = "data/bad/personas/pairs.jsonl", "data/bad/evaluate/conversations/base.jsonl"

# (id, file content (str or bytes; None: no file), argv after `aloe`, expect in message, env[, data files])
CASES: list[tuple] = [
    ("binary file", b"\x00\x01\xff\xfe" * 64, ["check", "{file}"], "binary", {}),
    ("latin-1 bytes", b"experiment: caf\xe9\n", ["check", "{file}"], "UTF-8", {}),
    ("empty file", "", ["check", "{file}"], "empty", {}),
    ("top level is a list", "- a\n- b\n", ["check", "{file}"], "mapping", {}),
    ("invalid YAML", "experiment: [\n", ["check", "{file}"], "line", {}),
    ("duplicate top-level key", BASE + "experiment: other\n", ["check", "{file}"], "experiment", {}),
    ("duplicate nested key", _stage("trees", "turns: 2\nturns: 3"), ["check", "{file}"], "turns", {}),
    ("non-string key in sft", _stage("train", "sft: {1: 2}"), ["check", "{file}"], "key", {}),
    (
        "20,000-deep nested list",
        BASE + "description: " + "[" * 20000 + "]" * 20000 + "\n",
        ["check", "{file}"],
        "deep",
        {},
    ),
    ("alias bomb", _bomb(), ["check", "{file}"], "alias", {}),
    ("recursive alias", BASE + "roles: &r {judge: *r}\n", ["check", "{file}"], "recursive", {}),
    ("experiment '..'", BASE.replace("experiment: bad", "experiment: '..'"), ["check", "{file}"], "experiment", {}),
    ("experiment '.'", BASE.replace("experiment: bad", "experiment: '.'"), ["check", "{file}"], "experiment", {}),
    (
        "experiment too long",
        BASE.replace("experiment: bad", "experiment: " + "x" * 300),
        ["check", "{file}"],
        "experiment",
        {},
    ),
    (
        "experiment with NUL",
        BASE.replace("experiment: bad", 'experiment: "a\\0b"'),
        ["check", "{file}"],
        "experiment",
        {},
    ),
    (
        "experiment with a slash",
        BASE.replace("experiment: bad", "experiment: a/b"),
        ["check", "{file}"],
        "experiment",
        {},
    ),
    ("experiment is a number", BASE.replace("experiment: bad", "experiment: 5"), ["check", "{file}"], "experiment", {}),
    ("stages is a list", BASE + "stages: []\n", ["check", "{file}"], "stages", {}),
    ("prices is a list", BASE + "prices: [1, 2]\n", ["check", "{file}"], "prices", {}),
    ("negative price", BASE + "prices: {m: {input: -1, output: 1}}\n", ["check", "{file}"], "prices.m.input", {}),
    ("price with a typo", BASE + "prices: {m: {inptu: 1, output: 1}}\n", ["check", "{file}"], "input", {}),
    ("int8 on vLLM", BASE + "roles: {policy: {kind: vllm, model: m, dtype: int8}}\n", ["check", "{file}"], "int8", {}),
    ("stage is false", BASE + "stages: {trees: false}\n", ["check", "{file}"], "stages.trees", {}),
    ("stage is a list", BASE + "stages: {trees: []}\n", ["check", "{file}"], "stages.trees", {}),
    ("unknown top-level key", BASE + "stagse: {}\n", ["check", "{file}"], "stagse", {}),
    ("unknown stage", BASE + "stages: {tree: {}}\n", ["check", "{file}"], "tree", {}),
    ("unknown stage key", _stage("trees", "turn: 2"), ["check", "{file}"], "turn", {}),
    ("base_url file://", OPENAI.replace("{url}", "file:///etc/passwd"), ["check", "{file}"], "base_url", {}),
    ("base_url ftp://", OPENAI.replace("{url}", "ftp://example.org/v1"), ["check", "{file}"], "base_url", {}),
    ("base_url not a URL", OPENAI.replace("{url}", "'not a url'"), ["check", "{file}"], "base_url", {}),
    ("base_url list of empty strings", OPENAI.replace("{url}", '["", ""]'), ["check", "{file}"], "base_url", {}),
    (
        "credentials in base_url",
        OPENAI.replace("{url}", "'http://user:hunter2@127.0.0.1:9/v1'"),
        ["check", "{file}"],
        "credentials",
        {},
    ),
    (
        "key over plain http to a remote host",
        OPENAI.replace("{url}", "'http://example.org/v1', api_key_env: OPENAI_API_KEY"),
        ["check", "{file}"],
        "api_key_env",
        {},
    ),
    (
        "api_key_env not a variable name",
        OPENAI.replace("{url}", "'https://example.org/v1', api_key_env: 'A B'"),
        ["check", "{file}"],
        "api_key_env",
        {},
    ),
    ("unknown model name", BASE.replace("smollm2-135m", "no-such-model-xyz"), ["check", "{file}"], "model", {}),
    ("model path ../../..", BASE.replace("smollm2-135m", "'../../..'"), ["check", "{file}"], "model", {}),
    (
        "missing official_dir",
        _stage("personas", "source: official\nofficial_dir: /nonexistent/aloe"),
        ["check", "{file}"],
        "official_dir",
        {},
    ),
    (
        "sft learning_rate: fast",
        _stage("train", "sft: {learning_rate: fast}"),
        ["check", "{file}"],
        "learning_rate",
        {},
    ),
    (
        "sft learning_rate: 1e-4 (YAML text)",
        _stage("train", "sft: {learning_rate: 1e-4}"),
        ["check", "{file}"],
        "learning_rate",
        {},
    ),
    ("sft max_steps: -5", _stage("train", "sft: {max_steps: -5}"), ["check", "{file}"], "max_steps", {}),
    ("sft hub_token", _stage("train", "sft: {hub_token: hf_abc}"), ["check", "{file}"], "hub_token", {}),
    ("peft r: sixteen", _stage("train", "peft: {r: sixteen}"), ["check", "{file}"], "peft.r", {}),
    ("variants: []", _stage("train", "variants: []"), ["check", "{file}"], "variants", {}),
    ("models: []", _stage("evaluate", "models: []"), ["check", "{file}"], "models", {}),
    (
        "max_retries: -1",
        BASE.replace("model: smollm2-135m}", "model: smollm2-135m, max_retries: -1}"),
        ["check", "{file}"],
        "max_retries",
        {},
    ),
    (
        "gpu_memory_utilization: 5",
        BASE.replace("model: smollm2-135m}", "model: smollm2-135m, gpu_memory_utilization: 5}"),
        ["check", "{file}"],
        "gpu_memory_utilization",
        {},
    ),
    (
        "timeout_s: .nan",
        BASE.replace("model: smollm2-135m}", "model: smollm2-135m, timeout_s: .nan}"),
        ["check", "{file}"],
        "timeout_s",
        {},
    ),
    ("temperature: -1", _stage("trees", "temperature: -1"), ["check", "{file}"], "temperature", {}),
    ("temperature: .nan", _stage("trees", "temperature: .nan"), ["check", "{file}"], "temperature", {}),
    ("temperature: .inf", _stage("trees", "temperature: .inf"), ["check", "{file}"], "temperature", {}),
    (
        "evaluate n_personas above the benchmark",
        _stage("evaluate", "n_personas: 1000"),
        ["check", "{file}"],
        "n_personas",
        {},
    ),
    ("turns: 1000000000", _stage("trees", "turns: 1000000000"), ["check", "{file}"], "turns", {}),
    ("n_boot: 10**15", _stage("evaluate", "n_boot: 1000000000000000"), ["check", "{file}"], "n_boot", {}),
    (
        "batch_size: 0",
        BASE.replace("model: smollm2-135m}", "model: smollm2-135m, batch_size: 0}"),
        ["check", "{file}"],
        "batch_size",
        {},
    ),
    (
        "batch_size: true",
        BASE.replace("model: smollm2-135m}", "model: smollm2-135m, batch_size: true}"),
        ["check", "{file}"],
        "batch_size",
        {},
    ),
    ("unknown backend kind", BASE.replace("kind: transformers", "kind: tgi"), ["check", "{file}"], "kind", {}),
    ("unknown role", BASE + "roles: {juge: {model: smollm2-135m}}\n", ["check", "{file}"], "juge", {}),
    (
        "likelihood judge on an HTTP server",
        OPENAI.replace("{url}", "'http://127.0.0.1:9/v1'") + "stages: {evaluate: {score_judge: likelihood}}\n",
        ["check", "{file}"],
        "likelihood",
        {},
    ),
    ("threshold: 1.5", _stage("personas", "threshold: 1.5"), ["check", "{file}"], "threshold", {}),
    ("preferences: [4, 2]", _stage("personas", "preferences: [4, 2]"), ["check", "{file}"], "preferences", {}),
    ("preferences: [2, 9]", _stage("personas", "preferences: [2, 9]"), ["check", "{file}"], "preferences", {}),
    (
        "evaluate preferences without official_dir",
        _stage("evaluate", "preferences: [2, 4]"),
        ["check", "{file}"],
        "preferences",
        {},
    ),
    ("unknown judge kind", _stage("trees", "pair_judge: rule"), ["check", "{file}"], "pair_judge", {}),
    ("trees.judge, the old name", _stage("trees", "judge: rules"), ["check", "{file}"], "pair_judge", {}),
    ("evaluate.judge, the old name", _stage("evaluate", "judge: rules"), ["check", "{file}"], "score_judge", {}),
    ("seed: -1", _stage("trees", "seed: -1"), ["check", "{file}"], "seed", {}),
    ("max_new_tokens: 10**9", _stage("trees", "max_new_tokens: 1000000000"), ["check", "{file}"], "max_new_tokens", {}),
    ("unknown evaluated model", _stage("evaluate", "models: [base, gpt]"), ["check", "{file}"], "models", {}),
    ("lora: 'yes'", _stage("train", "lora: 'yes'"), ["check", "{file}"], "lora", {}),
    ("evaluates a variant never trained", _stage("evaluate", "models: [base, dpo]"), ["check", "{file}"], "dpo", {}),
    (
        "data_root is a list",
        BASE.replace("data_root: {tmp}/data", "data_root: [a, b]"),
        ["check", "{file}"],
        "data_root",
        {},
    ),
    (
        "data_root under a file",
        BASE.replace("data_root: {tmp}/data", "data_root: {tmp}/binary.yaml/data"),
        ["check", "{file}"],
        "data_root",
        {},
    ),
    (
        "cache_path is a folder",
        BASE.replace("cache_path: {tmp}/cache.sqlite", "cache_path: {tmp}"),
        ["check", "{file}"],
        "cache_path",
        {},
    ),
    (
        "cache_path is /dev/null",
        BASE.replace("cache_path: {tmp}/cache.sqlite", "cache_path: /dev/null"),
        ["check", "{file}"],
        "cache_path",
        {},
    ),
    (
        "cache_path is a YAML file",
        BASE.replace("cache_path: {tmp}/cache.sqlite", "cache_path: {tmp}/params.yaml"),
        ["check", "{file}"],
        "cache_path",
        {},
    ),
    (
        "data_root is /proc/self",
        BASE.replace("data_root: {tmp}/data", "data_root: /proc/self"),
        ["check", "{file}"],
        "data_root",
        {},
    ),
    (
        "key in a base_url query string",
        OPENAI.replace("{url}", "'http://127.0.0.1:9/v1?api_key=sk-abcdefgh12345'"),
        ["check", "{file}"],
        "base_url",
        {},
    ),
    (
        "pairs.jsonl with bytes that are not UTF-8",
        BASE,
        ["run", "{file}", "--only", "trees"],
        "pairs.jsonl: line 2",
        {},
        {PAIRS: NOT_UTF8},
    ),
    (
        "pairs.jsonl with a line that is not JSON",
        BASE,
        ["run", "{file}", "--only", "trees"],
        "pairs.jsonl: line 2",
        {},
        {PAIRS: NOT_JSON},
    ),
    (
        "conversations with bytes that are not UTF-8",
        BASE,
        ["run", "{file}", "--only", "evaluate"],
        "base.jsonl: line 2",
        {},
        {CONVS: NOT_UTF8},
    ),
    ("check on a folder", None, ["check", "{tmp}"], "folder", {}),
    ("check on a missing file", None, ["check", "{tmp}/missing.yaml"], "not found", {}),
    ("run --only an unknown stage", BASE, ["run", "{file}", "--only", "nope"], "--only", {}),
    (
        "run with the key variable unset",
        OPENAI.replace("{url}", "'http://127.0.0.1:9/v1', api_key_env: ALOE_TEST_UNSET_KEY"),
        ["run", "{file}", "--only", "trees"],
        "ALOE_TEST_UNSET_KEY",
        {},
    ),
    (
        "run against a server that is down",
        OPENAI.replace("{url}", "'http://127.0.0.1:9/v1'"),
        ["run", "{file}", "--only", "trees"],
        "127.0.0.1:9",
        {},
    ),
    (
        "run with vLLM on a machine without a GPU",
        BASE.replace("kind: transformers", "kind: vllm"),
        ["run", "{file}", "--only", "trees"],
        "GPU",
        {},
    ),
    (
        "binary ALOE_MODELS_REGISTRY",
        BASE,
        ["check", "{file}"],
        "ALOE_MODELS_REGISTRY",
        {"ALOE_MODELS_REGISTRY": "{binary}"},
    ),
    (
        "missing ALOE_MODELS_REGISTRY file",
        BASE,
        ["check", "{file}"],
        "registry",
        {"ALOE_MODELS_REGISTRY": "{tmp}/no-registry.yaml"},
    ),
]


def run_case(case, tmp: Path) -> dict:
    """Try one case; returns {id, rc, message, verdict}."""
    cid, content, argv, expect, env, *extra = case
    for rel, data in (extra[0] if extra else {}).items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    f = tmp / "params.yaml"
    if content is not None:
        data = content.replace("{tmp}", str(tmp)) if isinstance(content, str) else content
        f.write_bytes(data.encode() if isinstance(data, str) else data)
    (tmp / "binary.yaml").write_bytes(b"\x00\xff" * 100)
    args = [a.replace("{file}", str(f)).replace("{tmp}", str(tmp)) for a in argv]
    from aloe.cli import main

    err_buf, crashed = io.StringIO(), False
    # aloe reads its variables at each use, not at import: set for this call only
    env = {k: v.replace("{tmp}", str(tmp)).replace("{binary}", str(tmp / "binary.yaml")) for k, v in env.items()}
    old = os.getcwd()
    os.chdir(tmp)
    try:
        with (
            mock.patch.dict(os.environ, env),
            contextlib.redirect_stderr(err_buf),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            try:
                rc = main(args)
            except SystemExit as e:  # argparse
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - this is what we count
                crashed, rc = True, None
                err_buf.write(traceback.format_exc())
    finally:
        os.chdir(old)
    err = err_buf.getvalue()
    message = "\n".join(line for line in err.splitlines() if not line.startswith(("INFO", "WARNING")))
    if crashed:
        verdict = "traceback"
    elif rc == 0:
        verdict = "accepted"
    elif rc == 2 and len(message.splitlines()) <= 3 and len(message) <= 600 and expect.lower() in message.lower():
        verdict = "clear"
    else:
        verdict = "unclear"
    return {"id": cid, "rc": rc, "message": message.strip(), "verdict": verdict}


def run_all(verbose: bool = False) -> dict:
    counts = {"tried": 0, "clear": 0, "traceback": 0, "accepted": 0, "unclear": 0}
    results = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as d:
            res = run_case(case, Path(d))
        results.append(res)
        counts["tried"] += 1
        counts[res["verdict"]] += 1
        if verbose:
            print(f"{res['verdict']:9} {res['id']}: {res['message'].splitlines()[-1][:150] if res['message'] else ''}")
    return {"counts": counts, "results": results}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per case")
    out = run_all(verbose=ap.parse_args().verbose)
    print(" / ".join(f"{k} {v}" for k, v in out["counts"].items()))
