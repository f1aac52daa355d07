"""A CPU stand-in for vLLM 0.31, for balcaprl's tests only — NOT vLLM.

Put the folder that holds this package (``tests/vllm_standin``) first on ``sys.path`` / ``PYTHONPATH``: its
``vllm-0.31.0.dist-info`` makes ``importlib.metadata`` (and so TRL's ``is_vllm_available()``) report vLLM 0.31.0, and
``import vllm`` finds this package. TRL's real ``use_vllm=True`` code then runs unchanged on CPU: ``VLLMGeneration``
builds an `LLM`, sends it `SamplingParams` and token prompts with raw images, and syncs weights through
``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights``.

What it mirrors and what it does not: see `vllm.entrypoints.llm`.
"""

from vllm.entrypoints.llm import LLM
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.31.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob"]
