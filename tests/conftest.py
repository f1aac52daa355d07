import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from balcaprl.tiny import build_tiny_model  # noqa: E402

# Two threads are slower than one for these tiny models on this 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of a tiny Qwen2.5-VL and a tiny LLaVA-1.5 checkpoint, built once per session."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_tiny_model(family, root / family) for family in ("qwen2_5_vl", "llava")}
