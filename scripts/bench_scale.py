"""A paper-scale rehearsal of the trees stage on this machine, against a provider that misbehaves.

    .venv/bin/python scripts/bench_scale.py [--trees 600] [--turns 10] [--servers 2] [--concurrency 16]
        [--mean-ms 40] [--tail 0.01] [--tail-x 20] [--paths conversation,lockstep] [--kill]
        [--official ../shared/aloe-official] [--out data/bench/bench_scale.json]

The trees stage runs with ``parameters/paper.yaml``'s trees settings (pair judge in both orders,
inference step, ``max_new_tokens`` 300, ``inconsistent: tie``: six calls a node), its real prompts
and exports, on ``--trees`` personas x ``--turns`` turns (the paper: 3,000 x 10), against
``--servers`` OpenAI-compatible servers on loopback that this script starts. Each answers with
text of a realistic length for the request's ``max_tokens`` (judges: log-probabilities of "1"
and "2"), a function of the request alone, after a time-compressed, heavy-tailed latency:
lognormal with mean ``--mean-ms``, and a ``--tail`` share ``--tail-x`` times slower. Every
``--burst-every`` seconds, for one second, half the requests get HTTP 429 (Retry-After 0.2 s);
the last server hangs (answers nothing) for ``--hang-s`` seconds a few seconds in.

For each path (``conversation``: each tree on its own; ``lockstep``: one batch per role per
turn) it reports the time spent growing the trees (the stage's wall time less its last step,
the exports, which makes no calls; the MiniLM disclosure curves are skipped) against the ideal (answered calls x mean
served latency / slots, slots = servers x concurrency), i.e. the utilisation; the run's peak RSS; the bytes it
wrote; and with ``--kill``, a second run SIGKILLed at a random moment: the calls the server
answered that the rerun asked for again (lost), the seconds from the rerun's start to its first
new request (resume), and whether the resumed trees equal the uninterrupted run's.

Backoff and the pool's cool-down are compressed with the latencies (x 0.1); the client timeout
is 2 s. Writes the numbers to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the a to and of you it is that for on with as this be at your I can my we are have or not but "
    "what so if do about like more some would time just get make when how think good need know want "
    "people day work home help try maybe really one also new first way day week plan idea small step"
).split()


# --------------------------------------------------------------------------- the provider


def serve(args) -> None:
    """One fake provider (``--serve PORT``): answers as described above; logs "time key" per answer."""
    state = {"first": None, "answered": 0, "latency": 0.0, "r429": 0, "hung": 0}
    lock = threading.Lock()
    keys = open(args.keys_file, "a", buffering=1, encoding="utf-8")
    rng = random.Random()
    sigma = 0.6
    mu = math.log(args.mean_ms / 1000) - sigma**2 / 2  # lognormal with this mean

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # headers and body go out in two writes: with Nagle's algorithm on, the body waits for the
        # client's delayed ACK (about 40 ms a request on loopback), time no provider adds
        disable_nagle_algorithm = True

        def log_message(self, *a):
            pass

        def _send(self, code: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            for k, v in {
                "Content-Type": "application/json",
                "Content-Length": str(len(data)),
                **(headers or {}),
            }.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(200, {"data": [{"id": args.model}]} if self.path.endswith("/models") else dict(state))

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            now = time.time()
            with lock:
                state["first"] = state["first"] or now
                since = now - state["first"]
            if args.hang and args.hang_at <= since < args.hang_at + args.hang_s:
                with lock:
                    state["hung"] += 1
                time.sleep(args.hang_s)  # the client times out first
                return
            if since % args.burst_every < 1.0 and rng.random() < 0.5:
                with lock:
                    state["r429"] += 1
                return self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0.2"})
            delay = rng.lognormvariate(mu, sigma) * (args.tail_x if rng.random() < args.tail else 1.0)
            time.sleep(delay)
            key = hashlib.sha256(json.dumps([req["messages"], req.get("seed")], sort_keys=True).encode()).hexdigest()
            h = int(key[:12], 16)
            prompt = sum(len(str(m.get("content") or "")) for m in req["messages"]) // 4
            if req.get("logprobs"):
                p = 0.05 + 0.9 * (h % 1000) / 1000
                first, second = ("1", "2") if p >= 0.5 else ("2", "1")
                top = [{"token": "1", "logprob": math.log(p)}, {"token": "2", "logprob": math.log(1 - p)}]
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": first},
                    "finish_reason": "stop",
                    "logprobs": {
                        "content": [{"token": first, "logprob": max(t["logprob"] for t in top), "top_logprobs": top}]
                    },
                }
                n = 1
            else:
                cap = int(req.get("max_tokens") or 64)
                n = max(8, int(cap * (0.3 + 0.6 * ((h >> 8) % 1000) / 1000)))
                words = [WORDS[(h >> (i % 40)) % len(WORDS) if i % 7 else (h + i) % len(WORDS)] for i in range(n)]
                text = " ".join(words).capitalize() + "."
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            self._send(200, {"choices": [choice], "usage": {"prompt_tokens": prompt, "completion_tokens": n}})
            with lock:
                state["answered"] += 1
                state["latency"] += delay
            keys.write(f"{time.time():.3f} {key}\n")

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", args.serve), Handler)
    srv.daemon_threads = True
    srv.request_queue_size = 256
    srv.serve_forever()


# --------------------------------------------------------------------------- one trees run


def _pairs(root: Path, n: int, official: Path | None) -> None:
    """``n`` training personas: the official pool's where it is given, else the project's seeds
    made distinct per persona (a load test needs distinct prompts, not new people)."""
    from aloe.io import write_jsonl
    from aloe.records import load_seeds, make_pairs, pool_records, read_aloe_pool

    if official is not None:
        profiles = pool_records(read_aloe_pool(official / "profile.jsonl"), "profile", "imported", "train")
        personalities = pool_records(read_aloe_pool(official / "personality.jsonl"), "personality", "imported", "train")
    else:
        profiles = pool_records(load_seeds("profiles"), "profile", "seed", "train")
        personalities = pool_records(load_seeds("personalities"), "personality", "seed", "train")
    pairs = make_pairs(profiles, personalities, 10, 0, "train")
    out = []
    for i in range(n):
        p = dict(pairs[i % len(pairs)])
        if i >= len(pairs):
            p.update(id=f"{p['id']}-{i}", profile=f"{p['profile']} (User {i}.)", profile_id=f"{p['profile_id']}-{i}")
        out.append(p)
    write_jsonl(root / "b" / "personas" / "pairs.jsonl", out)


def client(args) -> None:
    """One trees run (``--client FOLDER``); prints its wall time, counts and peak RSS as JSON."""
    import resource

    import aloe.trees
    from aloe.config import load_experiment, stage_config
    from aloe.roles import open_roles

    root = Path(args.client)
    if not (root / "b" / "personas" / "pairs.jsonl").exists():
        _pairs(root, args.trees, Path(args.official) if args.official else None)
    settings = {
        k: v
        for k, v in load_experiment(REPO / "parameters" / "paper.yaml").raw_sections["trees"].items()
        if k not in ("n_personas", "turns")
    }
    backend = {
        "kind": "openai",
        "model": args.model,
        "base_url": args.urls.split(","),
        "max_concurrency": args.concurrency,
        "timeout_s": 2.0,
        "max_retries": 8,
        "top_logprobs": 20,
    }
    cfg = stage_config(
        "trees",
        experiment="b",
        data_root=str(root),
        cache_path=str(root / "cache.sqlite"),
        backend=backend,
        n_personas=args.trees,
        turns=args.turns,
        schedule=args.path,
        **settings,
    )
    roles = open_roles(cfg, aloe.trees.ROLES)
    for r in aloe.trees.roles_used(cfg):  # engines open on first use: open them now, to set them up
        roles[r]
    for e in roles.engines():  # the provider's time is compressed: so are the client's waits
        e.backoff_base_s, e.backoff_max_s = 0.05, 0.8
        e.pool.cool_down_s = 3.0
        e.pool._cool = {u: 3.0 for u in e.pool.urls}
    # the stage's last step (exports) does not talk to the servers: timed apart, so the utilisation
    # measures the part that does; its MiniLM disclosure curves (minutes on 2 cores) are left out
    aloe.trees.add_disclosure = lambda records, threshold: None
    finish, spent = aloe.trees._finish, {}

    def timed_finish(*a, **kw):
        t = time.time()
        try:
            return finish(*a, **kw)
        finally:
            spent["finish_s"] = time.time() - t

    aloe.trees._finish = timed_finish
    trace = _Trace(roles, aloe.trees) if args.trace else None
    started = time.time()
    counts = aloe.trees.run(cfg, roles, progress=False)
    wall = time.time() - started
    print(
        json.dumps(
            {
                "wall_s": round(wall, 2),
                "grow_s": round(wall - spent.get("finish_s", 0.0), 2),
                "finish_s": round(spent.get("finish_s", 0.0), 2),
                "nodes": counts["turns"],
                "failed_trees": counts["failed_trees"],
                "resumed_turns": counts["resumed_turns"],
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                **({"where_time_went": trace.summary(started, wall - spent.get("finish_s", 0.0))} if trace else {}),
            }
        )
    )


class _Trace:
    """Where a trees run's time goes (``--trace``): every HTTP attempt (its outcome), every call
    (retries and their waits included) and every tree turn, as (start, end) on one clock."""

    def __init__(self, roles, trees_module):
        self.attempts, self.calls, self.turns = [], [], []
        for e in {id(e): e for e in roles.engines()}.values():
            self._wrap_engine(e)
        turn_of_one = trees_module._turn_of_one

        def timed_turn(*a, **kw):
            t0 = time.time()
            try:
                return turn_of_one(*a, **kw)
            finally:
                self.turns.append((t0, time.time()))

        trees_module._turn_of_one = timed_turn

    def _wrap_engine(self, e) -> None:
        post, call = e.client.post, e._post

        def timed_post(*a, **kw):
            t0, out = time.time(), "error"
            try:
                r = post(*a, **kw)
                out = "ok" if r.status_code == 200 else f"http_{r.status_code}"
                return r
            except Exception as ex:
                out = type(ex).__name__
                raise
            finally:
                self.attempts.append((t0, time.time(), out))

        def timed_call(*a, **kw):
            t0 = time.time()
            try:
                return call(*a, **kw)
            finally:
                self.calls.append((t0, time.time()))

        e.client.post, e._post = timed_post, timed_call

    @staticmethod
    def _mean_in_flight(spans, t0: float, t1: float) -> float:
        return sum(max(0.0, min(b, t1) - max(a, t0)) for a, b, *_ in spans) / max(1e-9, t1 - t0)

    def summary(self, started: float, grow_s: float) -> dict:
        end = started + grow_s
        kinds = sorted({k for *_, k in self.attempts})
        buckets = []
        step = max(1.0, grow_s / 20)
        t = started
        while t < end:
            buckets.append(
                {
                    "from_s": round(t - started, 1),
                    "http": round(self._mean_in_flight(self.attempts, t, min(end, t + step)), 1),
                    "calls": round(self._mean_in_flight(self.calls, t, min(end, t + step)), 1),
                    "turns": round(self._mean_in_flight(self.turns, t, min(end, t + step)), 1),
                }
            )
            t += step
        return {
            "mean_http_in_flight": {
                k: round(self._mean_in_flight([x for x in self.attempts if x[2] == k], started, end), 2) for k in kinds
            },
            "attempts": {k: sum(1 for x in self.attempts if x[2] == k) for k in kinds},
            "mean_calls_in_progress": round(self._mean_in_flight(self.calls, started, end), 2),
            "mean_turns_in_progress": round(self._mean_in_flight(self.turns, started, end), 2),
            "timeline": buckets,
        }


# --------------------------------------------------------------------------- the orchestra


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Servers:
    def __init__(self, args, work: Path):
        self.procs, self.urls, self.keys = [], [], []
        for i in range(args.servers):
            port, keys = _free_port(), work / f"keys-{i}-{time.time_ns()}.log"
            argv = [
                sys.executable,
                __file__,
                "--serve",
                str(port),
                "--keys-file",
                str(keys),
                "--mean-ms",
                str(args.mean_ms),
                "--tail",
                str(args.tail),
                "--tail-x",
                str(args.tail_x),
                "--burst-every",
                str(args.burst_every),
                "--hang-at",
                str(args.hang_at),
                "--hang-s",
                str(args.hang_s),
                "--model",
                args.model,
            ] + (["--hang"] if i == args.servers - 1 and args.hang_s > 0 else [])
            self.procs.append(subprocess.Popen(argv))
            self.urls.append(f"http://127.0.0.1:{port}/v1")
            self.keys.append(keys)
        for u in self.urls:
            _wait_up(u)

    def stats(self) -> dict:
        import httpx

        got = [httpx.get(u.rsplit("/v1", 1)[0] + "/stats", timeout=5).json() for u in self.urls]
        return {k: sum(g[k] for g in got) for k in ("answered", "latency", "r429", "hung")}

    def answered(self) -> list[tuple[float, str]]:
        out = []
        for f in self.keys:
            if f.exists():
                for line in f.read_text().splitlines():
                    t, k = line.split()
                    out.append((float(t), k))
        return out

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
            p.wait(10)


def _wait_up(url: str) -> None:
    import httpx

    for _ in range(100):
        try:
            httpx.get(f"{url}/models", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"the stand-in provider at {url} did not start")


def _client_argv(args, folder: Path, urls: list[str], path: str) -> list[str]:
    return (
        [
            sys.executable,
            __file__,
            "--client",
            str(folder),
            "--urls",
            ",".join(urls),
            "--path",
            path,
            "--trees",
            str(args.trees),
            "--turns",
            str(args.turns),
            "--concurrency",
            str(args.concurrency),
            "--model",
            args.model,
        ]
        + (["--official", str(args.official)] if args.official else [])
        + (["--trace"] if args.trace else [])
    )


def _run_client(argv: list[str]) -> dict:
    r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(f"the trees run failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _view(folder: Path) -> list:
    from aloe.io import read_jsonl

    keep = ("turn", "user", "verdict", "preferred", "rejected", "followed_text")
    return sorted(
        (t["id"], [{k: n.get(k) for k in keep} for n in t["turns"]])
        for t in read_jsonl(folder / "b" / "trees" / "trees.jsonl")
    )


def bench_path(args, work: Path, path: str) -> dict:
    slots = args.servers * args.concurrency
    servers = Servers(args, work)
    try:
        whole = work / f"{path}-whole"
        res = _run_client(_client_argv(args, whole, servers.urls, path))
        st = servers.stats()
    finally:
        servers.close()
    mean = st["latency"] / max(1, st["answered"])
    ideal = st["answered"] * mean / slots
    out = {
        "path": path,
        **res,
        "calls": st["answered"],
        "http_429": st["r429"],
        "hung_requests": st["hung"],
        "mean_latency_ms": round(mean * 1000, 1),
        "ideal_s": round(ideal, 2),
        "utilisation": round(ideal / res["grow_s"], 3),
        "bytes_written": _bytes(whole),
    }
    if args.kill:
        out.update(kill_and_resume(args, work, path, st["answered"], whole))
    return out


def kill_and_resume(args, work: Path, path: str, calls: int, whole: Path) -> dict:
    """The same run, SIGKILLed once the providers have answered a random share (20-70 %) of the
    uninterrupted run's calls, then rerun to the end."""
    servers = Servers(args, work)
    try:
        folder = work / f"{path}-killed"
        proc = subprocess.Popen(
            _client_argv(args, folder, servers.urls, path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
        )
        share = random.Random(args.seed).uniform(0.2, 0.7)
        started = time.time()
        while len(servers.answered()) < share * calls and proc.poll() is None:
            time.sleep(0.02)
        at = time.time() - started
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = {k for _, k in servers.answered()}
        restart = time.time()
        res = _run_client(_client_argv(args, folder, servers.urls, path))
        after = [(t, k) for t, k in servers.answered() if t >= restart]
        again = {k for _, k in after} & before
        fresh = [t for t, k in after if k not in before]
        return {
            "killed_at_s": round(at, 1),
            "killed_at_share": round(share, 2),
            "answered_before_kill": len(before),
            "lost_calls": len(again),
            "resume_s": round(min(fresh) - restart, 2) if fresh else None,
            "rerun_wall_s": res["wall_s"],
            "resumed_turns": res["resumed_turns"],
            "resumed_equals_uninterrupted": _view(folder) == _view(whole),
        }
    finally:
        servers.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", type=int, default=600)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16, help="in flight per server (paper.yaml: 16)")
    ap.add_argument("--mean-ms", type=float, default=40.0)
    ap.add_argument("--tail", type=float, default=0.01)
    ap.add_argument("--tail-x", type=float, default=20.0)
    ap.add_argument("--burst-every", type=float, default=20.0, help="seconds between one-second 429 bursts")
    ap.add_argument("--hang-at", type=float, default=5.0)
    ap.add_argument("--hang-s", type=float, default=8.0, help="how long the last server hangs (0: never)")
    ap.add_argument("--paths", default="conversation,lockstep")
    ap.add_argument("--kill", action="store_true", help="also SIGKILL a run at a random moment and resume it")
    ap.add_argument("--trace", action="store_true", help="report where the time went (HTTP in flight, calls, turns)")
    ap.add_argument(
        "--official",
        default=None,
        help="the official pools' folder (default: ../shared/aloe-official where it exists, else this project's seeds)",
    )
    ap.add_argument("--model", default="gpt-4o-mini-2024-07-18")
    ap.add_argument("--seed", type=int, default=0, help="seeds the moment of the kill")
    ap.add_argument("--out", default="data/bench/bench_scale.json")
    # the roles this script plays for itself
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--keys-file", help=argparse.SUPPRESS)
    ap.add_argument("--hang", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--urls", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args)
    if args.client:
        return client(args)
    if args.official is None and (REPO.parent / "shared" / "aloe-official" / "profile.jsonl").exists():
        args.official = str(REPO.parent / "shared" / "aloe-official")
    work = Path(tempfile.mkdtemp(prefix="bench_scale-"))
    try:
        results = [bench_path(args, work, p) for p in args.paths.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "args": {k: v for k, v in vars(args).items() if v is not None and k not in ("serve", "client")},
        "machine": {"cpus": os.cpu_count()},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
