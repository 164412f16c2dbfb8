"""The built-in engine's edges, both decode loops against full forwards: the context limit, plain multi-head and
single-KV-head attention, 1-token prompts, stops at the first token, seed properties, and non-finite logits."""
import pytest
import torch

from minitagpr.model import presets
from minitagpr.rollout import BuiltinEngine, RolloutError

from test_rollout_builtin import VOCAB, DigitTokenizer  # ids 500..511 of the tiny model are a padded tail

DECODES = ("dynamic", "static")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: tiny matmuls, one thread


def tiny(**overrides):
    # Untied and a wide init: peaked logits, so greedy ties cannot hide a bug.
    cfg = presets.tiny_config("tiny", tie_word_embeddings=False, initializer_range=0.3, **overrides)
    return presets.build_model(cfg, seed=0).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


def random_prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def ids(groups):
    return [[c.token_ids for c in g] for g in groups]


def assert_greedy_matches_full_forward(model, prompts, groups):
    """Every completion is the argmax at each of its positions of one full forward over prompt + completion (so the
    greedy sequence, no cache, no padding), and its log-probs are that forward's log-softmax within 1e-5."""
    for prompt, group in zip(prompts, groups):
        for c in group:
            with torch.no_grad():
                logits = model.logits(model(torch.tensor([prompt + c.token_ids])))[0].double()  # (T, V)
            at = logits[len(prompt) - 1:-1]  # (n_new, V) the logits each new token was chosen from
            assert c.token_ids == at[:, :VOCAB].argmax(-1).tolist()
            reference = at.log_softmax(-1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(c.logprobs, dtype=torch.float64), reference, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Parity with a full forward


@pytest.mark.parametrize("decode", DECODES)
def test_a_prompt_exactly_at_the_context_limit_decodes_like_a_full_forward(decode):
    model = tiny(max_position_embeddings=24)
    prompts = random_prompts((20, 7))  # 20 + 4 new tokens == 24 positions
    groups = BuiltinEngine(model, DigitTokenizer(), decode=decode).generate(prompts, n=2, temperature=0.0,
                                                                           max_new_tokens=4)
    assert all(len(c.token_ids) == 4 for g in groups for c in g)
    assert_greedy_matches_full_forward(model, prompts, groups)


@pytest.mark.parametrize("decode", DECODES)
@pytest.mark.parametrize("kv_heads", [4, 1], ids=["multi-head", "one-kv-head"])
def test_plain_multi_head_and_single_kv_head_attention_decode_like_a_full_forward(kv_heads, decode):
    # 4 query heads: 4 KV heads take the plain SDPA decode, 1 KV head the grouped-query branch with all heads in one
    # group (the default 2 KV heads are covered by test_rollout_builtin.py).
    model = tiny(num_key_value_heads=kv_heads)
    prompts = random_prompts((1, 30, 2, 17))
    groups = BuiltinEngine(model, DigitTokenizer(), decode=decode).generate(prompts, temperature=0.0,
                                                                           max_new_tokens=6)
    assert_greedy_matches_full_forward(model, prompts, groups)


def test_static_decode_of_a_one_token_prompt_beside_a_long_one_matches_a_full_forward(model):
    prompts = random_prompts((1, 45))  # the 1-token prompt's row is 44 slots of left padding
    eng = BuiltinEngine(model, DigitTokenizer(), decode="static")
    groups = eng.generate(prompts, n=2, temperature=0.0, max_new_tokens=8)
    assert_greedy_matches_full_forward(model, prompts, groups)
    # sampled: the reported log-probs are a full forward's log-softmax at T at the sampled ids
    T = 0.8
    sampled = eng.generate(prompts, n=2, temperature=T, top_p=0.9, max_new_tokens=8, seed=3)
    for prompt, group in zip(prompts, sampled):
        for c in group:
            with torch.no_grad():
                logits = model.logits(model(torch.tensor([prompt + c.token_ids])))[0].double() / T  # (T, V)
            reference = logits[len(prompt) - 1:-1].log_softmax(-1).gather(1, torch.tensor(c.token_ids)[:, None])
            assert torch.allclose(torch.tensor(c.logprobs, dtype=torch.float64), reference[:, 0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Stops and seeds


@pytest.mark.parametrize("max_new_tokens", [1, 5])
def test_a_stop_id_as_the_first_token_finishes_with_stop_and_empty_text(model, max_new_tokens):
    prompts = random_prompts((5, 9, 3))
    first = BuiltinEngine(model, DigitTokenizer()).generate(prompts, n=2, max_new_tokens=1, seed=1)
    stop = first[0][0].token_ids[0]
    out = {}
    for decode in DECODES:
        out[decode] = BuiltinEngine(model, DigitTokenizer(), decode=decode).generate(
            prompts, n=2, max_new_tokens=max_new_tokens, stop_token_ids=[stop], seed=1)
    assert ids(out["static"]) == ids(out["dynamic"])
    for g_first, group in zip(first, out["static"]):
        for a, c in zip(g_first, group):
            if a.token_ids == [stop]:
                assert (c.token_ids, c.finish_reason, c.text) == ([stop], "stop", "")
            else:
                assert c.token_ids[0] == a.token_ids[0] and len(c.token_ids) == max_new_tokens
                assert c.finish_reason == "length" and c.text != ""
    assert out["static"][0][0].finish_reason == "stop"


@pytest.mark.parametrize("decode", DECODES)
def test_sample_0_of_n_1_equals_sample_0_of_n_3(model, decode):
    eng = BuiltinEngine(model, DigitTokenizer(), decode=decode)
    prompts = random_prompts((5, 9, 3, 7))
    one = eng.generate(prompts, n=1, max_new_tokens=6, seed=7)
    three = eng.generate(prompts, n=3, max_new_tokens=6, seed=7)
    assert [g[0].token_ids for g in one] == [g[0].token_ids for g in three]


@pytest.mark.parametrize("decode", DECODES)
def test_the_first_tokens_do_not_change_when_max_new_tokens_grows(model, decode):
    eng = BuiltinEngine(model, DigitTokenizer(), decode=decode)
    prompts = random_prompts((5, 9, 3, 7))
    short = eng.generate(prompts, n=3, max_new_tokens=4, seed=7)
    long = eng.generate(prompts, n=3, max_new_tokens=12, seed=7)
    assert ids(short) == [[t[:4] for t in g] for g in ids(long)]


@pytest.mark.parametrize("decode", DECODES)
def test_max_batch_rows_below_n_gives_the_same_samples(model, decode):
    prompts = random_prompts((5, 9, 3, 7))
    wide = BuiltinEngine(model, DigitTokenizer(), decode=decode).generate(prompts, n=3, max_new_tokens=6, seed=7)
    narrow = BuiltinEngine(model, DigitTokenizer(), decode=decode, max_batch_rows=1).generate(
        prompts, n=3, max_new_tokens=6, seed=7)  # one prompt's 3 rows per chunk
    assert ids(narrow) == ids(wide)


def test_int_seeds_follow_the_prompt_position_and_per_prompt_seeds_the_prompt(model):
    eng = BuiltinEngine(model, DigitTokenizer())
    prompts = random_prompts((5, 9, 3))
    forward = eng.generate(prompts, n=2, max_new_tokens=6, seed=7)
    backward = eng.generate(prompts[::-1], n=2, max_new_tokens=6, seed=7)[::-1]
    assert ids(backward) != ids(forward)  # seeded by (7, i): prompt 0 now draws prompt 2's uniforms
    assert ids(backward)[1] == ids(forward)[1]  # the middle prompt keeps its position
    forward = eng.generate(prompts, n=2, max_new_tokens=6, seed=[10, 11, 12])
    backward = eng.generate(prompts[::-1], n=2, max_new_tokens=6, seed=[12, 11, 10])[::-1]
    assert ids(backward) == ids(forward)


# ---------------------------------------------------------------------------------------------------------------------
# Non-finite logits


@pytest.mark.parametrize("decode", DECODES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_fail_naming_the_prompt_sample_and_token(decode, temperature):
    model = tiny()
    prompts = random_prompts((6, 8), seed=3)
    kw = dict(temperature=temperature, max_new_tokens=4, seed=5)
    clean = BuiltinEngine(model, DigitTokenizer(), decode=decode).generate(prompts, **kw)
    t0, t1 = clean[1][0].token_ids[:2]
    assert t1 != t0 and t1 not in prompts[1] and t1 not in prompts[0] + clean[0][0].token_ids  # only prompt 1 sees t1
    with torch.no_grad():
        model.model.embed_tokens.weight[t1] = float("nan")  # the forward that reads t1 makes token 2's logits NaN
    with pytest.raises(RolloutError, match=r"prompt_token_ids\[1\], sample 0: the logits for generated token 2 are "
                                           r"not finite .*diverged"):
        BuiltinEngine(model, DigitTokenizer(), decode=decode).generate(prompts, **kw)


@pytest.mark.parametrize("decode", DECODES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_inf_logits_fail(decode, temperature):
    model = tiny()
    with torch.no_grad():  # id 7's logit overflows to +inf or -inf, id 8's to the opposite: a +inf in every row
        model.lm_head.weight[7] = 3e38
        model.lm_head.weight[8] = -3e38
    prompts = random_prompts((6, 8), seed=3)
    with torch.no_grad():
        assert torch.isposinf(model.logits(model(torch.tensor(prompts[:1])))).any(-1).all()
    with pytest.raises(RolloutError, match=r"prompt_token_ids\[\d\], sample 0: the logits for generated token 0 "
                                           r"are not finite"):
        BuiltinEngine(model, DigitTokenizer(), decode=decode).generate(prompts, temperature=temperature,
                                                                       max_new_tokens=3, seed=5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_logits_after_a_rows_stop_are_ignored_as_in_the_dynamic_loop(temperature):
    # The fixed-shape loop decodes a stopped row on; the dynamic loop drops it. Neither must fail on what follows.
    model = tiny()
    prompts = random_prompts((6, 8), seed=3)
    kw = dict(temperature=temperature, max_new_tokens=4, seed=5)
    clean = BuiltinEngine(model, DigitTokenizer()).generate(prompts, **kw)
    t0, t1 = clean[1][0].token_ids[:2]
    assert t1 != t0 and t1 not in prompts[1] and t1 not in prompts[0] + clean[0][0].token_ids and \
        t0 not in clean[0][0].token_ids  # prompt 0 decodes on after prompt 1 stops on t0
    with torch.no_grad():
        model.model.embed_tokens.weight[t1] = float("nan")
    for decode in DECODES:
        groups = BuiltinEngine(model, DigitTokenizer(), decode=decode).generate(prompts, stop_token_ids=[t0], **kw)
        assert (groups[1][0].token_ids, groups[1][0].finish_reason) == ([t0], "stop")
        assert groups[0][0].token_ids == clean[0][0].token_ids
