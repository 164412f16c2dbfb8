"""A decode loop with fixed shapes, so that one step can be captured once as a CUDA graph and replayed per token.

Why: on a GPU the built-in engine's decode step is launch-bound. Each token costs tens of small kernels per layer,
each launched from Python, and the card waits on the launches (bench/RESULTS.md, rollout: 22.7 ms per Qwen3-0.6B
step at batch 16, where reading the weights and the cache takes ~0.8 ms). A CUDA graph replays a recorded kernel
sequence with one launch, but only if every shape, address and branch is the same at every step. The dynamic loop
(builtin.py) is not like that: it drops finished rows and attends to a growing prefix of the cache.

Here, for the whole call:
  - every row decodes at every step. A finished row keeps decoding, and its output is cut at its first stop id. Rows
    never interact, so what a row produces before its stop does not depend on this;
  - attention reads the whole preallocated cache under a mask built from `cache.valid`. The cache is in fixed-shape
    mode (`KVCache.slot`): the write slot, the positions and the step index are device tensors advanced in place;
  - sampling reads its uniforms at the step index and writes ids, log-probs and stop flags into (R, T) buffers.

`graph=False` runs that step eagerly, on any device. That is what the CPU tests compare with the dynamic loop: the
same ids and the same log-probs to float rounding. `graph=True` (CUDA only) runs the first step eagerly on a side
stream (the warm-up that capture needs; it is a real step), captures the second, and replays it for every later
token. The host reads the stop flags once every `check_every` steps, to stop early, and copies the outputs once at
the end.

Capture is per call: the batch rows and the cache length change between calls. A weight update between calls (the
engine's `sync_weights`) copies into the same parameter storage, so nothing captured goes stale within a call.
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Callable

import torch

from .base import RolloutError


def _captured(step: Callable[[], None], stats: dict) -> Callable[[], None] | None:
    """Run `step` once on a side stream (the warm-up capture needs; a real step, its effects count), capture it on
    that same stream, and return the replay. If the capture fails, warn and return None: the caller goes on eagerly,
    and the state is consistent, since a capture runs nothing."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=side):  # the warm-up's stream: lazily made per-stream handles exist
            step()  # recorded, not run
    except RuntimeError as err:
        stats["fallbacks"] = stats.get("fallbacks", 0) + 1
        warnings.warn(f"CUDA-graph capture of the decode step failed, decoding eagerly instead: {err}")
        return None
    stats["captures"] = stats.get("captures", 0) + 1
    return graph.replay


@torch.inference_mode()
def decode_static(model, cache, logits: torch.Tensor, uniforms: torch.Tensor, next_pos: torch.Tensor,
                  max_new_tokens: int, stops: list[int], sample: Callable, *, graph: bool = False,
                  check_every: int = 8, stats: dict | None = None
                  ) -> tuple[list[list[int]], list[list[float]], list[str]]:
    """Decode up to max_new_tokens per row with fixed shapes.

    model: the Qwen3ForCausalLM that prefilled `cache` (`cache.length` = the prompt slots; rows are the samples).
    logits: (R, V) fp32, the prefill's last-position logits (they give token 0).
    uniforms: (R, max_new_tokens) float64, row r's uniform for each step. next_pos: (R,) the position of token 0.
    sample: `sample(logits (R, V), uniforms (R,)) -> (ids (R,) long, log-probs (R,) fp32)`; the engine's sampler.
    stats: with graph=True, counts "captures", "replays" and "fallbacks" (failed captures) into this dict.
    Returns per row: the ids up to and including the first stop id (or all max_new_tokens), their log-probs, and the
    finish reason ("stop" | "length"), as the dynamic loop does. On return `cache` is back in normal mode, its
    `length` covering the slots written here.
    """
    if graph and logits.device.type != "cuda":
        raise RolloutError(f"CUDA-graph decoding needs the model on a CUDA device, not {logits.device}")
    R, T, device = logits.shape[0], max_new_tokens, logits.device
    if cache.length + T - 1 > cache.max_len:
        raise RolloutError(f"KV cache of {cache.max_len} slots cannot hold {cache.length} + {T - 1} tokens")
    out_ids = torch.zeros(R, T, dtype=torch.long, device=device)  # (R, T)
    out_logp = torch.zeros(R, T, dtype=torch.float32, device=device)  # (R, T)
    stopped = torch.zeros(R, dtype=torch.bool, device=device)  # (R,) has the row produced a stop id yet
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)  # (n_stops,)
    step = torch.zeros(1, dtype=torch.long, device=device)  # index of the token being produced
    tokens = torch.zeros(R, dtype=torch.long, device=device)  # (R,) last ids: the next forward's input
    pos = next_pos.clone()  # (R,)
    cache.slot = torch.full((1,), cache.length, dtype=torch.long, device=device)  # first free slot of every row

    def take(step_logits: torch.Tensor) -> None:  # sample token `step` of every row and record it
        ids, logp = sample(step_logits, uniforms.index_select(1, step).squeeze(1))  # (R,) each
        out_ids.index_copy_(1, step, ids[:, None])
        out_logp.index_copy_(1, step, logp[:, None])
        stopped.logical_or_((ids[:, None] == stop_ids[None, :]).any(dim=1))
        tokens.copy_(ids)
        step.add_(1)

    def decode_step() -> None:  # one forward of the last ids, then sample the next
        hidden = model(tokens[:, None], pos[:, None], kv_cache=cache)  # (R, 1, H); writes K/V at cache.slot
        pos.add_(1)
        cache.slot.add_(1)
        take(model.logits(hidden)[:, 0])  # (R, V) fp32

    stats = {} if stats is None else stats
    replay, may_capture = None, graph  # one capture per call; after a failed one the call goes on eagerly
    produced = 1  # tokens per row so far
    try:
        with torch.cuda.device(device) if graph else nullcontext():  # streams and graph on the model's card
            take(logits)
            while produced < T:
                if (produced - 1) % check_every == 0 and bool(stopped.all()):  # one host read per check_every steps
                    break
                if replay is not None:
                    replay()
                    stats["replays"] = stats.get("replays", 0) + 1
                elif may_capture and T - produced >= 2:  # worth it only if a replay will follow
                    replay, may_capture = _captured(decode_step, stats), False  # runs this step (the warm-up)
                else:
                    decode_step()
                produced += 1
    finally:  # back to normal mode, `length` past the last slot a forward wrote (the slot advances right after it)
        cache.length, cache.slot = int(cache.slot.item()), None
    host_ids, host_logp = out_ids[:, :produced].tolist(), out_logp[:, :produced].tolist()
    stop_set = set(stops)
    ids_out, logp_out, finish = [], [], []
    for ids, logp in zip(host_ids, host_logp):
        end = next((i + 1 for i, t in enumerate(ids) if t in stop_set), None)
        ids_out.append(ids[:end] if end else ids)
        logp_out.append(logp[:end] if end else logp)
        finish.append("stop" if end else "length")
    return ids_out, logp_out, finish
