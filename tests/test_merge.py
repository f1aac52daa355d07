"""`balcaprl merge`: a LoRA adapter folder becomes a full checkpoint equal to base + merged adapter."""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText

from balcaprl.cli import main as balcaprl
from balcaprl.generation import load_for_generation
from balcaprl.models.loading import LANGUAGE_MODEL_LORA_TARGETS, load_model
from balcaprl.models.paths import model_family
from balcaprl.models.processors import load_processor

REPO = Path(__file__).resolve().parents[1]


def save_random_adapter(base: str, folder) -> torch.nn.Module:
    """A LoRA adapter with non-zero weights (PEFT's default starts lora_B at zero, which would merge to the base)."""
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_MODEL_LORA_TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_merge_writes_base_plus_adapter(tiny_models, tmp_path, family, capsys):
    base = str(tiny_models[family])
    peft_model = save_random_adapter(base, tmp_path / "adapter")
    balcaprl(["merge", str(tmp_path / "adapter"), "--output-dir", str(tmp_path / "merged")])
    assert "Merged checkpoint written to" in capsys.readouterr().out

    merged_dir = tmp_path / "merged"
    assert not (merged_dir / "adapter_config.json").exists(), "the merged folder must load as a plain checkpoint"
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    input_ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    torch.testing.assert_close(logits(merged, input_ids), logits(peft_model, input_ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(
        logits(merged, input_ids), logits(AutoModelForImageTextToText.from_pretrained(base), input_ids)
    )
    assert model_family(str(merged_dir)) == family and load_processor(str(merged_dir)) is not None

    # every command that takes a model accepts the adapter folder itself: the same weights, merged on load
    for model in (load_model(str(tmp_path / "adapter")), load_for_generation(tmp_path / "adapter")[0]):
        torch.testing.assert_close(logits(model.eval(), input_ids), logits(merged, input_ids))


def test_merge_of_an_adapter_whose_base_is_elsewhere(tiny_models, tmp_path, monkeypatch):
    base = str(tiny_models["qwen2_5_vl"])
    save_random_adapter(base, tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": "/other/machine/runs/sft"}))

    with pytest.raises(SystemExit, match=r"'/other/machine/runs/sft'.*BALCAPRL_ADAPTER_BASE.*--base-model"):
        balcaprl(["merge", str(tmp_path / "adapter"), "--output-dir", str(tmp_path / "out")])
    balcaprl(["merge", str(tmp_path / "adapter"), "--output-dir", str(tmp_path / "out"), "--base-model", base])
    assert (tmp_path / "out" / "config.json").is_file()
    # `balcaprl evaluate --base-model` on the adapter folder writes its report
    from balcaprl.evaluate import main as evaluate
    from balcaprl.world.splits import make_split, write_jsonl

    monkeypatch.delenv("BALCAPRL_ADAPTER_BASE", raising=False)
    data = write_jsonl(make_split("test", 2, seed=0), tmp_path / "data")
    arguments = [
        "--model", str(tmp_path / "adapter"), "--data", str(data), "--output-dir", str(tmp_path / "ev"),
        "--exact-world-judges", "--no-classic", "--no-plots", "--max-new-tokens", "4", "--no-progress",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="BALCAPRL_ADAPTER_BASE"):
        evaluate(arguments)
    assert evaluate([*arguments, "--base-model", base]) == 0
    assert list((tmp_path / "ev").glob("report*"))
    # the environment variable overrides it for every command (evaluate, generation, train, the demo)
    monkeypatch.setenv("BALCAPRL_ADAPTER_BASE", base)
    assert model_family(str(tmp_path / "adapter")) == "qwen2_5_vl"


def test_rl_starts_from_an_adapter_folder(tiny_models, tmp_path):
    # `balcaprl train` chained from a LoRA RL output (an adapter folder, no config.json): the adapter is merged into
    # its base on load and a new adapter trains on top.
    from balcaprl.train import main as train
    from balcaprl.world.splits import make_split, write_jsonl

    base = str(tiny_models["qwen2_5_vl"])
    save_random_adapter(base, tmp_path / "adapter")
    load_processor(base).save_pretrained(tmp_path / "adapter")  # as an RL output folder holds its processor
    write_jsonl(make_split("train", 4, seed=0), tmp_path / "data")
    trainer = train(
        ["--config", str(REPO / "recipes/demo/qwen2_5_vl_balcaprl.yaml"),
         "--model_name_or_path", str(tmp_path / "adapter"),
         "--dataset", str(tmp_path / "data" / "data.jsonl"), "--output_dir", str(tmp_path / "rl"), "--max_steps", "1",
         "--per_device_train_batch_size", "4", "--max_completion_length", "4"]
    )  # fmt: skip
    merged = load_model(str(tmp_path / "adapter")).state_dict()
    base_weights = {
        key.removeprefix("base_model.model.").replace(".base_layer.", "."): value
        for key, value in trainer.model.state_dict().items()
        if "lora_" not in key
    }
    changed_by_adapter = [key for key, value in merged.items() if not torch.equal(value, base_weights[key])]
    assert changed_by_adapter == [], "the RL policy's base is not the adapter folder merged into its base"
    assert (tmp_path / "rl" / "adapter_config.json").is_file()
