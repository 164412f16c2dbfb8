"""What only a GPU shows: our Qwen3 in bf16 against float64 (no worse than transformers in bf16), the model's fused
log-prob path (Triton on CUDA) in bf16, and the built-in engine's greedy, seed and log-prob contracts on the device.

Skipped without CUDA. MINITAGPR_TEST_DEVICE=cpu runs the same checks on the CPU (to debug them without a GPU).
"""
import os

import pytest
import torch

from minitagpr.kernels import token_logprobs
from minitagpr.model import load_pretrained, presets
from minitagpr.rollout import BuiltinEngine

DEVICE = os.environ.get("MINITAGPR_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (MINITAGPR_TEST_DEVICE=cpu forces the CPU)")
VOCAB = 1000  # sampleable ids; the model has 1024 rows


def rel_err(got, ref) -> float:
    return float((got.detach().double().cpu() - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # wider than "tiny" so bf16 rounding shows, and a wide init so logits are peaked (greedy has no near-ties)
    return presets.make_tiny_checkpoint(tmp_path_factory.mktemp("gpu") / "m", preset="tiny", seed=3, vocab_size=1024,
                                        hidden_size=256, intermediate_size=512, head_dim=64, initializer_range=0.1)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 96), generator=torch.Generator().manual_seed(0))  # (B, T)


@pytest.fixture(scope="module")
def reference_logits(checkpoint, ids):
    model = load_pretrained(checkpoint, dtype=torch.float64).eval()
    with torch.no_grad():
        return model.logits(model(ids))  # (B, T, V) float64 on the CPU


def test_bf16_logits_no_worse_than_transformers_bf16(checkpoint, ids, reference_logits):
    transformers = pytest.importorskip("transformers")
    ours = load_pretrained(checkpoint, dtype=torch.bfloat16, device=DEVICE).eval()
    theirs = transformers.Qwen3ForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16,
                                                           attn_implementation="sdpa").to(DEVICE).eval()
    with torch.no_grad():
        ours_err = rel_err(ours.logits(ours(ids.to(DEVICE))), reference_logits)
        theirs_err = rel_err(theirs(input_ids=ids.to(DEVICE)).logits, reference_logits)
    print(f"bf16 logits vs float64 on {DEVICE}: ours {ours_err:.2e}, transformers {theirs_err:.2e}")
    assert ours_err <= 1.25 * theirs_err + 1e-3, (ours_err, theirs_err)
    assert ours_err < 3e-2


def test_bf16_fused_logprobs_and_gradient_match_float64(checkpoint, ids, reference_logits):
    model = load_pretrained(checkpoint, dtype=torch.bfloat16, device=DEVICE)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    logp, entropy = model(ids.to(DEVICE), targets=targets.to(DEVICE), with_entropy=True)  # auto: Triton on CUDA
    assert logp.dtype == torch.float32
    ref = torch.log_softmax(reference_logits, -1)  # (B, T, V)
    ref_logp = ref.gather(-1, targets.clamp_min(0)[..., None])[..., 0] * (targets != -100)
    ref_entropy = -(ref.exp() * ref).sum(-1) * (targets != -100)
    print(f"bf16 model logp vs float64: {rel_err(logp, ref_logp):.2e}, entropy {rel_err(entropy, ref_entropy):.2e}")
    assert rel_err(logp, ref_logp) < 2e-2 and rel_err(entropy, ref_entropy) < 2e-2
    (logp.sum() + 0.1 * entropy.sum()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.fixture(scope="module")
def fp32_model(checkpoint):
    return load_pretrained(checkpoint, dtype=torch.float32, device=DEVICE).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (17, 40, 5, 29)]


def test_greedy_equals_stepwise_argmax_of_full_forwards_on_device(fp32_model, prompts):
    groups = BuiltinEngine(fp32_model, vocab_size=VOCAB).generate(prompts, n=2, temperature=0.0, max_new_tokens=12)
    for prompt, group in zip(prompts, groups):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                logits = fp32_model.logits(fp32_model(torch.tensor([seq], device=DEVICE)))[0, -1, :VOCAB]
                seq.append(int(logits.argmax()))
        assert [c.token_ids for c in group] == [seq[len(prompt):]] * 2


def test_seeded_samples_on_device_reproduce_and_ignore_batch_size(fp32_model, prompts):
    run = lambda rows, seed: [[c.token_ids for c in g] for g in BuiltinEngine(
        fp32_model, vocab_size=VOCAB, max_batch_rows=rows).generate(prompts, n=3, max_new_tokens=10, seed=seed)]
    wide = run(64, 5)
    assert wide == run(64, 5)
    assert wide == run(3, 5)  # one prompt per chunk
    assert wide != run(64, 6)


def test_sampling_logprobs_equal_the_kernel_on_device(fp32_model, prompts):
    groups = BuiltinEngine(fp32_model, vocab_size=VOCAB).generate(prompts, n=2, temperature=0.7, max_new_tokens=10,
                                                                  seed=9)
    for prompt, group in zip(prompts, groups):
        for c in group:
            seq = torch.tensor([prompt + c.token_ids], device=DEVICE)
            with torch.no_grad():
                hidden = fp32_model(seq)[0, len(prompt) - 1:-1]  # (T, H): the positions that predicted each token
                logp, _ = token_logprobs(hidden, fp32_model.lm_head_weight, seq[0, len(prompt):], temperature=0.7)
            assert torch.allclose(torch.tensor(c.logprobs), logp.cpu(), atol=1e-4), (c.logprobs, logp)


def _ids_and_finish(groups):
    return [[(c.token_ids, c.finish_reason) for c in g] for g in groups]


def _max_logp_diff(a, b) -> float:
    return max(float((torch.tensor(x.logprobs) - torch.tensor(y.logprobs)).abs().max())
               for ga, gb in zip(a, b) for x, y in zip(ga, gb))


needs_cuda = pytest.mark.skipif(not str(DEVICE).startswith("cuda"), reason="CUDA graphs need a CUDA device")


@needs_cuda
@pytest.mark.parametrize("max_new_tokens", [24, 23])  # cache of 64 slots, and 63 rounded up to 64 (see builtin.py)
@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)])
def test_graph_decode_gives_the_eager_loops_ids_and_logprobs(fp32_model, prompts, temperature, top_p, max_new_tokens):
    engines = {m: BuiltinEngine(fp32_model, vocab_size=VOCAB, decode=m) for m in ("dynamic", "static", "graph")}
    run = lambda mode, stops: engines[mode].generate(  # noqa: E731
        prompts, n=3, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, stop_token_ids=stops, seed=7)
    stop = run("dynamic", [])[1][0].token_ids[5]  # rows stop at different steps, some never
    dynamic, static, graph = run("dynamic", [stop]), run("static", [stop]), run("graph", [stop])
    assert engines["graph"].graph_stats.get("captures") == 1 and not engines["graph"].graph_stats.get("fallbacks")
    assert engines["graph"].graph_stats["replays"] > 0
    assert _ids_and_finish(graph) == _ids_and_finish(static) == _ids_and_finish(dynamic)
    assert _max_logp_diff(graph, static) <= 1e-5  # the same kernels, replayed
    assert _max_logp_diff(graph, dynamic) <= 1e-4


@needs_cuda
def test_graph_decode_in_bf16_gives_the_eager_static_loops_ids(checkpoint, prompts):
    # bf16 attention may take another SDPA backend than fp32; compared with the same fixed-shape loop run eagerly
    # (not the dynamic loop: bf16 rounding over a different cache length can flip near-ties)
    model = load_pretrained(checkpoint, dtype=torch.bfloat16, device=DEVICE).eval()
    run = lambda mode: BuiltinEngine(model, vocab_size=VOCAB, decode=mode).generate(  # noqa: E731
        prompts, n=2, temperature=1.0, max_new_tokens=21, seed=5)
    static, graph = run("static"), run("graph")
    assert _ids_and_finish(graph) == _ids_and_finish(static)
    assert _max_logp_diff(graph, static) <= 1e-5


@needs_cuda
def test_graph_decode_recaptures_per_call_and_follows_weight_syncs(checkpoint, fp32_model, prompts):
    other = load_pretrained(checkpoint, dtype=torch.float32, device=DEVICE).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.05)
    copy = load_pretrained(checkpoint, dtype=torch.float32, device=DEVICE).eval()
    eng = BuiltinEngine(copy, vocab_size=VOCAB, decode="graph")
    kw = dict(n=2, temperature=1.0, max_new_tokens=16, seed=3)
    ref = lambda m, ps: BuiltinEngine(m, vocab_size=VOCAB).generate(ps, **kw)  # noqa: E731
    assert _ids_and_finish(eng.generate(prompts, **kw)) == _ids_and_finish(ref(fp32_model, prompts))
    assert _ids_and_finish(eng.generate(prompts[:2], **kw)) == _ids_and_finish(ref(fp32_model, prompts[:2]))
    eng.sync_weights((name, t) for name, t in other.state_dict().items())
    assert _ids_and_finish(eng.generate(prompts, **kw)) == _ids_and_finish(ref(other, prompts))
