"""The package stays readable: no function in src/ longer than a reader can hold, and every
parameter declared once, with the notebooks' parameters cells and docs/parameters.md generated from
that declaration. (The import layers are checked by `lint-imports` in `make test`; see pyproject.toml.)"""

import ast
import importlib.util

from conftest import REPO

LIMIT = 80  # lines, decorators excluded; the aim is 60


def test_no_function_in_src_is_longer_than_the_limit():
    long = []
    for f in sorted((REPO / "src" / "aloe").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > LIMIT:
                    long.append(f"{f.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "break these into named steps: " + "; ".join(long)


def test_notebook_parameter_cells_and_the_parameter_reference_are_generated_from_the_declarations():
    spec = importlib.util.spec_from_file_location("sync", REPO / "scripts" / "sync_notebook_defaults.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    drifted = sync.drift(REPO / "parameters" / "default.yaml", write=False)
    assert not drifted, f"run python scripts/sync_notebook_defaults.py: {drifted} drifted from the declarations"


def test_every_parameter_has_help_and_every_number_a_range():
    import dataclasses
    import typing

    from aloe.config import STAGE_CONFIGS, BackendConfig, JudgeCardConfig

    for cls in (*STAGE_CONFIGS.values(), BackendConfig, JudgeCardConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help line"
            numeric = hints[f.name] in (int, float) or hints[f.name] in (typing.Optional[int], typing.Optional[float])
            if numeric:
                assert f.metadata.get("range"), f"{cls.__name__}.{f.name} has no range"
