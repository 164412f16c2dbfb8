"""Rule-based rewards of TagPR: R_v, R_f, R_rep, R_tag and the composite and foundation mixes.

Every formula is restated from ../shared/docs/tagpr-method.md ("Stage 2 — Guided RL" and "Stage 3 — Exploratory
RL"; the paper numbers them among its Eq. 5-9 and 11, which the method doc does not label one by one) and sits in
the docstring of the function that computes it. Pure Python, no torch: rewards are computed on decoded text.

How a response is read. A *response* is the decoded completion (the tokens the policy generated after the prompt,
special tokens kept), e.g. `"<think>\\n<analyze_input>...</analyze_input>...\\n</think>\\n\\n[2]<|im_end|>"`; the
end-of-turn marker is optional (the RL loop passes the text without its stop token, and says which responses the
length limit cut off through `score_batch(finished=...)`: those get R_f = 0).
- the *answer* is `answers.extract_answer(response)`: what follows the last `</think>`, stripped;
- the *chain* is the text inside the single think block: defined only when the response holds exactly one
  `<think>` and exactly one `</think>` after it; otherwise there is no chain and R_tag = -1 (two think blocks or a
  chain cut off by the length limit are tag-syntax failures too).

Cost. Every scan is linear in the response length: `str.find`/`str.count`, splitting, and regexes without nested
quantifiers. ROUGE uses rouge-score's own tokenizer but computes the LCS with a bit-parallel algorithm over Python
integers, O(len(prediction) * len(gold) / 64) machine operations instead of rouge-score's O(n*m) Python table
(a 1 MB answer would take minutes there); the two agree exactly (tests/test_rewards.py).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from rouge_score.tokenize import tokenize as _rouge_tokenize

from minitagpr.data.answers import (THINK_CLOSE, THINK_OPEN, canonical_task, extract_answer, is_classification,
                                    normalize, strip_end_markers)

# The nine reasoning tags, in tagpr-method.md's order.
TAGS = (
    "analyze_input",
    "examine_examples",
    "identify_patterns",
    "evaluate_reference",
    "compare_entities",
    "synthesize_findings",
    "make_decision",
    "verify_conclusion",
    "formulate_conclusion",
)
MIN_TAGS = 3  # R_tag's "at least 3 tags" (tagpr-method.md), counted as tagged segments

# Markers that may never appear inside a chain or an answer (they end or restart a turn / think block).
_MARKERS = (THINK_OPEN, THINK_CLOSE, "<|im_start|>", "<|im_end|>", "<|endoftext|>")
ROUGE_VARIANTS = ("rouge1", "rouge2", "rougeL")

# A tag token is `<name>` or `</name>`; names may hold letters, digits, `_` and `-`. Anything else that starts with
# `<` (`< 3`, `<|im_end|>`, `<a b>`) is plain text. Linear: the name class excludes `<` and `>`, so a failed match
# backtracks only over the one name run that follows its own `<`.
_TAG_TOKEN_RE = re.compile(r"<(/?)([A-Za-z_][A-Za-z0-9_\-]*)>")


# --------------------------------------------------------------------------------------------------------------
# Reading a response
# --------------------------------------------------------------------------------------------------------------
def split_response(response: str) -> tuple[str | None, str]:
    """(chain, answer): chain = text inside the single think block (None when there is not exactly one `<think>`
    followed by exactly one `</think>`), answer = `extract_answer(response)`."""
    answer = extract_answer(response)
    if response.count(THINK_OPEN) != 1 or response.count(THINK_CLOSE) != 1:
        return None, answer
    start, end = response.find(THINK_OPEN), response.find(THINK_CLOSE)
    if end < start:
        return None, answer
    return response[start + len(THINK_OPEN): end], answer


# --------------------------------------------------------------------------------------------------------------
# R_v: verifiable reward
# --------------------------------------------------------------------------------------------------------------
def rouge_f(prediction: str, target: str, variant: str = "rougeL") -> float:
    """ROUGE F-measure of `prediction` against `target`, equal to rouge-score's `RougeScorer([variant],
    use_stemmer=False).score(target, prediction)[variant].fmeasure` (same tokenizer, same formulas).

    rougeN: overlap = sum over n-grams of min(count_pred, count_gold); P = overlap / max(#pred n-grams, 1),
    R = overlap / max(#gold n-grams, 1). rougeL: P = LCS / |pred|, R = LCS / |gold| (0 if either is empty).
    F = 2PR / (P + R), 0 when P + R = 0.
    """
    if variant not in ROUGE_VARIANTS:
        raise ValueError(f"unknown ROUGE variant {variant!r}; expected one of {', '.join(ROUGE_VARIANTS)}")
    pred, gold = _rouge_tokenize(prediction, None), _rouge_tokenize(target, None)
    if variant == "rougeL":
        if not pred or not gold:
            return 0.0
        lcs = _lcs_length(pred, gold)
        precision, recall = lcs / len(pred), lcs / len(gold)
    else:
        n = int(variant[5:])
        pred_ngrams = Counter(zip(*(pred[i:] for i in range(n))))
        gold_ngrams = Counter(zip(*(gold[i:] for i in range(n))))
        overlap = sum(min(count, pred_ngrams[g]) for g, count in gold_ngrams.items())
        precision = overlap / max(sum(pred_ngrams.values()), 1)
        recall = overlap / max(sum(gold_ngrams.values()), 1)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists, bit-parallel (Hyyrö 2004).

    Bit i of V stands for position i of the shorter list `a`; after reading each token of `b`,
    V <- (V + U) | (V - U) with U = V & match_mask(token), and the LCS length is the number of zero bits of V.
    """
    if len(a) > len(b):
        a, b = b, a
    match_mask: dict[str, int] = {}
    for i, token in enumerate(a):
        match_mask[token] = match_mask.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    # A token absent from `a` has U = 0 and leaves V unchanged: skip it (a long answer is mostly such tokens).
    for token in [t for t in b if t in match_mask]:
        u = v & match_mask[token]
        v = ((v + u) | (v - u)) & full  # the mask drops the carry out of the top bit
    return len(a) - bin(v).count("1")


def verifiable_reward(task: str, answer: str, gold: str, *, normalize_answers: bool = False,
                      rouge_variant: str = "rougeL") -> float:
    """R_v. Classification tasks (LaMP-1, 2, 3, PGraphRAG-rating): 1.0 when the stripped answer equals the gold label
    exactly (the method's "exact match", also the official evaluation's rule), else 0.0; `normalize_answers=True`
    compares `answers.normalize`d strings instead (lenient: "4 stars" matches "4").
    Generation tasks: the ROUGE F-measure of answer vs gold (`rouge_variant`, default ROUGE-L). Range [0, 1].
    """
    if is_classification(task):
        same = normalize(task, answer, normalize_answers) == normalize(task, gold, normalize_answers)
        return 1.0 if same else 0.0
    return rouge_f(answer, gold, rouge_variant)


# --------------------------------------------------------------------------------------------------------------
# R_f: format reward
# --------------------------------------------------------------------------------------------------------------
def format_reward(response: str) -> float:
    """R_f = 1.0 when the response is exactly `<think>` chain `</think>` answer, else 0.0.

    Conditions: only whitespace before `<think>`; exactly one `<think>` and one `</think>`; the chain is not blank;
    after `</think>` comes a non-blank answer followed only by whitespace and end-of-turn markers (`<|im_end|>`,
    `<|endoftext|>`); neither chain nor answer holds a think or chat marker.
    """
    chain, _ = split_response(response)
    if chain is None or response[: response.find(THINK_OPEN)].strip():
        return 0.0
    answer = strip_end_markers(response[response.find(THINK_CLOSE) + len(THINK_CLOSE):])
    if not chain.strip() or not answer:
        return 0.0
    if any(marker in chain or marker in answer for marker in _MARKERS):
        return 0.0
    return 1.0


# --------------------------------------------------------------------------------------------------------------
# R_rep: repetition reward
# --------------------------------------------------------------------------------------------------------------
def repetition_reward(response: str, n: int = 4, delta: float = 1e-6) -> float:
    """R_rep = -(|T_n| - |U_n|) / (|T_n| + delta), over the word n-grams of the generation (chain and answer).

    T_n is the multiset of n-grams (|T_n| = #words - n + 1) and U_n its set of distinct n-grams; words are the
    whitespace-separated pieces of the response after the think and end-of-turn markers are replaced by spaces
    (tag markup such as `<make_decision>` stays part of the text: it is part of what was generated).
    0.0 with fewer than n words. Range (-1, 0].
    """
    if n < 1:
        raise ValueError(f"repetition_reward: n must be >= 1, got {n}")
    for marker in _MARKERS:
        response = response.replace(marker, " ")
    words = response.split()
    if len(words) < n:
        return 0.0
    total = len(words) - n + 1  # |T_n|
    distinct = len(set(zip(*(words[i:] for i in range(n)))))  # |U_n|
    return -(total - distinct) / (total + delta)


# --------------------------------------------------------------------------------------------------------------
# R_tag: tag reward
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TagCheck:
    """Result of reading a chain as tagged segments: the segment names in order, and the first failed check."""
    segments: tuple[str, ...]
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


def check_tags(chain: str | None, allowed: Iterable[str] = TAGS, min_tags: int = MIN_TAGS) -> TagCheck:
    """Read `chain` as a sequence of `<name>` ... `</name>` segments; report the first check that fails.

    Checks: no non-whitespace text outside segments; every segment opens with an allowed name and closes with the
    same name; no tag inside a segment (no nesting); no stray closing tag; nothing left unclosed; every segment has
    non-blank content (an empty `<make_decision></make_decision>` decides nothing); at least `min_tags` segments.
    `chain=None` (no single think block) fails. One pass over the tag tokens: linear time.

    tagpr-method.md names three checks (tag syntax, every tag in the nine-tag set, >= 3 tags); "tag syntax" is read
    here as "the chain is a flat sequence of non-empty tagged segments", so any `<word>` inside a segment (e.g. an
    HTML `<br>`) fails as nesting. The same function filters the Stage-0 chains (data/chains.py) that SFT learns
    from, so what the policy is taught and what the reward accepts are one definition.
    """
    if chain is None:
        return TagCheck((), "no single <think>...</think> block")
    allowed = frozenset(allowed)
    names: list[str] = []
    open_name: str | None = None  # name of the segment being read, None between segments
    last = 0  # end of the previous tag token
    for token in _TAG_TOKEN_RE.finditer(chain):
        closing, name = token.group(1) == "/", token.group(2)
        between = chain[last: token.start()]
        if open_name is None:
            if between.strip():
                return TagCheck(tuple(names), f"text outside segments before {token.group(0)}")
            if closing:
                return TagCheck(tuple(names), f"stray closing tag </{name}>")
            if name not in allowed:
                return TagCheck(tuple(names), f"unknown tag <{name}>")
            open_name = name
        else:
            if not closing:
                return TagCheck(tuple(names), f"nested tag <{name}> inside <{open_name}>")
            if name != open_name:
                return TagCheck(tuple(names), f"</{name}> closes <{open_name}>")
            if not between.strip():
                return TagCheck(tuple(names), f"empty segment <{name}>")
            names.append(name)
            open_name = None
        last = token.end()
    if open_name is not None:
        return TagCheck(tuple(names), f"unclosed tag <{open_name}>")
    if chain[last:].strip():
        return TagCheck(tuple(names), "text outside segments at the end")
    if len(names) < min_tags:
        return TagCheck(tuple(names), f"{len(names)} segments, fewer than {min_tags}")
    return TagCheck(tuple(names), None)


def tag_reward(chain: str | None, allowed: Iterable[str] = TAGS, min_tags: int = MIN_TAGS) -> float:
    """R_tag = 0.0 when every check of `check_tags` passes, else -1.0. Range {-1, 0}."""
    return 0.0 if check_tags(chain, allowed, min_tags).ok else -1.0


# --------------------------------------------------------------------------------------------------------------
# The mixes
# --------------------------------------------------------------------------------------------------------------
@dataclass
class RewardParts:
    """Every component of one response's reward, and the mixed total (`mix` says which formula made it)."""
    r_v: float  # verifiable, [0, 1]
    r_f: float  # format, {0, 1}
    r_rep: float  # repetition, (-1, 0]
    r_tag: float  # tag, {-1, 0}
    r_prmu: float | None = None  # sigmoid of the reward model's logit, (0, 1); None when not scored
    total: float = math.nan
    mix: str = ""
    tag_error: str | None = None  # the first failed tag check, for logging

    def as_dict(self) -> dict:
        return asdict(self)


def composite_reward(parts: RewardParts, alpha: float = 0.8, beta: float = 0.8, gamma: float = 0.2) -> float:
    """Guided-RL reward R = alpha * (R_v + R_rep) * R_f + beta * R_tag + gamma * R_PRMU (alpha = beta = 0.8,
    gamma = 0.2 in the paper). With R_PRMU absent (`parts.r_prmu is None`) gamma must be 0 (the "w/o PRMU" row);
    a missing score is an error, never a silent 0. Range [-(alpha + beta), alpha + gamma] for non-negative weights.
    """
    terms = reward_terms(parts, "composite", alpha, beta, gamma)
    total = terms[TERMS["composite"][0]]
    for name in TERMS["composite"][1:]:  # left to right, as the formula reads (sum() rounds otherwise on 3.12+)
        total += terms[name]
    return total


def foundation_reward(parts: RewardParts) -> float:
    """Exploratory-RL reward R_foundation = (R_v + R_rep) * R_f (no tag, no PRMU term). Range (-1, 1].

    As the paper writes it, the format gate R_f multiplies R_rep too: a response cut at max_new_tokens (R_f = 0)
    loses its repetition penalty with everything else, so a repetition loop run to the length limit scores 0, above
    a finished wrong answer with any repeated 4-gram (R_rep < 0). In guided RL a loop cut inside the chain still
    costs beta * R_tag (the chain does not close); in exploratory RL nothing else prices it. Kept as written."""
    return (parts.r_v + parts.r_rep) * parts.r_f


MIXES = ("composite", "foundation")
TERMS = {"composite": ("foundation", "tag", "prmu"), "foundation": ("foundation",)}  # reward_terms' keys per mix


def reward_terms(parts: RewardParts, mix: str = "composite", alpha: float = 0.8, beta: float = 0.8,
                 gamma: float = 0.2) -> dict[str, float]:
    """The additive terms of the mixed reward, which sum to it: composite {"foundation": alpha * R_foundation,
    "tag": beta * R_tag, "prmu": gamma * R_PRMU}, with R_foundation = (R_v + R_rep) * R_f; foundation
    {"foundation": R_foundation}. The RL loop logs how closely the group advantages follow each term."""
    if mix not in MIXES:
        raise ValueError(f"reward_terms: unknown mix {mix!r}; expected one of {', '.join(MIXES)}")
    if mix == "foundation":
        return {"foundation": foundation_reward(parts)}
    if parts.r_prmu is None and gamma != 0:
        raise ValueError("composite reward: R_PRMU is missing but gamma != 0; pass PRMU scores or set gamma=0")
    return {"foundation": alpha * foundation_reward(parts), "tag": beta * parts.r_tag,
            "prmu": gamma * parts.r_prmu if parts.r_prmu is not None else 0.0}


def score_batch(tasks: Sequence[str], responses: Sequence[str], golds: Sequence[str],
                prmu: Sequence[float] | None = None, *, mix: str = "composite", alpha: float = 0.8,
                beta: float = 0.8, gamma: float = 0.2, rouge_variant: str = "rougeL", normalize_answers: bool = False,
                n: int = 4, delta: float = 1e-6, allowed: Iterable[str] = TAGS, min_tags: int = MIN_TAGS,
                finished: Sequence[bool] | None = None) -> list[RewardParts]:
    """Score a rollout batch: one RewardParts per response, every component filled and `total` mixed by `mix`.

    `tasks[i]`, `responses[i]` (the decoded completion), `golds[i]` describe response i; `prmu[i]` is its R_PRMU
    (already a sigmoid, from the reward model) or `prmu=None`. mix="composite" needs PRMU scores unless gamma=0;
    mix="foundation" ignores them (they are still recorded when given).
    `finished[i]` = False marks a response the length limit cut off before it ended its turn (the engine's finish
    reason "length"): its R_f is 0 whatever the text, since a cut answer is not the expected format even when
    the text so far parses as one (the decoded text does not show the missing end-of-turn token). None: all
    finished.
    """
    if mix not in MIXES:
        raise ValueError(f"score_batch: unknown mix {mix!r}; expected one of {', '.join(MIXES)}")
    if not len(tasks) == len(responses) == len(golds) or (prmu is not None and len(prmu) != len(responses)) or (
            finished is not None and len(finished) != len(responses)):
        raise ValueError(f"score_batch: lengths differ: {len(tasks)} tasks, {len(responses)} responses, "
                         f"{len(golds)} golds" + ("" if prmu is None else f", {len(prmu)} PRMU scores")
                         + ("" if finished is None else f", {len(finished)} finished flags"))
    if mix == "composite" and prmu is None and gamma != 0:
        raise ValueError("score_batch: mix='composite' with gamma != 0 needs PRMU scores (or set gamma=0)")
    allowed = frozenset(allowed)
    out = []
    for i, (task, response, gold) in enumerate(zip(tasks, responses, golds)):
        if not isinstance(response, str) or not isinstance(gold, str):  # not a crash inside the parser or ROUGE
            raise TypeError(f"score_batch: response {i} and its gold must be strings, got "
                            f"{type(response).__name__} and {type(gold).__name__}")
        r_prmu = None if prmu is None else float(prmu[i])
        if r_prmu is not None and not math.isfinite(r_prmu):
            raise ValueError(f"score_batch: PRMU score of response {i} is {r_prmu}")
        if r_prmu is not None and not 0.0 <= r_prmu <= 1.0:  # a raw logit f would push R past alpha + gamma
            raise ValueError(f"score_batch: PRMU score of response {i} is {r_prmu}; R_PRMU = sigmoid(f) lies in "
                             "[0, 1] (pass the reward model's sigmoid scores, not its logits)")
        chain, answer = split_response(response)
        tags = check_tags(chain, allowed, min_tags)
        parts = RewardParts(
            r_v=verifiable_reward(canonical_task(task), answer, gold, normalize_answers=normalize_answers,
                                  rouge_variant=rouge_variant),
            r_f=format_reward(response) if finished is None or finished[i] else 0.0,
            r_rep=repetition_reward(response, n, delta),
            r_tag=0.0 if tags.ok else -1.0,
            r_prmu=r_prmu,
            mix=mix,
            tag_error=tags.error,
        )
        parts.total = composite_reward(parts, alpha, beta, gamma) if mix == "composite" else foundation_reward(parts)
        out.append(parts)
    return out
