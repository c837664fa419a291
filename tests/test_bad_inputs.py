"""Every bad input in the catalogue (tests/bad_inputs.py) gets one clear refusal: exit 2,
no traceback, at most three lines, naming the key, file or variable that is wrong."""

from __future__ import annotations

import bad_inputs
import pytest


def test_the_catalogue_is_large():
    assert len(bad_inputs.CASES) >= 40
    assert len({c[0] for c in bad_inputs.CASES}) == len(bad_inputs.CASES)


@pytest.mark.parametrize("case", bad_inputs.CASES, ids=[c[0] for c in bad_inputs.CASES])
def test_bad_input_is_refused_clearly(case, tmp_path):
    res = bad_inputs.run_case(case, tmp_path)
    assert res["verdict"] == "clear", res
    planted = {tmp_path / rel for rel in (case[5] if len(case) > 5 else {})}  # the damaged files a case brings
    written = set((tmp_path / "data").rglob("*.jsonl")) if (tmp_path / "data").exists() else set()
    assert written <= planted, f"nothing may run: {sorted(written - planted)}"


def test_a_good_file_passes_the_same_path(tmp_path):
    # the harness itself can tell a good file from a bad one
    case = ("good", bad_inputs.BASE, ["check", "{file}"], "", {})
    assert bad_inputs.run_case(case, tmp_path)["verdict"] == "accepted"
