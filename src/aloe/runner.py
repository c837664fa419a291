"""Run an experiment: validated parameters -> ordered notebooks under Papermill -> HTML reports.

Everything about the parameter file is checked before the first notebook starts:
the typed configs (unknown keys, wrong types, allowed values) and that every key
injected into a notebook exists in its ``parameters`` cell (Papermill itself would
only warn). Executed notebooks go to ``reports/<experiment>/`` as .ipynb and HTML,
with an ``index.html`` linking them and each stage's manifest.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

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
                    f"its parameters: {', '.join(declared)}")


def check_pass_through(exp: Experiment, stages: list[str]) -> None:
    """TRL / PEFT keys in the train stage are checked against those libraries' configs."""
    if "train" in stages:
        from aloe.training import validate

        try:
            validate(exp.stages["train"])
        except ConfigError as e:
            raise ConfigError(f"{exp.path}: {e}") from None


OFFICIAL_FILES = {"personas": ("profile.jsonl", "personality.jsonl", "profile_eval.jsonl", "personality_eval.jsonl"),
                  "evaluate": ("profile_eval.jsonl", "personality_eval.jsonl")}


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
            raise ConfigError(f"{exp.path}: stages.{stage}.official_dir: {folder}: {where}; copy the official "
                              f"ALOE datasets/ folder there (README, 'Official ALOE files')")


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
    """data_root and the cache's folder are folders (or can be made): not files, not under a file."""
    common = exp.stages["personas"]
    for key, folder in (("data_root", Path(common.data_root)), ("cache_path", Path(common.cache_path).parent)):
        for p in (folder, *folder.parents):
            if p.exists():
                if not p.is_dir():
                    raise ConfigError(f"{exp.path}: {key}: {p} is a file, so {folder} cannot be a folder")
                break
    if Path(common.cache_path).is_dir():
        raise ConfigError(f"{exp.path}: cache_path: {common.cache_path} is a folder; name a file (e.g. llm.sqlite)")


def check_experiment(exp: Experiment, stages: list[str], notebooks_dir: Path | None = None) -> None:
    """Everything knowable before a run: notebook parameters, TRL/PEFT pass-through keys, input
    folders, models, output folders."""
    check_output_paths(exp)
    check_notebook_parameters(exp, stages, notebooks_dir or REPO_ROOT / "notebooks")
    check_pass_through(exp, stages)
    check_inputs(exp, stages)
    check_models(exp, stages)


def preflight(exp: Experiment, stages: list[str]) -> None:
    """What `check` cannot know but `run` must before the first notebook: key variables are
    set, servers answer and accept the key, a GPU exists where one is asked for."""
    for role, cfg in used_roles(exp, stages):
        where = f"{exp.path}: roles.{role}"
        if cfg.kind == "openai":
            if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
                raise ConfigError(f"{where}.api_key_env: environment variable {cfg.api_key_env!r} is not set")
            from aloe.backends.openai_backend import OpenAIBackend

            probe = OpenAIBackend(cfg.base_url, cfg.served_model or cfg.model, cfg.model, "preflight", None,
                                  api_key_env=cfg.api_key_env, timeout_s=min(cfg.timeout_s, 10.0), max_retries=0)
            try:
                probe.check()
            except AloeError as e:
                raise BackendError(f"{where}: {e}") from None
            finally:
                probe.close()
        if cfg.kind == "vllm" or cfg.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"{where}: kind {cfg.kind!r}, device {cfg.device!r} needs a CUDA GPU and this "
                                  f"machine has none; use kind: transformers on the CPU")


def run_experiment(params_file: str | Path, only: list[str] | None = None, *,
                   notebooks_dir: Path | None = None, reports_root: Path | None = None,
                   cwd: Path | None = None, log_output: bool = True) -> dict:
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
        return _run_stages(exp, stages, notebooks_dir, reports_dir, cwd, log_output)


def _run_stages(exp: Experiment, stages: list[str], notebooks_dir: Path, reports_dir: Path, cwd: Path,
                log_output: bool) -> dict:
    import papermill
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    os.environ["ALOE_PARAMS_FILE"] = str(exp.path)  # the kernels inherit it; cards name the file
    status: dict[str, dict] = _read_status(reports_dir)
    for stage in stages:
        nb = NOTEBOOKS[stage]
        out_nb = reports_dir / nb
        out_nb.parent.mkdir(parents=True, exist_ok=True)
        print(f"[aloe] {exp.name}: stage {stage} ({nb}) ...", flush=True)
        t0 = time.time()
        try:
            papermill.execute_notebook(str(notebooks_dir / nb), str(out_nb), parameters=exp.parameters_for(stage),
                                       cwd=str(cwd), kernel_name="python3", progress_bar=False,
                                       log_output=log_output)
            status[stage] = {"status": "ok", "seconds": round(time.time() - t0, 1)}
        except PapermillExecutionError as e:
            status[stage] = {"status": "failed", "seconds": round(time.time() - t0, 1),
                             "error": f"{e.ename}: {str(e.evalue)[:300]}"}
            _render(out_nb)
            _write_index(reports_dir, exp, status)
            raise StageFailed(f"stage {stage} failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n"
                            f"  executed notebook: {out_nb}") from None
        except DeadKernelError:
            status[stage] = {"status": "failed", "seconds": round(time.time() - t0, 1),
                             "error": "the kernel died (killed, most often for lack of memory)"}
            _render(out_nb)
            _write_index(reports_dir, exp, status)
            raise StageFailed(f"stage {stage}: the notebook's kernel died (killed, most often for lack of memory: "
                              f"try smaller batch_size); rerun to resume\n  executed notebook: {out_nb}") from None
        _render(out_nb)
        _write_index(reports_dir, exp, status)
        print(f"[aloe] {exp.name}: stage {stage} done in {status[stage]['seconds']} s -> "
              f"{out_nb.with_suffix('.html')}", flush=True)
    return status


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
                cell.outputs = [o for o in cell.outputs if not (o.get("output_type") == "stream"
                                                                and o.get("name") == "stderr")]
            return cell, resources

    if not nb_path.exists():
        return
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    exporter.register_preprocessor(DropStderr(), enabled=True)
    body, _ = exporter.from_notebook_node(nbformat.read(str(nb_path), as_version=4))
    write_text(nb_path.with_suffix(".html"), body)


def _read_status(reports_dir: Path) -> dict:
    p = reports_dir / "status.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _write_index(reports_dir: Path, exp: Experiment, status: dict) -> None:
    from aloe.results import write_results

    write_text(reports_dir / "status.json", json.dumps(status, indent=2))
    write_results(exp, reports_dir, status)


def rebuild_report(params_file: str | Path, reports_root: Path | None = None) -> Path:
    """``aloe report``: the results page and its figures from existing outputs, nothing rerun."""
    exp = load_experiment(params_file)
    reports_dir = (reports_root or REPO_ROOT / "reports") / exp.name
    reports_dir.mkdir(parents=True, exist_ok=True)
    from aloe.results import write_results

    return write_results(exp, reports_dir, _read_status(reports_dir))
