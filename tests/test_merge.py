"""`balcaprl merge`: a LoRA adapter folder becomes a full checkpoint equal to base + merged adapter."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText

from balcaprl.cli import main as balcaprl
from balcaprl.generation import load_for_generation
from balcaprl.models import LANGUAGE_MODEL_LORA_TARGETS, load_model, load_processor, model_family


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
    # the environment variable overrides it for every command (evaluate, generation, train, the demo)
    monkeypatch.setenv("BALCAPRL_ADAPTER_BASE", base)
    assert model_family(str(tmp_path / "adapter")) == "qwen2_5_vl"
