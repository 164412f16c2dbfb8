"""Our Qwen3 against transformers' Qwen3ForCausalLM (reference oracle), packing, KV-cache decoding, presets."""
import random

import pytest
import torch

from minitagpr.model import Qwen3Config, Qwen3ForCausalLM
from minitagpr.model.presets import build_model, tiny_config
from train_fixtures import randomise_norms

transformers = pytest.importorskip("transformers")

# (tied, head_dim != hidden/heads, query heads per kv head 1, 2, 4)
CONFIGS = [
    dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=4, head_dim=12, tie_word_embeddings=True),
    dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
         num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    dict(vocab_size=333, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=8,
         num_key_value_heads=2, head_dim=8, tie_word_embeddings=False, rope_theta=1_000_000.0),
]


def hf_twin(model: Qwen3ForCausalLM):
    """transformers' model with the same config and the very same weights."""
    hf_cfg = transformers.Qwen3Config.from_dict(model.config.to_dict())
    hf_cfg._attn_implementation = "eager"
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not [m for m in missing if m != "lm_head.weight"] and not unexpected
    if model.config.tie_word_embeddings:
        hf.tie_weights()
    return hf


@pytest.mark.parametrize("cfg", CONFIGS, ids=["tied-gqa1", "untied-gqa2", "untied-gqa4"])
def test_logits_equal_transformers(cfg):
    seed = random.SystemRandom().randrange(1000)  # fresh weights each run, named in the message to replay a failure
    with torch.random.fork_rng(devices=[]):  # both constructors draw a default init (overwritten) from the global RNG
        model = build_model(Qwen3Config(**cfg), seed=seed).eval()
        randomise_norms(model, seed)  # trained norms: with weights of 1 (init) q/k-norm before or after RoPE agree
        hf = hf_twin(model)
    ids = torch.randint(0, cfg["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        ours = model.logits(model(ids))
        ref = hf(input_ids=ids).logits.float()
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4, f"max |logit difference| {err:.2e} (seed {seed})"


def test_targets_path_gives_log_softmax_of_logits():
    model = build_model(tiny_config("tiny"), seed=1).eval()
    ids = torch.randint(0, 512, (2, 9))
    targets = torch.randint(0, 512, (2, 9))
    targets[0, :3] = -100
    with torch.no_grad():
        logp, ent = model(ids, targets=targets, with_entropy=True)
        logits = model.logits(model(ids)).double()
    ref = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    ref[targets == -100] = 0
    assert logp.shape == (2, 9) and ent.shape == (2, 9)
    assert torch.allclose(logp.double(), ref, atol=1e-5)


@pytest.mark.parametrize("rows", [[[5, 11, 3]], [[5, 11, 3], [7, 2, 10]], [[19], [4, 15], [1, 1, 17]], [[1, 18]]])
def test_packed_rows_equal_unpacked_documents(rows):
    model = build_model(tiny_config("tiny"), seed=2).eval()
    docs = [[torch.randint(0, 512, (n,)) for n in lengths] for lengths in rows]
    packed = torch.stack([torch.cat(row) for row in docs])  # (B, 19)
    positions = torch.stack([torch.cat([torch.arange(len(d)) for d in row]) for row in docs])
    with torch.no_grad():
        out = model.logits(model(packed, positions))
        for b, row in enumerate(docs):
            alone = torch.cat([model.logits(model(d[None]))[0] for d in row])
            assert (out[b] - alone).abs().max().item() <= 1e-5


def test_right_padding_does_not_change_real_tokens():
    model = build_model(tiny_config("tiny"), seed=3).eval()
    ids = torch.randint(0, 512, (1, 7))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = model.logits(model(ids))
        b = model.logits(model(padded))[:, :7]
    assert (a - b).abs().max().item() <= 1e-5


def test_expanded_kv_heads_give_what_grouped_attention_gives(monkeypatch):
    """On CUDA, off the flash kernel's case, k/v are expanded to every query head instead of enable_gqa (which
    would fall back to the math kernel); the CPU runs that branch here by pretending it is such a case."""
    from minitagpr.model import qwen3
    cfg = tiny_config("tiny")
    assert cfg.num_attention_heads != cfg.num_key_value_heads  # grouped heads, or this tests nothing
    model = build_model(cfg, seed=5).eval()
    ids = torch.randint(0, 512, (2, 9))
    pos = torch.arange(9).expand(2, 9)
    cache_mask = torch.ones(2, 9, dtype=torch.bool)
    cache_mask[1, :4] = False  # left padding: the explicit-mask path
    with torch.no_grad():
        grouped = (model(ids), model(ids, pos, kv_cache=model.new_kv_cache(2, 9), cache_mask=cache_mask))
        asked = []
        monkeypatch.setattr(qwen3, "native_gqa", lambda q, mask: asked.append(mask is not None) and False)
        expanded = (model(ids), model(ids, pos, kv_cache=model.new_kv_cache(2, 9), cache_mask=cache_mask))
    assert set(asked) == {False, True}  # both calls took the expanded branch, with and without a mask
    for a, b in zip(grouped, expanded):
        assert (a - b).abs().max().item() <= 1e-5


def test_native_gqa_is_used_only_where_a_kernel_takes_grouped_heads():
    from minitagpr.model.qwen3 import native_gqa
    cpu = torch.zeros(1, 2, 3, 4)
    assert native_gqa(cpu, None) and native_gqa(cpu, torch.ones(3, 3, dtype=torch.bool))


def test_kv_cache_decoding_equals_full_forward_with_left_padding():
    model = build_model(tiny_config("tiny"), seed=4).eval()
    prompts = [torch.randint(0, 512, (n,)) for n in (6, 3)]
    steps = 5
    full_seqs = [torch.cat([p, torch.randint(0, 512, (steps,))]) for p in prompts]
    T0 = max(len(p) for p in prompts)
    ids = torch.zeros(2, T0, dtype=torch.long)
    mask = torch.zeros(2, T0, dtype=torch.bool)
    pos = torch.zeros(2, T0, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, T0 - len(p):] = p
        mask[i, T0 - len(p):] = True
        pos[i, T0 - len(p):] = torch.arange(len(p))
    cache = model.new_kv_cache(2, T0 + steps)
    with torch.no_grad():
        h = model(ids, pos, kv_cache=cache, cache_mask=mask)
        got = [[model.logits(h)[i, -1]] for i in range(2)]
        for s in range(steps):
            step_ids = torch.stack([seq[len(p) + s] for seq, p in zip(full_seqs, prompts)])[:, None]
            step_pos = torch.tensor([[len(p) + s] for p in prompts])
            h = model(step_ids, step_pos, kv_cache=cache)
            for i in range(2):
                got[i].append(model.logits(h)[i, -1])
        for i, (seq, p) in enumerate(zip(full_seqs, prompts)):
            ref = model.logits(model(seq[None]))[0, len(p) - 1:]
            assert (torch.stack(got[i]) - ref).abs().max().item() <= 1e-4


def test_kv_cache_reorder_shares_one_prefill():
    model = build_model(tiny_config("tiny"), seed=5).eval()
    ids = torch.randint(0, 512, (2, 4))
    pos = torch.arange(4).expand(2, 4)
    cache = model.new_kv_cache(2, 8)
    with torch.no_grad():
        model(ids, pos, kv_cache=cache)
        cache.reorder(torch.arange(2).repeat_interleave(3))  # 3 samples per prompt
        nxt = torch.randint(0, 512, (6, 1))
        h = model(nxt, torch.full((6, 1), 4), kv_cache=cache)
        ref = model(torch.cat([ids.repeat_interleave(3, 0), nxt], 1))[:, -1:]
    assert (h - ref).abs().max().item() <= 1e-5


def test_meta_device_construction_then_tie():
    cfg = tiny_config("tiny")
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_flops_per_token_counts_matmul_weights():
    model = build_model(tiny_config("tiny"), seed=0)
    c = model.config
    per_layer = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim \
        + c.num_attention_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    n = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size
    attn = 6 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * 128
    assert model.flops_per_token(128) == 6 * n + attn
    head = 6 * c.vocab_size * c.hidden_size  # the trainers count it per target token only (fused log-prob kernel)
    assert model.head_flops_per_token() == head and model.flops_per_token(128, head=False) == 6 * n + attn - head


def test_fused_projections_give_the_same_decode_and_are_dropped_on_exit():
    model = build_model(tiny_config("tiny"), seed=4).eval()
    ids = torch.randint(0, 512, (3, 9), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(9).expand(3, 9)
    with torch.no_grad():
        plain = model(ids, pos)
        cache = model.new_kv_cache(3, 10)
        with model.fused_projections():
            assert model.model.layers[0].self_attn.qkv_weight is not None
            fused = model(ids, pos)
            model(ids[:, :8], pos[:, :8], kv_cache=cache)  # prefill, then one decode step
            step = model(ids[:, 8:], pos[:, 8:], kv_cache=cache)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[:, 0], plain[:, 8], rtol=1e-4, atol=1e-5)
    assert all(l.self_attn.qkv_weight is None and l.mlp.gate_up_weight is None for l in model.model.layers)
    assert "model.layers.0.self_attn.qkv_weight" not in model.state_dict()


def test_a_config_without_rope_theta_loads_as_in_transformers(tmp_path):
    """The default was 1e6 against transformers' 1e4: a config.json without the field gave other logits."""
    import json

    from minitagpr.model import load_pretrained
    from minitagpr.model.presets import make_tiny_checkpoint
    folder = make_tiny_checkpoint(tmp_path / "ckpt", preset="tiny", seed=0)
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_theta", None)
    config.pop("rope_parameters", None)
    (folder / "config.json").write_text(json.dumps(config))
    ours = load_pretrained(folder).eval()
    hf = transformers.Qwen3ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids = torch.randint(0, config["vocab_size"], (1, 40))
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - hf(input_ids=ids).logits.float()).abs().max().item() <= 1e-4


# ---- pinned by mutation (2026-11-27) ---------------------------------------------------------------------------

def test_config_defaults_and_norm_eps_follow_transformers():
    from minitagpr.model.qwen3 import RMSNorm
    cfg = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=2)
    # transformers' Qwen3Config: head_dim 128 and 32768 positions unless given (it was hidden // heads and 40960
    # here: a config.json without them built another model than transformers and vLLM do; fixed 2026-11-29)
    assert (cfg.head_dim, cfg.max_position_embeddings) == (128, 32768)
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                  num_attention_heads=8, num_key_value_heads=2)
    assert (hf.head_dim, hf.max_position_embeddings) == (cfg.head_dim, cfg.max_position_embeddings)
    nulled = Qwen3Config.from_dict({**{k: v for k, v in cfg.to_dict().items() if k != "max_window_layers"},
                                    "head_dim": None})
    assert nulled.head_dim == 64 // 8  # null: hidden / query heads, not / kv heads
    assert RMSNorm(4, eps=0.1)(torch.full((1, 4), 0.1)).flatten()[0].item() == pytest.approx(0.1 / (0.01 + 0.1) ** 0.5)


def test_num_params_without_the_embedding_keeps_a_tied_head():
    """The embedding is left out as a lookup table; a tied one is also the head's matmul weight and stays."""
    tied = build_model(tiny_config("tiny", tie_word_embeddings=True), seed=0)
    untied = build_model(tiny_config("tiny", tie_word_embeddings=False), seed=0)
    assert tied.num_params(exclude_embedding=True) == tied.num_params()
    assert untied.num_params(exclude_embedding=True) == untied.num_params() - untied.model.embed_tokens.weight.numel()


def test_document_flops_sum_each_documents_tokens_at_its_own_length():
    model = Qwen3ForCausalLM(tiny_config())
    lengths = torch.tensor([3, 1, 7])
    expected = sum(n * model.flops_per_token(n, head=False) for n in (3, 1, 7))
    assert model.document_flops(lengths) == pytest.approx(expected, rel=1e-12)
