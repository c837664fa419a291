"""Every script in scripts/ imports and answers --help, so a rename in the library cannot break
one silently (each is run as a user would: python scripts/<name>.py --help)."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import REPO

SCRIPTS = sorted((REPO / "scripts").glob("*.py"))


def _help(path):
    return path.name, subprocess.run(
        [sys.executable, str(path), "--help"], cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.mark.integration  # runs aloe or a pipeline in a subprocess
def test_every_script_imports_and_answers_help():
    assert len(SCRIPTS) >= 10
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(pool.map(_help, SCRIPTS))
    for name, r in results.items():
        assert r.returncode == 0, f"{name}: {r.stderr[-1500:]}"
        assert "usage:" in r.stdout, f"{name} printed no usage: {r.stdout[:300]}"
