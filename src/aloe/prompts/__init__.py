"""Versioned role prompts loaded from YAML (prompts are data, not code)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from aloe.errors import AloeError

_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Prompt:
    name: str
    version: str
    parts: dict

    @property
    def tag(self) -> str:
        """What goes into the cache key: name@version."""
        return f"{self.name}@{self.version}"

    def render(self, part: str, **fields) -> str:
        try:
            return self.parts[part].format(**fields).strip()
        except KeyError as e:
            raise AloeError(f"prompt {self.tag}: part {part!r} needs field {e}") from None


@lru_cache(maxsize=None)
def load_prompts(file: str = "roles.yaml") -> dict[str, Prompt]:
    data = yaml.safe_load((_DIR / file).read_text(encoding="utf-8"))
    out = {}
    for name, entry in data.items():
        parts = {k: v for k, v in entry.items() if k != "version"}
        out[name] = Prompt(name, str(entry["version"]), parts)
    return out


def get(name: str) -> Prompt:
    prompts = load_prompts()
    if name not in prompts:
        raise AloeError(f"unknown prompt {name!r}; known: {', '.join(prompts)}")
    return prompts[name]
