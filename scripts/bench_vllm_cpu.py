"""What vLLM's CPU build (make test's vLLM tier) costs and does on this machine, against the
transformers engine, side by side in one run.

    .venv-vllm/bin/python scripts/bench_vllm_cpu.py [--model smollm2-135m] [--chats 16] [--scores 32]

Needs .venv-vllm (`make test-vllm` builds it). The same workload as scripts/bench_teacher.py, call
cache off, float32 everywhere (this CPU has no bf16 units): ``--chats`` simulated-user openings (64
new tokens, temperature 0.7) and ``--scores`` rubric judgments (the probabilities of "1".."5").
Engines: transformers (batched), vLLM with ``enforce_eager`` (what the tests use) and vLLM with its
default torch.compile warm-up. Prints seconds to open, to chat, to score and to close for each, and
the vLLM engines' prefix-cache hits; writes data/bench/bench_vllm_cpu_<model>.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench_teacher import timed, workload  # scripts/ is on sys.path when a script runs

from aloe.backends import open_backend
from aloe.io import write_json

ENGINES = {
    "transformers": {"kind": "transformers", "batch_size": 16},
    "vLLM, enforce_eager": {"kind": "vllm", "enforce_eager": True, "gpu_memory_utilization": 0.15},
    "vLLM, compiled": {"kind": "vllm", "enforce_eager": False, "gpu_memory_utilization": 0.15},
}


def measure(cfg: dict, chats, scores) -> dict:
    t0 = time.time()
    b = open_backend(cfg, None)
    opened = time.time() - t0
    timed(b, chats[:2], scores[:2])  # warm-up (first-call allocations), not counted
    row = {"open_s": round(opened, 1), **timed(b, chats, scores)}
    if cfg["kind"] == "vllm":
        row["prefix_hit_tokens"], row["prompt_tokens"] = b.prefix_hit_tokens, b.prompt_tokens
    t0 = time.time()
    b.close()
    row["close_s"] = round(time.time() - t0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--chats", type=int, default=16)
    ap.add_argument("--scores", type=int, default=32)
    args = ap.parse_args()
    chats, scores = workload(args.chats, args.scores)
    results = {}
    for name, cfg in ENGINES.items():
        results[name] = measure({**cfg, "model": args.model, "dtype": "float32"}, chats, scores)
        print(name, results[name], flush=True)
    print("\n| engine | open s | chats s | tokens | scores s | close s |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['open_s']} | {r['chat_s']} | {r['tokens']} | {r['score_s']} | {r['close_s']} |")
    out = Path("data/bench") / f"bench_vllm_cpu_{args.model}.json"
    write_json(out, {"model": args.model, "chats": args.chats, "scores": args.scores, "results": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
