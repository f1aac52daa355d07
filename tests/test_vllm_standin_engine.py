"""The vLLM stand-in's fidelity where our code depends on vLLM's rules: weight names (``load_weights`` renames as
vLLM 0.31's ``hf_to_vllm_mapper``), the ``max_model_len`` limit, and the processor image tokens are counted with."""

from __future__ import annotations

import pytest
import torch

from balcaprl.models.processors import load_processor
from tests import test_vllm_path
from tests.test_vllm_path import _prompts_with_images

vllm_standin = test_vllm_path.vllm_standin  # the module's fixture: vLLM importable, as the stand-in
pytestmark = pytest.mark.usefixtures("vllm_standin")

# Per family: (checkpoint name, an older layout's name vLLM maps to the same parameter, names vLLM refuses).
WEIGHT_NAMES = {
    "qwen2_5_vl": (
        "model.language_model.layers.0.mlp.down_proj.weight",
        "model.layers.0.mlp.down_proj.weight",  # pre-transformers-4.52 checkpoints: "model." -> language model
        [
            "base_model.model.model.language_model.layers.0.mlp.down_proj.weight",  # PEFT prefix kept
            "model.language_model.layers.0.mlp.down_proj.base_layer.weight",  # PEFT's wrapped layer
            "model.language_model.layers.0.mlp.down_proj.lora_A.default.weight",  # an adapter weight
            "model.vision_tower.vision_model.embeddings.patch_embedding.weight",  # LLaVA's layout
        ],
    ),
    "llava": (
        "model.language_model.layers.0.mlp.down_proj.weight",
        "language_model.model.layers.0.mlp.down_proj.weight",  # pre-4.52 LLaVA names are vLLM's own
        [
            "base_model.model.model.language_model.layers.0.mlp.down_proj.weight",
            "model.language_model.layers.0.mlp.down_proj.base_layer.weight",
            "model.layers.0.mlp.down_proj.weight",  # LLaVA's mapper has no "model." rule (Qwen2.5-VL's has)
            "model.visual.blocks.0.norm1.weight",  # Qwen2.5-VL's layout
        ],
    ),
}


def engine_model(vllm, path):
    llm = vllm.LLM(model=str(path))
    return llm, llm.llm_engine.model_executor.driver_worker.model_runner.model


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_load_weights_takes_the_names_vllms_mapper_takes(vllm_standin, tiny_models, family):
    _, model = engine_model(vllm_standin, tiny_models[family])
    checkpoint_name, older_name, refused = WEIGHT_NAMES[family]
    parameter = dict(model.named_parameters())[checkpoint_name]

    assert model.load_weights([(checkpoint_name, torch.full_like(parameter, 1.0))]) == {
        "language_model.model.layers.0.mlp.down_proj.weight"
    }
    assert torch.all(parameter == 1.0)
    model.load_weights([(older_name, torch.full_like(parameter, 2.0))])  # the same vLLM parameter
    assert torch.all(parameter == 2.0)
    for name in refused:
        with pytest.raises(ValueError, match=r"There is no module or parameter named '.*' in \w+ForConditional"):
            model.load_weights([(name, torch.zeros_like(parameter))])
    assert torch.all(parameter == 2.0)


def test_vllm_names_of_each_family(vllm_standin, tiny_models):
    """The prefixes vLLM's two model classes rename (vllm/model_executor/models/qwen2_5_vl.py and llava.py)."""
    _, qwen = engine_model(vllm_standin, tiny_models["qwen2_5_vl"])
    _, llava = engine_model(vllm_standin, tiny_models["llava"])
    assert qwen.architecture == "Qwen2_5_VLForConditionalGeneration"
    assert llava.architecture == "LlavaForConditionalGeneration"
    assert qwen.mapper.map_name("model.visual.blocks.0.norm1.weight") == "visual.blocks.0.norm1.weight"
    assert qwen.mapper.map_name("lm_head.weight") == "language_model.lm_head.weight"
    assert llava.mapper.map_name("model.vision_tower.vision_model.post_layernorm.weight") == (
        "vision_tower.vision_model.post_layernorm.weight"
    )
    assert (
        llava.mapper.map_name("model.multi_modal_projector.linear_1.weight") == "multi_modal_projector.linear_1.weight"
    )
    assert llava.mapper.map_name("lm_head.weight") == "language_model.lm_head.weight"
    # The tiny Qwen2.5-VL ties its embeddings: vLLM's language model skips lm_head weights, so a sync may send one.
    embeddings = dict(qwen.named_parameters())["model.language_model.embed_tokens.weight"].clone()
    assert qwen.load_weights([("lm_head.weight", torch.zeros_like(embeddings))]) == set()
    assert torch.equal(dict(qwen.named_parameters())["model.language_model.embed_tokens.weight"], embeddings)


def test_a_sync_that_keeps_peft_names_fails_on_cpu(vllm_standin, tiny_models, tmp_path):
    """TRL strips PEFT's prefixes before loading; names sent as PEFT has them are refused, as by vLLM."""
    trainer = test_vllm_path.vllm_trainer(tiny_models["qwen2_5_vl"], tmp_path)
    trainer.vllm_generation._iter_named_params = lambda: ((n, p.data) for n, p in trainer.model.named_parameters())
    with pytest.raises(ValueError, match="There is no module or parameter named 'base_model.model.model.visual"):
        trainer.vllm_generation.sync_weights()


def test_max_model_len_leaves_room_for_one_output_token(vllm_standin, tiny_models):
    """vLLM 0.31 (vllm/v1/engine/input_processor.py, _validate_prompt_len) refuses a processed prompt longer than
    max_model_len, and one exactly that long: every request asks for at least one output token."""
    path = tiny_models["qwen2_5_vl"]
    llm = vllm_standin.LLM(model=str(path))
    row = _prompts_with_images(1)[0]
    processor = load_processor(str(path))
    ids = processor.apply_chat_template([row["prompt"]], add_generation_prompt=True, tokenize=True, return_dict=True)
    image_token_id = processor.image_token_id
    one_placeholder = [
        t for i, t in enumerate(ids["input_ids"][0]) if t != image_token_id or ids["input_ids"][0][i - 1] != t
    ]
    request = {"prompt_token_ids": one_placeholder, "multi_modal_data": {"image": row["image"]}}
    params = vllm_standin.SamplingParams(max_tokens=8, temperature=0.0)
    length = len(llm.generate([request], params)[0].prompt_token_ids)  # image tokens expanded: what vLLM checks
    assert length > len(one_placeholder)

    def engine(max_model_len):
        return vllm_standin.LLM(model=str(path), max_model_len=max_model_len)

    no_room_left = (
        rf"^The decoder prompt \(length {length}\) plus the number of requested output tokens \(at least 1\) is "
        rf"longer than the maximum model length of {length}\. Make sure that `max_model_len` is no smaller than the "
        r"number of text tokens \(prompt \+ requested output tokens\)\.$"
    )
    too_long = (
        rf"^The decoder prompt \(length {length}\) is longer than the maximum model length of {length - 1}\. Make "
        r"sure that `max_model_len` is no smaller than the number of text tokens plus multimodal tokens\. For image "
        r"inputs, the number of image tokens depends on the number of images, and possibly their aspect ratios as "
        r"well\.$"
    )
    with pytest.raises(ValueError, match=no_room_left):
        engine(length).generate([request], params)
    with pytest.raises(ValueError, match=too_long):
        engine(length - 1).generate([request], params)
    (completion,) = engine(length + 1).generate([request], params)[0].outputs
    assert len(completion.token_ids) == 1 and completion.finish_reason in ("length", "stop")


def test_engine_processor_is_the_stock_one_where_torchvision_imports(vllm_standin, tiny_models):
    """Runs only where torchvision imports (`make test-torchvision`); the main environment has no torchvision and the
    stand-in uses balcaprl's image-only processor there (same image processor and defaults)."""
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor

    path = tiny_models["qwen2_5_vl"]
    llm = vllm_standin.LLM(model=str(path))
    assert type(llm.processor) is type(AutoProcessor.from_pretrained(str(path)))
    assert type(llm.processor).__name__ == "Qwen2_5_VLProcessor"
    image = _prompts_with_images(1)[0]["image"]
    ours = load_processor(str(path))
    counts = [
        processor(text=[processor.image_token], images=[image])["input_ids"][0].count(processor.image_token_id)
        for processor in (llm.processor, ours)
    ]
    assert counts[0] == counts[1] > 0
