"""Which checkpoint a run resumes from: complete ones only, the newest first; half-written ones named and skipped."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from balcaprl.checkpoints import checkpoint_problem, newest_complete_checkpoint
from balcaprl.runtime import RecipeError, last_checkpoint


def write_checkpoint(folder: Path, step: int, weights: str = "model.safetensors") -> Path:
    """A checkpoint as transformers' Trainer leaves it: weights first, trainer_state.json last."""
    folder.mkdir(parents=True)
    save_file({"layer.weight": torch.randn(16, 8), "layer.bias": torch.randn(16)}, str(folder / weights))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return folder


def test_a_complete_checkpoint_has_no_problem(tmp_path):
    assert checkpoint_problem(write_checkpoint(tmp_path / "checkpoint-2", 2)) is None
    assert checkpoint_problem(write_checkpoint(tmp_path / "checkpoint-4", 4, "adapter_model.safetensors")) is None


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda folder: (folder / "trainer_state.json").unlink(), "no trainer_state.json"),
        (lambda folder: (folder / "trainer_state.json").write_text('{"global_step": 4, "log_hi'), "truncated or not"),
        (lambda folder: (folder / "trainer_state.json").write_text('{"log_history": []}'), "names no global_step"),
        (lambda folder: truncate(folder / "model.safetensors", 10), "model.safetensors is truncated"),
        (lambda folder: truncate(folder / "model.safetensors", 4), "model.safetensors is truncated (4 bytes)"),
        (lambda folder: (folder / "model.safetensors").unlink(), "no model weights"),
    ],
    ids=["no-state", "truncated-state", "state-without-step", "truncated-weights", "torn-header", "no-weights"],
)
def test_each_kind_of_half_written_checkpoint_is_named(tmp_path, damage, problem):
    folder = write_checkpoint(tmp_path / "checkpoint-4", 4)
    damage(folder)
    assert problem in checkpoint_problem(folder)


def truncate(path: Path, keep_or_cut: int) -> None:
    """Cut ``keep_or_cut`` bytes from the end, or keep only that many when the number is below 8 (a torn header)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep_or_cut] if keep_or_cut < 8 else data[:-keep_or_cut])


def test_sharded_and_deepspeed_checkpoints(tmp_path):
    sharded = tmp_path / "checkpoint-2"
    sharded.mkdir()
    save_file({"a": torch.zeros(4)}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(4)}, str(sharded / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "trainer_state.json").write_text('{"global_step": 2}')
    assert checkpoint_problem(sharded) is None
    (sharded / "model-00002-of-00002.safetensors").unlink()
    missing = "model-00002-of-00002.safetensors, listed in model.safetensors.index.json, is missing"
    assert missing in checkpoint_problem(sharded)

    deepspeed = tmp_path / "checkpoint-6"
    (deepspeed / "global_step6").mkdir(parents=True)
    (deepspeed / "latest").write_text("global_step6")
    (deepspeed / "trainer_state.json").write_text('{"global_step": 6}')
    assert checkpoint_problem(deepspeed) is None
    (deepspeed / "global_step6").rmdir()
    assert "no model weights" in checkpoint_problem(deepspeed)


def test_the_newest_complete_checkpoint_wins_by_step_number(tmp_path):
    write_checkpoint(tmp_path / "checkpoint-2", 2)
    write_checkpoint(tmp_path / "checkpoint-4", 4)
    (write_checkpoint(tmp_path / "checkpoint-10", 10) / "trainer_state.json").unlink()  # 10 > 4, though "10" < "4"
    (tmp_path / "checkpoint-notes").mkdir()  # not a checkpoint
    checkpoint, skipped = newest_complete_checkpoint(tmp_path)
    assert checkpoint == tmp_path / "checkpoint-4"
    assert skipped == [(tmp_path / "checkpoint-10", "no trainer_state.json (the save did not finish)")]
    assert newest_complete_checkpoint(tmp_path / "absent") == (None, [])


def test_resume_skips_a_half_written_checkpoint_with_a_warning(tmp_path, caplog):
    write_checkpoint(tmp_path / "checkpoint-2", 2)
    (write_checkpoint(tmp_path / "checkpoint-4", 4) / "trainer_state.json").unlink()
    args = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=None)
    with caplog.at_level(logging.WARNING, logger="balcaprl"):
        assert last_checkpoint(args) == str(tmp_path / "checkpoint-2")
    assert f"Not resuming from {tmp_path / 'checkpoint-4'}: no trainer_state.json" in caplog.text


def test_an_explicit_half_written_checkpoint_is_a_recipe_error(tmp_path):
    folder = write_checkpoint(tmp_path / "checkpoint-4", 4)
    for value in (str(folder), "true"):
        assert last_checkpoint(SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=value)) == str(folder)
    (folder / "trainer_state.json").write_text("{")
    with pytest.raises(RecipeError, match=r"resume_from_checkpoint .*checkpoint-4: trainer_state.json is truncated"):
        last_checkpoint(SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint=str(folder)))


def test_run_identity_names_what_differs(tmp_path):
    from balcaprl.checkpoints import identity_differences, run_identity, write_run_identity

    model = SimpleNamespace(model_name_or_path="Qwen/Qwen2.5-VL-7B-Instruct", use_peft=True, lora_r=64, lora_alpha=128)
    rewards = SimpleNamespace(reward_funcs=["precision", {"name": "recall", "weight": 2.0}])
    identity = run_identity("train", model, rewards, SimpleNamespace(advantage_estimator="c_gdpo", seed=1))
    assert identity == {
        "stage": "train",
        "model_name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct",
        "use_peft": True,
        "lora_r": 64,
        "lora_alpha": 128,
        "reward_funcs": ["precision", {"name": "recall", "weight": 2.0}],
        "advantage_estimator": "c_gdpo",
    }  # the seed, learning rate and the like are not part of it: a resume may change them
    assert identity_differences(tmp_path, identity) == []  # nothing stored yet
    write_run_identity(tmp_path, identity)
    assert identity_differences(tmp_path, identity) == []
    changed = {**identity, "lora_r": 16, "stage": "sft"}
    assert identity_differences(tmp_path, changed) == ["lora_r: 64 -> 16", "stage: 'train' -> 'sft'"]
