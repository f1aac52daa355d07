"""Run by tests/test_vllm_zero3_sync.py under `accelerate launch` (2 processes, DeepSpeed ZeRO-3 on CPU, gloo,
PYTHONPATH with tests/vllm_standin): the LoRA weight sync to the colocated engine under ZeRO-3.

Each process trains one step (TRL syncs its engine before generating), gives the adapters values, then
1. syncs through TRL's ``sync_weights`` (balcaprl's per-layer path), recording what the engine's ``load_weights``
   gets and the number of elements of every ``gather_params`` call (the parameters' full ``ds_numel``);
2. walks TRL 1.16's own PEFT path (``VLLMGeneration._iter_named_params``: the whole model gathered, the adapters
   merged in place), recording what it yields and its gathers: the reference. Last, since it merges in place.
Each process writes OUTPUT_DIR/rank{i}.json.
"""

import contextlib
import hashlib
import json
import sys

import deepspeed
import torch
import vllm
from peft.tuners.lora import LoraLayer
from trl.generation.vllm_generation import VLLMGeneration

from balcaprl.models.loading import _plain_loading
from tests.helpers import REWARDS_FOR_DISTRIBUTED, exit_launched_script, make_trainer


def digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous()
    return f"{data.dtype}{tuple(data.shape)}:" + hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def numel(parameter) -> int:
    return getattr(parameter, "ds_numel", parameter.numel())


class PlainLoadingLLM(vllm.LLM):
    """The stand-in engine, loading its own full copy of the checkpoint as vLLM does: transformers' ``from_pretrained``
    would partition it (ZeRO-3's ``zero3_init_flag``), which real vLLM's own loader never does."""

    def __init__(self, *args, **kwargs):
        with _plain_loading():
            super().__init__(*args, **kwargs)


def record_gathers(generation, calls: list[list[int]], lora_ids: set[int]) -> None:
    """Records ``[elements, parameters, LoRA adapter parameters]`` of every ``gather_params`` call of ``generation``
    (TRL's own call, unchanged, underneath)."""
    gather = type(generation._dist).gather_params.__get__(generation._dist)

    @contextlib.contextmanager
    def counting(params):
        params = list(params)
        calls.append([sum(numel(p) for p in params), len(params), sum(id(p) in lora_ids for p in params)])
        with gather(params):
            yield

    generation._dist.gather_params = counting


def base_digests(model) -> dict[str, str]:
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {name: digest(p) for name, p in model.named_parameters() if "lora_" not in name}


def main(model_path: str, output_dir: str) -> None:
    torch.set_num_threads(1)
    from trl.generation import vllm_generation

    vllm_generation.LLM = PlainLoadingLLM  # what TRL's guarded `from vllm import LLM` bound (the stand-in)
    trainer = make_trainer(
        model_path,
        output_dir,
        REWARDS_FOR_DISTRIBUTED,
        per_device_train_batch_size=4,
        max_steps=1,
        use_vllm=True,
        vllm_mode="colocate",
    )
    trainer.train()  # DeepSpeed partitions every parameter (adapters included); TRL's first sync runs here
    generation, model = trainer.vllm_generation, trainer.vllm_generation.model
    assert generation._dist.is_zero3
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    with deepspeed.zero.GatheredParameters(lora, modifier_rank=0):  # LoRA B starts at 0: give the adapters values
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in lora:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    before = base_digests(model)

    engine_model = generation.llm.llm_engine.model_executor.driver_worker.model_runner.model
    received: dict[str, str] = {}
    load_weights = engine_model.load_weights

    def recording_load_weights(weights):
        weights = list(weights)
        received.update((name, digest(tensor)) for name, tensor in weights)
        return load_weights(weights)

    engine_model.load_weights = recording_load_weights
    lora_ids = {id(p) for p in lora}
    new_gathers: list[list[int]] = []
    record_gathers(generation, new_gathers, lora_ids)
    generation.sync_weights()  # balcaprl's path, as TRL calls it before a generation
    engine = {name: digest(p) for name, p in engine_model.named_parameters()}
    after = base_digests(model)

    old_gathers: list[list[int]] = []
    record_gathers(generation, old_gathers, lora_ids)
    reference = {name: digest(tensor) for name, tensor in VLLMGeneration._iter_named_params(generation)}

    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    parameters = list(model.parameters())
    report = {
        "vllm": vllm.__version__,
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
        "world_size": trainer.accelerator.num_processes,
        "not_partitioned": sum(not hasattr(p, "ds_id") for p in parameters),
        "model_elements": sum(numel(p) for p in parameters),
        "largest_parameter": max(numel(p) for p in parameters),
        "largest_lora_layer": max(sum(numel(p) for p in layer.parameters()) for layer in layers),
        "lora_layers": len(layers),
        "lora_layer_parameters": sorted({len(list(layer.parameters())) for layer in layers}),
        "new_gathers": new_gathers,
        "old_gathers": old_gathers,
        "received": received,
        "engine": engine,
        "reference": reference,
        "base_before": before,
        "base_after": after,
        # the LoRA layers' base weights as named for the engine
        "lora_base_names": sorted(
            name.removeprefix("base_model.model.").replace(".base_layer", "")
            for name, p in model.named_parameters()
            if ".base_layer.weight" in name
        ),
    }
    with open(f"{output_dir}/rank{trainer.accelerator.process_index}.json", "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
    exit_launched_script()
