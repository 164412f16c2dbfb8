"""Retrievers: recency order, BM25 against a brute-force float64 Okapi, seeded random, dense (dot product or cosine),
and k."""
import random

import numpy as np
import pytest

from lamp_fixtures import LAMP_TASKS, WORDS, make_examples
from minitagpr.data.lamp import DataError, LampExample, item_document, query_text
from minitagpr.data.retrieval import (
    BM25Retriever, DenseRetriever, RandomRetriever, RecencyRetriever, Retriever, bm25_scores, get_retriever,
)


def _tweets(texts, dates=None):
    profile = [{"id": f"9{j}", "text": t} for j, t in enumerate(texts)]
    for item, d in zip(profile, dates or []):
        if d is not None:
            item["date"] = d
    return LampExample("9", "LaMP-7", "Paraphrase this tweet: " + texts[0], profile)


# --- recency ------------------------------------------------------------------------------------------------------

def test_recency_returns_the_most_recent_k_newest_first():
    ex = _tweets(list("abcde"), ["2014-05-01", "2015-01-01", 2013, "2014-12-31", "2015-01-02"])
    assert [it["text"] for it in RecencyRetriever().select(ex, 3)] == ["e", "b", "d"]


def test_recency_without_dates_takes_the_last_items_in_file_order():
    ex = _tweets(list("abcde"))
    assert [it["text"] for it in RecencyRetriever().select(ex, 2)] == ["e", "d"]


def test_recency_ranks_undated_items_after_dated_ones():
    ex = _tweets(list("abcd"), [None, "2001-01-01", None, "2000-01-01"])
    assert [it["text"] for it in RecencyRetriever().select(ex, 4)] == ["b", "d", "c", "a"]


def test_recency_equal_dates_put_the_later_file_position_first():
    ex = _tweets(list("abc"), ["2010-01-01"] * 3)
    assert [it["text"] for it in RecencyRetriever().select(ex, 3)] == ["c", "b", "a"]


def test_recency_unreadable_date_names_example_and_item():
    ex = _tweets(list("ab"), ["2010-01-01", "last week"])
    with pytest.raises(DataError, match=r"example '9' \(LaMP-7\): field 'profile\[1\].date' \(item id '91'\)"):
        RecencyRetriever().select(ex, 1)


# --- BM25 ---------------------------------------------------------------------------------------------------------

def okapi_reference(query, docs, k1=1.5, b=0.75):
    """Brute-force float64 Okapi BM25, term by term over every document."""
    n = len(docs)
    avgdl = np.float64(sum(len(d) for d in docs)) / n
    out = []
    for d in docs:
        s = np.float64(0.0)
        for t in query:
            df = sum(1 for e in docs if t in e)
            tf = d.count(t)
            idf = np.log(np.float64(1.0) + (n - df + 0.5) / (df + 0.5))
            s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) / avgdl))
        out.append(float(s))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_bm25_ranks_agree_with_brute_force_okapi(seed):
    rng = random.Random(seed)
    vocab = WORDS[: rng.randint(5, len(WORDS))]  # small vocabularies force repeats and ties
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 25))) for _ in range(rng.randint(2, 30))]
    query_words = [rng.choice(vocab) for _ in range(rng.randint(1, 8))]
    ex = LampExample("1", "LaMP-7", "Paraphrase: " + " ".join(query_words),
                     [{"id": str(j), "text": t} for j, t in enumerate(texts)])
    ref = okapi_reference(query_words, [t.split() for t in texts])
    bm25 = BM25Retriever()
    assert bm25.scores(ex) == pytest.approx(ref, rel=1e-12, abs=1e-12)
    order = bm25.rank(ex)
    assert sorted(order) == list(range(len(texts)))
    for a, c in zip(order, order[1:]):  # non-increasing reference score; exact ties keep file order
        assert ref[a] >= ref[c] - 1e-12
        if abs(ref[a] - ref[c]) <= 1e-12:
            assert a < c


@pytest.mark.parametrize("task", LAMP_TASKS)
def test_bm25_uses_the_task_query_and_document_fields(task):
    ex = make_examples(task, n=1, n_items=8, seed=3)[0][0]
    ref = okapi_reference(query_text(ex).split(), [item_document(task, it).split() for it in ex.profile])
    assert BM25Retriever().scores(ex) == pytest.approx(ref, rel=1e-12, abs=1e-12)


def test_bm25_prefers_the_item_sharing_the_rare_query_word():
    ex = _tweets(["coffee at dawn", "rain and coffee", "rain rain rain", "quiet dawn"])
    ex.input = "Paraphrase: dawn coffee"
    assert [it["text"] for it in BM25Retriever().select(ex, 1)] == ["coffee at dawn"]


def test_bm25_is_case_sensitive_unless_asked_to_fold_case():
    ex = _tweets(["Storm warning", "sunny day"])
    ex.input = "Paraphrase: storm"
    assert BM25Retriever().scores(ex) == [0.0, 0.0]
    assert BM25Retriever(lowercase=True).scores(ex)[0] > 0


# --- random -------------------------------------------------------------------------------------------------------

def test_random_is_deterministic_per_seed_and_example():
    ex = make_examples("LaMP-4", n=2, n_items=30)[0]
    ids = lambda r, e: [it["id"] for it in r.select(e, 8)]  # noqa: E731
    assert ids(RandomRetriever(7), ex[0]) == ids(RandomRetriever(7), ex[0])
    assert ids(RandomRetriever(7), ex[0]) != ids(RandomRetriever(8), ex[0])
    assert ids(RandomRetriever(7), ex[0]) != [f"{ex[0].id}{j}" for j in range(8)]  # not the file order


def test_random_selection_has_no_repeats():
    ex = make_examples("LaMP-7", n=1, n_items=10)[0][0]
    chosen = [it["id"] for it in RandomRetriever(1).select(ex, 10)]
    assert sorted(chosen) == sorted(it["id"] for it in ex.profile)


# --- k ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["recency", "bm25", "random"])
def test_selections_for_growing_k_are_nested(name):
    ex = make_examples("LaMP-5", n=1, n_items=40)[0][0]
    r = get_retriever(name, seed=3)
    chosen = {k: [it["id"] for it in r.select(ex, k)] for k in (2, 4, 8, 16, 32)}
    assert all(len(chosen[k]) == k for k in chosen)
    assert chosen[32][:16] == chosen[16] and chosen[4][:2] == chosen[2]


@pytest.mark.parametrize("name", ["recency", "bm25", "random"])
def test_k_beyond_the_profile_returns_the_whole_profile_and_zero_returns_nothing(name):
    ex = make_examples("LaMP-3", n=1, n_items=5)[0][0]
    r = get_retriever(name)
    assert len(r.select(ex, 32)) == 5 and r.select(ex, 0) == []
    assert all(any(it is p for p in ex.profile) for it in r.select(ex, 3))  # the same dicts, not copies


def test_negative_k_is_rejected():
    with pytest.raises(ValueError, match="k must be a non-negative int"):
        RecencyRetriever().select(_tweets(["a"]), -1)


def test_unknown_retriever_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown retriever 'tfidf'; expected one of recency, bm25, bm25okapi, random, "
                                         "dense"):
        get_retriever("tfidf")


# --- dense --------------------------------------------------------------------------------------------------------

def _bag_of_words(texts):
    vocab = {w: i for i, w in enumerate(WORDS)}
    out = np.zeros((len(texts), len(vocab)))
    for r, t in enumerate(texts):
        for w in t.split():
            if w in vocab:
                out[r, vocab[w]] += 1
    return out


def _dense_order(ex, similarity):
    q = _bag_of_words([query_text(ex)])[0]
    docs = _bag_of_words([item_document("LaMP-2", it) for it in ex.profile])
    if similarity == "cosine":
        s = [float(d @ q / (np.linalg.norm(d) * np.linalg.norm(q))) if d.any() else 0.0 for d in docs]
    else:
        s = [float(d @ q) for d in docs]
    return sorted(range(len(s)), key=lambda j: (-round(s[j], 12), j))


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_dense_retriever_is_a_retriever_and_ranks_by_its_similarity(similarity):
    ex = make_examples("LaMP-2", n=1, n_items=12, seed=5)[0][0]
    kwargs = {} if similarity == "dot" else {"similarity": "cosine"}
    r = get_retriever("dense", encode_fn=_bag_of_words, **kwargs)
    assert isinstance(r, Retriever)
    expected = _dense_order(ex, similarity)
    assert [it["id"] for it in r.select(ex, 5)] == [ex.profile[j]["id"] for j in expected[:5]]


def test_dense_retriever_defaults_to_the_dot_product_as_contriever_and_lamp_rank():
    """A long item whose embedding has a large norm wins by dot product, a short aligned one by cosine."""
    ex = _tweets(["short", "long"])
    ex.input = "Paraphrase this tweet: the query"
    vectors = {"the query": [1.0, 0.0], "short": [1.0, 0.2], "long": [3.0, 2.0]}
    encode = lambda texts: [vectors[t.strip()] for t in texts]  # noqa: E731
    assert [it["text"] for it in DenseRetriever(encode).select(ex, 1)] == ["long"]
    assert [it["text"] for it in DenseRetriever(encode, similarity="cosine").select(ex, 1)] == ["short"]
    with pytest.raises(ValueError, match="similarity must be 'dot' or 'cosine'"):
        DenseRetriever(encode, similarity="l2")


def test_dense_retriever_rejects_a_wrongly_shaped_encoder():
    r = DenseRetriever(lambda texts: np.ones(len(texts)))
    with pytest.raises(ValueError, match=r"encode_fn returned shape \(3,\) for 3 texts"):
        r.select(_tweets(["a b", "c"]), 1)


def test_bm25_term_in_every_item_still_scores_above_zero():
    ex = _tweets(["coffee now", "coffee later"])
    ex.input = "Paraphrase: coffee"
    assert all(s > 0 for s in BM25Retriever().scores(ex))


# ---- pinned by mutation (2026-11-27) ---------------------------------------------------------------------------

def test_one_dense_retriever_keeps_each_tasks_ranking_apart_when_ids_repeat():
    """The ranking cache is keyed by (task, id, texts): LaMP ids repeat across tasks, and across parts."""
    a = _tweets(["music", "robot", "graph"])  # id "9", LaMP-7: ranking [0, 1, 2]
    b = LampExample("9", "LaMP-4", "Generate a headline for the following article: music",
                    [{"id": "x1", "title": "city", "text": "city"}, {"id": "x2", "title": "music", "text": "music"}])
    retriever = DenseRetriever(_bag_of_words)
    first = [it["id"] for it in retriever.select(a, 3)]
    assert [it["id"] for it in retriever.select(b, 2)] == ["x2", "x1"]  # not a's cached [0, 1]
    assert [it["id"] for it in retriever.select(a, 3)] == first
    # the same task and id with another profile (another split or part of the data): ranked afresh
    c = LampExample("9", "LaMP-4", b.input, [{"id": "y1", "title": "music", "text": "music"},
                                             {"id": "y2", "title": "city", "text": "city"}])
    assert [it["id"] for it in retriever.select(c, 2)] == ["y1", "y2"]  # not b's cached [1, 0]


def test_the_random_retriever_draws_per_task_as_well_as_per_id():
    profile = [{"id": str(j), "text": f"w{j}"} for j in range(12)]
    orders = {task: RandomRetriever(seed=3).rank(LampExample("7", task, "x: y", profile))
              for task in ("LaMP-7", "LaMP-3")}
    assert orders["LaMP-7"] != orders["LaMP-3"]


# ---- pinned by mutation (each fails on a mutant the suite let through, 2026-11-29) -------------------------------

def test_bm25_matches_a_capitalised_query_word_exactly_when_case_sensitive():
    """Case-sensitive means neither side is folded: query "Storm" matches item "Storm warning". By hand: N = 2,
    df = 1, idf = ln(1 + 1.5/1.5) = ln 2; |d| = avgdl = 2, so the norm is k1 = 1.5 and the score is
    ln 2 * 1 * 2.5 / (1 + 1.5) = ln 2."""
    import math
    ex = _tweets(["Storm warning", "sunny day"])
    ex.input = "Paraphrase: Storm"
    assert BM25Retriever().scores(ex) == pytest.approx([math.log(2), 0.0])


def test_bm25_with_k1_zero_scores_the_idf_of_the_matched_terms():
    """k1 = 0 turns term-frequency saturation off: each matched query token adds idf(t) * tf * 1 / tf = idf(t),
    and an item without the term adds nothing (no 0/0). N = 2, df(a) = 1: idf = ln 2."""
    import math
    from minitagpr.data.retrieval import bm25_scores
    assert bm25_scores(["a"], [["a", "a", "b"], ["c"]], k1=0.0) == pytest.approx([math.log(2), 0.0])


def test_get_retriever_passes_its_seed_to_the_random_retriever():
    """get_retriever("random", seed=s) is RandomRetriever(seed=s): another seed draws another order."""
    profile = [{"id": str(j), "text": f"w{j}"} for j in range(12)]
    ex = LampExample("7", "LaMP-7", "x: y", profile)
    for seed in (1, 5):
        assert get_retriever("random", seed=seed).rank(ex) == RandomRetriever(seed=seed).rank(ex)
    assert get_retriever("random", seed=1).rank(ex) != get_retriever("random", seed=5).rank(ex)


@pytest.mark.parametrize("kwargs, message", [({"k1": -0.5}, "k1 must be a finite number >= 0"),
                                             ({"k1": float("nan")}, "k1 must be a finite number >= 0"),
                                             ({"b": 1.5}, r"b must be in \[0, 1\]")])
def test_bm25_parameters_outside_their_range_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_retriever("bm25", **kwargs)


# ----------------------------------------------------------------------------------------------- bm25okapi
@pytest.mark.parametrize("seed", range(6))
def test_bm25okapi_scores_equal_rank_bm25s_bm25okapi(seed):
    """Words drawn from a small vocabulary, so some query terms are in more than half of the items (negative
    idf, floored) and some in none; a query may repeat a word."""
    rank_bm25 = pytest.importorskip("rank_bm25", reason="rank-bm25 is bm25okapi's reference oracle (test extra)")
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(8)]
    docs = [[rng.choice(vocab[:3] if rng.random() < 0.5 else vocab) for _ in range(rng.randint(1, 9))]
            for _ in range(rng.randint(2, 12))]
    query = [rng.choice(vocab + ["unseen"]) for _ in range(rng.randint(1, 6))]
    ours = bm25_scores(query, docs, idf_form="okapi_floor")
    assert ours == pytest.approx(rank_bm25.BM25Okapi(docs).get_scores(query).tolist(), rel=1e-12, abs=1e-12)


def test_bm25okapi_differs_from_bm25_only_through_a_term_in_most_items():
    docs = [["common", "x"], ["common", "y"], ["common"], ["rare", "z"]]
    lucene, okapi = (bm25_scores(["common", "rare"], docs, idf_form=f) for f in ("lucene", "okapi_floor"))
    assert lucene[0] > 0 and okapi[0] != lucene[0]  # "common": 3 of 4 items, a negative raw idf floored
    assert bm25_scores(["rare"], docs, idf_form="okapi_floor")[3] > 0


def test_the_bm25okapi_retriever_is_built_by_name_and_an_unknown_idf_form_is_refused():
    assert get_retriever("bm25okapi").idf_form == "okapi_floor" and get_retriever("bm25").idf_form == "lucene"
    with pytest.raises(ValueError, match="bm25 idf_form must be one of lucene, okapi_floor, got 'atire'"):
        get_retriever("bm25", idf_form="atire")
