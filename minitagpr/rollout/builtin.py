"""The built-in rollout engine: batched sampling with a KV cache on our Qwen3 model, in plain PyTorch.

It is what runs wherever vLLM does not (CPU machines, CI, the demo). One generate() call:
  1. sort prompts by length and cut them into chunks of at most `max_batch_rows // n` prompts;
  2. per chunk, prefill each prompt once, on its own, into its left-padded rows of one KV cache (pad slots are
     marked invalid, so nobody attends to them);
  3. copy each prompt's cache rows n times (`cache.reorder(repeat_interleave)`) so the n samples share the prefill;
  4. decode one token per step for every live row, dropping finished rows from the cache as they stop (or, with
     `decode="static"`/`"graph"`, with fixed shapes: static_decode.py, for CUDA graphs; "auto", the default, picks
     "graph" for an unsharded model on a CUDA device and "dynamic" elsewhere).

Randomness: every (prompt index, sample index) pair owns a torch.Generator seeded from (seed, prompt index, sample
index), which draws that row's uniforms u_1..u_max up front; the token at step t is the inverse CDF of the
processed distribution at u_t. So a completion's draws depend on its own seed only; its logits still change with the
chunk's batch size and padding, by float rounding (log-probs by ~1e-6), which in practice leaves the ids unchanged.

Sampling distribution at each step, for logits z over the model's V rows:
  - the padded vocabulary tail (ids >= the tokenizer's vocab_size) is removed: those ids cannot be decoded;
  - temperature T > 0: p = softmax(z / T); T == 0: greedy argmax;
  - top-p: sort p descending and keep token i while the mass strictly before it is < top_p (the top token is
    always kept), then renormalise.
Reported log-probs are log softmax(z / T) over all V rows at the sampled id (see `Completion`).

Weights: the engine samples from the module it is given. Given the policy itself (one process, colocated), it
always sees the current weights and `sync_weights` is unnecessary; given a separate copy (e.g. a full replica next
to an FSDP2-sharded policy), call `sync_weights` with (HF name, full tensor) pairs after each optimizer step.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial
from typing import Iterable

import torch

from .base import (Completion, DivergedError, RolloutEngine, RolloutError, check_request, hf_name, prompt_seed_keys,
                   sample_seed)
from .static_decode import decode_static


# ----------------------------------------------------------------------------------------------------------------------
# Sampling math on plain logits


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p truncation of probs (R, Vs) that sum to 1: keep each token while the mass strictly before it (in
    descending order) is < top_p, then renormalise. The most likely token is always kept."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)  # (R, Vs) each
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # (R, Vs) mass of strictly more likely tokens
    sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
    probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return probs / probs.sum(dim=-1, keepdim=True)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """z / T in fp32 (R, V); at T = 1 the logits themselves (dividing by 1 changes no bit)."""
    z = logits.float()
    return z if temperature == 1.0 else z / temperature


def _weights(z: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised softmax over the decodable ids: (w (R, Vs) fp32, m (R, 1)) with w = exp(z - m) and m the
    decodable maximum, so the largest weight is exactly 1 and nothing overflows. The padded tail gets no mass."""
    zs = z[:, :vocab_size]  # (R, Vs)
    m = zs.amax(dim=-1, keepdim=True)  # (R, 1)
    return torch.exp(zs - m), m


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float, vocab_size: int) -> torch.Tensor:
    """The distribution the sampler draws from: `logits` (R, V) -> probs (R, vocab_size) float64.

    Ids >= vocab_size (the padded tail) get no mass; temperature must be > 0 here (greedy is handled apart)."""
    w = _weights(_scaled(logits, temperature), vocab_size)[0].double()
    return _nucleus(w / w.sum(dim=-1, keepdim=True), top_p)


def sample_tokens(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
    top_p: float,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampling step: `logits` (R, V) fp32 and `uniforms` (R,) in [0, 1) -> (token ids (R,) long,
    log-probs (R,) fp32 under temperature T over all V rows, T = 1 when greedy)."""
    if temperature == 0.0:
        tokens = torch.argmax(logits[:, :vocab_size], dim=-1)  # (R,) first maximum on ties, like a plain argmax
        z = logits.float()  # (R, V)
        logp = z.gather(1, tokens.unsqueeze(1)).squeeze(1) - torch.logsumexp(z, dim=-1)  # (R,) at T = 1
        return tokens, logp
    # The exponentials are fp32 (relative error ~1e-7 each), every sum float64, so the CDF of a 150k-id vocabulary
    # loses nothing to accumulation; the softmax's normalisation is folded into the CDF walk's target. It spares a
    # float64 exp over (R, V): 1.3x faster per call on a CPU, same draws up to rounding (bench/RESULTS.md, rollout).
    z = _scaled(logits, temperature)  # (R, V) fp32
    w, m = _weights(z, vocab_size)  # (R, Vs) unnormalised, (R, 1)
    w_sum = w.sum(dim=-1, keepdim=True, dtype=torch.float64)  # (R, 1) >= 1 (the maximum has weight 1)
    probs = w if top_p >= 1.0 else _nucleus(w.double() / w_sum, top_p)  # (R, Vs)
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)  # (R, Vs)
    target = uniforms.to(cdf.dtype).unsqueeze(1) * cdf[:, -1:]  # (R, 1) in [0, total)
    # right=True picks the first id whose CDF exceeds the target, so a zero-probability id is never chosen.
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=vocab_size - 1)  # (R,)
    # Reported: log softmax(z) at the sampled id over all V rows (the padded tail included), before top-p.
    lse = m.double() + w_sum.log()  # (R, 1) log-sum-exp over the decodable ids
    if vocab_size < z.shape[1]:
        lse = torch.logaddexp(lse, torch.logsumexp(z[:, vocab_size:].double(), dim=-1, keepdim=True))
    logp = (z.gather(1, tokens.unsqueeze(1)).double() - lse).squeeze(1).float()  # (R,)
    return tokens, logp


def _check_finite(group: list[Completion], prompt_index: int) -> None:
    """Raise if a log-prob is NaN or inf: any NaN or +inf logit makes the row's log-softmax non-finite. Checked on the
    host copies both decode loops already make, so the fixed-shape loop gains no per-step sync."""
    for j, c in enumerate(group):
        if math.isfinite(sum(c.logprobs)):  # the common case in one C loop (log-probs are <= 0: the sum cannot overflow)
            continue
        step = next(k for k, lp in enumerate(c.logprobs) if not math.isfinite(lp))
        raise DivergedError(f"prompt_token_ids[{prompt_index}], sample {j}: the logits for generated token {step} are "
                           f"not finite (log-prob {c.logprobs[step]}); most likely the policy has diverged")


# ----------------------------------------------------------------------------------------------------------------------
# The engine


class BuiltinEngine(RolloutEngine):
    """Sampler over a `minitagpr.model.Qwen3ForCausalLM`.

    model: the Qwen3 module to sample from (see the module docstring on sharing it with the policy).
    tokenizer: a `minitagpr.tokenizer.Tokenizer` for the completion text and the sampleable vocabulary size;
        without one, `text` is empty and `vocab_size` must be given or the model's full vocabulary is sampleable.
    vocab_size: ids >= this are never sampled (default: tokenizer.vocab_size, else the model's embedding rows).
    max_batch_rows: prompts are cut into chunks of max(1, max_batch_rows // n), so at most this many sequences
        (prompts x n) share a KV cache (unless n alone exceeds it); bounds the cache's memory. The cache peaks at
        about twice its steady size while rows are copied (sharing a prefill, dropping finished rows: KVCache.reorder).
    decode: "dynamic": finished rows leave the batch, attention reads only the filled prefix of the cache (fastest
        on CPUs); "static": fixed shapes, every row decodes until all have stopped (static_decode.py), run eagerly;
        "graph": the static step captured as a CUDA graph and replayed per token (CUDA only, for a model that is not
        FSDP-sharded; 5.1x transformers at batch 16 on an H100 where "dynamic" is 1.1x, bench/RESULTS.md); "auto"
        (default): "graph" for an unsharded model on a CUDA device, else "dynamic", decided per call from where the
        model is then. All give the same ids and log-probs up to float rounding, with an fp32 model (every caller
        builds one): in bf16, exact logit ties are common and greedy ids then differ from a full forward's in practice.
    """

    DECODE_MODES = ("auto", "dynamic", "static", "graph")

    def __init__(self, model, tokenizer=None, *, vocab_size: int | None = None, max_batch_rows: int = 64,
                 decode: str = "auto"):
        self.model = model
        self.tokenizer = tokenizer
        self.model_vocab_size = int(model.config.vocab_size)
        if vocab_size is None:
            vocab_size = tokenizer.vocab_size if tokenizer is not None else self.model_vocab_size
        if not 0 < vocab_size <= self.model_vocab_size:
            source = f"tokenizer {tokenizer.source}" if getattr(tokenizer, "source", None) else "vocab_size"
            raise RolloutError(f"{source} has {vocab_size} ids but the model only {self.model_vocab_size} embedding "
                               f"rows (vocab_size in its config.json); they must come from the same checkpoint")
        self.vocab_size = int(vocab_size)
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        self.max_batch_rows = int(max_batch_rows)
        if decode not in self.DECODE_MODES:
            raise ValueError(f"decode must be one of {self.DECODE_MODES}, got {decode!r}")
        if decode == "graph" and hasattr(model, "unshard"):  # an FSDP2 module gathers its weights in hooks
            raise ValueError("decode='graph' needs an unsharded model (the engine's own copy), not an FSDP2 module")
        self.decode = decode
        self.graph_stats: dict[str, int] = {}  # graph decoding: "captures", "replays", "fallbacks" (failed captures)
        self.pad_id = int(getattr(tokenizer, "pad_id", 0) or 0) if tokenizer is not None else 0

    # -- weights -------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy (HF name, full tensor) pairs into the engine's model; returns how many parameters were written.
        Unknown names, shape mismatches and a name sent twice raise; a tied head arriving as `lm_head.weight` is
        accepted and lands in the shared embedding (a state_dict sends both names: one tensor). A stream that
        leaves a parameter out raises at its end, naming it: the engine would sample from a mix of old and new
        weights, not the policy the loss takes for pi_old."""
        params = dict(self.model.named_parameters())
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        sent: set[str] = set()  # engine parameters written
        arrived: set[str] = set()  # the names they arrived under (the tied pair, embed + lm_head, is one parameter)
        for name, tensor in named_tensors:
            name = original = hf_name(name)  # the engine's copy is unwrapped; the policy may carry checkpoint wrappers
            if name == "lm_head.weight" and name not in params and tied:
                name = "model.embed_tokens.weight"
            if name not in params:
                raise KeyError(f"sync_weights: the engine's model has no parameter named {name!r}")
            if original in arrived:
                raise RolloutError(f"sync_weights: {original} was sent twice")
            param = params[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"sync_weights: {name} has shape {tuple(tensor.shape)}, "
                                 f"model expects {tuple(param.shape)}")
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))
            sent.add(name)
            arrived.add(original)
        if missing := sorted(set(params) - set(sent)):
            raise RolloutError(f"sync_weights: {len(missing)} of the engine's {len(params)} parameters were not sent "
                               f"(e.g. {missing[:3]}); it would sample with stale weights")
        return len(sent)

    def decode_mode(self) -> str:
        """The loop the next generate() runs: `decode`, with "auto" resolved for where the model is now."""
        if self.decode != "auto":
            return self.decode
        on_cuda = next(self.model.parameters()).device.type == "cuda"
        return "graph" if on_cuda and not hasattr(self.model, "unshard") else "dynamic"

    # -- generation ----------------------------------------------------------------------------------------------------

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
        max_position = getattr(self.model.config, "max_position_embeddings", None)
        stops = check_request(prompt_token_ids, n, temperature, top_p, max_new_tokens, stop_token_ids,
                              self.model_vocab_size, max_len=None if max_position is None else
                              ("the model's max_position_embeddings", max_position))
        device = next(self.model.parameters()).device
        if self.decode_mode() == "graph" and device.type != "cuda":  # before any prefill, not after the first chunk's
            raise RolloutError(f"decode='graph' (CUDA graphs) needs the model on a CUDA device, not {device}")
        keys = prompt_seed_keys(seed, len(prompt_token_ids))  # (base, index) per prompt
        # Longest first, so each chunk pads little; per-row seeds make the order irrelevant to the samples.
        order = sorted(range(len(prompt_token_ids)), key=lambda i: -len(prompt_token_ids[i]))
        per_chunk = max(1, self.max_batch_rows // n)
        groups: list[list[Completion] | None] = [None] * len(prompt_token_ids)
        # On CPUs, decode with q/k/v and gate/up fused (fewer small matmuls); the copies live for this call only.
        on_cpu = device.type == "cpu"
        fused = getattr(self.model, "fused_projections", None)
        mode = self.decode_mode()
        with fused() if (on_cpu and fused is not None) else nullcontext():
            for start in range(0, len(order), per_chunk):
                chunk = order[start:start + per_chunk]
                outs = self._generate_chunk([list(prompt_token_ids[i]) for i in chunk], n, float(temperature),
                                            float(top_p), max_new_tokens, stops, [keys[i] for i in chunk], mode)
                for i, group in zip(chunk, outs):
                    _check_finite(group, i)
                    groups[i] = group
        return groups  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_chunk(self, prompts, n, temperature, top_p, max_new_tokens, stops, seed_keys, mode):
        model = self.model
        device = next(model.parameters()).device
        B, R = len(prompts), len(prompts) * n
        L = max(len(p) for p in prompts)

        # 1. Prefill each prompt on its own into its left-padded rows of one cache: no pad tokens are computed and
        #    attention is plain causal (SDPA's causal kernel skips the masked half); pad slots stay invalid.
        slots = L + max_new_tokens
        if mode != "dynamic":  # the fixed-shape loop masks the whole buffer: a length SDPA need not pad for
            slots = -(-slots // 16) * 16
        cache = model.new_kv_cache(B, slots, device=device)
        last_hidden = []
        for b, ids in enumerate(prompts):
            t = len(ids)
            input_ids = torch.tensor(ids, dtype=torch.long, device=device).unsqueeze(0)  # (1, t)
            position_ids = torch.arange(t, device=device).unsqueeze(0)  # (1, t)
            hidden = model(input_ids, position_ids, kv_cache=cache.row_view(b, L - t))  # (1, t, H)
            last_hidden.append(hidden[:, -1])
        cache.length = L  # every row now spans L slots: left pads (invalid) then its prompt
        logits = model.logits(torch.cat(last_hidden))  # (B, V) fp32

        # 2. Share each prefill across its n samples: rows are (prompt b, sample j) at b * n + j.
        if n > 1:  # (with n == 1 the rows already are the samples: no copy of the cache)
            share = torch.arange(B, device=device).repeat_interleave(n)  # (R,)
            cache.reorder(share)
            logits = logits.index_select(0, share)  # (R, V)
        next_pos = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(n)  # (R,)

        # 3. Each row's uniforms come from its own generator, so they do not depend on the chunk.
        uniforms = torch.empty(R, max_new_tokens, dtype=torch.float64)  # (R, max_new_tokens)
        if temperature > 0.0:
            for r in range(R):
                gen = torch.Generator().manual_seed(sample_seed(*seed_keys[r // n], r % n))
                uniforms[r] = torch.rand(max_new_tokens, generator=gen, dtype=torch.float64)
        uniforms = uniforms.to(device)

        # 4. Decode.
        if mode == "dynamic":
            out_tokens, out_logp, finish = self._decode_dynamic(cache, logits, uniforms, next_pos, max_new_tokens,
                                                                stops, temperature, top_p)
        else:
            sample = partial(sample_tokens, temperature=temperature, top_p=top_p, vocab_size=self.vocab_size)
            out_tokens, out_logp, finish = decode_static(model, cache, logits, uniforms, next_pos, max_new_tokens,
                                                         stops, sample, graph=mode == "graph",
                                                         stats=self.graph_stats)

        groups = []
        for b in range(B):
            group = []
            for r in range(b * n, (b + 1) * n):
                ids = out_tokens[r]
                body = ids[:-1] if finish[r] == "stop" else ids
                text = self.tokenizer.decode(body) if self.tokenizer is not None else ""
                group.append(Completion(token_ids=ids, text=text, logprobs=out_logp[r], finish_reason=finish[r]))
            groups.append(group)
        return groups

    def _decode_dynamic(self, cache, logits, uniforms, next_pos, max_new_tokens, stops, temperature, top_p):
        """The loop for CPUs: rows that stop leave the batch (and the cache); `alive` maps the cache's current
        rows back to the R output rows. Returns per row (ids, log-probs, finish reason)."""
        model, device = self.model, logits.device
        R = logits.shape[0]
        out_tokens: list[list[int]] = [[] for _ in range(R)]
        out_logp: list[list[float]] = [[] for _ in range(R)]
        finish = ["length"] * R
        stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
        alive = torch.arange(R, device=device)  # (R_alive,)
        for step in range(max_new_tokens):
            tokens, logp = sample_tokens(logits, uniforms[alive, step], temperature, top_p, self.vocab_size)
            stopped = torch.isin(tokens, stop_ids)  # (R_alive,)
            # one device -> host copy per step (on a GPU each copy waits for the queue to drain): ids < 2^53 and
            # fp32 log-probs are exact in float64
            host = torch.stack([alive.double(), tokens.double(), logp.double(), stopped.double()]).tolist()
            for r, t, lp, s in zip(*host):
                out_tokens[int(r)].append(int(t))
                out_logp[int(r)].append(lp)
                if s:
                    finish[int(r)] = "stop"
            n_stopped = int(sum(host[3]))
            if step == max_new_tokens - 1 or n_stopped == len(host[3]):
                break
            if n_stopped:
                keep = (~stopped).nonzero().squeeze(1)  # (R_alive',) rows that go on
                cache.reorder(keep)
                alive, tokens, next_pos = alive[keep], tokens[keep], next_pos[keep]
            hidden = model(tokens.unsqueeze(1), next_pos.unsqueeze(1), kv_cache=cache,
                           cache_mask=torch.ones(len(alive), 1, dtype=torch.bool, device=device))  # (R_alive, 1, H)
            logits = model.logits(hidden)[:, 0]  # (R_alive, V) fp32
            next_pos = next_pos + 1
        return out_tokens, out_logp, finish

