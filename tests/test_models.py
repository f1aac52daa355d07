"""Model-folder helpers: LoRA adapter folders are read through their base checkpoint."""

import json

import pytest

from balcaprl.models.paths import adapter_base, model_family


def test_an_adapter_folder_has_its_base_family(tiny_models, tmp_path, monkeypatch):
    monkeypatch.delenv("BALCAPRL_ADAPTER_BASE", raising=False)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_models["llava"])}))
    assert adapter_base(str(tmp_path)) == str(tiny_models["llava"])
    assert model_family(str(tmp_path)) == "llava"  # was: "Unrecognized model ... model_type" for an adapter folder
    assert adapter_base(str(tiny_models["llava"])) is None  # a full checkpoint


def test_an_adapter_whose_base_is_not_here_says_which_file_names_it(tmp_path, monkeypatch):
    monkeypatch.delenv("BALCAPRL_ADAPTER_BASE", raising=False)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/elsewhere/runs/sft"}))
    with pytest.raises(
        ValueError, match=r"adapter_config.json names the base model '/elsewhere/runs/sft'.*BALCAPRL_ADAPTER_BASE"
    ):
        model_family(str(tmp_path))
