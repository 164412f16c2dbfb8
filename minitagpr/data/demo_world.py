"""The demo world: small seeded LaMP-schema data, its own BPE tokenizer and tagged SFT chains, with no LLM.

`build(out_dir, seed=0)` writes, in the exact LaMP download layout (../shared/docs/lamp-format.md), train and dev
questions + outputs for LaMP-1, 2, 3, 4, 5 and 7 (user split; test questions on request), a byte-level BPE
tokenizer trained on the world's training text, and `sft_chains.jsonl` (docs/interfaces.md SFT records). Everything is
small enough for the 2-core CPU demo: 34 users, profile texts of 4-18 words, prompts of a few hundred tokens.

One deliberate extension of the format: the demo's user-split records carry `"user_id"` (the doc allows it in the
time split only), since a demo user asks several questions and the PRMU user table needs to know who asked. Real
user-split LaMP has one user per question: there every question is its own user (`LampExample.user` falls back to
the question id), so the table learns no sharing across questions that the demo shows.

Planted per-user regularities (so that reading the profile matters):
- LaMP-1: every user has a home topic (a set of invented words); most of the user's paper titles use it. The
  question's title mixes one home word with one word of another topic, and the two references come one from each
  topic, so only the profile says which is related.
- LaMP-2: every user has a favourite tag and puts it on a movie with probability `TAG_HABIT`, whatever the plot;
  otherwise the tag follows the plot's cue words (`TAG_CUES`).
- LaMP-3: every user has a usual score m_u; a review's cue phrase says "better / as / worse than usual" (d = +1,
  0, -1) and the score is clip(m_u + d, 1, 5).
- LaMP-4 / 5 / 7: every user has a headline / title / tweet style (a template) and a signature word of their own.

A hidden per-user preference: every user likes either concise reasoning (3 tagged segments) or thorough reasoning
(6, or every segment the chain program offers when it has fewer): `DemoWorld.reasoning_styles`. It is drawn on
its own (a seeded shuffle that gives half of each split's users each style), so nothing in a profile shows it; the
answers do not depend on it. Only the PRMU's "style" preference pairs carry it, so only the user's row of the
PRMU user table can learn it (the case the paper's user embeddings are for: a preference the profile does not show).

Some queries recur across users with user-dependent gold answers (the same references judged by authors of
different topics, the same movie tagged by users with different favourites, ...): `DemoWorld.user_dependent_groups`
lists them (PRMU needs preference pairs whose winner depends on the user).

`margins(world)` scores a profile-aware heuristic (`aware_answer`) against the best profile-blind answer
(`blind_answers`, best one chosen per task with hindsight) under the official metrics; the CLI prints the table:

    python -m minitagpr.data.demo_world OUT_DIR [--seed 0] [--force]

`make_chain(task, example, profile_items, answer, rng)` writes a tagged reasoning chain that argues for `answer`
from the visible profile items and the query; the PRMU preference builder also calls it with non-gold answers.

Tokenizer choices: the five Qwen3 chat markers are added tokens flagged exactly as in Qwen3 (`<|...|>` special,
`<think>`/`</think>` added but not special), so `minitagpr.tokenizer.Tokenizer` and transformers treat them alike.
The nine reasoning-tag markers (`<analyze_input>`, `</analyze_input>`, ...) are added *non-special* tokens: each is
one id, so a tiny model emits a tag with one choice instead of spelling 4-6 sub-words and can learn the format in
the demo's minute of SFT, while decoding still yields the plain text that the tag reward parses (and
`skip_special_tokens=True` keeps them). No Unicode normaliser: every string round-trips byte for byte.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from datetime import date, timedelta
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from minitagpr.atomic import atomic_write_json, atomic_write_text
from minitagpr.data.lamp import (
    LAMP2_TAGS, TASKS, DataError, LampExample, canonical_task, load_outputs,
    load_questions, query_text, split_files, task_spec, write_outputs, write_questions,
)

TASK_NAMES = ("LaMP-1", "LaMP-2", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7")
REASONING_TAGS = (
    "analyze_input", "examine_examples", "identify_patterns", "evaluate_reference", "compare_entities",
    "synthesize_findings", "make_decision", "verify_conclusion", "formulate_conclusion",
)  # the nine tags of ../shared/docs/tagpr-method.md
CHAT_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # special=True, as in Qwen3
THINK_MARKERS = ("<think>", "</think>")                            # added, special=False, as in Qwen3
TAG_MARKERS = tuple(m for t in REASONING_TAGS for m in (f"<{t}>", f"</{t}>"))

# Bump when the generator's output changes, so that an existing world.json no longer matches and is rebuilt.
FORMAT_VERSION = 3  # 3: reasoning_styles (the questions, golds, tokenizer and SFT chains are those of version 2)
MANIFEST = "world.json"
SHARED = Path(os.environ.get("MINITAGPR_SHARED", Path(__file__).resolve().parents[3] / "shared"))
QWEN3_TOKENIZER_CONFIG = SHARED / "assets" / "qwen3-tokenizer" / "tokenizer_config.json"
# Qwen3's pre-tokenizer split (contractions, letter runs, single digits, punctuation runs, newlines, spaces).
QWEN3_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# ----------------------------------------------------------------------------------------------------------------
# Fixed English material (the invented words come from the seed, see `_Lexicon`)

# The hidden reasoning preference: style -> segments per chain (make_chain's `segments`), the two ends of the
# 3-6 that SFT chains draw; a program with fewer segments gives all it has (generation tasks over no profile: 5).
REASONING_STYLES = {"concise": 3, "thorough": 6}
TAG_HABIT = 0.75   # P(a LaMP-2 user puts their favourite tag on a movie regardless of its plot)
HOME_TOPIC = 0.85  # P(a LaMP-1 paper is on the author's home topic)

# Plot cue words per LaMP-2 tag (disjoint sets): a description carries two cues of its plot's tag.
TAG_CUES: dict[str, tuple[str, ...]] = {
    "sci-fi": ("starship", "android", "galaxy"), "based on a book": ("novel", "author", "chapters"),
    "comedy": ("hilarious", "prank", "goofy"), "action": ("explosion", "chase", "shootout"),
    "twist ending": ("shocking", "reveal", "secret"), "dystopia": ("regime", "ruins", "surveillance"),
    "dark comedy": ("morbid", "absurd", "funeral"), "classic": ("vintage", "timeless", "old-fashioned"),
    "psychology": ("mind", "obsession", "therapist"), "fantasy": ("dragon", "wizard", "enchanted"),
    "romance": ("love", "wedding", "sweetheart"), "thought-provoking": ("meaning", "ponder", "questions"),
    "social commentary": ("inequality", "society", "protest"), "violence": ("brutal", "bloody", "revenge"),
    "true story": ("real", "historical", "biography"),
}
assert tuple(TAG_CUES) == LAMP2_TAGS
_CUE_TO_TAG = {cue: tag for tag, cues in TAG_CUES.items() for cue in cues}

# LaMP-3 cue phrases by d (the review's score relative to the user's usual one).
SCORE_CUES: dict[int, tuple[str, ...]] = {
    1: ("better than I expected", "a pleasant surprise this time", "nicer than my usual picks"),
    0: ("about what I expected", "nothing unusual here", "pretty much my usual experience"),
    -1: ("worse than I hoped", "a letdown this time", "below my usual standard"),
}

PAPER_ADJ = ("Scalable", "Robust", "Adaptive", "Sparse", "Efficient", "Neural", "Probabilistic", "Fast",
             "Hierarchical", "Stable")
PAPER_NOUN = ("models", "methods", "estimation", "networks", "analysis", "learning", "inference", "systems")
ROLES = ("shy baker", "retired pilot", "young doctor", "stubborn farmer", "lonely clerk", "former soldier",
         "curious student", "bored detective")
PLOTS = ("searches for a lost sister", "opens a small shop", "fights to save the harbor", "returns home after years",
         "starts a strange friendship", "takes a job at the old mill")
PRODUCTS = ("kettle", "lamp", "backpack", "blender", "headset", "chair", "umbrella", "notebook")
ASPECTS = ("arrived on time", "feels solid in the hand", "has a loud fan", "came in a small box",
           "is easy to clean", "has a short cable")
NEWS_VERBS = ("expand", "replace", "close", "rebuild", "fund", "delay")
NEWS_WHEN = ("month", "spring", "year", "week")
PAPER_VERBS = ("models", "improves", "compresses", "aligns", "stabilizes")
TWEET_OPENERS = ("Just finished", "Finally started", "Currently enjoying", "Still thinking about")
TWEET_ACTS = ("a long walk around", "the new book about", "a quiet dinner in", "the concert at", "my first class on")
TWEET_WHEN = ("this morning", "tonight", "today", "all weekend")
INTERJECTIONS = ("wow", "ugh", "honestly", "lol", "yay", "omg", "sigh", "woohoo")

# User styles for the generation tasks; {sig} is the user's signature word.
HEADLINE_STYLES = (
    "{K1} to {verb} {k2}, {sig} reports", "{Sig} brief: {k1} will {verb} {k2}",
    "Why {place} wants to {verb} the {k2}, by {sig}", "{Sig} asks: can the {k1} {verb} {k2}?",
    "{place} votes to {verb} {k2} | {sig} desk", "Inside the plan to {verb} {k2} ({sig})",
)
TITLE_STYLES = (
    "{Sig}: {adj} {k1} {k2}", "On the {k1} of {k2} with {sig}", "Towards {adj} {k1} {k2}: the {sig} approach",
    "{K1} meets {k2}: {sig}", "Learning {k1} {k2} with {sig}", "{Sig}, a {adj} model of {k1} {k2}",
)
TWEET_STYLES = ("{interj} {tweet} #{sig}", "{tweet}... {interj}!! #{sig}", "#{sig} {tweet} ({interj})")
# How each user's voice re-says a tweet's opener (voice v uses variant v).
OPENER_VOICES = {"Just finished": ("wrapped up", "done with", "finally done with"),
                 "Finally started": ("kicked off", "jumped into", "got going on"),
                 "Currently enjoying": ("loving", "really into", "digging"),
                 "Still thinking about": ("cannot stop thinking about", "still hung up on", "obsessed with")}
assert tuple(OPENER_VOICES) == TWEET_OPENERS

# Every fixed English word above: what is *not* in here is a content word (invented topic words, names).
_TEMPLATE_TEXT = " ".join([
    *PAPER_ADJ, *PAPER_NOUN, *ROLES, *PLOTS, *PRODUCTS, *ASPECTS, *NEWS_VERBS, *NEWS_WHEN, *PAPER_VERBS,
    *TWEET_OPENERS, *(v for vs in OPENER_VOICES.values() for v in vs), *TWEET_ACTS, *TWEET_WHEN,
    *(c for cs in SCORE_CUES.values() for c in cs),
    *HEADLINE_STYLES, *TITLE_STYLES, "we study and propose a method for improving on benchmarks the said will next",
    "after weeks of debate about officials present approach to that reduces error benchmark tasks full in",
    "an who has written paper with title which reference is related just answer or without explanation",
])
STOPWORDS = frozenset(re.findall(r"[a-z]+", _TEMPLATE_TEXT.lower()))

# ----------------------------------------------------------------------------------------------------------------
# Invented words and users

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kl", "pl",
           "st", "tr", "sh")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "l", "r", "s", "m")


@dataclass
class _Lexicon:
    topics: list[list[str]]   # NUM_TOPICS topics x TOPIC_WORDS invented words
    names: list[str]          # capitalised character names
    places: list[str]         # capitalised place names
    brands: list[str]
    sigs: list[str]           # signature words, three per user (headline desk, system name, hashtag)


NUM_TOPICS, TOPIC_WORDS = 8, 6


def _make_lexicon(seed: int, num_users: int) -> _Lexicon:
    """Readable invented words (consonant-vowel syllables), all distinct, none an English template word."""
    rng = random.Random(f"{seed}|lexicon")
    taken: set[str] = set(STOPWORDS)

    def words(n: int) -> list[str]:
        out = []
        while len(out) < n:
            w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 2, 3))))
            w += rng.choice(_CODAS)
            if w not in taken:
                taken.add(w)
                out.append(w)
        return out

    topics = [words(TOPIC_WORDS) for _ in range(NUM_TOPICS)]
    return _Lexicon(topics, [w.capitalize() for w in words(24)], [w.capitalize() for w in words(16)],
                    [w.capitalize() for w in words(10)], words(3 * num_users))


@dataclass
class _User:
    id: str             # "u007"
    index: int          # global index (question ids use it)
    topic: int          # LaMP-1 home topic (also LaMP-5 abstracts' topic)
    fav_tag: str        # LaMP-2 favourite tag
    usual: int          # LaMP-3 usual score m_u
    headline_style: int
    title_style: int
    tweet_style: int
    voice: int          # LaMP-7 opener variant
    interj: str
    desk: str           # LaMP-4 signature
    system: str         # LaMP-5 signature
    hashtag: str        # LaMP-7 signature


# Per task: which user attribute two users sharing a query must differ in for the golds to differ.
_PREFERENCE_KEY = {"LaMP-1": "topic", "LaMP-2": "fav_tag", "LaMP-3": "usual", "LaMP-4": "desk",
                   "LaMP-5": "system", "LaMP-7": "hashtag"}


def _make_users(lex: _Lexicon, seed: int, split_sizes: Mapping[str, int]) -> dict[str, list[_User]]:
    """Users per split. Attribute values are dealt round-robin by the user's global index g, so every split is
    balanced and neighbours differ, and no held-out user repeats a training user's tastes as long as there are at
    most 120 users (the tuple of dealt tastes comes round again after lcm(8, 15, 5, ...) = 120). Dealt by the index
    within the split, dev user i had training user i's eight tastes: a twin, new only in its signature words."""
    rng = random.Random(f"{seed}|users")
    perm = lambda values: rng.sample(list(values), len(values))  # noqa: E731  (a seeded relabelling)
    topic_p, tag_p, usual_p = perm(range(NUM_TOPICS)), perm(LAMP2_TAGS), perm(range(1, 6))
    head_p, title_p, tweet_p = perm(range(len(HEADLINE_STYLES))), perm(range(len(TITLE_STYLES))), perm(range(3))
    voice_p, interj_p = perm(range(3)), perm(INTERJECTIONS)
    users: dict[str, list[_User]] = {}
    g = 0
    for split, n in split_sizes.items():
        users[split] = []
        for _ in range(n):
            users[split].append(_User(
                f"u{g:03d}", g, topic_p[g % NUM_TOPICS], tag_p[g % len(LAMP2_TAGS)], usual_p[g % 5],
                head_p[g % len(head_p)], title_p[g % len(title_p)], tweet_p[g % 3], voice_p[g % 3],
                interj_p[g % len(interj_p)],
                lex.sigs[3 * g].capitalize(), lex.sigs[3 * g + 1].capitalize(), lex.sigs[3 * g + 2]))
            g += 1
    return users


# ----------------------------------------------------------------------------------------------------------------
# Texts per task. Each `_content_*` draws the user-independent part of one item or question, each `_gold_*` is
# the answer one user gives to it, each `_input_*` the LaMP `input` of a question (lamp-format.md structure).

def _title_words(lex: _Lexicon, rng: random.Random, topic: int, n: int, avoid: Sequence[str] = ()) -> list[str]:
    return rng.sample([w for w in lex.topics[topic] if w not in avoid], n)


def _paper_title(rng: random.Random, words: Sequence[str]) -> str:
    if len(words) == 3:
        return f"{rng.choice(PAPER_ADJ)} {words[0]} {words[1]} for {words[2]} {rng.choice(PAPER_NOUN)}"
    return f"{rng.choice(PAPER_ADJ)} {' '.join(words)} {rng.choice(PAPER_NOUN)}"


def _lamp1_item(lex, rng, user: _User) -> dict:
    topic = user.topic if rng.random() < HOME_TOPIC else rng.choice([t for t in range(NUM_TOPICS) if t != user.topic])
    w = _title_words(lex, rng, topic, 4)
    adj = rng.choice(PAPER_ADJ).lower()
    article = "an" if adj[0] in "aeiou" else "a"
    abstract = (f"We study {w[0]} {w[1]} and propose {article} {adj} method for {w[2]}, "
                f"improving {w[3]} on {rng.randint(2, 6)} benchmarks.")
    return {"title": _paper_title(rng, w[:3]), "abstract": abstract}


def _lamp1_question(lex, rng, users: Sequence[_User]) -> tuple[str, list[str]]:
    # Topics in play: each user's home topic (shared query) or the user's plus a distractor (single user).
    topics = [u.topic for u in users]
    if len(topics) == 1:
        topics.append(rng.choice([t for t in range(NUM_TOPICS) if t != topics[0]]))
    a, b = topics
    wa, wb = rng.choice(lex.topics[a]), rng.choice(lex.topics[b])
    pair = [wa, wb] if rng.random() < 0.5 else [wb, wa]
    title = f"{rng.choice(PAPER_ADJ)} {pair[0]} and {pair[1]} {rng.choice(PAPER_NOUN)}"
    # Reference words avoid the title's own words, so the title alone favours neither reference.
    refs = {a: _paper_title(rng, _title_words(lex, rng, a, 2, [wa])),
            b: _paper_title(rng, _title_words(lex, rng, b, 2, [wb]))}
    order = [a, b] if rng.random() < 0.5 else [b, a]
    text = (f'For an author who has written the paper with the title "{title}", which reference is related? '
            f'Just answer with [1] or [2] without explanation. [1]: "{refs[order[0]]}" [2]: "{refs[order[1]]}"')
    return text, [f"[{order.index(u.topic) + 1}]" for u in users]


def _movie(lex, rng) -> tuple[str, str]:
    plot_tag = rng.choice(LAMP2_TAGS)
    c1, c2 = rng.sample(TAG_CUES[plot_tag], 2)
    desc = (f"{rng.choice(lex.names)}, a {rng.choice(ROLES)}, {rng.choice(PLOTS)} in {rng.choice(lex.places)}. "
            f"Full of {c1} and {c2}.")
    return desc, plot_tag


def _lamp2_tag(rng, user: _User, plot_tag: str, habit: bool | None = None) -> str:
    habit = rng.random() < TAG_HABIT if habit is None else habit
    return user.fav_tag if habit else plot_tag


def _lamp2_item(lex, rng, user: _User) -> dict:
    desc, plot_tag = _movie(lex, rng)
    return {"description": desc, "tag": _lamp2_tag(rng, user, plot_tag)}


def _lamp2_question(lex, rng, users: Sequence[_User]) -> tuple[str, list[str]]:
    desc, plot_tag = _movie(lex, rng)
    text = (f"Which tag does this movie relate to among the following tags? Just answer with the tag name "
            f"without further explanation. tags: [{', '.join(LAMP2_TAGS)}] description: {desc}")
    shared = len(users) > 1  # a shared movie gets each user's favourite: that is what makes the golds differ
    return text, [_lamp2_tag(rng, u, plot_tag, habit=True if shared else None) for u in users]


def _review(lex, rng, d: int) -> str:
    return (f"The {rng.choice(lex.brands)} {rng.choice(PRODUCTS)} {rng.choice(ASPECTS)}; "
            f"{rng.choice(SCORE_CUES[d])}.")


def _draw_d(rng) -> int:
    return rng.choice((-1, 0, 0, 1))  # P(d) = 1/4, 1/2, 1/4


def _score(user: _User, d: int) -> str:
    return str(min(5, max(1, user.usual + d)))


def _lamp3_item(lex, rng, user: _User) -> dict:
    d = _draw_d(rng)
    return {"text": _review(lex, rng, d), "score": _score(user, d)}


def _lamp3_question(lex, rng, users: Sequence[_User]) -> tuple[str, list[str]]:
    d = _draw_d(rng)
    if len(users) > 1:  # shared review: keep only the d's under which the users' scores still differ (d = 0 does)
        d = rng.choice([x for x in (-1, 0, 1) if len({_score(u, x) for u in users}) == len(users)])
    text = (f"What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
            f"without further explanation. review: {_review(lex, rng, d)}")
    return text, [_score(u, d) for u in users]


def _article(lex, rng) -> dict:
    k1, k2, k3 = rng.sample(lex.topics[rng.randrange(NUM_TOPICS)], 3)
    place, verb = rng.choice(lex.places), rng.choice(NEWS_VERBS)
    text = (f"{place} officials said the {k1} will {verb} the {k2} next {rng.choice(NEWS_WHEN)}, "
            f"after weeks of debate about {k3}.")
    return {"text": text, "k1": k1, "k2": k2, "verb": verb, "place": place}


def _headline(art: dict, user: _User) -> str:
    return HEADLINE_STYLES[user.headline_style].format(
        K1=art["k1"].capitalize(), k1=art["k1"], k2=art["k2"], verb=art["verb"], place=art["place"],
        sig=user.desk, Sig=user.desk)


def _lamp4_item(lex, rng, user: _User) -> dict:
    art = _article(lex, rng)
    return {"text": art["text"], "title": _headline(art, user)}


def _lamp4_question(lex, rng, users: Sequence[_User]) -> tuple[str, list[str]]:
    art = _article(lex, rng)
    return f"Generate a headline for the following article: {art['text']}", [_headline(art, u) for u in users]


def _abstract(lex, rng, topic: int) -> dict:
    k1, k2, k3 = rng.sample(lex.topics[topic], 3)
    adj = rng.choice(PAPER_ADJ).lower()
    article = "an" if adj[0] in "aeiou" else "a"
    text = (f"We present {article} {adj} approach to {k1} {k2} that {rng.choice(PAPER_VERBS)} {k3} and reduces "
            f"error on {rng.randint(2, 6)} benchmark tasks.")
    return {"text": text, "k1": k1, "k2": k2, "adj": adj}


def _paper_name(ab: dict, user: _User) -> str:
    return TITLE_STYLES[user.title_style].format(
        K1=ab["k1"].capitalize(), k1=ab["k1"], k2=ab["k2"], adj=ab["adj"], sig=user.system, Sig=user.system)


def _lamp5_item(lex, rng, user: _User) -> dict:
    ab = _abstract(lex, rng, user.topic if rng.random() < HOME_TOPIC else rng.randrange(NUM_TOPICS))
    return {"title": _paper_name(ab, user), "abstract": ab["text"]}


def _lamp5_question(lex, rng, users: Sequence[_User]) -> tuple[str, list[str]]:
    ab = _abstract(lex, rng, rng.choice(users).topic)
    return (f"Generate a title for the following abstract of a paper: {ab['text']}",
            [_paper_name(ab, u) for u in users])


def _plain_tweet(lex, rng) -> str:
    obj = rng.choice(lex.places + [w for t in lex.topics for w in t])
    return f"{rng.choice(TWEET_OPENERS)} {rng.choice(TWEET_ACTS)} {obj} {rng.choice(TWEET_WHEN)}"


def _styled_tweet(tweet: str, user: _User) -> str:
    for opener, voices in OPENER_VOICES.items():
        if tweet.startswith(opener):
            tweet = voices[user.voice] + tweet[len(opener):]
    return TWEET_STYLES[user.tweet_style].format(interj=user.interj, tweet=tweet.lower(), sig=user.hashtag)


def _lamp7_item(lex, rng, user: _User) -> dict:
    return {"text": _styled_tweet(_plain_tweet(lex, rng), user)}


def _lamp7_question(lex, rng, users: Sequence[_User]) -> tuple[str, list[str]]:
    tweet = _plain_tweet(lex, rng)
    # No colon before the tweet: LaMP-7's query is whatever follows the input's first colon.
    return (f"Paraphrase the following tweet without any explanation before or after it: {tweet}",
            [_styled_tweet(tweet, u) for u in users])


_GENERATORS = {
    "LaMP-1": (_lamp1_item, _lamp1_question), "LaMP-2": (_lamp2_item, _lamp2_question),
    "LaMP-3": (_lamp3_item, _lamp3_question), "LaMP-4": (_lamp4_item, _lamp4_question),
    "LaMP-5": (_lamp5_item, _lamp5_question), "LaMP-7": (_lamp7_item, _lamp7_question),
}


def _history(lex, rng, task: str, user: _User, size: int) -> list[dict]:
    """`size` dated items of one user, oldest first (dates: distinct days of 2015-2022)."""
    days = sorted(rng.sample(range(8 * 365), size))
    items = []
    for day in days:
        item = _GENERATORS[task][0](lex, rng, user)
        item["date"] = (date(2015, 1, 1) + timedelta(days=day)).isoformat()
        items.append(item)
    return items


def _profile(rng, history: list[dict], qid: str, size: int) -> list[dict]:
    """A question's profile: `size` of the user's history items, shuffled file order, ids extending `qid`."""
    chosen = rng.sample(history, min(size, len(history)))
    return [{"id": f"{qid}{j}", **item} for j, item in enumerate(chosen)]


# ----------------------------------------------------------------------------------------------------------------
# Heuristics: what a reader of the query alone, or of the query and the profile, would answer

def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _content_words(text: str) -> list[str]:
    return [w for w in _words(text) if w not in STOPWORDS and not w.isdigit()]


def _references(example: LampExample) -> tuple[str, str]:
    m = re.search(r'\[1\]:\s*"(.*)"\s*\[2\]:\s*"(.*)"', example.input, flags=re.DOTALL)
    if m is None:
        raise DataError(f"example {example.id!r} (LaMP-1): field 'input': no '[1]: \"...\" [2]: \"...\"' part")
    return m.group(1), m.group(2)


def _paper_title_of(example: LampExample) -> str:
    m = re.search(r'title "(.*?)"', example.input)
    return m.group(1) if m else ""


def _reference_overlaps(example: LampExample, items: Sequence[Mapping]) -> tuple[list[str], list[str]]:
    """The content words of reference [1] and of [2] that also occur in the given items' titles."""
    seen = {w for item in items for w in _content_words(str(item.get("title", "")))}
    r1, r2 = _references(example)
    return [w for w in _content_words(r1) if w in seen], [w for w in _content_words(r2) if w in seen]


def _plot_tag(description: str) -> str | None:
    """The tag whose cue words the description uses most (None without any cue)."""
    counts = Counter(_CUE_TO_TAG[w] for w in re.findall(r"[a-z][a-z-]*", description.lower()) if w in _CUE_TO_TAG)
    return max(counts, key=lambda t: (counts[t], -LAMP2_TAGS.index(t))) if counts else None


def _score_shift(review: str) -> int:
    """d of the review's cue phrase (+1 better than usual, 0 as usual, -1 worse); 0 without a cue."""
    low = review.lower()
    for d, cues in SCORE_CUES.items():
        if any(c.lower() in low for c in cues):
            return d
    return 0


def _majority(values: Sequence[str]) -> str | None:
    """The most frequent value; ties go to the one listed first (retrievers list the most relevant first)."""
    if not values:
        return None
    counts = Counter(values)
    return max(values, key=lambda v: (counts[v], -values.index(v)))


def _usual_score(items: Sequence[Mapping]) -> int | None:
    scores = [float(item["score"]) for item in items if "score" in item]
    return int(math.floor(sum(scores) / len(scores) + 0.5)) if scores else None  # round half up


def _output_field(task: str) -> str:
    return {"LaMP-4": "title", "LaMP-5": "title", "LaMP-7": "text"}[task]


def signature_words(task: str, example: LampExample, items: Sequence[Mapping]) -> list[str]:
    """Words in more than half of the items' outputs (headline / title / tweet) that the query does not contain:
    the user's template words and signature, in order of first appearance."""
    outs = [_words(str(item[_output_field(task)])) for item in items]
    if not outs:
        return []
    query = set(_words(query_text(example)))
    counts = Counter(w for out in outs for w in set(out))
    order = list(dict.fromkeys(w for out in outs for w in out))
    return [w for w in order if counts[w] * 2 > len(outs) and w not in query]


def blind_answers(example: LampExample) -> dict[str, str]:
    """Profile-blind answers from the query alone (constant labels are added by `margins`):
    LaMP-1 the reference sharing more words with the author's title, LaMP-2 the plot's cue tag, LaMP-3 3 + d,
    LaMP-4/5 the query's first content words, LaMP-7 the tweet itself."""
    task = canonical_task(example.task)
    query = query_text(example)
    if task == "LaMP-1":
        title = set(_content_words(_paper_title_of(example)))
        r1, r2 = (len(title & set(_content_words(r))) for r in _references(example))
        return {"title overlap": "[2]" if r2 > r1 else "[1]"}
    if task == "LaMP-2":
        return {"plot cue tag": _plot_tag(query) or LAMP2_TAGS[0]}
    if task == "LaMP-3":
        return {"3 + cue shift": str(3 + _score_shift(query))}
    if task == "LaMP-7":
        return {"copy the tweet": query}
    return {"query keywords": " ".join(_content_words(query)[:6])}


def aware_answer(example: LampExample, items: Sequence[Mapping]) -> str:
    """A profile-aware heuristic over the shown items: LaMP-1 the reference sharing more words with the user's
    titles; LaMP-2 the user's majority tag; LaMP-3 the user's usual (mean) score + the cue shift d; LaMP-4/5/7 the
    blind answer followed by the user's signature words. Without items it is the blind answer."""
    task = canonical_task(example.task)
    blind = next(iter(blind_answers(example).values()))
    if not items:
        return blind
    if task == "LaMP-1":
        o1, o2 = _reference_overlaps(example, items)
        return blind if len(o1) == len(o2) else ("[1]" if len(o1) > len(o2) else "[2]")
    if task == "LaMP-2":
        return _majority([str(item["tag"]) for item in items])
    if task == "LaMP-3":
        return str(min(5, max(1, _usual_score(items) + _score_shift(query_text(example)))))
    return " ".join([blind] + signature_words(task, example, items))


# ----------------------------------------------------------------------------------------------------------------
# Tagged reasoning chains

def _q(text: str, max_words: int = 8) -> str:
    """A short quote of `text` (first words)."""
    words = text.split()
    return '"' + " ".join(words[:max_words]) + (' ..."' if len(words) > max_words else '"')


def _and(values: Sequence[str]) -> str:
    values = list(values)
    if not values:
        return "nothing"
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def _lamp1_segments(example, items, answer) -> dict[str, list[str]]:
    r1, r2 = _references(example)
    o1, o2 = _reference_overlaps(example, items)
    titles = [str(i.get("title", "")) for i in items]
    top = [w for w, _ in Counter(w for t in titles for w in _content_words(t)).most_common(3)]
    seg = {
        "analyze_input": [f"The author wrote {_q(_paper_title_of(example))}; I must say which reference relates.",
                          "Two candidate references, and I have to pick the one this author would cite.",
                          f"Choose between [1] {_q(r1, 5)} and [2] {_q(r2, 5)}."],
        "evaluate_reference": [f"Reference [1] shares {len(o1)} topic words with the history ({_and(o1)}).",
                               f"Reference [2] shares {len(o2)} topic words with the history ({_and(o2)})."],
        "compare_entities": [f"Overlap with past titles: [1] has {len(o1)}, [2] has {len(o2)}.",
                             f"[1] matches {_and(o1)}; [2] matches {_and(o2)}."],
    }
    if items:
        seg["examine_examples"] = [f"Past titles include {'; '.join(_q(t, 6) for t in titles[:2])}.",
                                   f"The history holds {len(items)} papers, the latest {_q(titles[0], 6)}."]
        seg["identify_patterns"] = [f"This author keeps writing about {_and(top)}.",
                                    f"Recurring topic words: {_and(top)}."]
    else:
        seg["identify_patterns"] = ["No past papers are given, so the topic cannot be matched."]
    return seg


def _lamp2_segments(example, items, answer) -> dict[str, list[str]]:
    desc = query_text(example)
    cues = [w for w in re.findall(r"[a-z][a-z-]*", desc.lower()) if w in _CUE_TO_TAG]
    plot = _plot_tag(desc) or "no tag in particular"
    tags = [str(i["tag"]) for i in items]
    fav = _majority(tags)
    seg = {
        "analyze_input": [f"I need one of the fifteen tags for a movie that mentions {_and(cues)}.",
                          f"Which tag fits? The description talks about {_and(cues)}.",
                          "The task is to tag this movie the way this user would."],
        "evaluate_reference": [f"The plot words {_and(cues)} point to {plot}."],
        "compare_entities": [f"The plot suggests {plot}, the history suggests {fav or 'nothing'}.",
                             f"{plot} fits the story; {fav or 'no habit'} fits the user."],
    }
    if items:
        n_fav = tags.count(fav)
        seg["examine_examples"] = [f"Recent movies were tagged {_and(tags)}.",
                                   f"The history shows the tags {_and(tags)}."]
        seg["identify_patterns"] = [f"This user picks {fav} most often ({n_fav} of {len(tags)}).",
                                    f"The habit is clear: {fav} dominates ({n_fav} of {len(tags)})."]
    else:
        seg["identify_patterns"] = ["There is no history, so only the plot can guide the tag."]
    return seg


def _lamp3_segments(example, items, answer) -> dict[str, list[str]]:
    review = query_text(example)
    d = _score_shift(review)
    cue = next((c for c in SCORE_CUES[d] if c.lower() in review.lower()), "no clear cue")
    scores = [str(i["score"]) for i in items]
    usual = _usual_score(items)
    shift = {1: "one point above", 0: "the same as", -1: "one point below"}[d]
    seg = {
        "analyze_input": [f"I must give this review a 1 to 5 score; it says {_q(cue, 6)}.",
                          "The task is to predict the user's score for this review.",
                          f"A score from 1 to 5 is needed; the key phrase is {_q(cue, 6)}."],
        "evaluate_reference": [f"The phrase {_q(cue, 6)} means {shift} the usual score."],
    }
    if items:
        seg["examine_examples"] = [f"Past scores were {_and(scores)}.", f"The user gave {_and(scores)} before."]
        seg["identify_patterns"] = [f"This user usually gives about {usual}.", f"The typical score here is {usual}."]
        seg["synthesize_findings"] = [f"Usual score {usual}, and this review reads {shift} usual."]
    else:
        seg["identify_patterns"] = ["No past scores are given, so the middle of the scale is the anchor."]
    return seg


def _generation_segments(task, example, items, answer) -> dict[str, list[str]]:
    thing = {"LaMP-4": "headline", "LaMP-5": "paper title", "LaMP-7": "tweet"}[task]
    keys = list(dict.fromkeys(_content_words(query_text(example))))[:4]
    outs = [str(i[_output_field(task)]) for i in items]
    sig = signature_words(task, example, items)
    seg = {
        "analyze_input": [f"I need a {thing} about {_and(keys)}.",
                          f"The input is about {_and(keys)}; write the {thing}.",
                          f"The task is a {thing} in this user's own style."],
        "make_decision": [f"The {thing} opens with {_q(answer, 4)}.", f"I will start with {_q(answer, 4)}."],
    }
    if items:
        seg["examine_examples"] = [f"Earlier: {'; '.join(_q(o, 7) for o in outs[:2])}.",
                                   f"One past {thing} reads {_q(outs[0], 8)}."]
        seg["identify_patterns"] = [f"They keep using the words {_and(sig)}.",
                                    f"Signature words of this user: {_and(sig)}."]
        seg["evaluate_reference"] = [f"The latest {thing}, {_q(outs[0], 6)}, shows the pattern to copy."]
        seg["synthesize_findings"] = [f"Content: {_and(keys[:3])}; style words: {_and(sig)}."]
    else:
        seg["identify_patterns"] = [f"No past {thing}s are given, so a plain wording will do."]
    used = [k for k in keys if k in _words(answer)]
    seg["verify_conclusion"] = [f"It keeps {_and(used)} from the input." if used else "It stays close to the input."]
    return seg


def _decision_segments(task: str, answer: str) -> dict[str, list[str]]:
    if task in ("LaMP-4", "LaMP-5", "LaMP-7"):
        return {"formulate_conclusion": ["Now I write it out in full.", "The final text follows."]}
    return {"make_decision": [f"I choose {answer}.", f"The answer is {answer}.", f"Going with {answer}."],
            "verify_conclusion": [f"{answer} is an allowed answer and fits the evidence.",
                                  f"{answer} has the required form."],
            "formulate_conclusion": [f"Final answer: {answer}."]}


# The segment that carries each task's deciding evidence (what the planted regularity is read from).
KEY_SEGMENT = {"LaMP-1": "compare_entities", "LaMP-2": "identify_patterns", "LaMP-3": "synthesize_findings",
               "LaMP-4": "identify_patterns", "LaMP-5": "identify_patterns", "LaMP-7": "identify_patterns"}


def make_chain(task: str, example: LampExample, profile_items: Sequence[Mapping], answer: str,
               rng: random.Random, segments: int | None = None) -> str:
    """A tagged reasoning chain (3-6 `<tag>...</tag>` segments, one per line) arguing for `answer` from the query
    and the shown `profile_items` (may be empty). Deterministic given `rng`'s state; wording varies with it.
    `segments` fixes the number of segments (at least the 3 required ones, at most what the task's program
    offers for these items: 5-8); None draws 3-6. Chains of two lengths drawn from equal `rng` states word the
    segments they share independently, as any two chains (the draws that pick the segments differ).

    The facts it states (tags and scores seen, topic overlaps, signature words) are read off the items, so a chain
    for a wrong `answer` states true evidence and then a decision that does not follow from it."""
    task = canonical_task(task)
    if task == "LaMP-1":
        seg = _lamp1_segments(example, profile_items, answer)
    elif task == "LaMP-2":
        seg = _lamp2_segments(example, profile_items, answer)
    elif task == "LaMP-3":
        seg = _lamp3_segments(example, profile_items, answer)
    elif task in ("LaMP-4", "LaMP-5", "LaMP-7"):
        seg = _generation_segments(task, example, profile_items, answer)
    else:
        raise ValueError(f"make_chain: no chain program for task {task!r} (demo tasks: {', '.join(TASK_NAMES)})")
    seg = {**seg, **_decision_segments(task, answer)}
    # Always: read the input, state the evidence that decides this task, commit; then up to three optional
    # segments (3-6 in all), kept in the canonical order below.
    key = KEY_SEGMENT[task] if profile_items else "identify_patterns"
    required = {"analyze_input", key, "make_decision"}
    optional = [t for t in REASONING_TAGS if t in seg and t not in required]
    n_total = rng.randint(3, 6)
    if segments is not None:
        if segments < len(required):
            raise ValueError(f"make_chain: segments={segments}, but every chain has the {len(required)} required ones")
        n_total = segments
    chosen = required | set(rng.sample(optional, min(len(optional), n_total - len(required))))
    # canonical order: input, evidence, comparison, decision, checks
    return "\n".join(f"<{tag}>{rng.choice(seg[tag])}</{tag}>" for tag in REASONING_TAGS if tag in chosen)


# ----------------------------------------------------------------------------------------------------------------
# The world on disk

@dataclass
class DemoWorld:
    """Paths of a built world. questions/outputs: task -> split -> path (test splits have no outputs)."""
    root: Path
    params: dict
    questions: dict[str, dict[str, Path]]
    outputs: dict[str, dict[str, Path]]
    tokenizer_dir: Path
    sft_chains: Path
    user_dependent_groups: list[list[str]]   # question ids sharing one input, with different golds per user
    reasoning_styles: dict[str, str]         # user id -> "concise" | "thorough" (REASONING_STYLES), every split
    stats: dict = field(default_factory=dict)
    reused: bool = field(default=False, compare=False)  # set by `build`: an up-to-date world it did not rewrite

    @property
    def user_dependent_ids(self) -> list[str]:
        return [i for group in self.user_dependent_groups for i in group]

    @property
    def fingerprint(self) -> str:
        """A short hash of the build parameters: later stages can store it to notice a rebuilt world."""
        return hashlib.sha256(json.dumps(self.params, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.questions)

    def task_files(self, task: str, split: str) -> tuple[Path, Path]:
        """(questions, outputs) paths of one task and split ('train' or 'dev'; 'test' has no outputs)."""
        task = canonical_task(task)
        if task not in self.outputs or split not in self.outputs[task]:
            have = sorted(self.outputs.get(task, {}))
            raise DataError(f"{self.root / MANIFEST}: no {task} {split!r} split with golds (have: {', '.join(have)})")
        return self.questions[task][split], self.outputs[task][split]

    def examples(self, task: str, split: str) -> list[LampExample]:
        return load_questions(self.questions[canonical_task(task)][split], task)

    def golds(self, task: str, split: str) -> dict[str, str]:
        return load_outputs(self.outputs[canonical_task(task)][split])[1]

    @classmethod
    def load(cls, root: str | os.PathLike) -> "DemoWorld":
        """Open a world that `build` wrote (reads its world.json)."""
        root = Path(root)
        path = root / MANIFEST
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{path}: no demo world here (run `python -m minitagpr.data.demo_world {root}`)") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON: {e.msg} (line {e.lineno})") from None
        if not isinstance(m, dict):
            raise DataError(f"{path}: want a JSON object (the world's manifest), got {type(m).__name__}; delete the "
                            "folder to rebuild")
        try:
            rel = lambda p: root / p  # noqa: E731
            styles = m["reasoning_styles"]
            if not isinstance(styles, dict) or not all(v in REASONING_STYLES for v in styles.values()):
                raise DataError(f"{path}: field 'reasoning_styles': want {{user id: one of "
                                f"{', '.join(REASONING_STYLES)}}}, got {str(styles)[:80]}; delete the folder to rebuild")
            return cls(root, m["params"],
                       {t: {s: rel(p) for s, p in sp.items()} for t, sp in m["questions"].items()},
                       {t: {s: rel(p) for s, p in sp.items()} for t, sp in m["outputs"].items()},
                       rel(m["tokenizer_dir"]), rel(m["sft_chains"]), m["user_dependent_groups"],
                       dict(styles), m.get("stats", {}))
        except (KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{path}: field {e}: missing or malformed; delete the folder to rebuild") from None

    def paths(self) -> list[Path]:
        files = [p for sp in self.questions.values() for p in sp.values()]
        files += [p for sp in self.outputs.values() for p in sp.values()]
        return files + [self.tokenizer_dir / "tokenizer.json", self.tokenizer_dir / "tokenizer_config.json",
                        self.sft_chains]


def _prompt_fingerprint(style: str) -> str:
    """A hash of the prompt text the SFT records embed: a changed prompt module means a stale world. Every task's
    prompt is rendered, with no items and with two whose every shown field is longer than the word cut (the
    instruction, the history heading, each item's layout, numbering and cut all enter the hash)."""
    from minitagpr.data import prompts
    long = " ".join(["w"] * (prompts.DEFAULT_MAX_ITEM_WORDS + 1))
    text = ""
    for task in TASK_NAMES:
        items = [{"id": f"0{i}", **{f: long for _, f, _ in task_spec(task).item_layout}} for i in range(2)]
        probe = LampExample("0", task, "x", items)
        text += json.dumps([prompts.build_messages(probe, shown, style=style) for shown in ([], items)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]



def _reasoning_styles(users: Mapping[str, Sequence[_User]], seed: int) -> dict[str, str]:
    """user id -> reasoning style: per split, a seeded shuffle of the users, the first half "concise" (one more
    "thorough" when odd). Its own random stream, independent of every dealt taste and of the questions."""
    rng = random.Random(f"{seed}|reasoning-style")
    styles: dict[str, str] = {}
    for split_users in users.values():
        order = rng.sample(list(split_users), len(split_users))
        for i, u in enumerate(order):
            styles[u.id] = "concise" if i < len(order) // 2 else "thorough"
    return styles


def _lexicon_and_users(params: dict) -> tuple[_Lexicon, dict[str, list[_User]]]:
    n_dev, n_test = params["dev_users"], params["test_users"]
    sizes = {"train": params["num_users"] - n_dev - n_test, "dev": n_dev}
    if n_test:
        sizes["test"] = n_test
    if sizes["train"] < 2 or n_dev < 2 or n_test < 0 or params["num_users"] > 999:  # ids hold 3 user digits
        raise DataError(f"demo world: need at least 2 train and 2 dev users, test_users >= 0 and at most 999 users "
                        f"in all, got {sizes} (test_users={n_test})")
    lex = _make_lexicon(params["seed"], params["num_users"])
    return lex, _make_users(lex, params["seed"], sizes)


def _generate(params: dict) -> tuple[dict, dict, list[list[str]]]:
    """All questions and golds: {task: {split: [LampExample]}}, {task: {split: {id: gold}}}, and the
    user-dependent groups (ids of questions sharing one input whose golds all differ)."""
    seed = params["seed"]
    lex, users = _lexicon_and_users(params)
    per_user, n_shared = params["per_user"], min(params["shared_per_user"], params["per_user"])
    lo, hi = params["profile_size"]
    questions: dict = {}
    golds: dict = {}
    groups: list[list[str]] = []
    for task in TASK_NAMES:
        questions[task], golds[task] = {}, {}
        make_question = _GENERATORS[task][1]
        key = _PREFERENCE_KEY[task]
        tnum = task.split("-")[1]
        for split, us in users.items():
            rng = random.Random(f"{seed}|{task}|{split}")
            history = {u.id: _history(lex, rng, task, u, params["history"]) for u in us}
            # Question slots per user: n_shared shared with a neighbour (round r pairs i with i+1 from offset r % 2,
            # wrapping around), the rest the user's own. A pair whose users agree on the task's preference is not
            # shared (both then get their own question).
            plan: dict[str, list[list[_User]]] = {u.id: [] for u in us}
            for r in range(n_shared):
                paired = set()
                for i in range(r % 2, len(us), 2):
                    a, b = us[i], us[(i + 1) % len(us)]
                    if a is b or a.id in paired or b.id in paired or getattr(a, key) == getattr(b, key):
                        continue
                    paired |= {a.id, b.id}
                    pair = [a, b]  # one object in both plans: the question is drawn once per pair
                    plan[a.id].append(pair)
                    plan[b.id].append(pair)
            # What each user already wrote (generation tasks): a question whose gold is one of its user's own past
            # outputs is drawn again -- the answer would sit in the profile, and a prompt's items could show it
            # (the generator repeats a title now and then: 8 of the 60 LaMP-5 dev golds were in their profiles).
            written = {u.id: {v for item in history[u.id] for v in item.values() if isinstance(v, str)}
                       if TASKS[task].kind == "generation" else set() for u in us}

            def draw(group: list[_User]) -> tuple[str, list[str]]:
                for _ in range(100):
                    text, gs = make_question(lex, rng, group)
                    if not any(g in written[m.id] for g, m in zip(gs, group)):
                        return text, gs
                raise ValueError(f"demo world: {task}: 100 draws of a question for {[m.id for m in group]} all "
                                 f"had a gold in that user's history")

            records, outs = [], {}
            made: dict[int, tuple[str, list[str]]] = {}  # id(group) -> the shared question, drawn once
            for u in us:
                slots = plan[u.id] + [[u]] * (per_user - len(plan[u.id]))
                for q, group in enumerate(slots):
                    if len(group) == 1:
                        text, (gold,) = draw(group)
                    else:
                        if id(group) not in made:
                            made[id(group)] = draw(group)
                        text, gs = made[id(group)]
                        gold = gs[group.index(u)]
                    qid = f"{tnum}{u.index:03d}{q:02d}"
                    profile = _profile(rng, history[u.id], qid, rng.randint(lo, hi))
                    records.append(LampExample(qid, task, text, profile, u.id))
                    outs[qid] = gold
            by_text: dict[str, list[str]] = {}
            for ex in records:
                by_text.setdefault(ex.input, []).append(ex.id)
            owner = {ex.id: ex.user_id for ex in records}
            if split != "test":  # a group: >= 2 different users, every one with a different gold
                groups += [ids for ids in by_text.values()
                           if len(ids) > 1 and len({outs[i] for i in ids}) == len({owner[i] for i in ids}) == len(ids)]
            questions[task][split], golds[task][split] = records, outs
    return questions, golds, groups


def _draft_records(questions: dict, golds: dict, params: dict) -> tuple[list[dict], list[str]]:
    """SFT records of every training question with untrimmed prompts (the k most recent items), and the
    tokenizer's training text: every training prompt as the model sees it, the chains and the answers."""
    from minitagpr.data.prompts import build_messages
    from minitagpr.data.retrieval import get_retriever
    retriever = get_retriever("recency")
    records, texts = [], []
    for task in TASK_NAMES:
        # training questions only: like a real tokenizer, this one has not seen the held-out users' texts (their
        # signature words are byte pieces to it), and only training questions become SFT records
        for ex in questions[task]["train"]:
            items = retriever.select(ex, params["k"])
            messages = build_messages(ex, items, style=params["prompt_style"])
            gold = golds[task]["train"][ex.id]
            chain = make_chain(task, ex, items, gold, _chain_rng(params, ex))
            records.append({"id": ex.id, "user": ex.user_id, "task": task, "messages": messages,
                            "chain": chain, "answer": gold, "_example": ex, "_items": items})
            texts += [m["content"] for m in messages] + [chain, gold]  # repeats kept: BPE learns the instruction
    return records, texts


def _chain_rng(params: dict, ex: LampExample) -> random.Random:
    return random.Random(f"{params['seed']}|chain|{ex.id}")  # string seeds hash the same in every process


def _fit_records(records: list[dict], tokenizer, params: dict) -> list[int]:
    """Trim prompts over `max_prompt_tokens` (re-writing their chains over the kept items only), in place;
    returns every prompt's token count. Counts are batched: one tokenizer pass over all prompts."""
    from minitagpr.data.prompts import fit_messages
    budget = params["max_prompt_tokens"]
    rendered = [tokenizer.render_chat(r["messages"], add_generation_prompt=True) for r in records]
    lengths = [len(ids) for ids in tokenizer.encode_batch(rendered)]
    for i, r in enumerate(records):
        ex, items = r.pop("_example"), r.pop("_items")
        if lengths[i] > budget:
            r["messages"], kept = fit_messages(ex, items, tokenizer, budget, style=params["prompt_style"])
            r["chain"] = make_chain(r["task"], ex, items[:kept], r["answer"], _chain_rng(params, ex))
            lengths[i] = len(tokenizer.apply_chat(r["messages"], add_generation_prompt=True))
    return lengths


def train_tokenizer(texts: Sequence[str], out_dir: str | os.PathLike, vocab_size: int = 2048) -> Path:
    """A byte-level BPE over `texts` with the Qwen3 chat markers and the nine tag markers as added tokens
    (see the module docstring), saved as tokenizer.json + tokenizer_config.json in `out_dir`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    added = len(CHAT_SPECIAL) + len(THINK_MARKERS) + len(TAG_MARKERS)
    tok = Tokenizer(models.BPE())  # byte-level: every byte has a token, so no unk is needed
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN3_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - added, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_MARKERS + TAG_MARKERS])

    decoder = {}
    for t in CHAT_SPECIAL + THINK_MARKERS + TAG_MARKERS:
        decoder[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                            "single_word": False, "special": t in CHAT_SPECIAL}
    config: dict[str, Any] = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 4096, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    try:  # the official template, for transformers users (minitagpr renders chats with its own code)
        config["chat_template"] = json.loads(QWEN3_TOKENIZER_CONFIG.read_text(encoding="utf-8"))["chat_template"]
    except (OSError, ValueError, KeyError):
        config["chat_template_note"] = (f"no chat_template: {QWEN3_TOKENIZER_CONFIG} was not readable when this "
                                        f"tokenizer was built; minitagpr.tokenizer renders the Qwen3 template itself")
    out = Path(out_dir)
    atomic_write_text(out / "tokenizer.json", tok.to_str())
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
    return out


DEFAULTS = dict(num_users=34, dev_users=10, test_users=0, per_user=6, shared_per_user=2, history=14,
                profile_size=(6, 12), k=4, vocab_size=2048, max_prompt_tokens=768, prompt_style="brief")
# prompt_style "brief": the instruction names the nine tags without their meanings (minitagpr.data.prompts), which
# cuts the demo's prompts roughly in half -- and with them SFT, RL and evaluation time on 2 CPU cores.


def build(out_dir: str | os.PathLike, seed: int = 0, *, num_users: int = DEFAULTS["num_users"],
          dev_users: int = DEFAULTS["dev_users"], test_users: int = DEFAULTS["test_users"],
          per_user: int = DEFAULTS["per_user"], shared_per_user: int = DEFAULTS["shared_per_user"],
          history: int = DEFAULTS["history"], profile_size: tuple[int, int] = DEFAULTS["profile_size"],
          k: int = DEFAULTS["k"], vocab_size: int = DEFAULTS["vocab_size"],
          max_prompt_tokens: int = DEFAULTS["max_prompt_tokens"], prompt_style: str = DEFAULTS["prompt_style"],
          force: bool = False) -> DemoWorld:
    """Build the demo world in `out_dir`, or reuse it when its world.json has the same parameters.

    Users: `num_users` in all, the last `dev_users` (then `test_users`) held out (user split). Every user answers
    `per_user` questions per task, `shared_per_user` of them shared with a neighbouring user of different taste.
    A question's profile is 6-12 (`profile_size`) of the user's `history` dated items; prompts show the `k` most
    recent within `max_prompt_tokens`. Files are written atomically and world.json last (a rebuild deletes the old one
    first), so an interrupted build is simply redone. One process builds at a time: the recipes build on rank 0 and
    the other ranks then reuse (a second builder could delete the manifest the first one just wrote).
    """
    from minitagpr.tokenizer import Tokenizer
    if not 1 <= per_user <= 99 or not 0 <= shared_per_user <= per_user:
        raise DataError(f"demo world: need 1 <= per_user <= 99 and 0 <= shared_per_user <= per_user, "
                         f"got per_user={per_user}, shared_per_user={shared_per_user}")
    if not 1 <= profile_size[0] <= profile_size[1] or history < 1 or k < 0:
        raise DataError(f"demo world: need 1 <= profile_size[0] <= profile_size[1], history >= 1 and k >= 0, "
                         f"got profile_size={profile_size}, history={history}, k={k}")
    root = Path(out_dir)
    params = dict(format=FORMAT_VERSION, seed=seed, num_users=num_users, dev_users=dev_users, test_users=test_users,
                  per_user=per_user, shared_per_user=shared_per_user, history=history,
                  profile_size=list(profile_size), k=k, vocab_size=vocab_size, max_prompt_tokens=max_prompt_tokens,
                  prompt_style=prompt_style, prompts=_prompt_fingerprint(prompt_style))
    if not force and (root / MANIFEST).exists():
        try:
            world = DemoWorld.load(root)
            if world.params == params and all(p.exists() for p in world.paths()):
                world.reused = True
                return world
        except DataError:
            pass  # unreadable manifest: rebuild below
    t0 = time.perf_counter()
    questions, golds, groups = _generate(params)
    styles = _reasoning_styles(_lexicon_and_users(params)[1], seed)
    tok_dir = root / "tokenizer"
    records, texts = _draft_records(questions, golds, params)
    # the old manifest goes before the first file is rewritten: a rebuild killed halfway must not leave a world.json
    # that a later build with the old parameters takes for the (now half overwritten) world it describes
    (root / MANIFEST).unlink(missing_ok=True)
    train_tokenizer(texts, tok_dir, vocab_size)
    tokenizer = Tokenizer.from_dir(tok_dir)
    lengths = _fit_records(records, tokenizer, params)

    q_paths: dict[str, dict[str, str]] = {}
    o_paths: dict[str, dict[str, str]] = {}
    for task in TASK_NAMES:
        q_paths[task], o_paths[task] = {}, {}
        for split, examples in questions[task].items():
            qp, op = split_files(root, task, "user", split)
            write_questions(qp, examples)
            q_paths[task][split] = str(qp.relative_to(root))
            if split != "test":
                write_outputs(op, task, golds[task][split])
                o_paths[task][split] = str(op.relative_to(root))
    sft = root / "sft_chains.jsonl"
    atomic_write_text(sft, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    stats = {
        "questions": {t: {s: len(e) for s, e in sp.items()} for t, sp in questions.items()},
        "sft_records": len(records), "user_dependent_groups": len(groups), "vocab_size": tokenizer.vocab_size,
        "prompt_tokens_mean": round(sum(lengths) / len(lengths), 1), "prompt_tokens_max": max(lengths),
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    manifest = {"params": params, "questions": q_paths, "outputs": o_paths, "tokenizer_dir": "tokenizer",
                "sft_chains": sft.name, "user_dependent_groups": groups, "reasoning_styles": styles, "stats": stats}
    atomic_write_json(root / MANIFEST, manifest)
    return DemoWorld.load(root)


# ----------------------------------------------------------------------------------------------------------------
# Margins: profile-aware heuristic vs the best profile-blind answer

REQUIRED_MARGIN = {"LaMP-1": 0.15, "LaMP-2": 0.15, "LaMP-3": 0.3}  # accuracy gain / MAE drop (issue 4)


@dataclass
class MarginRow:
    task: str
    split: str
    metric: str
    aware: float
    blind: float
    blind_name: str         # which profile-blind answer was best
    margin: float           # improvement of aware over blind (MAE: blind - aware)
    required: float | None  # the margin the issue demands (None: reported only)

    @property
    def ok(self) -> bool:
        return self.margin > 0 and (self.required is None or self.margin >= self.required)


def rule_predictions(world: DemoWorld, task: str, split: str = "dev", k: int | None = None, *,
                     retriever: str = "recency", seed: int = 0, ids: Sequence[str] | None = None
                     ) -> tuple[dict[str, str], str, dict[str, str]]:
    """The world's own rules as predictions, no model: (`aware_answer` over the k items `retriever` picks -- what
    the prompts show --, the name of the best profile-blind answer, its predictions), for the questions `ids`
    (default: all of `split`). The best profile-blind answer is the best of `blind_answers` and every constant
    label on those questions' main metric: picked on the questions it scores, so an optimistic reference."""
    from minitagpr.data.retrieval import get_retriever
    from minitagpr.metrics import evaluate, main_metric
    k = world.params["k"] if k is None else k
    pick = get_retriever(retriever, seed=seed)
    golds = world.golds(task, split)
    examples = world.examples(task, split)
    if ids is not None:
        wanted = set(ids)
        examples, golds = [e for e in examples if e.id in wanted], {i: golds[i] for i in ids}
    metric, higher = main_metric(task)
    better = (lambda a, b: a > b) if higher else (lambda a, b: a < b)  # noqa: E731
    aware = {e.id: aware_answer(e, pick.select(e, k)) for e in examples}
    candidates: dict[str, dict[str, str]] = {}
    for e in examples:
        for name, answer in blind_answers(e).items():
            candidates.setdefault(name, {})[e.id] = answer
    for label in TASKS[task].labels:
        candidates[f"always {label}"] = {e.id: label for e in examples}
    best_name, best = None, None
    for name, preds in candidates.items():
        value = evaluate(task, preds, golds)[metric]
        if best is None or better(value, best):
            best_name, best = name, value
    return aware, best_name, candidates[best_name]


def margins(world: DemoWorld, split: str = "dev", k: int | None = None) -> list[MarginRow]:
    """Per task: `aware_answer` over the k most recent items (what the prompts show) vs the best of
    `blind_answers` and every constant label, under `minitagpr.metrics.evaluate` (`rule_predictions`)."""
    from minitagpr.metrics import evaluate, main_metric
    rows = []
    for task in world.tasks:
        golds, (metric, higher) = world.golds(task, split), main_metric(task)
        aware_preds, best_name, blind_preds = rule_predictions(world, task, split, k)
        aware, best = evaluate(task, aware_preds, golds)[metric], evaluate(task, blind_preds, golds)[metric]
        margin = aware - best if higher else best - aware
        rows.append(MarginRow(task, split, metric, aware, best, best_name, margin, REQUIRED_MARGIN.get(task)))
    return rows


def format_margins(rows: Sequence[MarginRow]) -> str:
    lines = ["| task | split | metric | profile-aware | best profile-blind | (which) | margin | required | ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        req = "-" if r.required is None else f"{r.required:.2f}"
        lines.append(f"| {r.task} | {r.split} | {r.metric} | {r.aware:.3f} | {r.blind:.3f} | {r.blind_name} | "
                     f"{r.margin:+.3f} | {req} | {'yes' if r.ok else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minitagpr.data.demo_world",
                                 description="Build the demo world (or reuse the one in OUT_DIR when its world.json "
                                             "has the same parameters) and print profile-aware vs profile-blind "
                                             "margins. The main job builds it with every default.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("out_dir", help="folder for the LaMP-format files, tokenizer, SFT chains and world.json")
    ap.add_argument("--seed", type=int, default=0, help="seed of every random draw of the world")
    ap.add_argument("--num-users", type=int, default=DEFAULTS["num_users"], help="users in all splits")
    ap.add_argument("--dev-users", type=int, default=DEFAULTS["dev_users"], help="users held out for dev")
    ap.add_argument("--test-users", type=int, default=DEFAULTS["test_users"], help="users held out for test")
    ap.add_argument("--per-user", type=int, default=DEFAULTS["per_user"], help="questions per user and task")
    ap.add_argument("--k", type=int, default=DEFAULTS["k"], help="profile items a prompt shows")
    ap.add_argument("--vocab-size", type=int, default=DEFAULTS["vocab_size"], help="size of the trained tokenizer")
    ap.add_argument("--prompt-style", choices=("full", "brief"), default=DEFAULTS["prompt_style"],
                    help="instruction style of the SFT chains' prompts (minitagpr.data.prompts)")
    ap.add_argument("--force", action="store_true", help="rebuild even if world.json matches")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        before = DemoWorld.load(Path(args.out_dir)).params if (Path(args.out_dir) / MANIFEST).exists() else None
    except DataError:
        before = None
    world = build(args.out_dir, args.seed, num_users=args.num_users, dev_users=args.dev_users,
                  test_users=args.test_users, per_user=args.per_user, k=args.k, vocab_size=args.vocab_size,
                  prompt_style=args.prompt_style, force=args.force)
    s = world.stats
    if before is not None and before != world.params:  # build() rebuilds a world of other parameters by itself
        changed = sorted(k for k in set(before) | set(world.params) if before.get(k) != world.params.get(k))
        print(f"rebuilt {world.root}: its parameters differed ({', '.join(changed)})")
    print(f"demo world in {world.root} ({time.perf_counter() - t0:.1f} s; built in {s['build_seconds']} s)")
    print(f"questions per task: {json.dumps(s['questions']['LaMP-1'])}; SFT records {s['sft_records']}; "
          f"user-dependent groups {s['user_dependent_groups']}; tokenizer vocab {s['vocab_size']}; "
          f"prompt tokens mean {s['prompt_tokens_mean']} max {s['prompt_tokens_max']}")
    rows = margins(world, "train") + margins(world, "dev")
    print(format_margins(rows))
    failed = [r for r in rows if not r.ok]
    if failed:
        print(f"margin below requirement: {', '.join(f'{r.task}/{r.split}' for r in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from minitagpr.cli import exit_on_user_error
    with exit_on_user_error("demo_world"):  # e.g. an out_dir that is a file: one line, not a traceback
        sys.exit(main())
