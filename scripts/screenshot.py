"""Render an experiment's results page to PNG with headless Chromium (the README's screenshot).

    python scripts/screenshot.py [experiment] [out.png]      # defaults: default, reports/<experiment>-results.png

Needs Debian's Chromium (`apt-get install chromium`); it is not part of `make run` or
`make test`, which check the page's content with an HTML parser instead. The page is rendered
from the file as `aloe run` / `aloe report` left it: run those first.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The closed network refuses Chromium's background connections; these flags stop it trying.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
]


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 1000) -> Path:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("screenshot: no Chromium on PATH; install it with `apt-get install chromium`")
    if not page.exists():
        raise SystemExit(f"screenshot: {page} not found; run `aloe run` or `aloe report` first")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            browser,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={out.resolve()}",
            page.resolve().as_uri(),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0 or not out.exists() or out.stat().st_size == 0:
        raise SystemExit(f"screenshot: Chromium failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", nargs="?", default="default", help="reports/<experiment>/index.html")
    ap.add_argument("out", nargs="?", default=None, help="PNG to write (default reports/<experiment>-results.png)")
    args = ap.parse_args()
    out = Path(args.out) if args.out else REPO / "reports" / f"{args.experiment}-results.png"
    print(screenshot(REPO / "reports" / args.experiment / "index.html", out))
