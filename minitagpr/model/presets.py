"""Named model shapes for tests, the demo and benchmarks, and seeded random checkpoints saved in HF format."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from minitagpr.model.checkpoint import save_pretrained
from minitagpr.model.qwen3 import Qwen3Config, Qwen3ForCausalLM

PRESETS: dict[str, Qwen3Config] = {
    # unit tests: head_dim != hidden/heads, GQA 2:1, tied head
    "tiny": Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
                        max_position_embeddings=4096, rope_theta=10_000.0),
    # the demo pipeline on 2 CPU cores (~1M parameters with the demo tokenizer's few-thousand-token vocabulary)
    "demo": Qwen3Config(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                        max_position_embeddings=4096, rope_theta=10_000.0),
    # the Qwen3-0.6B shape cut to 2 layers (benchmarks at a realistic width)
    "qwen3-0.6b-2layer": Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                     num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=8,
                                     head_dim=128, tie_word_embeddings=True, max_position_embeddings=40960,
                                     rope_theta=1_000_000.0),
    # the whole Qwen3-0.6B shape (assets/qwen3-configs/Qwen3-0.6B): GPU throughput and MFU at a real model's size
    "qwen3-0.6b": Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                              num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                              max_position_embeddings=40960, rope_theta=1_000_000.0),
}


def tiny_config(name: str = "tiny", vocab_size: int | None = None, **overrides) -> Qwen3Config:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = replace(PRESETS[name], **overrides)
    return replace(cfg, vocab_size=vocab_size) if vocab_size else cfg


def build_model(cfg: Qwen3Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> Qwen3ForCausalLM:
    model = Qwen3ForCausalLM(cfg).to(dtype)
    model.init_weights(seed)
    return model


def make_tiny_checkpoint(out_dir, preset: str = "tiny", seed: int = 0, vocab_size: int | None = None,
                         tokenizer_dir=None, **overrides) -> Path:
    """A seeded random Qwen3 saved in HF format (+ the tokenizer files when given). With a tokenizer, the vocabulary
    is rounded up to a multiple of 64 rows (like Qwen3's 151,936 rows for 151,669 ids) unless vocab_size is given."""
    out_dir = Path(out_dir)
    extra = {}
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            extra[name] = tokenizer_dir / name
        if vocab_size is None:
            n = _tokenizer_size(tokenizer_dir / "tokenizer.json")
            vocab_size = -(-n // 64) * 64
    cfg = tiny_config(preset, vocab_size=vocab_size, **overrides)
    model = build_model(cfg, seed)
    return save_pretrained(model, out_dir, extra_files=extra)


def _tokenizer_size(path: Path) -> int:
    data = json.loads(path.read_text(encoding="utf-8"))
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1
