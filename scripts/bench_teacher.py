"""Which engine serves an embedded teacher fastest on this machine: transformers (bf16,
batched) or llama.cpp's server on the GGUF (the one the tests build).

    .venv/bin/python scripts/bench_teacher.py [--model qwen2.5-coder-0.5b] [--chats 16] [--scores 32]

The same workload on both, with the call cache off: ``--chats`` simulated-user openings
(64 new tokens, temperature 0.7) for the benchmark personas, and ``--scores`` rubric
judgments (the probabilities of "1".."5"). Prints the seconds of each part for each
engine and their ratio; writes data/bench/bench_teacher_<model>.json.
"""

from __future__ import annotations

import argparse
import socket
import time
from pathlib import Path

from aloe import prompts
from aloe.backends import ChatRequest, ProbRequest, Sampling, open_backend
from aloe.conversation import simulator_messages
from aloe.io import write_json
from aloe.judging import SCORES
from aloe.models import gguf_path, resolve_model
from aloe.records import load_seeds


def workload(n_chat: int, n_score: int):
    profiles, personalities = load_seeds("eval_profiles"), load_seeds("eval_personalities")
    sim = prompts.get("user_simulator")
    chats = [
        ChatRequest(
            simulator_messages(profiles[i % 20], personalities[i % 5], []),
            Sampling(temperature=0.7, max_tokens=64, seed=i),
            prompt_version=sim.tag,
        )
        for i in range(n_chat)
    ]
    rubric = prompts.get("judge_score")
    scores = [
        ProbRequest(
            [
                {"role": "system", "content": rubric.render("system")},
                {
                    "role": "user",
                    "content": rubric.render(
                        "user",
                        profile=profiles[i % 20],
                        personality=personalities[i % 5],
                        message="I spent the morning fixing my bike.",
                        reply="Nice! Was it the brakes again? I hope you got out for a ride after.",
                    ),
                },
            ],
            SCORES,
            prompt_version=rubric.tag,
        )
        for i in range(n_score)
    ]
    return chats, scores


def timed(backend, chats, scores) -> dict:
    t0 = time.time()
    out = backend.chat(chats)
    t1 = time.time()
    lps = backend.logprobs(scores)
    t2 = time.time()
    tokens = sum(c.completion_tokens or 0 for c in out)
    return {
        "chat_s": round(t1 - t0, 2),
        "score_s": round(t2 - t1, 2),
        "tokens": tokens,
        "chat_ok": sum(c.ok for c in out),
        "score_ok": sum(s.ok for s in lps),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--chats", type=int, default=16)
    ap.add_argument("--scores", type=int, default=32)
    args = ap.parse_args()
    chats, scores = workload(args.chats, args.scores)

    tf = open_backend({"kind": "transformers", "model": args.model, "batch_size": 16}, None)
    timed(tf, chats[:2], scores[:2])  # warm-up (first-call allocations), not counted
    results = {"transformers": {**timed(tf, chats, scores), "dtype": tf.dtype_used}}
    del tf

    import subprocess
    import tempfile

    import httpx

    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf_path(resolve_model(args.model))),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--model_alias",
            args.model,
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        for _ in range(240):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        srv = open_backend(
            {"kind": "openai", "model": args.model, "base_url": f"http://127.0.0.1:{port}/v1", "max_concurrency": 1},
            None,
        )
        timed(srv, chats[:2], scores[:2])
        results["llama.cpp server"] = timed(srv, chats, scores)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for engine, r in results.items():
        print(
            f"{engine:>17}: {args.chats} chats {r['chat_s']:7.2f} s ({r['tokens']} tokens), "
            f"{args.scores} scores {r['score_s']:7.2f} s"
        )
    tf_r, ll_r = results["transformers"], results["llama.cpp server"]
    print(
        f"llama.cpp / transformers: chats {ll_r['chat_s'] / tf_r['chat_s']:.2f}x the time, "
        f"scores {ll_r['score_s'] / tf_r['score_s']:.2f}x the time"
    )
    write_json(Path(f"data/bench/bench_teacher_{args.model}.json"), {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
