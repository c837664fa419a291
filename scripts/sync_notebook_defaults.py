"""Generate, from the parameters' one declaration (``aloe.config.param``), each notebook's
parameters cell and docs/parameters.md.

A notebook opened in JupyterLab runs with the values in its ``parameters`` cell; these are the
default study (``parameters/default.yaml``), not a test configuration. Papermill overrides them
on every headless run, so they only change what a person gets by hand. Each line is
``name = value  # help``: the stage config's fields in order, the default study's value (else the
declared default) and the field's help line. docs/parameters.md is the reference of every key:
type, default, allowed values and help.

    python scripts/sync_notebook_defaults.py [parameters/default.yaml]   # rewrite what drifted
    python scripts/sync_notebook_defaults.py --check                     # exit 1 when anything drifted

``tests/test_layout.py`` fails when the notebooks or the reference drift from the declarations.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from aloe.config import (  # noqa: E402
    NOTEBOOKS,
    STAGE_CONFIGS,
    STAGES,
    BackendConfig,
    Common,
    JudgeCardConfig,
    _type_name,
    load_experiment,
)

DOC = REPO / "docs" / "parameters.md"


def literal(value) -> str:
    """A Python literal in the notebooks' style (double-quoted strings)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    return repr(value)


def _fields(cls):
    return [f for f in dataclasses.fields(cls) if f.init]


def parameters_cell(stage: str, params: dict) -> str:
    """A stage notebook's parameters cell: one ``name = value  # help`` line per field."""
    return "\n".join(
        f"{f.name} = {literal(params[f.name])}  # {f.metadata['help']}" for f in _fields(STAGE_CONFIGS[stage])
    )


def _default(f) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(value):
            return "(see below)"
    else:
        return "(required)"
    return f"`{literal(value)}`"


def _table(cls, skip=()) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = ["| key | default | allowed | what it does |", "|---|---|---|---|"]
    for f in _fields(cls):
        if f.name in skip:
            continue
        rng = f.metadata.get("range")
        allowed = f"{_num(rng[0])} to {_num(rng[1])}" if rng else _type_name(hints[f.name])
        rows.append(
            f"| `{f.name}` | {_default(f)} | {allowed.replace('|', '/')} | {f.metadata['help'].replace('|', '/')} |"
        )
    return rows


def _num(x) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def parameters_doc() -> str:
    """docs/parameters.md: every key a parameter file may set, by section."""
    common = {f.name for f in dataclasses.fields(Common)}  # every stage's top-level keys
    out = [
        "# Parameters",
        "",
        "Every key a parameter file may set, generated from the one declaration of each "
        "(`aloe.config.param`) by `python scripts/sync_notebook_defaults.py`; a test fails when this "
        "page drifts. Ranges are inclusive. Back to the [README](../README.md).",
        "",
        "## Top level",
        "",
    ]
    out += _table(Common)
    out += [
        "",
        "## `backend` and each role under `roles`",
        "",
        "A role's mapping is merged over `backend`; a role that names another `model` does not inherit "
        "`revision` or `served_model`.",
        "",
    ]
    out += _table(BackendConfig)
    for stage in STAGES:
        out += ["", f"## `stages.{stage}`", ""]
        out += _table(STAGE_CONFIGS[stage], skip=common)
        if stage == "evaluate":
            out += ["", "### `stages.evaluate.judge_card`", ""]
            out += _table(JudgeCardConfig)
    return "\n".join(out) + "\n"


def drift(params_file: Path, write: bool) -> list[str]:
    """The files that differ from what the declarations generate (rewritten when ``write``)."""
    exp = load_experiment(params_file)
    changed = []
    for stage in STAGES:
        nb_path = REPO / "notebooks" / NOTEBOOKS[stage]
        nb = json.loads(nb_path.read_text(encoding="utf-8"))
        cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        source = parameters_cell(stage, exp.parameters_for(stage))
        if source != "".join(cell["source"]):
            changed.append(nb_path.name)
            if write:
                cell["source"] = [s + "\n" for s in source.split("\n")[:-1]] + [source.split("\n")[-1]]
                nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    doc = parameters_doc()
    if not DOC.exists() or DOC.read_text(encoding="utf-8") != doc:
        changed.append(str(DOC.relative_to(REPO)))
        if write:
            DOC.write_text(doc, encoding="utf-8")
    return changed


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "params",
        nargs="?",
        default=str(REPO / "parameters" / "default.yaml"),
        help="the parameter file whose values become the notebooks' defaults",
    )
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when anything drifted")
    args = ap.parse_args()
    changed = drift(Path(args.params), write=not args.check)
    print(("drifted: " if args.check else "updated: ") + (", ".join(changed) or "nothing"))
    sys.exit(1 if args.check and changed else 0)
