"""Used as a dependency: a wheel built from the repo installs into a clean virtualenv and imports there."""

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_wheel_installs_and_imports_in_a_clean_virtualenv(tmp_path):
    build = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(tmp_path / "dist"), str(REPO)])
    assert "absent from the `packages` configuration" not in build.stdout + build.stderr  # setuptools' warning
    (wheel,) = (tmp_path / "dist").glob("balcaprl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"balcaprl/evaluate/__init__.py", "balcaprl/evaluate/__main__.py", "balcaprl/text.py"} <= set(names)
    # every subpackage of the layered library is in the wheel
    for package in ("data", "experiments", "judge", "models", "preflight", "trainer", "world"):
        assert f"balcaprl/{package}/__init__.py" in names, package
    assert "balcaprl/rewards/__init__.py" in names  # the top-level rewards/ folder ships as balcaprl.rewards
    assert "balcaprl/py.typed" in names
    assert "balcaprl/rewards/prompts/precision_v1.txt" in names  # package data: the judge prompts
    assert not any(name.startswith(("rewards/", "tests/", "benchmarks/", "balcaprl/bench")) for name in names)
    # test tooling stays out: loopback judge servers, the vLLM stand-in, launch scripts, fixtures
    tooling = ("testing_server", "loopback", "judge_servers", "standin", "fixtures")
    assert not any(word in name for name in names for word in tooling)
    assert not any(name.startswith("vllm") for name in names)

    venv.create(tmp_path / "venv", with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    # The CPU torch first, so that resolving the wheel's `torch` requirement installs nothing more.
    run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "torch==2.13.0"])
    run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)])
    probe = (
        "import importlib.resources, balcaprl, balcaprl.rewards, balcaprl.trainer;"
        "print(balcaprl.__version__, balcaprl.BalCapGRPOTrainer.__name__, balcaprl.rewards.__name__);"
        "print(importlib.resources.files('balcaprl').joinpath('py.typed').is_file());"
        "from balcaprl.rewards.judged import load_prompt; print('JSON' in load_prompt('recall_verify'));"
        "from balcaprl.evaluate import evaluate_captions, main; print(evaluate_captions.__module__);"
        "from balcaprl import BalCapConfig, BalCapGRPOTrainer, compute_advantages, length_conditional_mask;"
        "from balcaprl.rewards import get_reward_funcs; print(get_reward_funcs(['length_penalty'])[0].__name__)"
    )
    output = run([python, "-c", probe], cwd=tmp_path).stdout.split()
    assert output == [
        "0.1.0", "BalCapGRPOTrainer", "balcaprl.rewards", "True", "True", "balcaprl.evaluate.harness", "length_penalty"
    ]  # fmt: skip
    # the console script's verbs and the `python -m` entry points
    verbs = run([str(tmp_path / "venv" / "bin" / "balcaprl"), "--help"], cwd=tmp_path).stdout
    assert all(verb in verbs for verb in ("sft", "train", "preflight", "evaluate", "merge", "demo", "reproduce"))
    entry_points = {"train": "--advantage_estimator", "sft": "--sft_references", "preflight": "--accelerate-config"}
    for module, option in entry_points.items():
        assert option in run([python, "-m", f"balcaprl.{module}", "--help"], cwd=tmp_path).stdout, module
    usage = run([python, "-m", "balcaprl.evaluate", "score", "--help"], cwd=tmp_path).stdout
    assert "--annotations" in usage
    # Installed from the wheel, not from the source tree, and no stray top-level `rewards` package.
    location = run([python, "-c", "import balcaprl; print(balcaprl.__file__)"], cwd=tmp_path).stdout
    assert str(tmp_path / "venv") in location
    missing = subprocess.run([python, "-c", "import rewards"], cwd=tmp_path, capture_output=True, text=True)
    assert missing.returncode != 0


# ---------------------------------------------------------------------------------------------------------------
# The `vllm` extra: a version set TRL supports, and one that resolves together with everything else.
# ---------------------------------------------------------------------------------------------------------------


def optional_dependencies() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def requirement(requirements: list[str], name: str):
    from packaging.requirements import Requirement

    (found,) = [Requirement(r) for r in requirements if Requirement(r).name == name]
    return found


def test_vllm_extra_is_a_set_trl_supports_and_the_torchvision_venv_tests():
    import importlib.metadata
    import re

    from packaging.requirements import Requirement

    extras = optional_dependencies()
    vllm = requirement(extras["vllm"], "vllm")
    (pinned,) = [spec.version for spec in vllm.specifier if spec.operator == "=="]
    trl_vllm = [Requirement(r) for r in importlib.metadata.requires("trl") if r.startswith("vllm")]
    assert trl_vllm and pinned in trl_vllm[0].specifier, f"TRL supports vllm{trl_vllm[0].specifier}, not {pinned}"
    # the transformers the torchvision virtualenv tests with is allowed by the base range and by the vllm extra
    tested = re.search(r"^TV_PINS \?= transformers==(\S+)", (REPO / "Makefile").read_text(), re.M).group(1)
    tomllib = pytest.importorskip("tomllib")
    base = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert tested in requirement(base, "transformers").specifier
    assert tested in requirement(extras["vllm"], "transformers").specifier


def registry_reachable() -> bool:
    import socket

    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        return False
    return True


@pytest.mark.slow
def test_gpu_extra_resolves_from_registry_metadata_alone(tmp_path):
    # pip resolves balcaprl[gpu] (vLLM, DeepSpeed, TensorBoard with the base requirements) without installing it.
    # `fast-deps` reads each wheel's metadata with HTTP range requests: the registry serves no separate metadata
    # files for vLLM, and a plain dry run would download every multi-GB GPU wheel it considers.
    if not registry_reachable():
        pytest.skip("the package registry (pypi.org) is not reachable: the resolution cannot be checked offline")
    import importlib.metadata
    import json

    from packaging.requirements import Requirement

    report = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--use-feature=fast-deps",
        "--disable-pip-version-check", "--report", str(report), "-v", f"{REPO}[gpu]",
    ]  # fmt: skip
    result = run(command, timeout=900)
    resolved = {
        item["metadata"]["name"].lower(): item["metadata"] for item in json.loads(report.read_text())["install"]
    }
    extras = optional_dependencies()
    assert resolved["vllm"]["version"] in requirement(extras["vllm"], "vllm").specifier
    assert resolved["transformers"]["version"] in requirement(extras["vllm"], "transformers").specifier
    trl_vllm = [Requirement(r) for r in importlib.metadata.requires("trl") if r.startswith("vllm")][0]
    assert resolved["vllm"]["version"] in trl_vllm.specifier
    assert resolved["trl"]["version"].startswith("1.16")
    for name in ("deepspeed", "tensorboard", "torch", "torchvision"):
        assert name in resolved, f"{name} is not part of the resolved gpu set"
    # vLLM's own pins hold in the resolution (pip enforces them; this guards against a silently different set)
    for line in resolved["vllm"].get("requires_dist", []):
        pin = Requirement(line)
        if pin.marker is None and pin.name in ("torch", "torchvision", "transformers"):
            assert resolved[pin.name]["version"] in pin.specifier, (pin, resolved[pin.name]["version"])
    # and no GPU wheel was downloaded to find this out
    downloads = [line for line in result.stdout.splitlines() if "Downloading" in line and " MB)" in line]
    assert not [line for line in downloads if float(line.rsplit("(", 1)[1].split()[0]) > 20], downloads
