"""Rollout engines behind one interface: `generate(prompt_token_ids, n, temperature, top_p, max_new_tokens,
stop_token_ids, seed) -> list[list[Completion]]`, `sync_weights(named_tensors)`, `sleep()`, `wake_up()`.

`BuiltinEngine` (plain PyTorch, everywhere) and `VLLMEngine` (GPUs; vllm itself is imported only when one is built
without an injected fake).
"""
import importlib.util

from .base import Completion, RolloutEngine, RolloutError, sample_seed
from .builtin import BuiltinEngine, sample_tokens, sampling_probs
from .vllm_engine import VLLMEngine, checkpoint_tensor_names, hf_named_tensors
from .vllm_engine import temperature_problem as vllm_temperature_problem


def vllm_available() -> bool:
    """Whether the vllm package is installed (it is an optional `gpu` extra)."""
    return importlib.util.find_spec("vllm") is not None


def resolve_engine(kind: str) -> str:
    """engine=auto as the recipes read it: vllm when it is installed and a GPU is present, else builtin."""
    if kind != "auto":
        return kind
    import torch
    return "vllm" if vllm_available() and torch.cuda.is_available() else "builtin"


def require_vllm(temperature: float | None = None) -> None:
    """Called where a run starts (not where its config is parsed, so that GPU configs still load on CPU boxes):
    engine=vllm without the package, or with a `temperature` vLLM would clamp or refuse, fails before any work, in
    one line (not at the first generate, after the policy and vLLM have loaded)."""
    if not vllm_available():
        raise RolloutError("engine=vllm needs the vllm package, which is not installed (install the gpu extra, or "
                           "use engine=builtin)")
    if temperature is not None and (why := vllm_temperature_problem(temperature)):
        raise RolloutError(why)


__all__ = [
    "BuiltinEngine", "Completion", "RolloutEngine", "RolloutError", "VLLMEngine", "checkpoint_tensor_names", "require_vllm",
    "hf_named_tensors", "resolve_engine", "sample_seed", "sample_tokens", "sampling_probs", "vllm_available",
]
