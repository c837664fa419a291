"""Roles: which model plays which part of the teacher -> student design.

A parameter file's ``roles:`` maps a role to backend settings merged over ``backend``
(``aloe.config.Common.role``); a role it does not name inherits ``backend`` as is:

* ``generator`` grows the persona pool;
* ``simulator`` plays the user, in trees and in evaluation;
* ``inferrer`` states what the user has revealed;
* ``responder`` writes the hinted and plain replies;
* ``judge`` makes every judgment (pair and score judges in trees, scores in evaluation);
* ``policy`` is the student: what train fine-tunes and what ``base``, ``oracle`` and
  ``reminder`` run on in evaluation (trained variants are the policy plus training).

:func:`open_roles` gives a stage the roles it uses. Engines open lazily, on a role's
first use, and roles whose resolved settings are equal share one engine: one model in
memory, one server pool.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Iterable, Iterator

from aloe.backends import ChatBackend, open_backend
from aloe.config import ROLE_DOCS, ROLES, BackendConfig, Common

log = logging.getLogger(__name__)


class Roles(Mapping):
    """role name -> ChatBackend, opened on first use; equal settings share one engine."""

    def __init__(
        self,
        configs: dict[str, BackendConfig],
        cache_path: str | None = None,
        engines: dict[str, ChatBackend] | None = None,
    ):
        self.configs = dict(configs)
        self.cache_path = cache_path
        self._by_config: dict[BackendConfig, ChatBackend] = {}
        self._given = dict(engines or {})  # engines handed in ready-made (tests, one-backend callers)
        self._released: list[dict] = []  # usage of engines closed before the stage ended
        self._opening = threading.Lock()  # trees scheduled one by one ask for engines from many threads
        self._asked: set[str] = set()  # roles a stage asked for: usage names only those (a rules judge asks none)

    @classmethod
    def single(cls, backend: ChatBackend, names: Iterable[str] = ROLES) -> "Roles":
        """Every named role played by one ready engine."""
        return cls({}, None, {n: backend for n in names})

    def __getitem__(self, role: str) -> ChatBackend:
        self._asked.add(role)
        if role in self._given:
            return self._given[role]
        if role not in self.configs:
            raise KeyError(f"role {role!r} was not opened for this stage (opened: {', '.join(self)})")
        cfg = self.configs[role]
        with self._opening:
            if cfg not in self._by_config:
                log.info("opening %s engine for role %s: %s", cfg.kind, role, cfg.model)
                self._by_config[cfg] = open_backend(cfg, self.cache_path)
            return self._by_config[cfg]

    @property
    def asked(self) -> frozenset[str]:
        """The roles the stage has asked for an engine so far."""
        return frozenset(self._asked)

    def __contains__(self, role) -> bool:  # without opening an engine (Mapping's would: it calls self[role])
        return role in self._given or role in self.configs

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._given, *self.configs]))

    def __len__(self) -> int:
        return len(set(self._given) | set(self.configs))

    def shared(self, a: str, b: str) -> bool:
        """True when roles a and b are (or will be) played by the same engine."""
        if a in self._given or b in self._given:
            return self._given.get(a) is not None and self._given.get(a) is self._given.get(b)
        return self.configs.get(a) == self.configs.get(b)

    def release(self, role: str) -> None:
        """Close the engine of ``role`` unless another opened role still uses it (frees GPU memory
        before evaluation loads a trained model)."""
        if role in self._given or role not in self.configs:
            return
        cfg = self.configs[role]
        engine = self._by_config.get(cfg)
        if engine is None:
            return
        if any(self.configs[r] == cfg for r in self.configs if r != role):
            return
        self._released.append({"roles": [role], "kind": engine.kind, "model": engine.model_id, **engine.usage()})
        engine.close()
        del self._by_config[cfg]

    def describe(self) -> dict[str, dict]:
        """Provenance: every role's engine (model id, revision, kind ...), opening none that is
        not open: an unopened role is described from its settings."""
        out = {}
        for role in self:
            if role in self._given:
                out[role] = self._given[role].describe()
            elif self.configs[role] in self._by_config:
                out[role] = self._by_config[self.configs[role]].describe()
            else:
                c = self.configs[role]
                out[role] = {"kind": c.kind, "model": c.model, "revision": c.revision, "opened": False}
        return out

    def engines(self) -> list[ChatBackend]:
        """The distinct engines opened so far."""
        seen: dict[int, ChatBackend] = {}
        for e in [*self._given.values(), *self._by_config.values()]:
            seen.setdefault(id(e), e)
        return list(seen.values())

    def cache_stats(self) -> dict[str, int]:
        caches = {id(e.cache): e.cache for e in self.engines()}
        return {
            "cache_hits": sum(c.hits for c in caches.values()),
            "cache_misses": sum(c.misses for c in caches.values()),
        }

    def usage(self) -> list[dict]:
        """Per engine opened so far: the roles it played, its model and what it was asked
        (ChatBackend.usage): calls, cached calls, prompt and completion tokens."""
        out = []
        for e in self.engines():
            played = [
                r
                for r in self
                if r in self._asked and (self._given.get(r) is e or self._by_config.get(self.configs.get(r)) is e)
            ]
            out.append({"roles": played, "kind": e.kind, "model": e.model_id, **e.usage()})
        return self._released + out

    def close(self) -> None:
        for e in self._by_config.values():
            e.close()
        self._by_config.clear()


def open_roles(cfg: Common, names: Iterable[str]) -> Roles:
    """The roles a stage uses, from its config (engines open on first use)."""
    return Roles({n: cfg.role(n) for n in names}, cfg.cache_path)


def as_roles(roles: "Roles | ChatBackend", names: Iterable[str]) -> Roles:
    """Stages accept a Roles mapping, or one backend that plays every role (tests, scripts)."""
    if isinstance(roles, Roles):
        missing = [n for n in names if n not in roles]
        if missing:
            raise KeyError(f"roles not provided: {', '.join(missing)}")
        return roles
    return Roles.single(roles, names)


def identity(described: dict | None) -> tuple | None:
    """What makes two engines the same model: (model id, revision)."""
    if not described:
        return None
    return (described.get("model"), described.get("revision"))


def role_rows(manifests: dict[str, dict]) -> list[dict]:
    """Who played which role, from the stages' manifests: one row per role and model seen."""
    seen: dict[tuple, dict] = {}
    for stage, m in manifests.items():
        for role, d in (m.get("roles") or {}).items():
            key = (role, d.get("model"), d.get("revision"))
            row = seen.setdefault(
                key,
                {
                    "role": role,
                    "does": ROLE_DOCS.get(role, ""),
                    "model": d.get("model"),
                    "revision": d.get("revision"),
                    "kind": d.get("kind"),
                    "stages": [],
                },
            )
            row["stages"].append(stage)
    order = {r: i for i, r in enumerate(ROLES)}
    return sorted(seen.values(), key=lambda r: (order.get(r["role"], 99), str(r["model"])))


def self_judging(manifests: dict[str, dict]) -> list[str]:
    """Stages where the judge is the policy itself (same model id and revision)."""
    out = []
    policy = {identity(m["roles"]["policy"]) for m in manifests.values() if "policy" in (m.get("roles") or {})}
    for stage, m in manifests.items():
        judge = identity((m.get("roles") or {}).get("judge"))
        if judge is not None and judge in policy:
            out.append(stage)
    return out
