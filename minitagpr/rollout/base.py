"""The rollout-engine contract shared by the built-in sampler and the vLLM adapter.

An engine turns prompt token ids into groups of sampled completions:

    groups = engine.generate(prompt_token_ids, n=5, temperature=1.0, top_p=1.0,
                             max_new_tokens=512, stop_token_ids=[im_end, eos], seed=step)
    groups[i][j]  # the j-th of n completions of prompt i

and takes new policy weights between RL steps:

    engine.wake_up(); engine.sync_weights(named_full_tensors); ... engine.generate(...); engine.sleep()

Everything here is plain data; nothing owns an optimizer or a process group.
"""
from __future__ import annotations

import hashlib
import numbers
import secrets
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

FINISH_REASONS = ("stop", "length")


class RolloutError(ValueError):
    """A generate() request that cannot be served, with the argument (and prompt index) at fault."""


class DivergedError(RolloutError):
    """Non-finite logits while sampling: the model's fault (it has diverged), not the request's."""


@dataclass
class Completion:
    """One sampled continuation of a prompt.

    token_ids: the generated ids; when generation ended on a stop id, that id is the last element (the RL loss
        must see `<|im_end|>` to learn to stop), but it is not part of `text`.
    text: the decoded continuation without the stop id (special tokens such as `<think>` are kept).
    logprobs: one fp32 float per token: log softmax(logits / T) of the model's full output row at the sampled id,
        i.e. under the sampling temperature T, *before* top-p truncation and before the padded-vocabulary mask,
        which is exactly what `minitagpr.kernels.token_logprobs(..., temperature=T)` computes. With T == 0
        (greedy) they are taken at T = 1; the vLLM adapter always reports them at T = 1 (vLLM's raw
        log-probs). The RL loop recomputes old log-probs itself and logs how far these lie
        from them (rollout/logp_gap_mean, rollout/logp_gap_max); they never enter the loss.
    finish_reason: "stop" (a stop id was sampled) or "length" (max_new_tokens reached).
    """

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"Completion.finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
        if len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"Completion has {len(self.token_ids)} token ids but {len(self.logprobs)} logprobs")


# Wrappers that prefix parameter names (activation checkpointing, torch.compile); checkpoints use the bare HF names.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def hf_name(name: str) -> str:
    """A parameter name with wrapper prefixes removed, e.g. `model.layers.0._checkpoint_wrapped_module.mlp...`."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one (request, sample) pair, so each completion's random draws depend only on these three
    numbers, not on which other prompts share its batch (its logits do, up to float rounding)."""
    digest = hashlib.blake2b(f"minitagpr/{seed}/{prompt_index}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_base(seed: int, global_index: int) -> int:
    """The per-prompt seed (generate's list form) of the prompt at `global_index` of a whole run (an RL step, an
    evaluation, a sampling job): its samples then depend on the run seed and that position only, not on how the run
    is cut into generate() calls or ranks. Distinct positions under one seed get distinct seeds; seeds s and s + 1
    meet only 65,537 positions apart."""
    return (seed * 65_537 + global_index) & (2**62 - 1)


def _is_int(value) -> bool:
    """A Python or numpy integer, not a bool (True would silently mean 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def resolve_seed(seed: int | None) -> int:
    """`None` asks for fresh randomness: draw a base seed from the OS."""
    if seed is not None and not _is_int(seed):
        raise RolloutError(f"seed must be an int, None or a list of per-prompt ints, got {seed!r}")
    return secrets.randbits(62) if seed is None else int(seed)


def prompt_seed_keys(seed, num_prompts: int) -> list[tuple[int, int]]:
    """(base, index) per prompt; sample j of prompt i is seeded from `sample_seed(base, index, j)`.

    An int (or None) seed gives (seed, i): prompt i of this call. A sequence gives (seed[i], 0): the caller names
    each prompt's seed, e.g. from its global position, so samples do not depend on how prompts are split into calls
    (the RL loop's ranks)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != num_prompts:
            raise RolloutError(f"seed: {len(seed)} per-prompt seeds for {num_prompts} prompts")
        for i, s in enumerate(seed):
            if not _is_int(s):
                raise RolloutError(f"seed[{i}] = {s!r} is not an int")
        return [(int(s), 0) for s in seed]
    base = resolve_seed(seed)
    return [(base, i) for i in range(num_prompts)]


MIN_TEMPERATURE = 1e-4  # below it logits / T overflow in fp32; use 0 for greedy decoding


def check_request(
    prompt_token_ids: Sequence[Sequence[int]],
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop_token_ids: Iterable[int] | None,
    vocab_size: int,
    max_len: tuple[str, int] | None = None,
) -> list[int]:
    """Validate a generate() call up front and return the stop ids as a list; errors name the argument and,
    for prompts, the prompt index. `max_len` = (its name, its value): the positions a prompt and its completion
    share (the model's max_position_embeddings, vLLM's max_model_len)."""
    if not isinstance(prompt_token_ids, (list, tuple)):
        raise RolloutError(f"prompt_token_ids must be a list of token-id lists, got {type(prompt_token_ids).__name__}")
    for i, ids in enumerate(prompt_token_ids):
        if not isinstance(ids, (list, tuple)) or len(ids) == 0:
            raise RolloutError(f"prompt_token_ids[{i}] must be a non-empty list of ints")
        for j, t in enumerate(ids):
            if not _is_int(t):
                raise RolloutError(f"prompt_token_ids[{i}][{j}] = {t!r} is not an int ({type(t).__name__})")
            if not 0 <= t < vocab_size:
                raise RolloutError(f"prompt_token_ids[{i}][{j}] = {t} is not a token id in [0, {vocab_size})")
    if not _is_int(n) or n < 1:
        raise RolloutError(f"n must be a positive int, got {n!r}")
    if not _is_real(temperature):
        raise RolloutError(f"temperature must be a number (0 means greedy), got {temperature!r}")
    if not temperature >= 0.0:  # also rejects NaN
        raise RolloutError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
    if 0.0 < temperature < MIN_TEMPERATURE:  # logits / T overflow: NaN log-probs and the last id always sampled
        raise RolloutError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature!r}")
    if not _is_real(top_p) or not 0.0 < top_p <= 1.0:
        raise RolloutError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise RolloutError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if max_len is not None:
        name, limit = max_len
        for i, ids in enumerate(prompt_token_ids):
            if len(ids) + max_new_tokens > limit:
                raise RolloutError(f"prompt_token_ids[{i}] has {len(ids)} tokens; with max_new_tokens="
                                   f"{max_new_tokens} it exceeds {name}={limit}")
    if stop_token_ids is None:
        return []
    if isinstance(stop_token_ids, (str, bytes)) or not isinstance(stop_token_ids, Iterable):
        raise RolloutError(f"stop_token_ids must be a list of token ids or None, got {stop_token_ids!r}")
    stops = list(stop_token_ids)
    for s in stops:
        if not _is_int(s):
            raise RolloutError(f"stop token id {s!r} is not an int ({type(s).__name__})")
        if not 0 <= s < vocab_size:
            raise RolloutError(f"stop token id {s} is not in [0, {vocab_size})")
    return [int(s) for s in stops]


class RolloutEngine:
    """The interface every engine implements. Subclasses override `generate` and `sync_weights`;
    `sleep`/`wake_up` free and restore accelerator memory between rollouts (no-ops where there is none to free)."""

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        stop_token_ids: Iterable[int] | None = None,
        seed: int | None = 0,
    ) -> list[list[Completion]]:
        """Sample `n` completions for every prompt; returns one list of n `Completion`s per prompt, in order.
        temperature == 0 is greedy decoding. With an int seed, prompt i's samples are seeded by (seed, i): the same
        call gives the same completions however the engine batches it, but reordering the prompts changes them. With a
        list, they are seeded by seed[i] alone, whatever the order. "Same" is up to float rounding: logits change
        slightly with the batch, so log-probs differ (~1e-6 in fp32) and a near-tie could flip a token."""
        raise NotImplementedError

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | Iterator) -> int:
        """Load new weights given as (HF parameter name, full tensor) pairs; returns how many were loaded."""
        raise NotImplementedError

    def sleep(self) -> None:
        """Release accelerator memory held for generation until the next `wake_up` or `sync_weights`."""

    def wake_up(self) -> None:
        """Undo `sleep`."""
