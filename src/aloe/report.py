"""Final report helpers: read every stage's manifest and metrics into tables."""

from __future__ import annotations

from pathlib import Path

from aloe.config import STAGES, ReportConfig
from aloe.io import read_json, write_manifest


def stage_summary(cfg: ReportConfig) -> list[dict]:
    rows = []
    for stage in STAGES[:-1]:
        p = cfg.stage_dir_root / stage / "manifest.json"
        if not p.exists():
            rows.append({"stage": stage, "finished": False})
            continue
        m = read_json(p)
        rows.append({"stage": stage, "finished": True, "wall_seconds": m["wall_seconds"],
                     "model": (m.get("models") or {}).get("backend", {}).get("model", ""),
                     "counts": ", ".join(f"{k}={v}" for k, v in m["counts"].items())})
    return rows


def evaluation_metrics(cfg: ReportConfig) -> dict | None:
    p = Path(cfg.stage_dir_root / "evaluate" / "metrics.json")
    return read_json(p) if p.exists() else None


def finish(cfg: ReportConfig, started: float) -> None:
    write_manifest(cfg.stage_dir_root / "report", stage="report", parameters=cfg, started=started)
