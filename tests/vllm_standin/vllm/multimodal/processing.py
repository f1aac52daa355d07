"""The image processing the stand-in engine runs: the checkpoint's processor, and the placeholder runs it produces."""

from __future__ import annotations

from pathlib import Path


def runs_of(token_ids: list[int], token_id: int) -> list[tuple[int, int]]:
    """(start, length) of every run of ``token_id``."""
    runs, index = [], 0
    while index < len(token_ids):
        if token_ids[index] == token_id:
            start = index
            while index < len(token_ids) and token_ids[index] == token_id:
                index += 1
            runs.append((start, index - start))
        else:
            index += 1
    return runs


def load_processor(model_path: str, mm_processor_kwargs: dict):
    """The checkpoint's own processor with its saved defaults, which is what vLLM counts image tokens with.

    Where torchvision imports: the stock ``AutoProcessor``, as vLLM builds it (this branch runs only in an environment
    with torchvision, e.g. ``make test-torchvision``; the main test environment has none). Without torchvision a stock
    Qwen2.5-VL processor cannot be built (its video processor needs it), so balcaprl's image-only equivalent is used
    there: the same image processor with the same defaults, so the same image-token counts.
    """
    if not Path(model_path).exists():
        raise FileNotFoundError(f"vLLM stand-in: {model_path} is not a local checkpoint folder (no hub access).")
    if torchvision_imports():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_path, **mm_processor_kwargs)
    from balcaprl.models import load_processor as load_balcaprl_processor

    return load_balcaprl_processor(model_path, **mm_processor_kwargs)


def torchvision_imports() -> bool:
    """Whether torchvision imports (a CUDA torchvision wheel beside a CPU torch is installed but fails to import)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or the RuntimeError / OSError of a torchvision built for another torch
        return False
    return True
