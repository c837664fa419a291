"""Cards that travel with what a run produces, so a copied dataset or model keeps its provenance.

* ``trees/README.md`` beside the TRL exports: schema, counts, roles' models, prompt versions,
  the parameter file (a dataset card);
* ``train/<variant>/README.md`` and a copy in ``merged/`` and ``adapter/``: the base model (the
  policy), the data, the recipe, and the evaluation numbers once evaluation has run (a model card).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from aloe.io import read_json, write_text
from aloe.paths import Paths

SCHEMAS = {
    "sft_preferred": "`id` (tree and turn), `prompt` (conversational messages: the history along the followed "
    "branch plus that turn's user message), `completion` (the preferred reply)",
    "sft_rejected": "as sft_preferred, with the rejected reply as `completion` (a control)",
    "dpo": "`id`, `prompt`, `chosen` (preferred reply), `rejected`",
}


def params_file() -> str:
    """The parameter file of the run (set by ``aloe run``), or a note that there was none."""
    return os.environ.get("ALOE_PARAMS_FILE", "(not run through `aloe run`: see manifest.json's parameters)")


def dataset_card(paths: Paths, experiment: str, counts: dict[str, int], provenance: dict) -> Path:
    roles = "\n".join(
        f"| {r} | {d.get('model')} | {d.get('revision')} | {d.get('kind')} |"
        for r, d in provenance.get("roles", {}).items()
    )
    prompts = ", ".join(f"`{v}`" for v in provenance.get("prompts", {}).values())
    files = "\n".join(f"| `{name}.jsonl` | {counts[name]} | {SCHEMAS[name]} |" for name in SCHEMAS)
    text = f"""# aloe preference conversations: {experiment}

Tree-structured preference data made by the aloe tree stage (a reproduction of Wu et al., COLING 2025,
"Aligning LLMs with Individual Preferences via Interaction"). Per training persona a simulated user
reveals the persona a little per turn; a hinted and a plain reply are judged; one continues the
conversation. Load with `datasets.load_dataset("json", data_files="dpo.jsonl")`.

| file | rows | schema |
|---|---|---|
{files}

Who played which role:

| role | model | revision | kind |
|---|---|---|---|
{roles}

Judge: `{provenance.get("judge")}`; inference: `{provenance.get("inference")}`; branch policy:
`{provenance.get("branch")}`; seed {provenance.get("seed")}; prompt versions: {prompts}.
Parameter file: `{params_file()}`. Full settings: `manifest.json` beside this file.
"""
    out = paths.stage("trees") / "README.md"
    write_text(out, text)
    return out


def model_card(
    paths: Paths, experiment: str, variant: str, metrics: dict, recipe: dict, evaluation: dict | None = None
) -> str:
    policy = metrics.get("policy") or {}
    ev = ""
    if evaluation:
        vs = evaluation.get("vs_base") or {}
        ev = (
            f"\n## Evaluation (ALOE, this run)\n\nAVG {evaluation['avg']:.3f}"
            + (f", IR {evaluation['ir']:+.4f}" if evaluation.get("ir") is not None else "")
            + (
                f"; minus base {vs['avg_diff']:+.3f} [{vs['avg_diff_ci_low']:+.3f}, {vs['avg_diff_ci_high']:+.3f}]"
                if vs.get("avg_diff") is not None
                else ""
            )
            + f". Judge card: {'passed' if evaluation.get('judge_fit') else 'not passed: these numbers are not evidence'}."
            + " See `data/<experiment>/evaluate/metrics.json`.\n"
        )
    return f"""# aloe {variant}: {experiment}

Fine-tuned from the policy **{policy.get("model")}** (revision {policy.get("revision")}), starting from
{metrics.get("started_from")}, with TRL ({metrics.get("kind")}) {"and LoRA (PEFT)" if metrics.get("lora") else "(full fine-tuning)"}.

- data: `{paths.export(_data_of(variant))}` ({metrics.get("rows")} rows)
- recipe: `{json.dumps(recipe, sort_keys=True, default=str)}`
- {metrics.get("global_step")} steps, final training loss {metrics.get("train_loss")}, {metrics.get("world_size")} process(es)
- parameter file: `{params_file()}`
{ev}"""


def _data_of(variant: str) -> str:
    from aloe.variants import VARIANTS

    return VARIANTS[variant].data


def write_model_card(paths: Paths, experiment: str, variant: str, evaluation: dict | None = None) -> None:
    """(Re)write a trained variant's card from its metrics.json (and evaluation numbers, when given)."""
    mfile = paths.train_metrics(variant)
    if not mfile.exists():
        return
    metrics = read_json(mfile)
    text = model_card(paths, experiment, variant, metrics, metrics.get("recipe", {}), evaluation)
    for folder in (paths.variant(variant), paths.merged(variant), paths.adapter(variant)):
        if folder.is_dir():
            write_text(folder / "README.md", text)
