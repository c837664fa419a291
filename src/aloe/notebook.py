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
