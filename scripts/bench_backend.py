"""Tokens/s of the transformers backend on an embedded model: single prompt vs batch 8.

    .venv/bin/python scripts/bench_backend.py [--model smollm2-135m|qwen2.5-coder-0.5b]
        [--dtype auto|float32|bfloat16|autocast-bf16|int8] [--new-tokens 128]

Greedy decoding, no cache (every call is generated), ~400-token prompts.
"""

from __future__ import annotations

import argparse
import json
import time

from aloe.backends import ChatRequest, Sampling
from aloe.backends.transformers_backend import TransformersBackend
from aloe.models import hf_location, model_identity, resolve_model

STORY = (
    "My grandmother kept a garden behind her house in Porto, with tomatoes, kale and a fig tree that "
    "was older than my father. Every summer we picked figs and she told stories about the fishing boats. "
) * 6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="an embedded model's name (docs/models.md)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "autocast-bf16", "int8"])
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    spec = resolve_model(args.model)
    mid, rev = model_identity(spec)
    b = TransformersBackend(hf_location(spec), mid, rev, None, batch_size=8, dtype=args.dtype)
    samp = Sampling(temperature=0.0, max_tokens=args.new_tokens)
    reqs = [
        ChatRequest(
            [
                {
                    "role": "user",
                    "content": f"{STORY}\nWrite a long, detailed essay (at least 400 words) about garden number {i}: what to plant, month by month.",
                }
            ],
            samp,
        )
        for i in range(8)
    ]
    b.chat(reqs[:1])  # warm-up
    out = {"model": args.model, "dtype": b.dtype_used, "prompt_tokens": len(b._prompt_ids(reqs[0].messages))}
    for name, batch in (("single", reqs[:1]), ("batch8", reqs)):
        b.generated_tokens = 0
        t = time.time()
        b.chat(batch)
        dt = time.time() - t
        out[name] = {
            "seconds": round(dt, 2),
            "new_tokens": b.generated_tokens,
            "tokens_per_s": round(b.generated_tokens / dt, 1),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
