"""Write the default experiment's settings into each notebook's parameters cell.

A notebook opened in JupyterLab runs with the values in its ``parameters`` cell; these should
be the default study (``parameters/default.yaml``), not a test configuration. Papermill
overrides them on every headless run, so this only changes what a person gets by hand.

    python scripts/sync_notebook_defaults.py [parameters/default.yaml]

Each ``name = value  # comment`` line keeps its comment; values the file does not set keep
the notebook's own (which equal the config class defaults; ``tests/test_roles.py`` checks both).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from aloe.config import NOTEBOOKS, STAGES, load_experiment  # noqa: E402

LINE = re.compile(r"^(?P<name>[A-Za-z_]\w*) = (?P<value>.*?)(?P<comment>\s+# .*)?$")


def literal(value) -> str:
    """A Python literal in the notebooks' style (double-quoted strings)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{literal(k)}: {literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    return repr(value)


def sync(path: Path) -> list[str]:
    exp = load_experiment(path)
    changed = []
    for stage in STAGES:
        nb_path = REPO / "notebooks" / NOTEBOOKS[stage]
        nb = json.loads(nb_path.read_text(encoding="utf-8"))
        cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        params = exp.parameters_for(stage)
        lines = "".join(cell["source"]).split("\n")
        out = []
        for line in lines:
            m = LINE.match(line)
            if m and m["name"] in params:
                line = f"{m['name']} = {literal(params[m['name']])}{m['comment'] or ''}"
            out.append(line)
        source = "\n".join(out)
        if source != "".join(cell["source"]):
            cell["source"] = [s + "\n" for s in source.split("\n")[:-1]] + [source.split("\n")[-1]]
            nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            changed.append(nb_path.name)
    return changed


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("params", nargs="?", default=str(REPO / "parameters" / "default.yaml"),
                    help="the parameter file whose values become the notebooks' defaults")
    print("updated:", ", ".join(sync(Path(ap.parse_args().params))) or "nothing")
