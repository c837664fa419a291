"""Training (thin foundation version): checks that the tree exports load as the
datasets TRL consumes. LoRA SFT / DPO with TRL lands with the training issue; until
then this stage trains nothing and says so in its manifest."""

from __future__ import annotations

import time

from aloe.config import TrainConfig
from aloe.io import write_manifest


def run(cfg: TrainConfig) -> dict:
    from datasets import load_dataset

    started = time.time()
    src = cfg.stage_dir_root / "trees"
    counts = {}
    for name in ("sft_preferred", "dpo"):
        ds = load_dataset("json", data_files=str(src / f"{name}.jsonl"), split="train")
        counts[f"{name}_rows"] = len(ds)
        counts[f"{name}_columns"] = ",".join(ds.column_names)
    counts["trained_variants"] = 0
    write_manifest(cfg.stage_dir_root / "train", stage="train", parameters=cfg, started=started, counts=counts,
                   extra={"note": "foundation: exports validated, no training run yet"})
    return counts
