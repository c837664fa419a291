"""Small helpers for notebook cells (logging, plotting defaults)."""

from __future__ import annotations

import logging
import time


def setup() -> float:
    """Call first in a notebook: INFO logging to the cell output; returns the start time."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return time.time()


def show_warning(text: str | None) -> None:
    """A red box above a table or figure (the judge card's warning); nothing when ``text`` is None."""
    if text:
        from IPython.display import Markdown, display

        display(Markdown(f"<div style='border:3px solid #c00;padding:.6em;color:#900'><b>{text}</b></div>"))
