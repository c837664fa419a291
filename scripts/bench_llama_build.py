"""Time building llama.cpp's server (llama-cpp-python, the test suite's loopback server) from its
source, as `make setup-test` does, with and without the multimodal library the Makefile leaves out.

Each build runs `pip wheel --no-cache-dir` on the same source archive, one after the other, so the
two times are measured side by side. Run it on an idle machine; it takes about 15 minutes on 2 cores.

    .venv/bin/python scripts/bench_llama_build.py [--sdist llama_cpp_python-0.3.36.tar.gz]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
MODES = {"without multimodal (the Makefile's)": "-DLLAVA_BUILD=OFF", "pip's default": ""}


def pinned() -> str:
    """The llama-cpp-python pin of pyproject.toml's ``server`` extra, e.g. ``llama-cpp-python==0.3.36``."""
    extra = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["server"]
    return next(r for r in extra if r.startswith("llama-cpp-python")).replace("[server]", "")


def fetch_sdist(work: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", pinned(), "--no-deps", "--no-binary", ":all:"]
        + ["-q", "-d", str(work)],
        check=True,
    )
    return next(work.glob("llama_cpp_python-*.tar.gz"))


def build(sdist: Path, out: Path, cmake_args: str) -> tuple[float, list[str]]:
    env = dict(os.environ, CMAKE_ARGS=cmake_args)
    start = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", str(out), str(sdist)],
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"bench_llama_build: the build with CMAKE_ARGS={cmake_args!r} failed:\n{r.stderr[-2000:]}")
    wheel = next(out.glob("*.whl"))
    libs = sorted({Path(n).name.split(".so")[0] for n in zipfile.ZipFile(wheel).namelist() if ".so" in n})
    return seconds, libs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sdist",
        type=Path,
        help="the source archive of pyproject.toml's llama-cpp-python pin (fetched with pip if absent)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-llama-build-") as tmp:
        work = Path(tmp)
        sdist = args.sdist or fetch_sdist(work)
        for i, (name, cmake_args) in enumerate(MODES.items()):
            seconds, libs = build(sdist, work / f"out{i}", cmake_args)
            print(f"{name}: {seconds:.0f} s, CMAKE_ARGS={cmake_args!r}, libraries: {', '.join(libs)}", flush=True)


if __name__ == "__main__":
    main()
