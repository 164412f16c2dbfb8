"""Rule-based rewards, each formula against hand-computed values (minitagpr.rewards)."""
import random

import pytest
from rouge_score import rouge_scorer

from minitagpr.rewards import (
    TAGS, TERMS, RewardParts, _lcs_length, check_tags, composite_reward, format_reward, foundation_reward,
    reward_terms,
    repetition_reward, rouge_f, score_batch, split_response, tag_reward, verifiable_reward,
)

# A chain in the shape the paper's model writes: several functional segments, tags repeating.
PAPER_SHAPED_CHAIN = """
<analyze_input>
The task asks which of the two references the author would cite for the paper "Sparse attention for long documents".
</analyze_input>
<examine_examples>
The profile holds five papers on efficient transformers and two on retrieval; none on speech.
</examine_examples>
<examine_examples>
Reference [1] is about speech recognition; reference [2] is about linear-time attention.
</examine_examples>
<identify_patterns>
This author repeatedly cites work on making attention cheaper.
</identify_patterns>
<make_decision>
Reference [2] matches the pattern.
</make_decision>
"""


def respond(chain: str, answer: str, end: str = "<|im_end|>") -> str:
    return f"<think>\n{chain}\n</think>\n\n{answer}{end}"


# --- reading a response -------------------------------------------------------------------------------------------
def test_chain_is_the_text_inside_the_single_think_block():
    assert split_response("<think>abc</think>\n\nans<|im_end|>") == ("abc", "ans")


def test_two_think_blocks_have_no_chain():
    assert split_response("<think>a</think><think>b</think>x")[0] is None


def test_unclosed_think_has_no_chain():
    assert split_response("<think>cut off by the length lim")[0] is None


# --- R_v -----------------------------------------------------------------------------------------------------------
def test_classification_match_after_opt_in_normalisation_scores_one():
    assert verifiable_reward("LaMP-1", "reference 2", "[2]", normalize_answers=True) == 1.0
    assert verifiable_reward("LaMP_3", "4 stars", "4", normalize_answers=True) == 1.0
    assert verifiable_reward("LaMP-2", "Dark Comedy", "dark comedy", normalize_answers=True) == 1.0


def test_classification_mismatch_scores_zero():
    assert verifiable_reward("LaMP-2", "comedy", "dark comedy") == 0.0
    assert verifiable_reward("PGraphRAG-rating", "3", "4") == 0.0


def test_classification_needs_the_exact_label_by_default():
    # tagpr-method.md: R_v is exact match for LaMP-1/2/3, as the official evaluation scores them
    assert verifiable_reward("LaMP-1", "2", "[2]") == 0.0
    assert verifiable_reward("LaMP_3", "4 stars", "4") == 0.0
    assert verifiable_reward("LaMP-1", " [2] ", "[2]") == 1.0


def test_generation_rouge_l_by_hand():
    # pred 6 tokens, gold 5, LCS "the cat on mat" = 4: P = 4/6, R = 4/5, F = 2PR/(P+R) = 8/11
    assert verifiable_reward("LaMP-4", "The cat sat on the mat.", "the cat on a mat") == pytest.approx(8 / 11)


def test_generation_rouge_1_and_2_by_hand():
    pred, gold = "the cat sat on the mat", "the cat on a mat"
    assert rouge_f(pred, gold, "rouge1") == pytest.approx(8 / 11)  # overlap the, cat, on, mat = 4
    assert rouge_f(pred, gold, "rouge2") == pytest.approx(2 / 9)  # bigram overlap 1: P = 1/5, R = 1/4
    assert verifiable_reward("LaMP-5", pred, gold, rouge_variant="rouge2") == pytest.approx(2 / 9)


def test_empty_generation_answer_scores_zero():
    assert verifiable_reward("LaMP-7", "", "a tweet") == 0.0


def test_unknown_rouge_variant_is_an_error():
    with pytest.raises(ValueError, match="rougeLsum"):
        rouge_f("a", "a", "rougeLsum")


def test_rouge_equals_rouge_score_on_random_texts():
    rng = random.Random(0)
    vocab = "the The a cat dog sat on mat, x-ray 3 ünï 3.5 ... mat!".split()
    scorers = {v: rouge_scorer.RougeScorer([v], use_stemmer=False) for v in ("rouge1", "rouge2", "rougeL")}
    for _ in range(200):
        pred = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 20)))
        gold = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 10)))
        for variant, scorer in scorers.items():
            assert rouge_f(pred, gold, variant) == pytest.approx(scorer.score(gold, pred)[variant].fmeasure, abs=1e-12)


def test_bit_parallel_lcs_equals_dynamic_programming():
    def lcs_dp(a, b):
        prev = [0] * (len(b) + 1)
        for x in a:
            cur = [0]
            for j, y in enumerate(b):
                cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
            prev = cur
        return prev[-1]

    rng = random.Random(1)
    for _ in range(500):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 15))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 15))]
        assert _lcs_length(a, b) == lcs_dp(a, b)


# --- R_f -----------------------------------------------------------------------------------------------------------
def test_well_formed_response_has_format_one():
    assert format_reward(respond(PAPER_SHAPED_CHAIN, "[2]")) == 1.0


def test_trailing_whitespace_and_end_markers_are_allowed():
    assert format_reward("\n<think>c</think>a \n<|im_end|>\n<|endoftext|>") == 1.0
    assert format_reward("<think>c</think>a") == 1.0


def test_empty_answer_has_format_zero():
    assert format_reward(respond("chain", "  ")) == 0.0


def test_empty_chain_has_format_zero():
    assert format_reward(respond(" \n ", "[2]")) == 0.0


def test_two_think_blocks_have_format_zero():
    assert format_reward("<think>a</think><think>b</think>[2]") == 0.0


def test_text_before_think_has_format_zero():
    assert format_reward("Sure! <think>a</think>[2]") == 0.0


def test_text_after_end_of_turn_has_format_zero():
    assert format_reward("<think>a</think>[2]<|im_end|>more") == 0.0


def test_missing_think_close_has_format_zero():
    assert format_reward("<think>a [2]") == 0.0
    assert format_reward("[2]") == 0.0


# --- R_rep ---------------------------------------------------------------------------------------------------------
def test_a_four_gram_repeated_three_times_by_hand():
    text = "the cat sat down one the cat sat down two the cat sat down"
    # 14 words: |T_4| = 11; "the cat sat down" occurs 3 times, every other 4-gram once: |U_4| = 9
    assert repetition_reward(text) == pytest.approx(-2 / (11 + 1e-6), abs=1e-15)


def test_periodic_text_by_hand():
    # 12 words of period 4: |T_4| = 9, |U_4| = 4
    assert repetition_reward("a b c d " * 3) == pytest.approx(-5 / (9 + 1e-6), abs=1e-15)


def test_no_repeated_ngram_gives_zero():
    assert repetition_reward("one two three four five six") == 0.0


def test_fewer_than_n_words_gives_zero():
    assert repetition_reward("a a a") == 0.0
    assert repetition_reward("a a a", n=2) == pytest.approx(-1 / (2 + 1e-6))


def test_think_markers_separate_words_and_do_not_count():
    # "<think>x</think>x x x" reads as the words x x x x: |T_4| = 1, |U_4| = 1
    assert repetition_reward("<think>x</think>x x x<|im_end|>") == 0.0
    assert repetition_reward("<think>x x</think>x x x<|im_end|>") == pytest.approx(-1 / (2 + 1e-6))


# --- R_tag ---------------------------------------------------------------------------------------------------------
def test_well_formed_three_tag_chain_passes():
    chain = "<analyze_input>a</analyze_input>\n<examine_examples>b</examine_examples> <make_decision>c</make_decision>"
    assert tag_reward(chain) == 0.0
    assert check_tags(chain).segments == ("analyze_input", "examine_examples", "make_decision")


def test_paper_shaped_chain_passes_with_repeated_tags():
    assert check_tags(PAPER_SHAPED_CHAIN).ok and tag_reward(PAPER_SHAPED_CHAIN) == 0.0


def test_two_tag_chain_fails_the_minimum():
    chain = "<analyze_input>a</analyze_input><make_decision>c</make_decision>"
    assert tag_reward(chain) == -1.0 and "fewer than 3" in check_tags(chain).error
    assert tag_reward(chain, min_tags=2) == 0.0


@pytest.mark.parametrize("chain,reason", [
    ("<analyze_input>a<make_decision>b</make_decision></analyze_input><make_decision>c</make_decision>"
     "<verify_conclusion>d</verify_conclusion>", "nested"),
    ("<analyze_input>a</analyze_input><guess>b</guess><make_decision>c</make_decision>", "unknown tag <guess>"),
    ("<analyze_input>a</analyze_input> so then <examine_examples>b</examine_examples><make_decision>c</make_decision>",
     "text outside"),
    ("<analyze_input>a</analyze_input><examine_examples>b</examine_examples><make_decision>c</make_decision> [2]",
     "text outside segments at the end"),
    ("<analyze_input>a</analyze_input></examine_examples><make_decision>c</make_decision>", "stray closing"),
    ("<analyze_input>a</analyze_input><examine_examples>b</examine_examples><make_decision>c", "unclosed"),
    ("<analyze_input>a</make_decision><examine_examples>b</examine_examples><make_decision>c</make_decision>",
     "closes <analyze_input>"),
    ("<analyze_input>a</analyze_input><examine_examples> </examine_examples><make_decision>c</make_decision>",
     "empty segment"),
    (None, "no single"),
    ("", "fewer than 3"),
])
def test_each_broken_chain_fails_with_its_reason(chain, reason):
    assert tag_reward(chain) == -1.0
    assert reason in check_tags(chain).error


def test_angle_brackets_in_prose_are_text():
    chain = "<analyze_input>score < 3 and a->b</analyze_input><examine_examples>x</examine_examples>" \
            "<make_decision>c</make_decision>"
    assert tag_reward(chain) == 0.0


def test_allowed_set_is_a_parameter():
    chain = "<a>1</a><b>2</b><a>3</a>"
    assert tag_reward(chain) == -1.0 and tag_reward(chain, allowed=("a", "b")) == 0.0


def test_tags_are_the_nine_of_the_method_doc_in_order():
    assert TAGS == ("analyze_input", "examine_examples", "identify_patterns", "evaluate_reference",
                    "compare_entities", "synthesize_findings", "make_decision", "verify_conclusion",
                    "formulate_conclusion")


# --- the mixes -----------------------------------------------------------------------------------------------------
def test_composite_by_hand():
    parts = RewardParts(r_v=1.0, r_f=1.0, r_rep=-0.25, r_tag=0.0, r_prmu=0.5)
    assert composite_reward(parts) == pytest.approx(0.8 * 0.75 + 0.0 + 0.2 * 0.5)
    bad = RewardParts(r_v=1.0, r_f=0.0, r_rep=-0.25, r_tag=-1.0, r_prmu=0.9)
    assert composite_reward(bad, alpha=0.5, beta=0.3, gamma=0.1) == pytest.approx(-0.3 + 0.09)


def test_foundation_by_hand():
    assert foundation_reward(RewardParts(r_v=0.6, r_f=1.0, r_rep=-0.1, r_tag=-1.0, r_prmu=0.9)) == pytest.approx(0.5)
    assert foundation_reward(RewardParts(r_v=0.6, r_f=0.0, r_rep=-0.1, r_tag=0.0)) == 0.0


def test_composite_without_prmu_needs_gamma_zero():
    parts = RewardParts(r_v=1.0, r_f=1.0, r_rep=0.0, r_tag=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        composite_reward(parts)
    assert composite_reward(parts, gamma=0.0) == pytest.approx(0.8 - 0.8)


def test_reward_terms_add_up_to_each_mix():
    parts = RewardParts(r_v=0.6, r_f=1.0, r_rep=-0.1, r_tag=-1.0, r_prmu=0.9)
    terms = reward_terms(parts, "composite", alpha=0.5, beta=0.3, gamma=0.1)
    assert terms == {"foundation": pytest.approx(0.25), "tag": -0.3, "prmu": pytest.approx(0.09)}
    assert tuple(terms) == TERMS["composite"] and sum(terms.values()) == composite_reward(parts, 0.5, 0.3, 0.1)
    assert reward_terms(parts, "foundation") == {"foundation": foundation_reward(parts)}
    assert reward_terms(RewardParts(r_v=1.0, r_f=1.0, r_rep=0.0, r_tag=0.0), gamma=0.0)["prmu"] == 0.0  # w/o PRMU
    with pytest.raises(ValueError, match="unknown mix 'sum'"):
        reward_terms(parts, "sum")


def test_composite_reward_is_the_paper_formula_bit_for_bit():
    """composite_reward adds reward_terms' terms; the rewards RL trains on must stay exactly the formula's."""
    rng = random.Random(0)
    for _ in range(20000):
        parts = RewardParts(r_v=rng.random(), r_f=float(rng.random() < 0.8), r_rep=-rng.random() / 3,
                            r_tag=-float(rng.random() < 0.3), r_prmu=rng.random())
        alpha, beta, gamma = rng.choice([(0.8, 0.8, 0.2), (rng.random(), rng.random(), rng.random())])
        expected = alpha * (parts.r_v + parts.r_rep) * parts.r_f + beta * parts.r_tag + gamma * parts.r_prmu
        assert composite_reward(parts, alpha, beta, gamma) == expected


def test_score_batch_fills_every_component_and_total_by_hand():
    good = respond(PAPER_SHAPED_CHAIN, "[2]")
    two_blocks = "<think>a</think><think>b</think>dark comedy"
    headline = respond("<analyze_input>a</analyze_input><examine_examples>b</examine_examples>"
                       "<make_decision>c</make_decision>", "The cat sat on the mat")
    parts = score_batch(["LaMP-1", "LaMP-2", "LaMP-4"], [good, two_blocks, headline],
                        ["[2]", "dark comedy", "the cat on a mat"], prmu=[0.5, 0.25, 1.0])
    p0, p1, p2 = parts
    assert (p0.r_v, p0.r_f, p0.r_tag, p0.r_prmu) == (1.0, 1.0, 0.0, 0.5)
    assert p0.r_rep == repetition_reward(good)
    assert p0.total == pytest.approx(0.8 * (1.0 + p0.r_rep) + 0.2 * 0.5)
    # R_v counts the answer, but the format (two blocks) zeroes it and the tag check fails.
    assert (p1.r_v, p1.r_f, p1.r_tag, p1.r_rep) == (1.0, 0.0, -1.0, 0.0)
    assert p1.total == pytest.approx(-0.8 + 0.2 * 0.25) and "no single" in p1.tag_error
    assert p2.r_v == pytest.approx(8 / 11) and p2.total == pytest.approx(0.8 * (8 / 11 + p2.r_rep) + 0.2)


def test_score_batch_by_hand_with_distinct_weights_a_repeating_answer_and_the_default_rouge():
    """Every weight distinct and every term non-zero, all values by hand: swapping alpha and beta, R_rep over
    3-grams (or left out) and ROUGE-1 as the default R_v each change a number here (the test above had alpha = beta,
    R_rep = 0 and a pair on which ROUGE-1 and ROUGE-L agree; pinned 2026-11-29)."""
    tags = "<analyze_input>a</analyze_input><examine_examples>b</examine_examples><make_decision>c</make_decision>"
    # words: the chain (one word: tags without spaces), then 7 answer words; 8 words -> 5 4-grams, 4 distinct
    # (-1/5); 3-grams would give 6, 4 distinct (-1/3)
    loop = "<think>" + tags + "</think>mat the cat mat the cat mat"
    untagged = respond("plain", "mat the cat")  # R_f = 1 but the tag check fails
    p_loop, p_untagged = score_batch(["LaMP-4", "LaMP-4"], [loop, untagged], ["the cat on a mat"] * 2,
                                     prmu=[0.5, 0.25], alpha=0.5, beta=0.3, gamma=0.1)
    # ROUGE-L of "mat the cat" vs "the cat on a mat": LCS "the cat" = 2 -> P 2/3, R 2/5, F 0.5 (ROUGE-1 0.75)
    assert p_untagged.r_v == pytest.approx(0.5) and p_untagged.r_rep == 0.0
    assert (p_untagged.r_f, p_untagged.r_tag) == (1.0, -1.0)
    assert p_untagged.total == pytest.approx(0.5 * 0.5 + 0.3 * -1.0 + 0.1 * 0.25)
    assert p_loop.r_rep == pytest.approx(-1 / (5 + 1e-6))
    f_loop = 2 * (3 / 7) * (3 / 5) / (3 / 7 + 3 / 5)  # LCS "the cat mat" = 3 of 7 predicted, 5 gold words
    assert p_loop.r_v == pytest.approx(f_loop) and (p_loop.r_f, p_loop.r_tag) == (1.0, 0.0)
    assert p_loop.total == pytest.approx(0.5 * (f_loop - 1 / 5) + 0.3 * 0.0 + 0.1 * 0.5)


def test_score_batch_foundation_ignores_prmu_and_tags():
    response = respond("no tags here", "4")
    (parts,) = score_batch(["LaMP-3"], [response], ["4"], mix="foundation")
    assert parts.r_tag == -1.0 and parts.r_prmu is None and parts.total == pytest.approx(1.0 + parts.r_rep)


def test_a_response_cut_by_the_length_limit_fails_the_format():
    # the text of a cut response can parse as chain + answer ("The cat" of "The cat sat ..."): R_f must still be 0
    cut = respond(PAPER_SHAPED_CHAIN, "The cat")
    finished, truncated = score_batch(["LaMP-4"] * 2, [cut, cut], ["The cat sat"] * 2, mix="foundation",
                                      finished=[True, False])
    assert finished.r_f == 1.0 and finished.total > 0
    assert truncated.r_f == 0.0 and truncated.total == 0.0 and truncated.r_v == finished.r_v


def test_score_batch_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 responses"):
        score_batch(["LaMP-1"], ["a", "b"], ["[1]"], mix="foundation")
    with pytest.raises(ValueError, match="1 finished flags"):
        score_batch(["LaMP-1"] * 2, ["a", "b"], ["[1]"] * 2, mix="foundation", finished=[True])


def test_score_batch_rejects_unknown_mix_and_missing_prmu():
    with pytest.raises(ValueError, match="mix"):
        score_batch(["LaMP-1"], ["a"], ["[1]"], mix="guided")
    with pytest.raises(ValueError, match="PRMU"):
        score_batch(["LaMP-1"], ["a"], ["[1]"])


def test_a_chat_marker_inside_the_chain_fails_the_format():  # pinned by mutation, 2026-11-27
    assert format_reward("<think>chain <|im_end|><|im_start|>user</think>answer") == 0.0
    assert format_reward("<think>chain</think>answer <|im_start|>user") == 0.0
    assert format_reward("<think>chain</think>answer") == 1.0


# ---- pinned by mutation (each fails on a mutant the suite let through, 2026-11-29) -----------------------------------
def test_split_response_has_no_chain_unless_exactly_one_think_then_one_close():
    """The chain is defined only for exactly one `<think>` followed by exactly one `</think>`: two openings, or a
    close before the open, give None (not the text between the first markers, not an empty chain)."""
    assert split_response("<think>a<think>b</think>x") == (None, "x")
    assert split_response("</think>x<think>y")[0] is None


def test_verifiable_reward_defaults_to_rouge_l():
    """R_v of a generation task is ROUGE-L by default: "beta alpha" vs "alpha beta" has LCS 1 of 2 words on both
    sides -> P = R = F = 0.5, where ROUGE-1 (every unigram shared) would give 1.0."""
    assert verifiable_reward("LaMP-4", "beta alpha", "alpha beta") == pytest.approx(0.5)
    assert verifiable_reward("LaMP-4", "beta alpha", "alpha beta", rouge_variant="rouge1") == pytest.approx(1.0)


def test_verifiable_reward_strips_and_normalises_the_gold_like_the_answer():
    """Both sides are read the same way: stripped under the exact rule (as the official metric strips golds), and
    normalised too when normalize_answers=True."""
    assert verifiable_reward("LaMP-1", "[2]", "[2]\n") == 1.0
    assert verifiable_reward("LaMP-2", "Sci Fi", " sci-fi ", normalize_answers=True) == 1.0


def test_score_batch_is_exact_match_unless_normalisation_is_asked_for():
    """score_batch's default is the method's exact match: an answer "2" for gold "[2]" earns R_v = 0; only
    normalize_answers=True maps it to "[2]" (R_v = 1)."""
    response = respond(PAPER_SHAPED_CHAIN, "2")
    (exact,) = score_batch(["LaMP-1"], [response], ["[2]"], gamma=0.0)
    (lenient,) = score_batch(["LaMP-1"], [response], ["[2]"], gamma=0.0, normalize_answers=True)
    assert (exact.r_v, lenient.r_v) == (0.0, 1.0)


@pytest.mark.parametrize("score,match", [(7.3, r"7.3; R_PRMU = sigmoid\(f\) lies in \[0, 1\]"),
                                         (-0.5, r"-0.5; R_PRMU = sigmoid"), (float("nan"), r"nan$"),
                                         (float("inf"), r"inf$")])
def test_a_prmu_score_outside_0_1_is_refused_by_response(score, match):
    """R_PRMU = sigmoid(f): a raw logit passed by mistake pushed the total past alpha + gamma unnoticed (7.3 gave
    2.26; reported by a review, 2026-11-29). A non-finite score (a diverged PRMU) is named as such."""
    with pytest.raises(ValueError, match=r"PRMU score of response 1 is " + match):
        score_batch(["LaMP-3"] * 2, [respond("a", "4")] * 2, ["4"] * 2, prmu=[0.5, score])


@pytest.mark.parametrize("response,gold,kinds", [(None, "4", "NoneType and str"),
                                                 ("<think>a</think>4", 4, "str and int")])
def test_a_response_or_gold_that_is_no_string_is_named_by_its_index(response, gold, kinds):
    """Was an AttributeError inside the answer parser or rouge_score."""
    with pytest.raises(TypeError, match=f"response 1 and its gold must be strings, got {kinds}"):
        score_batch(["LaMP-3"] * 2, ["<think>a</think>4", response], ["4", gold], mix="foundation")
