"""Configuration dataclasses, parsed from recipes by TRL's `TrlParser`.

`BalCapConfig` (TRL's `GRPOConfig` plus BalCapRL's advantage estimator and length-conditional masking),
`CaptionModelConfig` (TRL's `ModelConfig` plus freezing, LoRA presets, image resolution), `CaptionDataConfig`
and `RewardConfig` (reward functions and the judge they call).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig, ModelConfig, SFTConfig

from balcaprl.advantages import ESTIMATORS, get_estimator
from balcaprl.data.constants import BAD_IMAGE_POLICIES, DEFAULT_INSTRUCTION, FORMATS, SFT_REFERENCE_MODES
from balcaprl.judge.config import JudgeConfig
from balcaprl.length import DEFAULT_WINDOW, LENGTH_UNITS

LORA_PRESETS = ("language_model", "language_model_attention")


class DefaultMaskedRewards(list):
    """The default of ``length_mask_rewards`` (``["linguistic"]``), told apart from the same list set on purpose:
    left at the default in a run without a ``linguistic`` reward (a CIDEr-D recipe), it masks nothing, where a
    recipe that names a reward its run lacks is an error."""


def check_training_values(args) -> None:
    """Values transformers and TRL accept at parse time but that fail (or train nothing) only once the weights are
    loaded: each is a ValueError naming the key."""
    if args.learning_rate < 0:
        raise ValueError(f"learning_rate must be >= 0, got {args.learning_rate!r}.")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(args, key)!r}.")
    if args.max_steps == 0 or args.max_steps < -1:
        raise ValueError(
            f"max_steps must be a positive number of steps, or -1 for num_train_epochs; got {args.max_steps!r}."
        )
    if args.max_steps == -1 and args.num_train_epochs <= 0:
        raise ValueError(f"num_train_epochs must be > 0 when max_steps is unset, got {args.num_train_epochs!r}.")


def adopt_activation_checkpointing(args) -> None:
    """Carry ``gradient_checkpointing(_kwargs)`` over to ``activation_checkpointing(_kwargs)`` where transformers has
    the new names (5.24 and later), so that no FutureWarning is raised on every run; transformers 5.17, the release
    the ``vllm`` extra pins, knows only the old names, which the recipes therefore keep."""
    for old, new in (
        ("gradient_checkpointing", "activation_checkpointing"),
        ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
    ):
        if hasattr(args, new) and getattr(args, new) is None and getattr(args, old) is not None:
            setattr(args, new, getattr(args, old))


@dataclass
class BalCapConfig(GRPOConfig):
    r"""Configuration of `BalCapGRPOTrainer`: every `trl.GRPOConfig` field, plus:

    > Advantages

    advantage_estimator (`str`, defaults to `"c_gdpo"`):
        `"c_gdpo"` (alias `"gdpo"`): each reward z-scored inside its group, weighted sum, batch z-score (BalCapRL).
        `"grpo"`: weighted sum of rewards, then group z-score. `"scst"`: weighted reward minus that of the greedy
        caption of the same prompt. `multi_objective_aggregation` is derived from it.

    > Length-conditional masking

    length_mask_rewards (`list[str]`, defaults to `["linguistic"]`):
        Names of the reward functions set to 0 when a caption's length ratio ρ is outside `length_mask_window`.
        Names absent from the run's reward functions are an error, except the default in a run without a
        `linguistic` reward (e.g. CIDEr-D only), which masks nothing; an empty list turns masking off.
    length_mask_window (`list[float]`, defaults to `[0.5, 2.0]`):
        [low, high] of ρ = len(caption) / mean len(references); both bounds are kept.
    length_unit (`str`, defaults to `"words"`):
        `"words"` (`balcaprl.length.word_length`: whitespace-separated tokens that are not punctuation only) or
        `"tokens"` (the policy's tokenizer).
    reference_column (`str`, defaults to `"references"`):
        Dataset column holding each row's reference caption(s).
    max_train_seconds (`float`, *optional*):
        Stop training (cleanly, as at ``max_steps``) once this much wall-clock time has passed.

    > Judge guard (`balcaprl.judge.guard`; the judge client's own keys are `balcaprl.judge.JudgeConfig`'s)

    judge_health_check (`bool`, defaults to `True`):
        Before training, and before any model weights load, send one real request per judge reward and fail at
        once, naming the judge URL and the fault, if it gets no schema-valid answer.
    judge_max_failure_rate (`float`, defaults to `0.5`):
        Save a checkpoint and stop when more than this fraction of the judge calls of the last
        `judge_failure_window` judged steps failed; `1.0` turns the budget off.
    judge_failure_window (`int`, defaults to `3`):
        Number of steps (that called the judge) the failure rate is taken over.
    judge_outage_wait_seconds (`float`, defaults to `0`):
        Over budget, first wait up to this long for the judge to pass the health check again, then stop.
    """

    advantage_estimator: str = field(
        default="c_gdpo",
        metadata={"help": "Advantage estimator.", "choices": list(ESTIMATORS)},
    )
    length_mask_rewards: list[str] = field(
        default_factory=lambda: DefaultMaskedRewards(["linguistic"]),
        metadata={"help": "Reward functions zeroed when the caption/reference length ratio is outside the window."},
    )
    length_mask_window: list[float] = field(
        default_factory=lambda: list(DEFAULT_WINDOW),
        metadata={"help": "Inclusive [low, high] window of the caption/reference length ratio."},
    )
    length_unit: str = field(
        default="words",
        metadata={"help": "Unit of caption and reference lengths.", "choices": list(LENGTH_UNITS)},
    )
    reference_column: str = field(
        default="references",
        metadata={"help": "Dataset column holding the reference caption(s) of each row."},
    )
    max_train_seconds: float | None = field(
        default=None, metadata={"help": "Stop training cleanly after this many seconds of wall-clock time."}
    )
    judge_health_check: bool = field(
        default=True,
        metadata={"help": "Check every judge reward with one real request before any model weights load."},
    )
    judge_max_failure_rate: float = field(
        default=0.5,
        metadata={"help": "Save a checkpoint and stop above this failed fraction of judge calls (1.0: never)."},
    )
    judge_failure_window: int = field(
        default=3, metadata={"help": "Judged steps over which judge_max_failure_rate is measured."}
    )
    judge_outage_wait_seconds: float = field(
        default=0.0, metadata={"help": "Over the failure budget, wait this long for the judge before stopping."}
    )

    def __post_init__(self):
        if self.advantage_estimator not in ESTIMATORS:
            raise ValueError(
                f"advantage_estimator must be one of {list(ESTIMATORS)}, got {self.advantage_estimator!r}."
            )
        if self.length_unit not in LENGTH_UNITS:
            raise ValueError(f"length_unit must be one of {list(LENGTH_UNITS)}, got {self.length_unit!r}.")
        if isinstance(self.length_mask_rewards, str):
            self.length_mask_rewards = [self.length_mask_rewards]
        if not isinstance(self.length_mask_rewards, DefaultMaskedRewards):
            self.length_mask_rewards = list(self.length_mask_rewards or [])
        window = list(self.length_mask_window)
        if len(window) != 2 or not 0 <= float(window[0]) <= float(window[1]):
            raise ValueError(f"length_mask_window must be [low, high] with 0 <= low <= high, got {window!r}.")
        self.length_mask_window = [float(window[0]), float(window[1])]
        if not self.reference_column:
            raise ValueError("reference_column must name a dataset column, got an empty string.")
        if not 0.0 <= self.judge_max_failure_rate <= 1.0:
            raise ValueError(f"judge_max_failure_rate must be in [0, 1], got {self.judge_max_failure_rate!r}.")
        if self.judge_failure_window < 1:
            raise ValueError(f"judge_failure_window must be >= 1 step, got {self.judge_failure_window!r}.")
        if self.judge_outage_wait_seconds < 0:
            raise ValueError(f"judge_outage_wait_seconds must be >= 0, got {self.judge_outage_wait_seconds!r}.")
        if not self.temperature > 0:
            # transformers and vLLM reject it only at the first generation; greedy decoding would make the G captions
            # of a group identical (zero advantages). SCST's greedy baseline is decoded greedily whatever this is.
            raise ValueError(
                f"temperature must be > 0 (the G captions of a group are sampled at it), got {self.temperature!r}."
            )
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1 token, got {self.max_completion_length!r}.")
        check_training_values(self)
        # TRL settings the estimator decides: a value the user chose that the estimator would ignore is an error,
        # not a silent override (TRL's defaults, sum_then_normalize and group, are taken as "not chosen").
        estimator = get_estimator(self.advantage_estimator)
        derived = estimator.trl_aggregation
        if self.multi_objective_aggregation not in (derived, "sum_then_normalize"):
            raise ValueError(
                f"multi_objective_aggregation={self.multi_objective_aggregation!r} has no effect: "
                f"advantage_estimator={self.advantage_estimator!r} computes the advantages (it matches TRL's "
                f"{derived!r}). Leave multi_objective_aggregation unset, or choose the estimator instead."
            )
        self.multi_objective_aggregation = derived
        adopt_activation_checkpointing(self)
        super().__post_init__()
        if self.scale_rewards != "group":
            raise ValueError(
                f"scale_rewards={self.scale_rewards!r} has no effect: advantage_estimator="
                f"{self.advantage_estimator!r} {estimator.scaling}. Leave scale_rewards at 'group'."
            )


@dataclass
class CaptionModelConfig(ModelConfig):
    r"""TRL's `ModelConfig` (``model_name_or_path``, ``dtype``, ``attn_implementation``, ``use_peft``, ``lora_*``)
    plus captioning specifics:

    freeze_vision_tower (`bool`, defaults to `True`) / freeze_projector (`bool`, defaults to `True`):
        Keep the vision tower / the vision-to-language projector frozen. With LoRA, an unfrozen part is trained in
        full (PEFT ``modules_to_save``); LoRA itself goes on the language model.
    lora_preset (`str`, defaults to `"language_model"`):
        LoRA targets when ``lora_target_modules`` is not given: `"language_model"` (attention + MLP projections of
        the language model) or `"language_model_attention"` (attention projections only).
    min_pixels / max_pixels (`int`, *optional*):
        Qwen2.5-VL image resolution bounds passed to its processor.

    ``model_name_or_path`` may also be ``tiny:qwen2_5_vl`` or ``tiny:llava``: a random tiny model built offline
    (`balcaprl.models.tiny`), for CPU smoke runs.
    """

    freeze_vision_tower: bool = field(default=True, metadata={"help": "Keep the vision tower frozen."})
    freeze_projector: bool = field(default=True, metadata={"help": "Keep the multimodal projector frozen."})
    lora_preset: str = field(
        default="language_model",
        metadata={"help": "LoRA targets when lora_target_modules is unset.", "choices": list(LORA_PRESETS)},
    )
    min_pixels: int | None = field(default=None, metadata={"help": "Qwen2.5-VL processor min_pixels."})
    max_pixels: int | None = field(default=None, metadata={"help": "Qwen2.5-VL processor max_pixels."})

    def __post_init__(self):
        super().__post_init__()
        if self.lora_preset not in LORA_PRESETS:
            raise ValueError(f"lora_preset must be one of {list(LORA_PRESETS)}, got {self.lora_preset!r}.")


@dataclass
class CaptionDataConfig:
    r"""Where the captions come from (see `balcaprl.data.load_caption_dataset`).

    dataset (`str`): a Hugging Face dataset name or folder, a Karpathy JSON (``dataset_coco.json``), COCO captions
        annotations (``captions_train2014.json``), LLaVA / ShareGPT4V conversations (JSON or JSONL), or a JSONL file.
    dataset_format (`str`, defaults to `"auto"`, detected from the file's content): `"auto"`, `"hf"`, `"karpathy"`,
        `"jsonl"`, `"coco"` or `"llava"`.
    dataset_split / eval_split: the training split, and an optional evaluation split.
    image_root: folder relative image paths are resolved against (Karpathy ``filepath/filename``, JSONL paths, path
        columns of a Hugging Face dataset); defaults to the data file's folder.
    image_column / caption_column: columns of a Hugging Face dataset.
    instruction: the captioning instruction in the user turn.
    max_train_samples / max_eval_samples: keep at most this many images (a seeded random subset).
    restval_as_train: Karpathy COCO: whether the train split includes ``restval`` (113,287 images) or not.
    hf_config_name: configuration name of a Hugging Face dataset that has several.
    on_bad_image: `"error"` (a missing or corrupt image fails, naming row and path) or `"skip"` (dropped, counted).
    """

    dataset: str | None = field(default=None, metadata={"help": "Dataset name, folder, Karpathy JSON or JSONL."})
    dataset_format: str = field(default="auto", metadata={"help": "Format of `dataset`.", "choices": list(FORMATS)})
    dataset_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str | None = field(default=None, metadata={"help": "Evaluation split (optional)."})
    image_root: str | None = field(default=None, metadata={"help": "Folder relative image paths resolve against."})
    image_column: str = field(default="image", metadata={"help": "Image column of a Hugging Face dataset."})
    caption_column: str = field(default="references", metadata={"help": "Caption column of a Hugging Face dataset."})
    instruction: str = field(default=DEFAULT_INSTRUCTION, metadata={"help": "Captioning instruction."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on the number of training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on the number of evaluation images."})
    restval_as_train: bool = field(default=True, metadata={"help": "Karpathy COCO: train split includes restval."})
    hf_config_name: str | None = field(default=None, metadata={"help": "Hugging Face dataset configuration name."})
    on_bad_image: str = field(
        default="error",
        metadata={"help": "Missing/corrupt images: error or skip.", "choices": list(BAD_IMAGE_POLICIES)},
    )

    def __post_init__(self):
        if self.dataset_format not in FORMATS:
            raise ValueError(f"dataset_format must be one of {list(FORMATS)}, got {self.dataset_format!r}.")
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {list(BAD_IMAGE_POLICIES)}, got {self.on_bad_image!r}.")


@dataclass
class RewardConfig(JudgeConfig):
    r"""Reward functions, and the judge they call (the ``judge_*`` keys of `balcaprl.judge.JudgeConfig`).

    reward_funcs (`list`): registered names (``precision``, ``recall``, ``linguistic``, ``cider_d``,
        ``length_penalty``, ``world_*``), dotted paths (``my_pkg.rewards:brevity``) or, in YAML, mappings
        ``{name: ..., weight: ..., kwargs...}``; weights given there fill ``reward_weights``.
    """

    reward_funcs: list[str] = field(
        default_factory=lambda: ["precision", "recall", "linguistic"],
        metadata={"help": "Reward functions: registered names, dotted paths, or {name, weight, ...} mappings."},
    )


@dataclass
class CaptionSFTConfig(SFTConfig):
    r"""TRL's `SFTConfig` plus how reference captions become training rows.

    sft_references (`str`, defaults to `"all"`): `"all"`, one row per (image, reference) pair; `"random"`, one row
        per image with one of its references.
    max_train_seconds (`float`, *optional*): stop training cleanly once this much wall-clock time has passed.
    """

    sft_references: str = field(
        default="all",
        metadata={"help": "Rows per image: all references or one random.", "choices": list(SFT_REFERENCE_MODES)},
    )
    max_train_seconds: float | None = field(
        default=None, metadata={"help": "Stop training cleanly after this many seconds of wall-clock time."}
    )

    def __post_init__(self):
        if self.sft_references not in SFT_REFERENCE_MODES:
            raise ValueError(
                f"sft_references must be one of {list(SFT_REFERENCE_MODES)}, got {self.sft_references!r}."
            )
        check_training_values(self)
        adopt_activation_checkpointing(self)
        super().__post_init__()
