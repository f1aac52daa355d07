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
    assert "balcaprl/rewards/__init__.py" in names  # the top-level rewards/ folder ships as balcaprl.rewards
    assert "balcaprl/py.typed" in names
    assert "balcaprl/rewards/prompts/precision_v1.txt" in names  # package data: the judge prompts
    assert not any(name.startswith(("rewards/", "tests/")) for name in names)

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
        "from balcaprl.evaluate import evaluate_captions, main; print(evaluate_captions.__module__)"
    )
    output = run([python, "-c", probe], cwd=tmp_path).stdout.split()
    assert output == ["0.1.0", "BalCapGRPOTrainer", "balcaprl.rewards", "True", "True", "balcaprl.evaluate.harness"]
    usage = run([python, "-m", "balcaprl.evaluate", "score", "--help"], cwd=tmp_path).stdout
    assert "--annotations" in usage
    # Installed from the wheel, not from the source tree, and no stray top-level `rewards` package.
    location = run([python, "-c", "import balcaprl; print(balcaprl.__file__)"], cwd=tmp_path).stdout
    assert str(tmp_path / "venv") in location
    missing = subprocess.run([python, "-c", "import rewards"], cwd=tmp_path, capture_output=True, text=True)
    assert missing.returncode != 0
