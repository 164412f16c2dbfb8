"""Sampling math of the built-in engine on plain logit vectors, against float64 references written out longhand."""
import math

import pytest
import torch

from minitagpr.rollout import Completion, RolloutError, sample_seed, sample_tokens, sampling_probs
from minitagpr.rollout.base import check_request, prompt_seed_keys

# Eight decodable ids plus a padded tail of two ids the tokenizer cannot decode; the tail holds the largest logit.
LOGITS = [1.2, -0.3, 0.8, 2.1, -1.5, 0.0, 1.9, -0.7, 5.0, 4.0]
VOCAB = 8
DRAWS = 40_000


def reference_probs(temperature: float, top_p: float) -> list[float]:
    """The intended distribution over the decodable ids, in float64 with plain Python."""
    z = [x / temperature for x in LOGITS[:VOCAB]]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    p = [v / sum(e) for v in e]
    order = sorted(range(VOCAB), key=lambda i: -p[i])
    kept, mass = set(), 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.add(i)
        mass += p[i]
    total = sum(p[i] for i in kept)
    return [p[i] / total if i in kept else 0.0 for i in range(VOCAB)]


def draw(temperature: float, top_p: float, seed: int = 1234) -> torch.Tensor:
    logits = torch.tensor(LOGITS, dtype=torch.float32).expand(DRAWS, -1)  # (DRAWS, V)
    uniforms = torch.rand(DRAWS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # (DRAWS,)
    tokens, _ = sample_tokens(logits, uniforms, temperature, top_p, VOCAB)
    return tokens


def chi_square_pvalue(tokens: torch.Tensor, probs: list[float]) -> float:
    """Pearson's chi-square goodness of fit over the ids with positive probability."""
    counts = torch.bincount(tokens, minlength=len(LOGITS)).double()
    support = [i for i, p in enumerate(probs) if p > 0]
    expected = torch.tensor([probs[i] * DRAWS for i in support], dtype=torch.float64)
    stat = (((counts[support] - expected) ** 2) / expected).sum()
    dof = torch.tensor((len(support) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, stat / 2))  # survival function of chi2(dof)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_temperature_sampling_matches_float64_reference(temperature):
    tokens = draw(temperature, 1.0)
    assert chi_square_pvalue(tokens, reference_probs(temperature, 1.0)) > 1e-3


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.5), (0.8, 0.9), (1.5, 0.3)])
def test_top_p_sampling_matches_float64_reference(temperature, top_p):
    probs = reference_probs(temperature, top_p)
    tokens = draw(temperature, top_p)
    outside = [i for i in range(len(LOGITS)) if i >= VOCAB or probs[i] == 0.0]
    assert not torch.isin(tokens, torch.tensor(outside)).any(), "sampled an id outside the nucleus"
    assert chi_square_pvalue(tokens, probs) > 1e-3


def test_chi_square_check_rejects_a_wrong_distribution():
    # The test above must be able to fail: samples at T=1 do not fit the T=0.6 distribution.
    assert chi_square_pvalue(draw(1.0, 1.0), reference_probs(0.6, 1.0)) < 1e-6


def test_padded_vocabulary_tail_is_never_sampled():
    tokens = draw(3.0, 1.0)  # a hot temperature would put ~30% of the mass on the tail if it were not masked
    assert int(tokens.max()) < VOCAB


def test_greedy_is_argmax_over_decodable_ids():
    logits = torch.tensor([LOGITS, LOGITS[::-1]], dtype=torch.float32)  # (2, V)
    tokens, _ = sample_tokens(logits, torch.zeros(2), 0.0, 1.0, VOCAB)
    expected = [max(range(VOCAB), key=lambda i: row[i]) for row in logits.tolist()]
    assert tokens.tolist() == expected


def test_tiny_top_p_keeps_the_most_likely_token():
    tokens = draw(1.0, 1e-9)
    assert set(tokens.tolist()) == {3}  # logit 2.1 is the largest decodable one


def test_uniform_zero_never_picks_a_zero_probability_id():
    logits = torch.tensor([[-float("inf"), -float("inf"), 0.0, 1.0]])  # ids 0 and 1 impossible
    tokens, _ = sample_tokens(logits, torch.zeros(1, dtype=torch.float64), 1.0, 1.0, 4)
    assert tokens.item() == 2


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.3, 0.5), (0.0, 1.0)])
def test_logprobs_are_full_softmax_at_temperature_before_top_p(temperature, top_p):
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(7))  # (64, 10)
    uniforms = torch.rand(64, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    tokens, logp = sample_tokens(logits, uniforms, temperature, top_p, VOCAB)
    scale = temperature if temperature > 0 else 1.0
    ref = torch.log_softmax(logits.double() / scale, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), ref, atol=1e-5, rtol=0)


def test_sampling_probs_sum_to_one_and_respect_the_nucleus():
    probs = sampling_probs(torch.tensor([LOGITS], dtype=torch.float64), 1.0, 0.5, VOCAB)[0]
    ref = torch.tensor(reference_probs(1.0, 0.5), dtype=torch.float64)
    assert probs.dtype == torch.float64 and abs(float(probs.sum()) - 1.0) < 1e-12
    torch.testing.assert_close(probs, ref, atol=1e-6, rtol=0)  # the exponentials are fp32, every sum float64


def test_sample_seed_is_a_pure_function_of_seed_prompt_and_sample():
    assert sample_seed(3, 1, 2) == sample_seed(3, 1, 2)
    seeds = {sample_seed(s, p, j) for s in range(3) for p in range(4) for j in range(5)}
    assert len(seeds) == 60
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("kwargs,field", [
    (dict(prompt_token_ids=[[1, 2], []]), "prompt_token_ids[1]"),
    (dict(prompt_token_ids=[[1, 99]]), "prompt_token_ids[0][1]"),
    (dict(n=0), "n must"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=1e-39), "temperature must be 0 \\(greedy\\) or at least 0.0001"),  # was NaN log-probs
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(stop_token_ids=[50]), "stop token id 50"),
    # pinned 2026-11-29: these raised a bare TypeError/ValueError deep inside or were silently truncated
    (dict(temperature=None), "temperature must be a number"),
    (dict(temperature="1.0"), "temperature must be a number"),
    (dict(top_p=None), "top_p must be a number"),
    (dict(top_p="0.9"), "top_p must be a number"),
    (dict(stop_token_ids=5), "stop_token_ids must be a list"),
    (dict(stop_token_ids="ab"), "stop_token_ids must be a list"),
    (dict(stop_token_ids=[5.7]), "stop token id 5.7 is not an int"),
    (dict(prompt_token_ids=[[1, 2.0]]), "prompt_token_ids[0][1] = 2.0 is not an int"),
    (dict(n=2.0), "n must"),
    (dict(max_new_tokens=True), "max_new_tokens"),
])
def test_bad_requests_fail_naming_the_argument(kwargs, field):
    request = dict(prompt_token_ids=[[1, 2]], n=1, temperature=1.0, top_p=1.0, max_new_tokens=4,
                   stop_token_ids=[3], vocab_size=10)
    request.update(kwargs)
    with pytest.raises(RolloutError, match=field.replace("[", r"\[").replace("]", r"\]")):
        check_request(**request)


def test_numpy_integers_are_ids_and_seeds_and_bad_seeds_are_named():
    import numpy as np
    stops = check_request([[np.int64(1), 2]], np.int32(2), np.float32(0.5), 1.0, np.int64(4), [np.int64(3)], 10)
    assert stops == [3] and type(stops[0]) is int
    assert prompt_seed_keys(np.int64(7), 2) == [(7, 0), (7, 1)]
    assert prompt_seed_keys([np.int64(4), 5], 2) == [(4, 0), (5, 0)]
    for bad in ("x", 1.5, True):
        with pytest.raises(RolloutError, match="seed must be an int, None or a list"):
            prompt_seed_keys(bad, 1)
    with pytest.raises(RolloutError, match=r"prompt_token_ids\[0\]\[0\] = 99 is not a token id"):
        check_request([[np.int64(99)]], 1, 1.0, 1.0, 4, None, 10)


def test_completion_rejects_an_unknown_finish_reason():
    with pytest.raises(ValueError, match="finish_reason"):
        Completion(token_ids=[1], text="a", logprobs=[-0.1], finish_reason="eos")


def test_completion_needs_one_log_prob_per_token():
    """The RL loop's sampler_logp_gap lays each completion's log-probs over its response targets, trusting this."""
    with pytest.raises(ValueError, match="2 token ids but 1 logprobs"):
        Completion(token_ids=[1, 2], text="a", logprobs=[-0.1], finish_reason="stop")


def test_per_prompt_seeds_must_number_the_prompts_exactly():
    with pytest.raises(RolloutError, match="3 per-prompt seeds for 2 prompts"):  # pinned by mutation (more seeds)
        prompt_seed_keys([1, 2, 3], 2)


def test_draws_equal_the_inverse_cdf_of_a_float64_softmax():
    # fp32 exponentials with float64 sums pick the same ids as a float64 softmax's CDF walk (a draw can differ
    # only when its uniform lands within ~1e-7 of a CDF step; none does here), and report the same log-probs
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(256, 4096, generator=g) * 4  # (R, V)
    uniforms = torch.rand(256, generator=g, dtype=torch.float64)
    for temperature, vocab in [(1.0, 4096), (0.7, 4000)]:
        tokens, logp = sample_tokens(logits, uniforms, temperature, 1.0, vocab)
        full = torch.softmax(logits.double() / temperature, dim=-1)  # (R, V)
        cdf = torch.cumsum(full[:, :vocab], dim=-1)
        ref = torch.searchsorted(cdf, uniforms[:, None] * cdf[:, -1:], right=True).squeeze(1)
        assert torch.equal(tokens, ref)
        torch.testing.assert_close(logp.double(), full.gather(1, ref[:, None]).squeeze(1).log(), atol=1e-5, rtol=0)


# ---- pinned by mutation (2026-11-27) ---------------------------------------------------------------------------

def test_the_nucleus_keeps_a_token_only_while_the_mass_before_it_is_below_top_p():
    from minitagpr.rollout.builtin import _nucleus
    exact = _nucleus(torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64), 0.5)  # mass before token 1 == top_p
    assert exact.tolist() == [[1.0, 0.0, 0.0]]
    near_one = _nucleus(torch.tensor([[0.9, 0.095, 0.005]], dtype=torch.float64), 0.99)  # 0.99 still truncates
    torch.testing.assert_close(near_one, torch.tensor([[0.9 / 0.995, 0.095 / 0.995, 0.0]], dtype=torch.float64))


def test_request_bounds_are_exact():
    base = dict(prompt_token_ids=[[1, 2]], n=1, temperature=1.0, top_p=1.0, max_new_tokens=4, stop_token_ids=[3],
                vocab_size=10)
    with pytest.raises(RolloutError, match=r"prompt_token_ids\[0\]\[0\] = 10"):
        check_request(**{**base, "prompt_token_ids": [[10, 2]]})
    with pytest.raises(RolloutError, match="stop token id 10"):
        check_request(**{**base, "stop_token_ids": [10]})
    from minitagpr.rollout.base import MIN_TEMPERATURE
    assert check_request(**{**base, "temperature": MIN_TEMPERATURE}) == [3]  # "at least 1e-4" includes it
    with pytest.raises(RolloutError, match="at least 0.0001"):  # and just below it is refused
        check_request(**{**base, "temperature": MIN_TEMPERATURE * 0.99})
    # prompt + completion must fit max_len: 2 + 4 tokens fit 6 positions, not 5
    assert check_request(**base, max_len=("max_position_embeddings", 6)) == [3]
    with pytest.raises(RolloutError, match=r"prompt_token_ids\[0\] has 2 tokens; with max_new_tokens=4 it exceeds "
                                           r"max_position_embeddings=5"):
        check_request(**base, max_len=("max_position_embeddings", 5))


def test_a_huge_padded_tail_logit_does_not_distort_the_decodable_distribution():
    """The softmax is shifted by the *decodable* maximum: a padded-tail logit 200 above it (exp(-200) underflows in
    fp32) must not zero every weight. Decodable logits 0, 1, 2 give p = e^i / (1 + e + e^2) = .090, .245, .665; a
    uniform of 0 picks id 0 and one of 0.2 (below .090 + .245 = .335) id 1. Pinned by mutation, 2026-11-29."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 202.0]] * 2)
    denom = 1 + math.e + math.e ** 2
    expected = torch.tensor([[1 / denom, math.e / denom, math.e ** 2 / denom]] * 2, dtype=torch.float64)
    assert torch.allclose(sampling_probs(logits, 1.0, 1.0, 3), expected, atol=1e-6)
    tokens, logp = sample_tokens(logits, torch.tensor([0.0, 0.2], dtype=torch.float64), 1.0, 1.0, 3)
    assert tokens.tolist() == [0, 1]
    assert logp.tolist() == pytest.approx([-202.0, -201.0], abs=1e-3)  # log softmax over all 4 rows
