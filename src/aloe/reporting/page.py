"""The results page a colleague reads without opening a notebook.

``reports/<experiment>/index.html``: what was run (parameter file, roles and their models,
commit, date), the judge card's verdict, the headline table (AVG, IR, N-IR, N-R² with CIs
and the paired differences against base), the figures inline, each stage's status, time
and key counts in words with links to its page and log, and the "what this run shows and
cannot show" paragraph. ``reports/index.html`` lists every experiment with its headline
numbers. Written by the runner after each stage and by ``aloe report`` from the files alone.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from aloe.config import NOTEBOOKS, STAGES, Experiment
from aloe.io import git_commit, read_json, write_text
from aloe.metrics import fmt as _fmt
from aloe.reporting import plots
from aloe.reporting import summary as rep
from aloe.reporting.summary import disclosure_rows, headline_rows, stage_words, usage_rows

_CSS = """body{font-family:sans-serif;max-width:64em;margin:2em auto;padding:0 1em;color:#222}
td,th{padding:.3em .7em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
table{border-collapse:collapse;margin:.6em 0} .box{border:3px solid #c00;padding:.6em;color:#900;font-weight:bold}
.ok{border:2px solid #2a2;padding:.6em} .glance li{margin:.2em 0} img{max-width:100%} code{background:#f4f4f4;padding:0 .2em}"""


def _e(x) -> str:
    return html.escape("" if x is None else str(x))


def _table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p>(none)</p>"
    columns = columns or list(rows[0])
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<figure><img alt="{_e(path.stem)}" src="data:image/png;base64,{data}"><figcaption>{_e(path.stem)} '
        f'(<a href="figures/{_e(path.name)}">PNG</a>, <a href="figures/{_e(path.stem)}.svg">SVG</a>)'
        f"</figcaption></figure>"
    )


def write_results(exp: Experiment, reports_dir: Path, status: dict | None = None) -> Path:
    """Write reports/<experiment>/index.html (and summary.json, read by reports/index.html)."""
    cfg = exp.stages["report"]
    status = status if status is not None else read_status(reports_dir)
    metrics = rep.evaluation_metrics(cfg)
    card = rep.judge_card(cfg)
    if metrics:  # the AL figure is redrawn from metrics.json, so `aloe report` needs no notebook
        plots.save(plots.al_curves(metrics), exp.name, "al_curves", reports_dir.parent)
        plots.save(plots.eval_disclosure(metrics), exp.name, "eval_disclosure", reports_dir.parent)
    manifests = rep.manifests(cfg)
    parts = [
        f"<h1>{_e(cfg.title)}</h1><p>{_e(exp.description)}</p>",
        f"<p>Parameter file <code>{_e(exp.path)}</code>; commit <code>{_e(git_commit())}</code>; "
        f"page written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.</p>",
    ]
    parts += _judge_sections(cfg, metrics, card)
    if metrics:
        parts += _result_sections(cfg, metrics)
    parts.append(
        "<h2>What this run shows and cannot show</h2><ul>"
        + "".join(f"<li>{_e(s.replace('**', ''))}</li>" for s in rep.findings(cfg))
        + "</ul>"
    )
    figures = sorted(plots.figures_dir(exp.name, reports_dir.parent).glob("*.png"))
    if figures:
        parts.append("<h2>Figures</h2>" + "".join(_img(f) for f in figures))
    parts.append(_stages_table(reports_dir, status, manifests))
    used = usage_rows(manifests)
    if used:
        parts.append(
            "<h2>Model calls</h2><p>Per stage and engine: requests sent, requests answered from the call "
            "cache, tokens read and generated (as far as the engine reports them), what the calls sent "
            "cost at the parameter file's <code>prices</code>, and what the answers taken from the cache "
            "would have cost. Local engines cost nothing but time; a served model without a price has "
            "an unknown cost.</p>" + _table(used)
        )
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>aloe: {_e(exp.name)}</title>'
        f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    write_text(reports_dir / "index.html", page)
    summary = {
        "experiment": exp.name,
        "title": cfg.title,
        "params": str(exp.path),
        "written": time.time(),
        "judge_fit": card["fit"] if card else None,
        "models": {
            m: {"avg": s["avg"], "vs_base": (s.get("vs_base") or {}).get("avg_diff")}
            for m, s in (metrics or {}).get("models", {}).items()
        },
    }
    write_text(reports_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    write_reports_index(reports_dir.parent)
    return reports_dir / "index.html"


def _judge_sections(cfg, metrics: dict | None, card: dict | None) -> list[str]:
    """At a glance (the lines 05_report shows, from what the page already read), who played which
    role, and whether the judge can rank models."""
    sj = rep.self_judging(cfg)
    found = rep.glance(metrics, card, bool(sj))
    parts = ['<h2>At a glance</h2><ul class="glance">' + "".join(f"<li>{_e(x)}</li>" for x in found) + "</ul>"]
    if sj:
        parts.append(f'<p class="box">{_e(sj)}</p>')
    parts.append(
        "<h2>Who played which role</h2>"
        + _table(rep.role_table(cfg), ["role", "does", "model", "revision", "kind", "stages"])
    )
    parts.append("<h2>Can this judge rank models?</h2>")
    verdict = rep.judge_verdict(card).replace("**", "")
    parts.append(f'<p class="{"ok" if card and card["fit"] else "box"}">{_e(verdict)}</p>')
    if card:
        from aloe.judge_card import card_rows

        parts.append(_table(card_rows(card)))
    return parts


def _result_sections(cfg, metrics: dict) -> list[str]:
    """The headline table and, for checkable preferences, the disclosure table."""
    warning = rep.judge_warning(cfg)
    reps = f" x {metrics['repeats']} simulator seeds" if metrics.get("repeats", 1) > 1 else ""
    parts = [
        f"<h2>Results: {metrics['personas']} personas x {metrics['turns']} turns{reps}, judge "
        f"<code>{_e(metrics['judge'])}</code>, protocol <code>{_e(metrics.get('protocol'))}</code></h2>"
    ]
    if warning:
        parts.append(f'<p class="box">{_e(warning)}</p>')
    parts.append(_table(headline_rows(metrics)))
    disc = disclosure_rows(metrics)
    if disc:
        parts.append(
            "<h2>Checkable preferences: did the simulated user reveal them?</h2><p>On its scheduled "
            "turn the simulated user is told to get one preference across in its own words; a detector "
            "checks the message (the disclosure rate), and where it missed, the catalogue's phrasing "
            "was appended. <i>kept by turn k</i>: the share of the preferences revealed so far that the "
            "reply kept.</p>" + _table(disc)
        )
    return parts


def _stages_table(reports_dir: Path, status: dict, manifests: dict) -> str:
    rows = []
    for stage in STAGES:
        s, nb = status.get(stage), NOTEBOOKS[stage][:-6]
        log = f' (<a href="logs/{stage}.log">log</a>)' if (reports_dir / "logs" / f"{stage}.log").exists() else ""
        state = "not run" if s is None else s["status"] + (f": {s['error']}" if s.get("error") else "")
        rows.append(
            f'<tr><td><a href="{nb}.html">{_e(stage)}</a>{log}</td><td>{_e(state)}</td>'
            f"<td>{_e(s['seconds']) + ' s' if s else ''}</td>"
            f"<td>{_e(stage_words(stage, manifests[stage])) if stage in manifests else ''}</td></tr>"
        )
    return (
        "<h2>Stages</h2><table><tr><th>stage (full page)</th><th>status</th><th>time</th>"
        "<th>what it made</th></tr>" + "".join(rows) + "</table>"
    )


def write_reports_index(reports_root: Path) -> Path:
    """reports/index.html: every experiment with a results page, and its headline numbers."""
    rows = []
    for p in sorted(reports_root.glob("*/summary.json")):
        s = read_json(p)
        models = ", ".join(
            f"{m} {_fmt(v['avg'], 2)}" + (f" ({_fmt(v['vs_base'], 2, True)})" if v["vs_base"] is not None else "")
            for m, v in s["models"].items()
        )
        fit = {True: "passed", False: "failed", None: "not run"}[s["judge_fit"]]
        rows.append(
            f'<tr><td><a href="{_e(p.parent.name)}/index.html">{_e(s["experiment"])}</a></td>'
            f"<td>{_e(s['title'])}</td><td>{fit}</td><td>{_e(models)}</td></tr>"
        )
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>aloe reports</title><style>{_CSS}</style>'
        f"</head><body><h1>aloe experiments</h1><p>AVG per model (paired difference to base); a difference "
        f"counts only where the judge card passed.</p><table><tr><th>experiment</th><th>title</th>"
        f"<th>judge card</th><th>AVG per model</th></tr>{''.join(rows)}</table></body></html>\n"
    )
    write_text(reports_root / "index.html", page)
    return reports_root / "index.html"


def read_status(reports_dir: Path) -> dict:
    """The run's stage statuses (``status.json``), or none yet."""
    p = reports_dir / "status.json"
    return read_json(p) if p.exists() else {}
