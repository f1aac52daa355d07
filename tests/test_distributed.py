"""Two processes on CPU (gloo) through `accelerate launch`: both see the same advantages for the same batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def accelerate_launch(args, output_dir, timeout=600):
    # `--cpu --num_processes 2` silently starts ONE process; --multi_gpu with use_cpu=True gives two gloo processes.
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        *args,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=output_dir, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["c_gdpo", "scst"])
def test_two_processes_share_the_same_advantages(tiny_models, tmp_path, estimator):
    script = REPO / "tests" / "scripts" / "two_process_train.py"
    accelerate_launch([str(script), str(tiny_models["qwen2_5_vl"]), str(tmp_path), estimator], tmp_path)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 3
    for step0, step1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        # The gathered reward matrix and the advantages computed from it are identical on both processes ...
        assert step0["rewards"] == step1["rewards"]
        assert step0["full"] == step1["full"]
        assert len(step0["full"]) == 12  # 3 prompts x G=4 over the global batch
        # ... and each process kept its own half, in order.
        torch.testing.assert_close(torch.tensor(step0["local"] + step1["local"]), torch.tensor(step0["full"]))
        if estimator == "scst":
            # Each process decodes the greedy caption of the prompts it holds; the straddling prompt's baseline
            # must agree across the two, i.e. be constant inside every group.
            baseline = torch.tensor(step0["baseline"]).view(3, 4, -1)
            assert (baseline == baseline[:, :1]).all()
    # The logged metrics come from gathered tensors, so both processes report the same values.
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert all("length/masked_frac" in step for step in ranks[0]["metrics"])


def test_end_process_group_destroys_the_default_group(tmp_path):
    """What every launched entry point calls last: the gloo group is gone afterwards, and a second call is harmless."""
    code = f"""
import torch.distributed as dist
from balcaprl.train import end_process_group
end_process_group()  # no group yet: nothing to do
dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
assert dist.is_initialized()
end_process_group()
assert not dist.is_initialized()
end_process_group()
print("destroyed")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "destroyed"
