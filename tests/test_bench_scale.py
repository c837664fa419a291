"""The paper-scale rehearsal (scripts/bench_scale.py), scaled down: 24 trees x 3 turns over two
misbehaving loopback providers (heavy-tailed latency, 429 bursts, one server that hangs), the
trees scheduled one by one; a run SIGKILLed at a random moment loses at most the calls in flight,
and its rerun equals an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.integration


def test_a_killed_scheduled_run_loses_at_most_the_calls_in_flight_and_resumes_to_the_same_trees(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "bench_scale.py"),
            "--trees",
            "24",
            "--turns",
            "3",
            "--servers",
            "2",
            "--concurrency",
            "4",
            "--mean-ms",
            "10",
            "--hang-at",
            "0.5",
            "--hang-s",
            "1.5",
            "--burst-every",
            "3",
            "--paths",
            "conversation",
            "--kill",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (res,) = json.loads(out.read_text())["results"]
    assert res["nodes"] == 72 and res["failed_trees"] == 0
    assert res["calls"] >= 72 * 6  # six calls a node (the paper's settings), retries not counted
    assert res["answered_before_kill"] > 0 and 0 < res["resumed_turns"] < 72
    assert res["lost_calls"] <= 2 * 4  # at most the calls in flight: servers x concurrency
    assert res["resumed_equals_uninterrupted"]
