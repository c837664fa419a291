"""aloe.notebook: what a stage's notebook sets up before its first cell of work."""

import logging
import logging.config

from aloe import notebook


def test_the_stage_log_survives_a_library_that_reconfigures_logging(tmp_path, monkeypatch):
    """vLLM calls logging.config.dictConfig when an engine opens, and dictConfig closes every
    existing handler: the stage's log lost every line after it (evaluation's progress, failures,
    warnings) until the handler reopened its file in append mode. A rerun still starts a fresh log."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(notebook, "_to_repo_root", lambda: None)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        path = notebook.log_path("exp", "evaluate")
        path.parent.mkdir(parents=True)
        path.write_text("a previous run's line\n")
        notebook.setup("exp", "evaluate")
        log = logging.getLogger("aloe.evaluation")
        log.info("before the engine")
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})  # what vLLM does
        log.info("evaluate base: 4/4 done")
        log.warning("a failure")
        text = path.read_text()
        assert "previous run" not in text
        assert "before the engine" in text and "evaluate base: 4/4 done" in text and "a failure" in text
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.captureWarnings(False)
