"""Training: SFT on preferred / rejected replies, DPO, and SFT then DPO, with TRL + PEFT.

Fine-tunes the ``policy`` role's model (``roles.policy``; the student) on the tree
stage's exports (conversational prompt/completion and prompt/chosen/rejected JSONL).
What each variant trains on and starts from is the table in ``aloe.variants``. The YAML's ``sft``, ``dpo`` and ``peft`` mappings
pass through unchanged to ``trl.SFTConfig``, ``trl.DPOConfig`` and
``peft.LoraConfig``; an unknown key is an error naming it, before any model loads.

Per variant, in ``data/<experiment>/train/<variant>/``: ``checkpoints/`` (a rerun
resumes from the last one), ``adapter/`` (LoRA), ``merged/`` (a plain model folder
that the evaluation backends load), ``metrics.json`` (the trainer's log history:
loss; for DPO reward margins and accuracies) and ``done.json`` (written last; a
variant with a matching ``done.json`` is skipped on rerun).

The same code runs in one process (the notebook) and under ``accelerate launch``
(DDP, DeepSpeed ZeRO, FSDP: see ``accelerate/``)::

    accelerate launch --config_file accelerate/ddp.yaml -m aloe.training parameters/paper.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import re
import resource
import sys
import time
import types
import typing
from pathlib import Path

from aloe.cards import write_model_card
from aloe.config import TrainConfig
from aloe.errors import AloeError, ConfigError
from aloe.io import normal_modes, read_json, write_json, write_manifest
from aloe.lock import stage as stage_guard
from aloe.variants import VARIANTS, needed
from aloe.yamlfile import number_hint, short

log = logging.getLogger(__name__)

# Our defaults under the user's keys. Small-data friendly: the default run has a few
# dozen rows, so log every step and keep two checkpoints.
COMMON_DEFAULTS = {
    "num_train_epochs": 1,
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 20,
    "save_total_limit": 2,
    "report_to": "none",
    "seed": 0,
    "max_length": 512,
}
SFT_DEFAULTS = {**COMMON_DEFAULTS, "per_device_train_batch_size": 4, "learning_rate": 1e-4}
DPO_DEFAULTS = {**COMMON_DEFAULTS, "per_device_train_batch_size": 2, "learning_rate": 5e-5, "beta": 0.1}
LORA_DEFAULTS = {
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": "all-linear",
    "task_type": "CAUSAL_LM",
}


# Pass-through keys that hold secrets: a parameter file is recorded in manifests, model cards
# and executed notebooks, so a token written there is published with the results.
_SECRET_KEY = re.compile(r"(^|_)(hub_token|api_key|password|secret|auth)($|_)")
# Bounds for the pass-through numbers people set most; TRL/PEFT accept some nonsense silently.
_PASS_RANGES = {
    "learning_rate": (0.0, 1.0, False),
    "num_train_epochs": (0.0, 1e4, False),
    "per_device_train_batch_size": (1, 1e5, True),
    "gradient_accumulation_steps": (1, 1e5, True),
    "max_length": (1, 1e7, True),
    "beta": (0.0, 1e3, False),
    "r": (1, 1e5, True),
    "lora_alpha": (0.0, 1e6, False),
    "lora_dropout": (0.0, 1.0, True),
    "warmup_ratio": (0.0, 1.0, True),
    "logging_steps": (0.0, 1e9, False),
    "save_steps": (0.0, 1e9, False),
}


def _expected_types(hint) -> tuple[type, ...] | None:
    """The plain types a pass-through field accepts, or None when its type is too rich to check."""
    if hint in (bool, int, float, str):
        return {float: (int, float), int: (int,), bool: (bool,), str: (str,)}[hint]
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and args:
        out: list[type] = []
        for a in args:
            if a is type(None):
                out.append(type(None))
                continue
            inner = _expected_types(a)
            if inner is None:
                return None
            out.extend(inner)
        return tuple(out)
    return None


def _check_keys(section: str, given: dict, cls) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - some library classes have unresolvable annotations
        hints = {}
    for k, v in given.items():
        key = f"stages.train.{section}.{k}"
        if not isinstance(k, str):
            raise ConfigError(f"stages.train.{section}: key {short(k)} is not a string")
        if _SECRET_KEY.search(k):
            raise ConfigError(
                f"{key}: a secret does not belong in a parameter file (it is recorded in manifests "
                f"and notebooks); set it in the environment (e.g. HF_TOKEN) instead"
            )
        if k == "output_dir":
            raise ConfigError(f"{key}: set by aloe (data/<experiment>/train/<variant>)")
        if k not in fields:
            near = difflib.get_close_matches(k, fields, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(
                f"stages.train.{section}: unknown key {short(k)}{hint}: not a field of "
                f"{cls.__module__.split('.')[0]}.{cls.__name__}"
            )
        allowed = _expected_types(hints.get(k))
        if allowed is not None:
            ok = isinstance(v, allowed) and not (isinstance(v, bool) and bool not in allowed)
            if not ok:
                names = " or ".join(sorted({t.__name__.replace("NoneType", "null") for t in allowed}))
                raise ConfigError(f"{key}: expected {names}, got {short(v)}{number_hint(v)}")
        if k in _PASS_RANGES and isinstance(v, (int, float)) and not isinstance(v, bool):
            lo, hi, closed = _PASS_RANGES[k]
            if not math.isfinite(v) or not (lo <= v <= hi if closed else lo < v <= hi):
                raise ConfigError(f"{key}: {v!r} is out of range ({lo:g} {'<=' if closed else '<'} value <= {hi:g})")
        if k == "max_steps" and isinstance(v, int) and not (v == -1 or v > 0):
            raise ConfigError(f"{key}: {v!r}: use a positive number of steps, or -1 for num_train_epochs")


def validate(cfg: TrainConfig) -> None:
    """Check the pass-through sections against TRL's and PEFT's own config classes."""
    from peft import LoraConfig
    from trl import DPOConfig, SFTConfig

    _check_keys("sft", cfg.sft, SFTConfig)
    _check_keys("dpo", cfg.dpo, DPOConfig)
    _check_keys("peft", cfg.peft, LoraConfig)
    if cfg.peft and not cfg.lora:
        raise ConfigError("stages.train.peft: given, but lora is false (full fine-tuning uses no adapters)")


def _device_args() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"bf16": torch.cuda.is_bf16_supported()}
    # TRL's configs default to bf16=True, which errors on CPU unless use_cpu is set;
    # with use_cpu, bf16 becomes CPU autocast (faster here, where the CPU has bf16 units).
    from aloe.backends.transformers_backend import cpu_supports_bf16

    return {"use_cpu": True, "bf16": cpu_supports_bf16()}


def _fingerprint(cfg: TrainConfig, variant: str, data_file: Path, base: str) -> str:
    blob = json.dumps(
        {
            "variant": variant,
            "base": base,
            "lora": cfg.lora,
            "peft": cfg.peft,
            "sft": cfg.sft,
            "dpo": cfg.dpo,
            "seed": cfg.seed,
            "data": hashlib.sha256(data_file.read_bytes()).hexdigest(),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load(location: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(location)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # fp32 weights: on CPU the trainer's bf16 autocast does the fast matmuls.
    model = AutoModelForCausalLM.from_pretrained(location, dtype="float32")
    return model, tok


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def policy_identity(cfg: TrainConfig) -> dict:
    """The policy role's model as provenance: kind, model id and revision (as backends describe it)."""
    from aloe.models import model_identity, resolve_model

    policy = cfg.role("policy")
    model_id, revision = model_identity(resolve_model(policy.model, policy.revision))
    return {"kind": policy.kind, "model": model_id, "revision": revision}


def _rows(data_file: Path):
    """The variant's training rows as a datasets.Dataset, with the node ids dropped."""
    from datasets import load_dataset

    empty = AloeError(
        f"{data_file}: no rows to train on: the trees stage exported none (every node a tie, dropped or "
        f"unusable: see its manifest's verdict_* counts); grow the trees (n_personas, turns) or use a judge "
        f"that separates the replies"
    )
    with open(data_file, encoding="utf-8") as f:
        if not any(line.strip() for line in f):  # datasets fails on an empty file with a bare StopIteration
            raise empty
    dataset = load_dataset("json", data_files=str(data_file), split="train")
    if len(dataset) == 0:
        raise empty
    return dataset.remove_columns([c for c in dataset.column_names if c == "id"])


def _recipe(cfg: TrainConfig, kind: str) -> tuple[dict, dict]:
    """The project's defaults for this kind of trainer, and the file's own settings over them."""
    return (SFT_DEFAULTS, cfg.sft) if kind == "sft" else (DPO_DEFAULTS, cfg.dpo)


def _trainer(cfg: TrainConfig, variant: str, dataset, base_location: str, fp: str, callbacks):
    """TRL's SFT or DPO trainer for one variant, with LoRA where configured."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    kind = VARIANTS[variant].kind
    args_cls, trainer_cls = (SFTConfig, SFTTrainer) if kind == "sft" else (DPOConfig, DPOTrainer)
    defaults, user = _recipe(cfg, kind)
    args = args_cls(
        output_dir=str(cfg.paths.checkpoints(variant)), **{**defaults, "seed": cfg.seed, **_device_args(), **user}
    )
    model, tok = _load(base_location)
    peft_config = LoraConfig(**{**LORA_DEFAULTS, **cfg.peft}) if cfg.lora else None
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[_mark_complete(fp), *(callbacks or [])],
    )
    return trainer, tok


def _variant_metrics(
    cfg: TrainConfig,
    variant: str,
    trainer,
    result,
    rows: int,
    base_location: str,
    last: str | None,
    wall: float,
    policy: dict | None,
) -> dict:
    kind = VARIANTS[variant].kind
    defaults, user = _recipe(cfg, kind)
    return {
        "variant": variant,
        "kind": kind,
        "base": base_location,
        "policy": policy or policy_identity(cfg),
        "started_from": VARIANTS[variant].start_from or "policy",
        "rows": rows,
        "lora": cfg.lora,
        "global_step": trainer.state.global_step,
        "resumed_from": last,
        "world_size": trainer.accelerator.num_processes,
        "train_runtime_s": round(wall, 2),
        "seconds_per_step": round(wall / max(1, trainer.state.global_step - _step_of(last)), 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "train_loss": result.training_loss,
        "recipe": {
            "lora": cfg.lora,
            "peft": {**LORA_DEFAULTS, **cfg.peft} if cfg.lora else None,
            kind: {**defaults, **user},
        },
        "log_history": trainer.state.log_history,
    }


def train_variant(
    cfg: TrainConfig, variant: str, base_location: str, *, callbacks=None, policy: dict | None = None
) -> dict:
    """Train one variant from ``base_location``; returns its metrics (also on disk)."""
    from transformers.trainer_utils import get_last_checkpoint

    paths = cfg.paths
    data_file = paths.export(VARIANTS[variant].data)
    if not data_file.exists():
        raise AloeError(f"{data_file}: file not found; run the trees stage first")
    fp = _fingerprint(cfg, variant, data_file, base_location)
    done = paths.train_done(variant)
    if done.exists() and read_json(done).get("fingerprint") == fp:
        log.info("%s: already trained with these settings (%s); skipping", variant, done)
        return read_json(paths.train_metrics(variant))
    done.unlink(missing_ok=True)  # the model on disk is not this one: evaluation must not load it
    usable_checkpoints(paths.checkpoints(variant), fp)
    dataset = _rows(data_file)
    trainer, tok = _trainer(cfg, variant, dataset, base_location, fp, callbacks)
    last = get_last_checkpoint(str(paths.checkpoints(variant))) if paths.checkpoints(variant).exists() else None
    if last:
        log.info("%s: resuming from %s", variant, last)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=last)
    metrics = _variant_metrics(
        cfg, variant, trainer, result, len(dataset), base_location, last, time.time() - started, policy
    )
    if trainer.accelerator.is_main_process:
        _save_variant(cfg, variant, trainer, tok, metrics, fp)
    trainer.accelerator.wait_for_everyone()
    return metrics


def _save_variant(cfg: TrainConfig, variant: str, trainer, tok, metrics: dict, fp: str) -> None:
    """The trained variant on disk (adapter, merged model, metrics, card), then the mark that it is
    finished: evaluation loads only a variant whose mark carries these settings' fingerprint."""
    paths = cfg.paths
    if cfg.lora:
        trainer.save_model(str(paths.adapter(variant)))
        normal_modes(paths.adapter(variant))
    if cfg.merge:
        _save_merged(trainer, tok, paths.merged(variant), cfg.lora)
    write_json(paths.train_metrics(variant), metrics)
    write_model_card(paths, cfg.experiment, variant)
    write_json(paths.train_done(variant), {"fingerprint": fp, "variant": variant, "finished": time.time()})


def _step_of(checkpoint: str | None) -> int:
    return int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0


COMPLETE = "aloe_complete.json"  # written into a checkpoint folder once the trainer has saved all of it


def _mark_complete(fingerprint: str):
    """A TrainerCallback whose ``on_save`` runs after a checkpoint is fully written, so a folder
    without its mark was cut short (a kill mid-save) and is never resumed from. The mark also
    carries the settings' fingerprint: a checkpoint of other data or settings is not resumed."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                write_json(folder / COMPLETE, {"fingerprint": fingerprint, "step": state.global_step})

    return MarkComplete()


def usable_checkpoints(folder: Path, fingerprint: str) -> None:
    """Delete checkpoints that must not be resumed: cut short (no completion mark) or made with
    other data or settings (another fingerprint). What remains is safe for the trainer to pick."""
    import shutil

    if not folder.is_dir():
        return
    for ckpt in sorted(folder.glob("checkpoint-*")):
        mark = ckpt / COMPLETE
        why = (
            "cut short (no completion mark)"
            if not mark.exists()
            else "made with other data or settings"
            if read_json(mark).get("fingerprint") != fingerprint
            else None
        )
        if why:
            log.warning("%s: %s; not resuming from it", ckpt, why)
            shutil.rmtree(ckpt, ignore_errors=True)


def _save_merged(trainer, tok, path: Path, lora: bool) -> None:
    """A plain model folder (adapters folded in) that transformers and vLLM load directly."""
    import shutil

    model = trainer.accelerator.unwrap_model(trainer.model)
    if lora:
        model = model.merge_and_unload()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    normal_modes(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


@stage_guard("train")
def run(cfg: TrainConfig, variants: list[str] | None = None, *, callbacks=None) -> dict:
    """Train the configured variants of the policy model in order; a variant that starts from
    another (``sft_then_dpo`` from ``sft_preferred``'s merged model) has that one trained first."""
    from aloe.models import hf_location, resolve_model

    validate(cfg)
    started = time.time()
    policy_cfg = cfg.role("policy")
    spec = resolve_model(policy_cfg.model, policy_cfg.revision)
    base = hf_location(spec)  # converts an embedded GGUF once
    policy = policy_identity(cfg)
    results = {}
    for variant in needed(variants or cfg.variants):
        start = VARIANTS[variant].start_from
        if start and not cfg.merge:
            raise ConfigError(
                f"stages.train.merge: {variant} needs merge: true (it starts from the merged {start} model)"
            )
        location = str(cfg.paths.merged(start)) if start else base
        results[variant] = train_variant(cfg, variant, location, callbacks=callbacks, policy=policy)
    counts = {f"{v}_steps": m["global_step"] for v, m in results.items()}
    counts.update({f"{v}_seconds_per_step": m["seconds_per_step"] for v, m in results.items()})
    if _is_main():
        write_manifest(
            cfg.paths.stage("train"),
            stage="train",
            parameters=cfg,
            started=started,
            counts=counts,
            roles={"policy": policy},
            models={"base": cfg.base_model, "location": base},
            extra={
                "variants": {
                    v: {k: m[k] for k in ("rows", "global_step", "train_loss", "peak_rss_mb", "world_size")}
                    for v, m in results.items()
                }
            },
        )
    return results


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def history_frame(results: dict):
    """Long table of the trainers' logged values: variant, step, metric, value."""
    import pandas as pd

    rows = []
    for variant, m in results.items():
        for entry in m["log_history"]:
            if "step" not in entry or "train_runtime" in entry:
                continue
            for k, v in entry.items():
                if (
                    k
                    in (
                        "loss",
                        "rewards/margins",
                        "rewards/accuracies",
                        "rewards/chosen",
                        "rewards/rejected",
                        "learning_rate",
                        "grad_norm",
                    )
                    and v is not None
                ):
                    rows.append({"variant": variant, "step": entry["step"], "metric": k, "value": float(v)})
    return pd.DataFrame(rows, columns=["variant", "step", "metric", "value"])


def sample_replies(cfg: TrainConfig, messages: list[dict], variants: list[str], max_new_tokens: int = 64) -> dict:
    """Greedy replies to one conversation from the base model and each trained variant."""
    from aloe.backends import ChatRequest, Sampling
    from aloe.backends.transformers_backend import TransformersBackend
    from aloe.models import hf_location, resolve_model

    policy = cfg.role("policy")
    locations = {"base": hf_location(resolve_model(policy.model, policy.revision))}
    locations.update({v: str(cfg.paths.merged(v)) for v in variants if cfg.paths.merged(v).exists()})
    out = {}
    for name, loc in locations.items():
        be = TransformersBackend(loc, name, "local", None, batch_size=1)
        out[name] = be.chat([ChatRequest(messages, Sampling(temperature=0.0, max_tokens=max_new_tokens))])[0].text
        del be
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``accelerate launch -m aloe.training PARAMS [--variant V ...]``."""
    from aloe.config import load_experiment

    ap = argparse.ArgumentParser(prog="python -m aloe.training", description="Train the variants of one experiment.")
    ap.add_argument("params", help="parameter file (parameters/*.yaml)")
    ap.add_argument("--variant", action="append", help="train only these variants (repeatable)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_experiment(args.params).stages["train"]
        for v in args.variant or []:
            if v not in VARIANTS:
                raise ConfigError(f"--variant {v!r}: allowed: {', '.join(VARIANTS)}")
        results = run(cfg, args.variant)
    except AloeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if _is_main():
        for v, m in results.items():
            print(
                f"{v}: {m['global_step']} steps, {m['seconds_per_step']} s/step, loss {m['train_loss']:.4f}, "
                f"peak RSS {m['peak_rss_mb']:.0f} MB, {m['world_size']} process(es)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
