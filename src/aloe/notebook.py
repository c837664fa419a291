"""Small helpers for notebook cells: logging, warnings boxes.

A stage's logs and library warnings go to ``reports/<experiment>/logs/<stage>.log`` (linked
from the results page), not into cell outputs, so the shared pages hold results only.
Progress bars still show in a terminal and, as widgets, in JupyterLab.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path


def log_path(experiment: str, stage: str, reports_root: str | Path = "reports") -> Path:
    return Path(reports_root) / experiment / "logs" / f"{stage}.log"


def setup(experiment: str | None = None, stage: str | None = None) -> float:
    """Call first in a notebook; returns the start time. With ``experiment`` and ``stage``,
    INFO logging and every library warning go to that stage's log file; without them (a
    notebook opened by hand), to the cell output as before."""
    handlers: list[logging.Handler]
    _to_repo_root()
    if experiment and stage:
        path = log_path(experiment, stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")  # a fresh log per run
        # appended to, not opened with "w": logging.config.dictConfig, which vLLM calls when an engine
        # opens, closes every existing handler; a "w" handler then drops every later line without a
        # word, an "a" handler reopens its file at the next line
        handlers = [logging.FileHandler(path, mode="a", encoding="utf-8")]
        logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the file
        warnings.simplefilter("default")
        _quiet_libraries()
    else:
        handlers = [logging.StreamHandler()]
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return time.time()


def _to_repo_root() -> None:
    """Paths in parameter files are relative to the repository root, where ``aloe run`` executes
    every notebook. A notebook opened by hand in JupyterLab starts in ``notebooks/``: move up."""
    here = Path.cwd()
    if here.name == "notebooks" and (here.parent / "parameters").is_dir() and (here.parent / "src" / "aloe").is_dir():
        os.chdir(here.parent)


def _quiet_libraries() -> None:
    """transformers and datasets write to stderr through handlers of their own: send their
    messages through logging (to the file) and drop datasets' per-split progress bars."""
    try:
        import transformers

        transformers.utils.logging.disable_default_handler()
        transformers.utils.logging.enable_propagation()
    except ImportError:  # pragma: no cover
        pass
    try:
        import datasets

        datasets.utils.logging.set_verbosity_error()  # its own stderr handler: errors only
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


def show_warning(text: str | None) -> None:
    """A red box above a table or figure (the judge card's warning); nothing when ``text`` is None."""
    if text:
        from IPython.display import Markdown, display

        display(Markdown(f"<div style='border:3px solid #c00;padding:.6em;color:#900'><b>{text}</b></div>"))
