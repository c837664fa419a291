"""Reading the YAML files people write (parameter files, the model registry), strictly.

PyYAML's safe loader accepts things that make a parameter file mean something other than
what its author sees: a repeated key (the last one silently wins), a non-string key, a
recursive alias, an alias bomb (a few lines that expand to millions of values), nesting
thousands deep (a RecursionError far from the file). Each is refused here with a message
that names the file, the line and the key, and quotes values only in shortened form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from aloe.errors import ConfigError

MAX_BYTES = 1_000_000  # a parameter file is a few KB; anything near this is not one
MAX_DEPTH = 32  # the deepest real key is four levels down (stages.train.sft.<key>)
MAX_NODES = 100_000  # values after alias expansion; real files have a few hundred


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def number_hint(value: Any) -> str:
    """A hint for the classic YAML trap: ``1e-4`` (no dot) is read as text, not a number."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return f" (YAML reads {value} as text; write it with a dot, e.g. {float(value):.1e})"
    return ""


class _StrictLoader(yaml.SafeLoader):
    """Safe loader that refuses duplicate and non-string mapping keys, naming the line."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)  # resolves `<<` merges first
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if not isinstance(key, str):
                    raise _Refused(f"line {line}: key {short(key)} is not a string; write it as a name")
                if key in seen:
                    raise _Refused(
                        f"line {line}: key {key!r} appears twice in one mapping (first on line "
                        f"{seen[key]}); YAML would keep only the last one"
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _Refused(Exception):
    pass


def _walk(value: Any) -> None:
    """Refuse cycles (recursive aliases), nesting deeper than MAX_DEPTH and alias bombs."""
    count = 0
    stack: list[tuple[Any, int, frozenset]] = [(value, 0, frozenset())]
    while stack:
        v, depth, parents = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise _Refused(f"more than {MAX_NODES:,} values once aliases are expanded (an alias bomb?)")
        if isinstance(v, (dict, list)):
            if id(v) in parents:
                raise _Refused("a recursive alias (a value that contains itself)")
            if depth >= MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep")
            inner = parents | {id(v)}
            children = v.values() if isinstance(v, dict) else v
            stack.extend((c, depth + 1, inner) for c in children)


def load_yaml(path: str | Path, what: str = "parameter file") -> Any:
    """Parse ``path`` strictly; every refusal is a ConfigError of a line or two naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a {what}")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what} ({e.strerror})") from None
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{path}: {len(raw):,} bytes; a {what} is at most {MAX_BYTES:,}")
    if b"\x00" in raw:
        raise ConfigError(f"{path}: a binary file (it holds NUL bytes), not a YAML {what}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); a {what} is YAML text") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
        _walk(data)
    except _Refused as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: {loc}invalid YAML ({str(problem)[:120]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deep to read (more than {MAX_DEPTH} levels is never needed)") from None
    return data
