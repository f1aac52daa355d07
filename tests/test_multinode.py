"""More than one node, on this machine: two `accelerate launch` "nodes" of one CPU process each on loopback
(`--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1`) with the repo's 2-node DDP config; and the SLURM
launcher's commands (one `accelerate launch` per node, rendezvous from the allocation, judge URL and vLLM server)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.judge_servers import free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "two_node_train.py"
SLURM = REPO / "recipes" / "slurm" / "train.slurm"


def launch_two_nodes(model: Path, output_dir: Path, max_steps: int, tag: str, config: str = "ddp_2nodes.yaml") -> list:
    """Both nodes' `accelerate launch` with the repo's 2-node ``config``, concurrently; returns each node's record."""
    # CPU: use_cpu=True in the trainer config -> gloo; a DeepSpeed config takes its precision from its JSON
    precision = [] if config.startswith("zero") else ["--mixed_precision", "no"]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    processes = []
    for rank in (0, 1):
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(REPO / "recipes" / "accelerate" / config),
            "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            *precision, "--dynamo_backend", "no",
            str(SCRIPT), str(model), str(output_dir), str(max_steps), tag,
        ]  # fmt: skip
        processes.append(
            subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"node {rank}:\n{output[-5000:]}"
    return [json.loads((output_dir / f"node{rank}-{tag}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_two_nodes_on_loopback_train_checkpoint_and_resume(tiny_models, tmp_path):
    nodes = launch_two_nodes(tiny_models["qwen2_5_vl"], tmp_path, max_steps=2, tag="first")
    assert [node["world_size"] for node in nodes] == [2, 2]
    assert [node["resumed_from"] for node in nodes] == [None, None]
    for record in nodes:
        assert len(record["steps"]) == 2
    for step0, step1 in zip(nodes[0]["steps"], nodes[1]["steps"]):
        # the same gathered rewards give the same advantages on both nodes; each node keeps its own half
        assert step0["full"] == step1["full"] and len(step0["full"]) == 12
        torch.testing.assert_close(torch.tensor(step0["local"] + step1["local"]), torch.tensor(step0["full"]))
    # one checkpoint, written by the main process (one adapter file, one trainer state), with both nodes' RNG states
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    checkpoint = tmp_path / "checkpoint-2"
    assert (
        len(list(checkpoint.glob("adapter_model.safetensors"))) == 1 and (checkpoint / "trainer_state.json").is_file()
    )
    assert sorted(p.name for p in checkpoint.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]

    # resume: both nodes start from checkpoint-2 and run to step 4
    resumed = launch_two_nodes(tiny_models["qwen2_5_vl"], tmp_path, max_steps=4, tag="resumed")
    assert [node["resumed_from"] for node in resumed] == [str(checkpoint)] * 2
    assert [node["global_step"] for node in resumed] == [4, 4]
    assert len(resumed[0]["steps"]) == 2 and resumed[0]["steps"][0]["full"] == resumed[1]["steps"][0]["full"]
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert [log["step"] for log in state["log_history"] if "loss" in log] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------------------
# The SLURM launcher: its commands, with srun / scontrol replaced by recorders (there is no SLURM here)
# ---------------------------------------------------------------------------------------------------------------

RECORDER = """#!/bin/bash
echo "$(basename "$0") $*" >> "$RECORD"
"""
# srun runs its command once per task, with SLURM_PROCID set, as SLURM does (sequentially here)
SRUN = """#!/bin/bash
tasks=1
while [[ $1 == --* ]]; do
    case $1 in --ntasks=*) tasks=${1#--ntasks=} ;; esac
    echo "srun-option $1" >> "$RECORD"; shift
done
for ((i = 0; i < tasks; i++)); do SLURM_PROCID=$i "$@"; done
"""


def run_slurm_script(tmp_path: Path, nodes: list[str], *args: str) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("accelerate", "balcaprl", "trl"):
        (bin_dir / name).write_text(RECORDER)
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/bash\n" + "".join(f"echo {node}\n" for node in nodes))
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    record = tmp_path / "record.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RECORD": str(record), "SLURM_JOB_NODELIST": "ignored", "SLURM_GPUS_ON_NODE": "8"}  # fmt: skip
    result = subprocess.run(["bash", str(SLURM), *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [line for line in record.read_text().splitlines() if not line.startswith("srun-option")]


def test_slurm_launcher_one_accelerate_launch_per_node_with_the_judge_url(tmp_path):
    recipe = "recipes/qwen2_5_vl_7b/balcaprl.yaml"
    commands = run_slurm_script(tmp_path, ["gpu-a", "gpu-b"], recipe, "recipes/accelerate/zero3_2nodes.yaml",
                                "--judge-url", "http://judge:8000/v1", "--", "--learning_rate", "2e-6")  # fmt: skip
    preflight, *launches = commands
    assert preflight.startswith(
        f"balcaprl preflight {recipe} --accelerate-config recipes/accelerate/zero3_2nodes.yaml"
    )
    assert "--gpus 16 --judge_base_url http://judge:8000/v1 --learning_rate 2e-6" in preflight
    assert len(launches) == 2  # one per node
    for rank, launch in enumerate(launches):
        assert launch == (
            "accelerate launch --config_file recipes/accelerate/zero3_2nodes.yaml --num_machines 2 --num_processes 16 "
            f"--main_process_ip gpu-a --main_process_port 29500 --machine_rank {rank} -m balcaprl.train --config "
            f"{recipe} --judge_base_url http://judge:8000/v1 --learning_rate 2e-6"
        )


def test_slurm_launcher_vllm_server_on_the_last_node(tmp_path):
    recipe = "recipes/qwen2_5_vl_7b/grpo_cider.yaml"
    commands = run_slurm_script(tmp_path, ["n1", "n2", "n3"], recipe, "recipes/accelerate/zero3_2nodes.yaml",
                                "--vllm-server")  # fmt: skip
    # the server starts in the background: its line may come before or after the launches'
    [server] = [c for c in commands if c.startswith("trl ")]
    [preflight] = [c for c in commands if c.startswith("balcaprl ")]
    launches = [c for c in commands if c.startswith("accelerate ")]
    config = yaml.safe_load((REPO / recipe).read_text())
    assert server == (
        f"trl vllm-serve --model {config['model_name_or_path']} --data_parallel_size 8 --port 8000 "
        f"--max_model_len {config['vllm_max_model_length']}"
    )
    assert len(launches) == 2 and all(
        "--num_machines 2 --num_processes 16 --main_process_ip n1" in c for c in launches
    )
    for launch in [preflight, *launches]:
        assert launch.endswith("--vllm_mode server --vllm_server_host n3 --vllm_server_port 8000")
