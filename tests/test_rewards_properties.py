"""Property tests: on any text every reward is a finite float in its documented range, and a 1 MB response
scores in under a second (linear scanning, no backtracking)."""
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minitagpr.data.answers import TASKS, extract_answer, is_classification, normalize
from minitagpr.rewards import (
    MIN_TAGS, TAGS, check_tags, format_reward, repetition_reward, score_batch, split_response, tag_reward,
    verifiable_reward,
)

ALPHA, BETA, GAMMA = 0.8, 0.8, 0.2
MB = 1 << 20

# Pieces that stress the scanners: tag tokens (allowed, unknown, half-written), think/chat markers, labels.
FRAGMENTS = [f"<{t}>" for t in TAGS[:4]] + [f"</{t}>" for t in TAGS[:4]] + [
    "<think>", "</think>", "<|im_end|>", "<|endoftext|>", "<|im_start|>", "<x>", "</x>", "<", "</", ">", "<a b>",
    "[2]", "[", "]", "4", "4.5", " ", "\n", "the", "cat", "ünï", "😀", "\x00",
]
tag_soup = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8)), max_size=60).map("".join)

# Well-formed responses, which the two strategies above practically never produce (0 of 1000 draws had R_f = 1 or a
# passing tag check), so without these the composite's range check only ever saw R_f = 0 and R_tag = -1.
# Plain text: no `<` or `>` (so no tag token, think or chat marker), plus a few `<`/`>` pieces that no tag token can
# form from (a space or `=`/`|` follows `<`, a space precedes `>`); never blank, as a segment and an answer must not be.
PLAIN_PIECES = ["< 3", "a > b", "4 <= 5", "<|"]
plain = st.lists(st.one_of(st.text(st.characters(exclude_characters="<>"), min_size=1, max_size=12),
                           st.sampled_from(PLAIN_PIECES)), min_size=1, max_size=4).map("".join).filter(str.strip)
segment = st.tuples(st.sampled_from(TAGS), plain).map(lambda s: f"<{s[0]}>{s[1]}</{s[0]}>")
gap = st.sampled_from(["", " ", "\n", "\n\n", "\t"])  # whitespace only: text between segments fails the check


def segment_chain(min_size: int) -> st.SearchStrategy[str]:
    return st.tuples(gap, st.lists(st.tuples(segment, gap), min_size=min_size, max_size=9)).map(
        lambda c: c[0] + "".join(seg + after for seg, after in c[1]))


well_formed_chain = segment_chain(MIN_TAGS)
END_OF_TURN = ["", "<|im_end|>", "\n<|im_end|>", "<|endoftext|>", " <|im_end|>\n", "<|im_end|><|endoftext|>"]
well_formed = st.builds(lambda before, chain, answer, end: f"{before}<think>{chain}</think>{answer}{end}",
                        st.sampled_from(["", " ", "\n"]), well_formed_chain,
                        st.one_of(plain, st.sampled_from(["[2]", "4", "comedy", "\n\n[1]", " the cat sat"])),
                        st.sampled_from(END_OF_TURN))
any_text = st.one_of(st.text(max_size=300), tag_soup, well_formed)


def nested(depth: int, name: str = "analyze_input") -> str:
    return f"<{name}>" * depth + "x" + f"</{name}>" * depth


def assert_parts_in_range(parts, mix):
    for value, low, high in [(parts.r_v, 0.0, 1.0), (parts.r_f, 0.0, 1.0), (parts.r_rep, -1.0, 0.0),
                             (parts.r_tag, -1.0, 0.0)]:
        assert isinstance(value, float) and math.isfinite(value) and low <= value <= high
    assert parts.r_f in (0.0, 1.0) and parts.r_tag in (-1.0, 0.0)
    low, high = (-(ALPHA + BETA), ALPHA + GAMMA) if mix == "composite" else (-1.0, 1.0)
    assert math.isfinite(parts.total) and low <= parts.total <= high


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response=any_text, gold=st.one_of(any_text, st.none()), task=st.sampled_from(TASKS), prmu=st.floats(0.0, 1.0))
def test_every_component_is_finite_and_in_range_on_any_text(response, gold, task, prmu):
    if gold is None:  # the response's own answer: R_v = 1 on a well-formed response, the top of the range
        gold = extract_answer(response)
    for mix in ("composite", "foundation"):
        (parts,) = score_batch([task], [response], [gold], [prmu], mix=mix, alpha=ALPHA, beta=BETA, gamma=GAMMA)
        assert_parts_in_range(parts, mix)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(response=well_formed, task=st.sampled_from(TASKS), prmu=st.floats(0.0, 1.0), gold_is_answer=st.booleans(),
       other_gold=any_text)
def test_a_well_formed_response_passes_format_and_tags_and_its_composite_is_in_range(response, task, prmu,
                                                                                     gold_is_answer, other_gold):
    """The strategy's responses obey every rule of format_reward's and check_tags' docstrings, so R_f = 1 and
    R_tag = 0; the composite is then alpha * (R_v + R_rep) + gamma * R_PRMU, inside [-(alpha + beta), alpha + gamma]
    (composite_reward's docstring), and above 0 whenever R_v = 1 (R_rep > -1)."""
    gold = extract_answer(response) if gold_is_answer else other_gold
    (parts,) = score_batch([task], [response], [gold], [prmu], alpha=ALPHA, beta=BETA, gamma=GAMMA)
    assert parts.r_f == 1.0 and format_reward(response) == 1.0, response
    assert parts.r_tag == 0.0 and parts.tag_error is None, (response, parts.tag_error)
    assert_parts_in_range(parts, "composite")
    assert parts.total == pytest.approx(ALPHA * (parts.r_v + parts.r_rep) + GAMMA * prmu, rel=1e-12, abs=1e-12)
    if gold_is_answer and (is_classification(task) or any(c.isascii() and c.isalnum() for c in gold)):
        # exact match for labels; ROUGE 1 for text with a token (rouge-score keeps only [a-z0-9] runs)
        assert parts.r_v == 1.0 and parts.total > 0.0, (response, parts)


def test_the_composite_reaches_its_documented_upper_bound():
    """alpha + gamma: a well-formed response whose answer is the gold, no repeated 4-gram, R_PRMU = 1."""
    response = "<think>" + "".join(f"<{t}>step {i}</{t}>" for i, t in enumerate(TAGS[:3])) + "</think>a b c d"
    (parts,) = score_batch(["LaMP-4"], [response], ["a b c d"], [1.0], alpha=ALPHA, beta=BETA, gamma=GAMMA)
    assert (parts.r_v, parts.r_f, parts.r_rep, parts.r_tag) == (1.0, 1.0, 0.0, 0.0)
    assert parts.total == pytest.approx(ALPHA + GAMMA, rel=1e-12)


@settings(max_examples=150, deadline=None)
@given(text=any_text, n=st.integers(1, 6))
def test_repetition_is_in_minus_one_to_zero(text, n):
    value = repetition_reward(text, n=n)
    assert math.isfinite(value) and -1.0 < value <= 0.0


@settings(max_examples=150, deadline=None)
@given(text=any_text)
def test_normalisation_and_extraction_never_raise_and_return_strings(text):
    assert isinstance(extract_answer(text), str)
    for task in TASKS:
        assert isinstance(normalize(task, text), str)


@settings(max_examples=100, deadline=None)
@given(chain=st.one_of(any_text, segment_chain(0)))
def test_a_passing_tag_check_means_enough_allowed_segments_spanning_the_chain(chain):
    # Properties the checker does not compute this way: a pass needs >= MIN_TAGS segments, all named in TAGS,
    # the chain (whitespace aside) opening with the first one and closing with the last one. segment_chain(0) also
    # draws chains of valid segments that are too few, which a checker that forgot the count would let pass.
    check = check_tags(chain)
    assert tag_reward(chain) in (0.0, -1.0) and set(check.segments) <= set(TAGS)
    if check.ok:
        assert tag_reward(chain) == 0.0 and len(check.segments) >= MIN_TAGS
        body = chain.strip()
        assert body.startswith(f"<{check.segments[0]}>") and body.endswith(f"</{check.segments[-1]}>"), chain
        assert all(f"<{name}>" in chain and f"</{name}>" in chain for name in check.segments)
    else:
        assert tag_reward(chain) == -1.0 and check.error
    assert format_reward(chain) in (0.0, 1.0)


@settings(max_examples=30, deadline=None)
@given(depth=st.integers(1, 20_000))
def test_deep_nesting_fails_the_tag_check(depth):
    chain = nested(depth)
    assert tag_reward(chain) == -1.0  # depth 1 is a single segment, below min_tags
    if depth > 1:
        assert "nested" in check_tags(chain).error


@settings(max_examples=100, deadline=None)
@given(segments=st.lists(st.tuples(st.sampled_from(TAGS), st.text(min_size=1, max_size=20)), min_size=0, max_size=8))
def test_concatenated_valid_segments_pass_exactly_when_there_are_three(segments):
    # Contents that are plain text (no tag tokens, not blank) make each segment valid by construction.
    segments = [(name, body.replace("<", "").replace(">", "") or "x") for name, body in segments]
    segments = [(name, body if body.strip() else "x") for name, body in segments]
    chain = "\n".join(f"<{name}>{body}</{name}>" for name, body in segments)
    assert tag_reward(chain) == (0.0 if len(segments) >= 3 else -1.0)
    assert split_response(f"<think>{chain}</think>a")[0] == chain


def one_megabyte(piece: str) -> str:
    return (piece * (MB // max(len(piece), 1) + 1))[:MB]


GOLD_TITLE = "the cat sat on the mat today"
WELL_FORMED_CHAIN = "".join(f"<{t}>word {i} of the chain</{t}>\n" for i, t in enumerate(TAGS))
BIG_RESPONSES = {
    "answer of gold words (LaMP-4)": ("LaMP-4", "<think>" + WELL_FORMED_CHAIN + "</think>" + one_megabyte(
        "the cat sat on mat today ")),
    "answer of unique words (LaMP-7)": ("LaMP-7", "<think>c</think>" + " ".join(
        f"w{i}" for i in range(MB // 8))),
    "one-letter words (LaMP-5)": ("LaMP-5", one_megabyte("a ")),
    "many valid segments (LaMP-2)": ("LaMP-2", "<think>" + WELL_FORMED_CHAIN * (MB // len(WELL_FORMED_CHAIN)) +
                                     "</think>comedy"),
    "deep nesting (LaMP-1)": ("LaMP-1", "<think>" + nested(MB // 40) + "</think>[2]"),
    "open angles (LaMP-1)": ("LaMP-1", "<think>" + one_megabyte("<analyze_input") + "</think>" + one_megabyte("[ ")),
    "digits (LaMP-3)": ("LaMP-3", "<think>x</think>" + one_megabyte("4")),
    "unicode soup (PGraphRAG-title)": ("PGraphRAG-title", one_megabyte("ünï 😀 <x> </think> [2] ")),
}


@pytest.mark.parametrize("name", list(BIG_RESPONSES))
def test_a_one_megabyte_response_scores_in_under_a_second(name):
    task, response = BIG_RESPONSES[name]
    best = math.inf
    for _ in range(2):  # CPU time, best of two: the box is shared, and it is our own cost we are bounding
        start = time.process_time()
        (parts,) = score_batch([task], [response], [GOLD_TITLE if task != "LaMP-3" else "4"], mix="foundation")
        best = min(best, time.process_time() - start)
    assert_parts_in_range(parts, "foundation")
    if name.startswith("many valid"):
        assert parts.r_tag == 0.0  # the scan really went through all ~100k tag tokens
    assert best < 1.0, f"{name}: {best:.2f} s"


def test_verifiable_reward_of_a_long_answer_against_a_long_gold_is_exact_and_fast():
    answer = " ".join(f"w{i % 997}" for i in range(5000))
    gold = " ".join(f"w{i % 991}" for i in range(2000))
    start = time.process_time()
    value = verifiable_reward("LaMP-5", answer, gold)
    assert time.process_time() - start < 1.0
    # The gold (w0..w990 twice, then w0..w17) is a subsequence of the answer (w0..w996 five times, plus a tail), so
    # LCS = 2000: P = 2000/5000 = 0.4, R = 1, F = 2 * 0.4 / 1.4 = 4/7 (rouge-score says 0.5714285714285715 too).
    assert value == pytest.approx(4 / 7, rel=1e-12)
