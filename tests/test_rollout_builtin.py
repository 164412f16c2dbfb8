"""The built-in engine on a tiny random Qwen3: greedy parity with full forwards, seeds, stops, log-probs, sync."""
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from minitagpr.model import presets
from minitagpr.rollout import BuiltinEngine, RolloutError
from minitagpr.rollout.builtin import sample_tokens
from minitagpr.rollout.static_decode import decode_static

VOCAB = 500  # decodable ids; the tiny model has 512 rows, so ids 500..511 are a padded tail


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: tiny matmuls, one thread


class DigitTokenizer:
    """Stands in for the real tokenizer: each id decodes to its number."""

    vocab_size = VOCAB
    pad_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids)


@pytest.fixture(scope="module")
def model():
    # Untied and a wide init: peaked, non-degenerate logits, so greedy ties cannot hide a bug.
    cfg = presets.tiny_config("tiny", tie_word_embeddings=False, initializer_range=0.3)
    return presets.build_model(cfg, seed=0).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]


def engine(model, **kw):
    return BuiltinEngine(model, DigitTokenizer(), **kw)


@torch.no_grad()
def full_forward_greedy(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        logits = model.logits(model(torch.tensor([ids])))[0, -1, :VOCAB]  # (VOCAB,) no cache, no padding
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_greedy_equals_stepwise_argmax_of_full_forwards(model, prompts):
    groups = engine(model).generate(prompts, n=2, temperature=0.0, max_new_tokens=10)
    for prompt, group in zip(prompts, groups):
        expected = full_forward_greedy(model, prompt, 10)
        assert [c.token_ids for c in group] == [expected, expected]
        assert all(c.finish_reason == "length" for c in group)


def test_same_seed_reproduces_and_another_seed_differs(model, prompts):
    eng = engine(model)
    a = eng.generate(prompts, n=3, max_new_tokens=8, seed=11)
    b = eng.generate(prompts, n=3, max_new_tokens=8, seed=11)
    c = eng.generate(prompts, n=3, max_new_tokens=8, seed=12)
    ids = lambda groups: [[x.token_ids for x in g] for g in groups]
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_samples_do_not_depend_on_batch_size(model, prompts):
    wide = engine(model, max_batch_rows=64).generate(prompts, n=3, max_new_tokens=8, seed=5)
    narrow = engine(model, max_batch_rows=2).generate(prompts, n=3, max_new_tokens=8, seed=5)  # one prompt per chunk
    assert [[c.token_ids for c in g] for g in wide] == [[c.token_ids for c in g] for g in narrow]


def test_samples_do_not_depend_on_other_prompts_in_the_call(model, prompts):
    eng = engine(model)
    alone = eng.generate(prompts[:2], n=2, max_new_tokens=8, seed=5)
    longer = prompts[1] + prompts[0]  # 14 tokens: more left padding for the first two prompts than alone (9)
    with_more = eng.generate(prompts[:2] + [longer] + prompts[2:], n=2, max_new_tokens=8, seed=5)
    assert [[c.token_ids for c in g] for g in alone] == [[c.token_ids for c in g] for g in with_more[:2]]


def test_n_samples_of_one_prompt_differ(model, prompts):
    group = engine(model).generate(prompts[:1], n=4, temperature=1.0, max_new_tokens=8, seed=0)[0]
    assert len({tuple(c.token_ids) for c in group}) == 4


def test_padded_vocabulary_tail_is_never_sampled(model, prompts):
    # At T=4 the distribution is nearly flat: unmasked, ~2% of 1,600 draws would land on the 12 tail ids.
    groups = engine(model).generate(prompts, n=20, temperature=4.0, max_new_tokens=20, seed=3)
    assert max(t for g in groups for c in g for t in c.token_ids) < VOCAB


def test_stop_id_ends_the_completion_and_is_kept_in_ids_but_not_in_text(model, prompts):
    greedy = full_forward_greedy(model, prompts[1], 6)
    stop = greedy[3]
    assert stop not in greedy[:3]
    c = engine(model).generate([prompts[1]], temperature=0.0, max_new_tokens=20, stop_token_ids=[stop])[0][0]
    assert c.token_ids == greedy[:4]
    assert c.finish_reason == "stop"
    assert c.text == " ".join(str(t) for t in greedy[:3])


def test_length_finish_when_max_new_tokens_is_reached(model, prompts):
    groups = engine(model).generate(prompts, n=2, max_new_tokens=5, stop_token_ids=[], seed=1)
    assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for g in groups for c in g)


def test_finished_rows_leave_the_batch_without_disturbing_the_others(model, prompts):
    # Stopping on a frequent id makes rows finish at different steps; the survivors must match runs without stops.
    eng = engine(model)
    free = eng.generate(prompts, n=4, max_new_tokens=12, seed=9)
    stop = free[0][0].token_ids[2]
    stopped = eng.generate(prompts, n=4, max_new_tokens=12, stop_token_ids=[stop], seed=9)
    for g_free, g_stop in zip(free, stopped):
        for a, b in zip(g_free, g_stop):
            cut = a.token_ids.index(stop) + 1 if stop in a.token_ids else len(a.token_ids)
            assert b.token_ids == a.token_ids[:cut]
            assert b.finish_reason == ("stop" if stop in a.token_ids else "length")


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.6, 1.0)])
def test_logprobs_equal_the_fused_kernel_under_the_sampling_temperature(model, prompts, temperature, top_p):
    groups = engine(model).generate(prompts, n=2, temperature=temperature, top_p=top_p, max_new_tokens=8, seed=2)
    for prompt, group in zip(prompts, groups):
        for c in group:
            ids = torch.tensor([prompt + c.token_ids])  # (1, T)
            targets = torch.full_like(ids, -100)
            targets[0, :-1] = ids[0, 1:]
            with torch.no_grad():
                logp, _ = model(ids, targets=targets, temperature=temperature)  # (1, T) via the kernel
            kernel = logp[0, len(prompt) - 1:-1]
            assert torch.allclose(torch.tensor(c.logprobs), kernel, atol=1e-5, rtol=0)


def test_sync_weights_makes_a_copy_sample_like_the_source(prompts):
    cfg = presets.tiny_config("tiny", initializer_range=0.3)  # tied head: the stream holds no lm_head.weight
    source, copy = presets.build_model(cfg, seed=1), presets.build_model(cfg, seed=2)
    eng = BuiltinEngine(copy, DigitTokenizer())
    before = eng.generate(prompts, temperature=0.0, max_new_tokens=6)
    loaded = eng.sync_weights(source.named_parameters())
    after = eng.generate(prompts, temperature=0.0, max_new_tokens=6)
    reference = BuiltinEngine(source, DigitTokenizer()).generate(prompts, temperature=0.0, max_new_tokens=6)
    assert loaded == len(list(source.parameters()))
    assert [g[0].token_ids for g in after] == [g[0].token_ids for g in reference] != [g[0].token_ids for g in before]


def test_sync_weights_rejects_unknown_names_and_wrong_shapes(model):
    eng = engine(model)
    with pytest.raises(KeyError, match="model.layers.9.mlp.up_proj.weight"):
        eng.sync_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="model.norm.weight has shape"):
        eng.sync_weights([("model.norm.weight", torch.zeros(3))])


def test_sync_weights_rejects_a_stream_missing_a_parameter_or_sending_one_twice():
    """A partial stream left the engine sampling from a mix of old and new weights, without a word (pinned
    2026-11-29). A state_dict of a tied model (embedding and lm_head: one tensor) is accepted."""
    from minitagpr.rollout import RolloutError
    cfg = presets.tiny_config("tiny")
    source, copy = presets.build_model(cfg, seed=1), presets.build_model(cfg, seed=2)
    eng = BuiltinEngine(copy, DigitTokenizer())
    partial = [(n, p) for n, p in source.named_parameters() if n != "model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(RolloutError, match=r"1 of the engine's \d+ parameters were not sent .*layers\.0\.mlp\.up_proj"):
        eng.sync_weights(partial)
    twice = [*source.named_parameters(), ("model.norm.weight", source.model.norm.weight)]
    with pytest.raises(RolloutError, match="model.norm.weight was sent twice"):
        eng.sync_weights(twice)
    assert eng.sync_weights(source.state_dict().items()) == len(list(copy.parameters()))  # tied: both names
    embed = source.model.embed_tokens.weight  # embed, lm_head, embed: the tied pair's first name twice
    with pytest.raises(RolloutError, match="model.embed_tokens.weight was sent twice"):
        eng.sync_weights([("model.embed_tokens.weight", embed), ("lm_head.weight", embed), *source.named_parameters()])


def test_prompt_longer_than_the_position_range_is_refused(model):
    too_long = [[1] * (model.config.max_position_embeddings - 2)]
    with pytest.raises(RolloutError, match=r"prompt_token_ids\[0\].*max_position_embeddings"):
        engine(model).generate(too_long, max_new_tokens=4)


def test_vocab_size_above_the_model_rows_is_refused(model):
    from minitagpr.rollout import RolloutError
    with pytest.raises(RolloutError, match="vocab_size has 600 ids but the model only 512 embedding rows"):
        BuiltinEngine(model, vocab_size=600)

    class TooBig:  # a tokenizer from another checkpoint is named by its folder
        vocab_size, source = 600, "/ckpt/other"
    with pytest.raises(RolloutError, match="tokenizer /ckpt/other has 600 ids"):
        BuiltinEngine(model, TooBig())


def test_sync_weights_accepts_names_of_a_checkpoint_wrapped_policy(prompts):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    cfg = presets.tiny_config("tiny", initializer_range=0.3)
    policy, copy = presets.build_model(cfg, seed=1), presets.build_model(cfg, seed=2)
    policy.model.layers[1] = checkpoint_wrapper(policy.model.layers[1])  # names gain `_checkpoint_wrapped_module.`
    eng = BuiltinEngine(copy, DigitTokenizer())
    eng.sync_weights(policy.named_parameters())
    for (name, a), b in zip(copy.named_parameters(), (p for _, p in policy.named_parameters())):
        assert torch.equal(a, b), name


def test_per_prompt_seeds_make_samples_independent_of_how_prompts_are_split(tmp_path):
    """The RL loop's ranks each generate a slice of the step's prompts with seeds from global positions."""
    from minitagpr.model import load_pretrained
    from minitagpr.model.presets import make_tiny_checkpoint
    from minitagpr.rollout.builtin import BuiltinEngine
    engine = BuiltinEngine(load_pretrained(make_tiny_checkpoint(tmp_path / "c", seed=4)).eval())
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    seeds = [101, 202, 303, 404]
    whole = engine.generate(prompts, n=2, max_new_tokens=6, seed=seeds)
    halves = engine.generate(prompts[:2], n=2, max_new_tokens=6, seed=seeds[:2]) + \
        engine.generate(prompts[2:], n=2, max_new_tokens=6, seed=seeds[2:])
    assert [[c.token_ids for c in g] for g in whole] == [[c.token_ids for c in g] for g in halves]
    with pytest.raises(Exception, match="3 per-prompt seeds for 4 prompts"):
        engine.generate(prompts, n=1, max_new_tokens=2, seed=seeds[:3])


# ---------------------------------------------------------------------------------------------------------------------
# Fixed-shape decoding (rollout/static_decode.py): the step a CUDA graph captures, run eagerly here


def _as_lists(groups):
    return [[(c.token_ids, c.finish_reason) for c in g] for g in groups]


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.9)])
def test_static_decode_gives_the_dynamic_loops_ids_logprobs_and_finish_reasons(model, prompts, temperature, top_p):
    free = engine(model).generate(prompts, n=3, temperature=temperature, top_p=top_p, max_new_tokens=12, seed=4)
    stop = free[1][0].token_ids[3]  # rows stop at different steps, some never
    kw = dict(n=3, temperature=temperature, top_p=top_p, max_new_tokens=12, stop_token_ids=[stop], seed=4)
    dynamic = engine(model).generate(prompts, **kw)
    static = engine(model, decode="static").generate(prompts, **kw)
    assert _as_lists(static) == _as_lists(dynamic)
    finishes = {c.finish_reason for g in static for c in g}
    assert finishes == {"stop", "length"}, finishes  # the case mixes both
    for g_s, g_d in zip(static, dynamic):
        for a, b in zip(g_s, g_d):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def _decode_stopping_at_once(model, prompts, decode):
    """Every id is a stop id: each row stops at its first token. Returns (groups, input shapes of every forward)."""
    calls = []
    hook = model.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    try:
        groups = engine(model, decode=decode).generate(prompts, n=2, max_new_tokens=40,
                                                        stop_token_ids=list(range(VOCAB)), seed=1)
    finally:
        hook.remove()
    assert all(len(c.token_ids) == 1 and c.finish_reason == "stop" for g in groups for c in g)
    return groups, calls


def test_static_decode_stops_early_once_every_row_has_stopped(model, prompts):
    _, calls = _decode_stopping_at_once(model, prompts, "static")
    assert [s for s in calls if s[1] == 1 and s[0] == 2 * len(prompts)] == []  # no decode step ran


def test_dynamic_decode_runs_no_forward_once_every_row_has_stopped(model, prompts):
    """Pinned by mutation: without the early exit the loop ran max_new_tokens forwards of an empty batch."""
    _, calls = _decode_stopping_at_once(model, prompts, "dynamic")
    assert calls == [(1, len(p)) for p in sorted(prompts, key=len, reverse=True)]  # the prefills, nothing more


def test_static_decode_stops_once_every_row_has_stopped_each_at_its_own_step(model, prompts):
    """A row that stopped keeps decoding (its later ids are cut off): the loop must remember that it stopped, not
    wait for a step where every row samples a stop id at once. Pinned by mutation."""
    T, stop = 12, 7
    cache, logits = _prefilled(model, prompts[0], T)
    cache.reorder(torch.tensor([0, 0]))  # two rows sharing the prompt
    script = [[stop, 1], [1, 1], [1, stop]] + [[1, 1]] * (T - 3)  # row 0 stops at token 0, row 1 at token 2
    calls = []

    def scripted(z, u):
        calls.append(1)
        return torch.tensor(script[len(calls) - 1]), torch.zeros(2)

    ids, _, finish = decode_static(model, cache, logits.repeat(2, 1), torch.zeros(2, T, dtype=torch.float64),
                                   torch.tensor([len(prompts[0])] * 2), T, [stop], scripted, check_every=1)
    assert ids == [[stop], [1, 1, stop]] and finish == ["stop", "stop"]
    assert len(calls) == 3  # nothing sampled after the last row's stop


def _prefilled(model, prompt, free_slots):
    cache = model.new_kv_cache(1, len(prompt) + free_slots)
    with torch.no_grad():
        logits = model.logits(model(torch.tensor([prompt]), torch.arange(len(prompt))[None], kv_cache=cache))[:, -1]
    return cache, logits  # (1, V)


def test_static_decode_hands_back_a_normal_cache_that_covers_its_tokens(model, prompts):
    prompt, T = prompts[1], 5
    cache, logits = _prefilled(model, prompt, T)
    greedy = partial(sample_tokens, temperature=0.0, top_p=1.0, vocab_size=VOCAB)
    ids, _, _ = decode_static(model, cache, logits, torch.zeros(1, T, dtype=torch.float64),
                              torch.tensor([len(prompt)]), T, [], greedy)
    assert cache.slot is None and cache.length == len(prompt) + T - 1
    with torch.no_grad():  # normal mode goes on from there: the last token's logits equal a full forward's
        nxt = model.logits(model(torch.tensor([[ids[0][-1]]]), torch.tensor([[len(prompt) + T - 1]]), kv_cache=cache))
        full = model.logits(model(torch.tensor([prompt + ids[0]])))[:, -1]
    assert torch.allclose(nxt[:, -1], full, atol=1e-5)


def test_static_decode_leaves_normal_mode_when_sampling_fails(model, prompts):
    cache, logits = _prefilled(model, prompts[0], 6)
    calls = []

    def failing(z, u):
        calls.append(1)
        if len(calls) == 3:  # the sampling of token 2
            raise RuntimeError("sampler failed")
        return sample_tokens(z, u, 1.0, 1.0, VOCAB)

    with pytest.raises(RuntimeError, match="sampler failed"):
        decode_static(model, cache, logits, torch.rand(1, 6, dtype=torch.float64), torch.tensor([len(prompts[0])]),
                      6, [], failing)
    # token 0 came from the prefill; token 1's forward wrote slot len(prompt), token 2's forward slot len(prompt) + 1
    # before its sampling failed: both are covered
    assert cache.slot is None and cache.length == len(prompts[0]) + 2


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)])
def test_static_decode_step_reads_nothing_back_to_the_host(model, prompts, temperature, top_p):
    # What a CUDA graph cannot hold: a read of device data on the host (.item(), bool(t), a data-dependent shape such
    # as nonzero or boolean-mask indexing) inside the captured step. Every aten call of a whole eager call is
    # recorded; the only reads must be the loop's stop checks (one per check_every steps) and the final read of the
    # cache slot, none per step. And no tensor made on the host's default device (a host-to-device copy in a graph):
    # the call runs again with the default device set to "meta", where a factory without an explicit device fails to
    # meet the model's tensors. (An explicit .cpu() or .tolist() cannot be seen on a CPU-only run: test_gpu.py.)
    from torch.utils._python_dispatch import TorchDispatchMode

    host_reads = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique",
                  "_unique2", "unique_consecutive", "repeat_interleave"}

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            indices = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else ()
            if name in host_reads or any(i is not None and i.dtype == torch.bool for i in indices):
                self.reads.append(name)
            return func(*args, **(kwargs or {}))

    T, every = 20, 8
    uniforms = torch.rand(1, T, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sample = partial(sample_tokens, temperature=temperature, top_p=top_p, vocab_size=VOCAB)
    start = torch.tensor([len(prompts[1])])
    cache, logits = _prefilled(model, prompts[1], T)
    with Recorder() as rec:
        ids, _, _ = decode_static(model, cache, logits, uniforms, start, T, [], sample, check_every=every)
    assert len(ids[0]) == T
    checks = -(-(T - 1) // every)  # stop checks at tokens 1, 1 + every, ...: 3 for 19 decode steps
    assert sorted(rec.reads) == sorted(["is_nonzero"] * checks + ["item"]), rec.reads
    cache, logits = _prefilled(model, prompts[1], T)
    with torch.device("meta"):  # the same call again, factories without an explicit device now make meta tensors
        again, _, _ = decode_static(model, cache, logits, uniforms, start, T, [], sample, check_every=every)
    assert again == ids


def test_graph_decode_is_refused_off_cuda_and_for_sharded_models(model, prompts):
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(RolloutError, match="decode='graph' \\(CUDA graphs\\) needs the model on a CUDA device"):
            engine(model, decode="graph").generate(prompts, max_new_tokens=3)
    finally:
        hook.remove()
    assert calls == []  # refused before any prefill (it was refused after the first chunk's)

    class Sharded(torch.nn.Module):  # stands in for an FSDP2 module: it has unshard()
        config = model.config

        def unshard(self):
            pass

    with pytest.raises(ValueError, match="unsharded"):
        BuiltinEngine(Sharded(), DigitTokenizer(), decode="graph")
    with pytest.raises(ValueError, match="decode must be one of"):
        engine(model, decode="fast")


def test_auto_decode_is_graph_for_an_unsharded_model_on_cuda_only(model):
    class OnCuda(torch.nn.Module):  # reports a CUDA parameter without needing a card: only the resolution is tested
        config = model.config

        def parameters(self, recurse=True):
            return iter([SimpleNamespace(device=torch.device("cuda", 0))])

    class ShardedOnCuda(OnCuda):
        def unshard(self):
            pass

    assert engine(model).decode == "auto" and engine(model).decode_mode() == "dynamic"  # this CPU
    assert BuiltinEngine(OnCuda(), vocab_size=10).decode_mode() == "graph"
    assert BuiltinEngine(ShardedOnCuda(), vocab_size=10).decode_mode() == "dynamic"  # an FSDP2 module (gathers in hooks)
    assert BuiltinEngine(OnCuda(), vocab_size=10, decode="static").decode_mode() == "static"  # explicit wins


def test_a_call_never_decodes_more_than_max_batch_rows_sequences_at_once(model, prompts):  # mutation pin
    rows = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(
        (args[0] if args else kwargs["input_ids"]).shape[0]), with_kwargs=True)
    try:
        engine(model, max_batch_rows=8).generate(prompts, n=4, max_new_tokens=3, seed=0)  # 4 prompts x 4 samples
    finally:
        hook.remove()
    assert rows and max(rows) == 8  # two prompts' samples per chunk, not all 16 at once
