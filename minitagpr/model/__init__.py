"""Our Qwen3: model, HF checkpoint I/O, named presets."""
from minitagpr.model.checkpoint import CheckpointError, load_pretrained, save_pretrained
from minitagpr.model.qwen3 import ConfigError, KVCache, Qwen3Config, Qwen3ForCausalLM, Qwen3Model

__all__ = ["CheckpointError", "ConfigError", "KVCache", "Qwen3Config", "Qwen3ForCausalLM", "Qwen3Model",
           "load_pretrained", "save_pretrained"]
