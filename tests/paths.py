"""Folders the tests read: the repository and its fixtures (no path outside the repository is needed)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
# The real interface files (configs, tokenizers, chat templates; no weights) of llava-hf/llava-1.5-7b-hf and
# Qwen/Qwen2.5-VL-7B-Instruct, with their licence notices (fixtures/reference-models/README.md).
REFERENCE_MODELS = FIXTURES / "reference-models"
