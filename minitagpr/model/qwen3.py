"""Qwen3 decoder in plain PyTorch: config, RMSNorm, RoPE, grouped-query attention with q/k norms, SwiGLU MLP.

Read top to bottom: config -> helpers -> attention -> MLP -> block -> model. Parameter names equal the Hugging Face
checkpoint names, so checkpoint I/O is a name check and a copy. This file knows nothing of distribution (FSDP wraps
a built model from the outside, in minitagpr/distributed.py).

Shapes: B batch rows, T tokens per row, H hidden size, nh query heads, nkv key/value heads, D head_dim, V vocab rows.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


CAUSAL_LM = "Qwen3ForCausalLM"  # the HF architecture name of this model (config.json "architectures")


class ConfigError(ValueError):
    """A config.json that this implementation cannot run faithfully; the message names the file and the fields."""


# Keys of a HF config.json that carry no information for this model (bookkeeping of transformers / generation).
_IGNORED_KEYS = {
    "architectures", "model_type", "transformers_version", "use_cache", "torch_dtype", "dtype", "max_window_layers",
    "_name_or_path", "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "num_labels",
    "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class", "pruned_heads",
    "tie_encoder_decoder", "torchscript", "use_bfloat16", "finetuning_task", "task_specific_params",
    "output_router_logits", "mlp_only_layers", "layer_types", "sliding_window", "use_sliding_window", "rope_scaling",
    "rope_parameters",
}


@dataclass
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    # transformers' Qwen3Config defaults (a config.json without them builds the same model there and here); the
    # released configs set head_dim 128 even where hidden/heads differs (0.6B: 1024/16 = 64), and 40960 positions.
    # head_dim null: hidden_size // num_attention_heads.
    head_dim: int | None = 128
    max_position_embeddings: int = 32768
    rope_theta: float = 10_000.0  # transformers' Qwen3Config default (a config.json without it loads alike);
    #                               the released Qwen3 configs all set 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the dtype the weights were saved in; load_pretrained(dtype=None) casts a
    #                                 checkpoint that mixes dtypes to it

    def __post_init__(self):
        if problems := self._field_problems():
            raise ConfigError("; ".join(problems))
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
            if self.head_dim < 2 or self.head_dim % 2:
                raise ConfigError(f"field 'head_dim' is not set, and hidden_size // num_attention_heads = "
                                  f"{self.head_dim} is not an even integer > 0 (RoPE rotates pairs of dimensions)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"field 'num_key_value_heads': num_attention_heads={self.num_attention_heads} is not a "
                              f"multiple of num_key_value_heads={self.num_key_value_heads}")

    def _field_problems(self) -> list[str]:
        """Every field of the wrong type or out of range, by name (JSON true is no integer here, though Python's
        bool is an int)."""
        def integer(v, low):
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def token(v):
            return v is None or integer(v, 0)

        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings")
        checks = {name: (lambda v: integer(v, 1), "an integer > 0") for name in sizes}
        checks.update(
            head_dim=(lambda v: v is None or integer(v, 2) and v % 2 == 0,
                      "an even integer > 0 (RoPE rotates pairs of dimensions)"),
            rope_theta=(lambda v: number(v) and v > 0, "a finite number > 0"),
            rms_norm_eps=(lambda v: number(v) and v > 0, "a finite number > 0"),
            attention_dropout=(lambda v: number(v) and v == 0, "0 (attention dropout is not implemented; the "
                                                                "released Qwen3 configs have 0.0)"),
            initializer_range=(lambda v: number(v) and v >= 0, "a finite number >= 0"),
            tie_word_embeddings=(lambda v: isinstance(v, bool), "true or false"),
            attention_bias=(lambda v: isinstance(v, bool), "true or false"),
            hidden_act=(lambda v: isinstance(v, str), "a string"),
            bos_token_id=(token, "null or a token id >= 0"),
            eos_token_id=(lambda v: token(v) or isinstance(v, list) and all(integer(t, 0) for t in v),
                          "null, a token id >= 0 or a list of token ids"),
            pad_token_id=(token, "null or a token id >= 0"),
            torch_dtype=(lambda v: v is None or isinstance(v, str), "null or a dtype name such as 'bfloat16'"),
        )
        return [f"field {name!r}: expected {what}, got {getattr(self, name)!r}"
                for name, (ok, what) in checks.items() if not ok(getattr(self, name))]

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "Qwen3Config":
        """Parse a HF Qwen3 config dict; unsupported settings and unknown keys are rejected by name."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        own = {f.name for f in fields(cls)}
        problems = []
        if d.get("model_type", "qwen3") != "qwen3":
            problems.append(f"model_type={d['model_type']!r} (only 'qwen3' is supported)")
        if d.get("rope_scaling") not in (None, {}, {"rope_type": "default"}, {"type": "default"}):
            problems.append(f"rope_scaling={d['rope_scaling']!r} (RoPE scaling is not implemented)")
        rope = d.get("rope_parameters")
        if rope is not None:  # transformers >= 5 nests rope_theta here; "type" is the older name of rope_type
            plain = isinstance(rope, dict) and set(rope) <= {"rope_type", "type", "rope_theta"} \
                and rope.get("rope_type", rope.get("type", "default")) == "default"
            if not plain:  # e.g. yarn, or parameters per layer type: another RoPE, never silently the default one
                problems.append(f"rope_parameters={rope!r} (only rope_type 'default' with rope_theta is implemented)")
            elif "rope_theta" in rope and "rope_theta" in d and rope["rope_theta"] != d["rope_theta"]:
                problems.append(f"rope_theta={d['rope_theta']!r} and rope_parameters.rope_theta="
                                f"{rope['rope_theta']!r} differ (transformers reads the latter)")
            elif "rope_theta" in rope:
                d = {**d, "rope_theta": rope["rope_theta"]}
        layer_types = d.get("layer_types") or []
        # transformers slides the window in layers >= max_window_layers (default 28) unless layer_types says
        # otherwise: with max_window_layers >= num_hidden_layers no layer slides
        window_layers, n_layers = d.get("max_window_layers", 28), d.get("num_hidden_layers")
        if d.get("use_sliding_window") and not layer_types and not (
                isinstance(window_layers, int) and isinstance(n_layers, int) and window_layers >= n_layers):
            problems.append(f"use_sliding_window=true with max_window_layers={window_layers!r} < num_hidden_layers="
                            f"{n_layers!r} (sliding-window attention is not implemented)")
        if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
            problems.append(f"layer_types={d['layer_types']!r} (only full_attention layers are implemented)")
        if d.get("hidden_act", "silu") not in ("silu", "swish"):  # the same function under two names
            problems.append(f"hidden_act={d['hidden_act']!r} (Qwen3 uses silu)")
        if d.get("attention_bias", False):
            problems.append("attention_bias=true (Qwen3 attention has no biases)")
        unknown = sorted(k for k in d if k not in own and k not in _IGNORED_KEYS)
        if unknown:
            problems.append("unknown keys " + ", ".join(unknown))
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads"]
        missing = [k for k in required if k not in d]
        if missing:
            problems.append("missing fields " + ", ".join(missing))
        if problems:
            raise ConfigError(f"{source}: unsupported Qwen3 config: " + "; ".join(problems))
        kwargs = {k: d[k] for k in own if k in d}
        if kwargs.get("hidden_act") == "swish":
            kwargs["hidden_act"] = "silu"
        if "num_key_value_heads" in kwargs and kwargs["num_key_value_heads"] is None:  # transformers: no GQA
            kwargs["num_key_value_heads"] = d.get("num_attention_heads")
        if "dtype" in d and "torch_dtype" not in d:
            kwargs["torch_dtype"] = d["dtype"]
        try:
            return cls(**kwargs)
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "Qwen3Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config.json ({e.strerror or e})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        """HF layout: transformers' Qwen3Config loads it unchanged."""
        d = asdict(self)
        d.update(architectures=[CAUSAL_LM], model_type="qwen3", rope_scaling=None, sliding_window=None,
                 use_sliding_window=False, use_cache=True, max_window_layers=self.num_hidden_layers)
        if d["torch_dtype"] is None:
            d.pop("torch_dtype")
        return d


# ----------------------------------------------------------------------------------------------- helpers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 and scale in the input dtype, as the reference implementation does (bit-level parity)
        x32 = x.float()
        x32 = x32 * torch.rsqrt((x32 * x32).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, T, D) for the half-split ("rotate_half") RoPE layout Qwen3 checkpoints use."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, D/2) fp32
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, D); cos/sin (B, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def document_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, 1, T, T) bool mask for packed rows (a document starts where the position is 0), or None for one document
    per row, where plain causal attention is already right (right padding sits after every real token)."""
    starts = position_ids == 0
    if not bool(starts[:, 1:].any()):
        return None
    doc = starts.cumsum(dim=1)  # (B, T) document index of every token
    T = position_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # (B, 1, T, T): the same for every head


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func  # optional GPU extra
        return flash_attn_varlen_func
    except ImportError:
        return None


class KVCache:
    """Preallocated keys/values for decoding. Every forward call appends t slots to every row; `valid` marks which
    slots hold real tokens (False = left padding), and nobody attends to an invalid slot but itself.

    Fixed-shape mode (`slot` set to a (1,) long tensor on the cache's device; rollout/static_decode.py): a forward of
    one token per row writes at slot `slot` and attends to the whole buffer, the not-yet-written slots masked off;
    `length` is not used. Every shape then stays the same from step to step, so the step can be a CUDA graph; the
    caller advances `slot`."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, nkv, S, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, S)
        self.length = 0
        self.max_len = max_len
        self.slot: torch.Tensor | None = None  # (1,) long: fixed-shape mode's write slot (see the class docstring)

    def row_view(self, row: int, start: int) -> "KVCache":
        """An empty one-row cache whose slots are slots start.. of `row` here (shared storage): prefilling one prompt
        through it writes that prompt's keys/values straight into its left-padded place in this cache."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, row:row + 1, :, start:], self.v[:, row:row + 1, :, start:]
        view.valid = self.valid[row:row + 1, start:]
        view.length, view.max_len, view.slot = 0, self.max_len - start, None
        return view

    def reorder(self, index: torch.Tensor) -> None:
        """Select/repeat rows, e.g. `index = arange(B).repeat_interleave(n)` shares one prefill across n samples."""
        self.k, self.v, self.valid = self.k[:, index], self.v[:, index], self.valid[index]

    def attention_mask(self, t: int) -> torch.Tensor:
        """(B, 1, t, S') bool for the t new query slots against the first S' = length + t slots."""
        s = self.length + t
        q_slot = torch.arange(self.length, s, device=self.valid.device)[:, None]  # (t, 1)
        k_slot = torch.arange(s, device=self.valid.device)[None, :]  # (1, S')
        causal = k_slot <= q_slot
        return ((self.valid[:, None, :s] & causal) | (k_slot == q_slot))[:, None]  # self-attend keeps pads finite


# ----------------------------------------------------------------------------------------------- attention
class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.nkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.d, bias=False)
        self.o_proj = nn.Linear(self.nh * self.d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)  # per-head norm of queries and keys, before RoPE
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.qkv_weight = None  # (q+k+v rows, H) copy, only inside Qwen3ForCausalLM.fused_projections()

    def forward(self, x, cos, sin, mask, kv_cache: KVCache | None = None, varlen=None):
        B, T, _ = x.shape
        if self.qkv_weight is not None:  # one matmul for q, k and v (inference, see fused_projections)
            q, k, v = F.linear(x, self.qkv_weight).split([self.nh * self.d, self.nkv * self.d, self.nkv * self.d], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.view(B, T, self.nh, self.d)).transpose(1, 2)  # (B, nh, T, D)
        k = self.k_norm(k.view(B, T, self.nkv, self.d)).transpose(1, 2)  # (B, nkv, T, D)
        v = v.view(B, T, self.nkv, self.d).transpose(1, 2)  # (B, nkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if varlen is not None:  # flash-attn on packed rows: every document is its own causal sequence
            fn, cu, max_len = varlen
            out = fn(q.transpose(1, 2).reshape(B * T, self.nh, self.d), k.transpose(1, 2).reshape(B * T, self.nkv, self.d),
                     v.transpose(1, 2).reshape(B * T, self.nkv, self.d), cu, cu, max_len, max_len, causal=True)
            return self.o_proj(out.reshape(B, T, self.nh * self.d))
        if kv_cache is not None and kv_cache.slot is not None:  # fixed shapes: write at a device-side slot, read all
            kv_cache.k[self.layer_idx].index_copy_(2, kv_cache.slot, k)
            kv_cache.v[self.layer_idx].index_copy_(2, kv_cache.slot, v)
            k, v = kv_cache.k[self.layer_idx], kv_cache.v[self.layer_idx]  # (B, nkv, max_len, D), the mask cuts
        elif kv_cache is not None:
            start = kv_cache.length
            kv_cache.k[self.layer_idx, :, :, start:start + T] = k
            kv_cache.v[self.layer_idx, :, :, start:start + T] = v
            k = kv_cache.k[self.layer_idx, :, :, :start + T]  # (B, nkv, S', D)
            v = kv_cache.v[self.layer_idx, :, :, :start + T]
        gqa = self.nh != self.nkv
        if kv_cache is not None and T == 1 and gqa and mask is not None:
            # one-token decode: the g = nh/nkv query heads sharing a kv head become g query rows of that head (head
            # h uses kv head h // g), so the cache is read once per kv head instead of being expanded g times
            g = self.nh // self.nkv
            out = F.scaled_dot_product_attention(q.reshape(B, self.nkv, g, self.d), k, v, attn_mask=mask)
            return self.o_proj(out.reshape(B, self.nh * self.d))[:, None]  # (B, 1, H)
        if gqa and not native_gqa(q, mask):  # expanded: head h reads kv head h // g, as enable_gqa does
            k, v = (t.repeat_interleave(self.nh // self.nkv, dim=1) for t in (k, v))
            gqa = False
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.nh * self.d))  # (B, T, H)


def native_gqa(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether SDPA gets the grouped k/v (enable_gqa) or k/v expanded to every query head. On CUDA only the flash
    kernel takes grouped heads, and only in bf16/fp16 without an explicit mask; otherwise SDPA falls back to its
    math kernel, which materialises the (B, nh, T, S) scores (an fp32 engine's prefill, the fp32 PRMU scoring
    long inputs), so there k/v are expanded for the memory-efficient kernel. On the CPU: grouped."""
    return not q.is_cuda or (mask is None and q.dtype in (torch.float16, torch.bfloat16))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_weight = None  # (2 I, H) copy, only inside Qwen3ForCausalLM.fused_projections()

    def forward(self, x):
        if self.gate_up_weight is not None:  # one matmul for gate and up (inference, see fused_projections)
            gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, kv_cache=None, varlen=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, varlen)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------- model
def embedding(rows: int, dim: int) -> nn.Embedding:
    """nn.Embedding, left uninitialised when built on the meta device (every checkpoint load, which then fills it):
    its default normal_ init there runs through torch's reference implementations, whose first use in a process
    imports torch's tracing stack (sympy, dynamo: ~1.5 s, most of a small model's load). On a real device it keeps
    the default init."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))
    return nn.Embedding(rows, dim)


class Qwen3Model(nn.Module):
    """Embedding -> decoder layers -> final norm. Returns hidden states (B, T, H)."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids=None, position_ids=None, *, inputs_embeds=None, kv_cache: KVCache | None = None,
                cache_mask=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, H)
        B, T, _ = x.shape
        if position_ids is not None and not (position_ids.dim() == 2 and position_ids.shape[0] in (1, B)
                                             and position_ids.shape[1] == T):  # a 1-D one broadcast RoPE over heads
            raise ValueError(f"position_ids must be ({B}, {T}) or (1, {T}), got {tuple(position_ids.shape)}")
        if kv_cache is not None and kv_cache.slot is not None:
            if T != 1 or position_ids is None:
                raise ValueError("a fixed-shape KV cache (slot set) decodes one token per row with explicit position_ids")
            kv_cache.valid.index_fill_(1, kv_cache.slot, True)
            # (B, 1, 1, max_len) additive: every written slot of the row (left pads stay invalid), nothing after
            mask = torch.zeros(B, 1, 1, kv_cache.max_len, dtype=x.dtype, device=x.device).masked_fill_(
                ~kv_cache.valid[:, None, None, :], float("-inf"))
            varlen = None
        elif kv_cache is not None:
            if kv_cache.length + T > kv_cache.max_len:
                raise ValueError(f"KV cache full: {kv_cache.length} + {T} tokens > max_len {kv_cache.max_len}")
            valid = torch.ones(B, T, dtype=torch.bool, device=x.device) if cache_mask is None else cache_mask
            kv_cache.valid[:, kv_cache.length:kv_cache.length + T] = valid
            if position_ids is None:
                raise ValueError("decoding with a KV cache needs explicit position_ids (B, T)")
            # an empty cache filled with real tokens only is plain causal attention (SDPA's causal kernel)
            mask = None if kv_cache.length == 0 and cache_mask is None else kv_cache.attention_mask(T)
            if mask is not None:  # additive form, made once for all layers (SDPA would convert a bool mask per call)
                mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
            varlen = None
        else:
            if position_ids is None:
                position_ids = torch.arange(T, device=x.device).expand(B, T)
            mask, varlen = document_mask(position_ids), None
            fn = _flash_attn_varlen() if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) else None
            if fn is not None:  # packed rows -> cumulative sequence lengths over the flattened batch
                starts = (position_ids.expand(B, T) == 0).flatten()  # (B*T,): a (1, T) position_ids counts per row
                starts[0::T] = True  # every row starts a document
                idx = torch.nonzero(starts).flatten()
                cu = torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32)
                varlen, mask = (fn, cu, int((cu[1:] - cu[:-1]).max())), None
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, kv_cache, varlen)
        if kv_cache is not None and kv_cache.slot is None:
            kv_cache.length += T
        return self.norm(x)


class Qwen3ForCausalLM(nn.Module):
    """Decoder + LM head. `forward` returns hidden states, or per-token log-probs when given targets."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.config = cfg
        self.model = Qwen3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Qwen3-0.6B/1.7B share the head with the embedding; call again after `to_empty` (which unties)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.lm_head.weight  # (V, H); the embedding itself when tied

    def forward(self, input_ids=None, position_ids=None, *, inputs_embeds=None, kv_cache=None, cache_mask=None,
                targets=None, temperature: float = 1.0, with_entropy: bool = False, token_weights=None):
        """Hidden states (B, T, H); with `targets` (B, T): (logp (B, T), entropy (B, T) | None) fp32; with targets
        and `token_weights` (B, T): (sum of token_weights * logp (), logp (B, T) detached) -- the loss-shaped path
        for losses linear in logp (SFT), whose gradient is formed during the forward (kernels.weighted_logprob_sum)."""
        hidden = self.model(input_ids, position_ids, inputs_embeds=inputs_embeds, kv_cache=kv_cache,
                            cache_mask=cache_mask)  # (B, T, H)
        if targets is None:
            return hidden
        # log-probs inside forward: under FSDP2 the head weight is unsharded only during the root module's forward
        from minitagpr.kernels import token_logprobs, weighted_logprob_sum
        B, T, H = hidden.shape
        for name, t in (("targets", targets), ("token_weights", token_weights)):
            if t is not None and tuple(t.shape) != (B, T):
                raise ValueError(f"{name} must be (B, T) = ({B}, {T}) like the input, got {tuple(t.shape)}")
        if token_weights is not None:
            total, logp = weighted_logprob_sum(hidden.reshape(B * T, H), self.lm_head_weight, targets.reshape(B * T),
                                               token_weights.reshape(B * T), temperature=temperature)
            return total, logp.view(B, T)
        logp, entropy = token_logprobs(hidden.reshape(B * T, H), self.lm_head_weight, targets.reshape(B * T),
                                       temperature=temperature, with_entropy=with_entropy)
        # clone: FSDP2 hooks the root's outputs for backward, and a view output is fragile there (in-place ops on it
        # would skip the hook); (B, T) is tiny next to the hidden states
        return logp.view(B, T).clone(), (entropy.view(B, T).clone() if entropy is not None else None)  # (B, T) fp32

    @contextmanager
    def fused_projections(self):
        """Inference only: concatenate every layer's q/k/v and gate/up weights once, so a decode step runs 3 matmuls
        fewer per layer (small matmuls are overhead-bound on CPUs). The copies are made on entry and dropped on
        exit: they do not follow weight updates made inside the block. Costs one extra copy of those weights."""
        with torch.no_grad():
            for layer in self.model.layers:
                a, m = layer.self_attn, layer.mlp
                a.qkv_weight = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
                m.gate_up_weight = torch.cat([m.gate_proj.weight, m.up_proj.weight])
        try:
            yield self
        finally:
            for layer in self.model.layers:
                layer.self_attn.qkv_weight = layer.mlp.gate_up_weight = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head_weight).float()  # (B, T, V) fp32 -- very big tensor for real vocabularies

    def new_kv_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        ref = self.model.embed_tokens.weight
        cfg = self.config
        return KVCache(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim,
                       dtype or ref.dtype, device or ref.device)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Seeded normal(0, initializer_range) init of every matrix, ones for the norms (the HF scheme)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).to(p.dtype))

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # a tied head is counted once
        if exclude_embedding and not self.config.tie_word_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int, head: bool = True) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight used in a matmul (the embedding lookup never
        counts; the head only with head=True) plus causal attention's 6·L·nh·D·T (QK^T and AV at 2·nh·D·T each,
        half masked, x3). The fused log-prob kernels run the head only at target positions, so the trainers count
        `head_flops_per_token()` per target token and this with head=False per input token."""
        c = self.config
        n = sum(p.numel() for p in self.model.layers.parameters() if p.ndim == 2)
        return 6.0 * n + 6.0 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len + \
            (self.head_flops_per_token() if head else 0.0)

    def document_flops(self, lengths: torch.Tensor) -> float:
        """Training FLOPs without the head of documents of these lengths, each attending within itself: the sum of
        n x `flops_per_token(n, head=False)` over the lengths n, in closed form (6N per token + 6·L·nh·D·n²)."""
        c = self.config
        n = lengths.double()
        per_token = self.flops_per_token(0, head=False)  # 6N: the weights
        return per_token * float(n.sum()) + 6.0 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * float(
            (n ** 2).sum())

    def head_flops_per_token(self) -> float:
        """Training FLOPs of the LM head for one position (forward + backward): 6 · vocab · hidden."""
        return 6.0 * self.config.vocab_size * self.config.hidden_size
