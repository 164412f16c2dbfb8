"""A BERT-style text encoder with mean pooling: the dense retriever of the paper's robustness study (Contriever).

Contriever (Izacard et al., 2021; `facebook/contriever`) is a BERT-base encoder whose text embedding is the mean of
the last hidden states over the text's tokens (padding excluded); LaMP's reference ranker scores a profile item by
the dot product of its embedding with the query's. This module reads such a checkpoint (HF `BertModel` layout in
safetensors, with or without a `bert.` prefix; pickled `.bin` weights are never loaded, convert them once) and its
WordPiece tokenizer (`tokenizer.json`, or `vocab.txt` + `tokenizer_config.json`), and gives
`encoder.encode(texts) -> (n, hidden) float32` for `minitagpr.data.retrieval.DenseRetriever(encode_fn=...)`.

Post-LayerNorm BERT: embeddings (word + absolute position + token type 0) -> LayerNorm -> N x [self-attention ->
dense -> LayerNorm(x + .), intermediate dense -> GELU (erf) -> dense -> LayerNorm(x + .)]. The pooler is not used.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minitagpr.model.checkpoint import CheckpointError, load_state_into, resolve_checkpoint
from minitagpr.model.qwen3 import embedding


@dataclass
class EncoderConfig:
    vocab_size: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_json(cls, path: Path) -> "EncoderConfig":
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path}: cannot read the encoder config: {err}") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("model_type", "bert") != "bert":
            raise CheckpointError(f"{path}: model_type {raw.get('model_type')!r} is not a BERT encoder")
        if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"{path}: only hidden_act 'gelu' with absolute positions is supported, got "
                                  f"{raw.get('hidden_act')!r} / {raw.get('position_embedding_type')!r}")
        for name in ("is_decoder", "add_cross_attention"):  # causal attention / cross-attention layers: not ours
            if raw.get(name):
                raise CheckpointError(f"{path}: field {name!r} is {raw[name]!r}: only a bidirectional BERT encoder "
                                      f"without cross-attention is supported")
        values = {}
        for name, kind in cls.__annotations__.items():
            if name in raw:
                value, low = raw[name], 0 if name == "pad_token_id" else 1  # every size is at least 1
                if (kind == "int" and not (isinstance(value, int) and not isinstance(value, bool) and value >= low)) \
                        or (kind == "float" and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                                     and 0 < value < math.inf)):
                    expected = f"an integer >= {low}" if kind == "int" else "a finite number > 0"
                    raise CheckpointError(f"{path}: field {name!r}: expected {expected}, got {value!r}")
                values[name] = value
        if "vocab_size" not in values:
            raise CheckpointError(f"{path}: field 'vocab_size' is missing")
        cfg = cls(**values)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise CheckpointError(f"{path}: hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads "
                                  f"{cfg.num_attention_heads}")
        return cfg


class _Layer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.heads = cfg.num_attention_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out, self.attn_norm = nn.Linear(h, h), nn.LayerNorm(h, eps=eps)
        self.up, self.down = nn.Linear(h, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, h)
        self.out_norm = nn.LayerNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # x (B, T, H), bias (B, 1, 1, T)
        b, t, h = x.shape
        split = lambda y: y.view(b, t, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731  (B, nh, T, hd)
        attn = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                              attn_mask=bias)  # padded keys carry -inf-like bias
        x = self.attn_norm(x + self.attn_out(attn.transpose(1, 2).reshape(b, t, h)))
        return self.out_norm(x + self.down(F.gelu(self.up(x))))


class TextEncoder(nn.Module):
    """BERT encoder + mean pooling. `forward(input_ids (B, T), attention_mask (B, T)) -> (B, H)` embeddings."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.word = embedding(cfg.vocab_size, h)
        self.position = embedding(cfg.max_position_embeddings, h)
        self.token_type = embedding(cfg.type_vocab_size, h)
        self.embed_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.tokenizer = None  # set by from_pretrained

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        positions = torch.arange(t, device=input_ids.device)
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type.weight[0]
        x = self.embed_norm(x)
        keep = attention_mask.bool()
        bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
        bias = bias[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.layers:
            x = layer(x, bias)
        weights = keep.to(x.dtype)[..., None]  # (B, T, 1)
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # mean over the text's tokens

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """(n, H) float32 CPU embeddings of `texts`, each truncated to the model's length, in batches."""
        if self.tokenizer is None:
            raise RuntimeError("encode needs a tokenizer: load the encoder with TextEncoder.from_pretrained")
        device = self.word.weight.device
        out = []
        for start in range(0, len(texts), batch_size):  # the tokenizer truncates to the model's length
            ids = [enc.ids for enc in self.tokenizer.encode_batch(list(texts[start:start + batch_size]))]
            width = max(len(i) for i in ids)
            input_ids = torch.tensor([i + [self.config.pad_token_id] * (width - len(i)) for i in ids])  # (b, T)
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])  # (b, T)
            out.append(self(input_ids.to(device), mask.to(device)).float().cpu())
        return torch.cat(out) if out else torch.zeros((0, self.config.hidden_size))

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, device="cpu",
                        dtype: torch.dtype | None = None) -> "TextEncoder":
        folder = resolve_checkpoint(path_or_hub_id)
        cfg = EncoderConfig.from_json(folder / "config.json")
        with torch.device("meta"):
            model = cls(cfg)
        load_state_into(model, folder, dtype=dtype, device=device, rename=_our_name, skip=_UNUSED)
        model.tokenizer = load_wordpiece(folder, cfg.max_position_embeddings)
        return model.eval()


_UNUSED = frozenset(f"{prefix}{name}" for prefix in ("", "bert.")  # checkpoint tensors we never read
                    for name in ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"))


_LAYER_NAMES = {  # HF BertModel name inside encoder.layer.{i} -> ours inside layers.{i}
    "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
    "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "up", "output.dense": "down", "output.LayerNorm": "out_norm",
}
_EMBED_NAMES = {"word_embeddings": "word", "position_embeddings": "position",
                "token_type_embeddings": "token_type", "LayerNorm": "embed_norm"}


def _our_name(name: str) -> str | None:
    """HF BertModel tensor name (optionally `bert.`-prefixed) -> our parameter name; None when it is not ours."""
    name = name.removeprefix("bert.")
    parts = name.split(".")
    leaf = {"gamma": "weight", "beta": "bias"}.get(parts[-1], parts[-1])  # old TF-converted LayerNorm names
    if parts[0] == "embeddings" and len(parts) == 3 and parts[1] in _EMBED_NAMES:
        return f"{_EMBED_NAMES[parts[1]]}.{leaf}"
    if parts[:2] == ["encoder", "layer"] and len(parts) >= 5:
        inner = ".".join(parts[3:-1])
        if inner in _LAYER_NAMES:
            return f"layers.{parts[2]}.{_LAYER_NAMES[inner]}.{leaf}"
    return None


def load_wordpiece(folder: Path, max_length: int):
    """The checkpoint's WordPiece tokenizer (`tokenizers`), adding [CLS] ... [SEP] and truncating to `max_length`."""
    from tokenizers import Tokenizer
    from tokenizers.implementations import BertWordPieceTokenizer

    if (folder / "tokenizer.json").is_file():
        try:
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as err:  # noqa: BLE001 -- the tokenizers library raises its own exception type
            raise CheckpointError(f"{folder / 'tokenizer.json'}: cannot load the tokenizer: {err}") from None
    elif (folder / "vocab.txt").is_file():
        lower = True
        config = folder / "tokenizer_config.json"
        if config.is_file():
            try:
                lower = bool(json.loads(config.read_text()).get("do_lower_case", True))
            except (OSError, ValueError) as err:
                raise CheckpointError(f"{config}: cannot read the tokenizer config: {err}") from None
        tok = BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lower)
    else:
        raise CheckpointError(f"{folder}: no tokenizer.json or vocab.txt for the encoder's tokenizer")
    tok.enable_truncation(max_length=max_length)
    tok.no_padding()
    return tok


def encoder_fn(path_or_hub_id: str | os.PathLike, device: str | None = None):
    """`encode_fn` for DenseRetriever: texts -> (n, H) numpy embeddings from the encoder at `path_or_hub_id` (on
    CUDA when available unless `device` says otherwise)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = TextEncoder.from_pretrained(path_or_hub_id, device=device)
    return lambda texts: model.encode(list(texts)).numpy()

