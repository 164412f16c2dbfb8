"""Profile retrievers: choose the k profile items a prompt shows (k = 8 by default in TagPR).

Every retriever ranks the whole profile of one example and returns its first k items, most relevant first (the
same dict objects as in the profile, not copies); k larger than the profile returns the whole ranked profile and
k = 0 returns nothing (a profile-free prompt). Because the ranking does not depend on k, the items chosen for k = 2
are the first two of those chosen for k = 4, 8, 16, 32 -- the profile-length robustness runs are nested.

- `recency`: most recent first. Dates compare as integer tuples (`lamp.date_key`), like the benchmark's own
  recency ranking; equal dates put the later file position first. Undated items count as older than every dated
  one and keep file order among themselves, with later in the file meaning more recent -- so a profile without
  dates gives its last k items, newest (last) first.
- `bm25`: our Okapi BM25 over the user's own profile (the corpus is that profile, as in LaMP). Document = the
  task's `doc_fields` (lamp.TASKS), query = the task's query item (`lamp.query_text`); whitespace tokens,
  case-sensitive by default like the benchmark's reference retrieval (`lowercase=True` folds case). With N items,
  df(t) of them containing term t, tf(t, d) its count in item d, |d| the item's length and avgdl the mean length:
      idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))          (always > 0; no negative-idf floor needed)
      score(q, d) = sum over query tokens t (repeats count again) of
                    idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
  k1 = 1.5 and b = 0.75 (the defaults of the widely used rank_bm25 package). Equal scores keep file order (a
  reference that takes `argsort(scores)[::-1]` lists tied items last-in-file first instead: with a query sharing no
  word with the profile, every item ties and the two pick different items).
- `bm25okapi`: the same with rank_bm25's `BM25Okapi` idf, which LaMP's reference retrieval code uses:
      idf(t) = ln((N - df(t) + 0.5) / (df(t) + 0.5)), and where that is negative (t in more than half the profile)
      eps * (the mean of that idf over every distinct word of the profile), eps = 0.25
  It ranks like `bm25` unless a query term is in more than half of the profile (tests/test_retrieval.py checks
  its scores against rank_bm25 itself).
- `random`: a seeded shuffle, deterministic per (seed, task, example id) and independent of everything else.
- `DenseRetriever(encode_fn, similarity="dot")`: the dot product (or cosine) of the query and item embeddings
  from any encoder: `encode_fn(list[str]) -> (n, d)` array-like (numpy or lists). Contriever, the paper's dense
  retriever, is `minitagpr.model.encoder.encoder_fn(folder)`. An example's ranking is computed once and reused
  (every checkpoint and every k of a sweep sees the same items). This module itself never touches tensors.

Anything with `select(example, k) -> list[dict]` is a `Retriever`; `get_retriever(name)` builds the built-in ones.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from minitagpr.data.lamp import DataError, LampExample, date_key, item_document, query_text

DEFAULT_K = 8


@runtime_checkable
class Retriever(Protocol):
    def select(self, example: LampExample, k: int) -> list[dict]:
        """The k items of `example.profile` to show, most relevant first."""
        ...


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")


class RankingRetriever:
    """A retriever defined by a full ranking of the profile; `select` takes the first k."""

    name = "ranking"

    def rank(self, example: LampExample) -> list[int]:
        """Indices into `example.profile`, most relevant first (a permutation of the whole profile)."""
        raise NotImplementedError

    def select(self, example: LampExample, k: int = DEFAULT_K) -> list[dict]:
        _check_k(k)
        if k == 0:
            return []
        return [example.profile[i] for i in self.rank(example)[:k]]


class RecencyRetriever(RankingRetriever):
    name = "recency"

    def rank(self, example: LampExample) -> list[int]:
        undated, dated = [], []
        for j, item in enumerate(example.profile):
            if item.get("date") is None:
                undated.append(j)
                continue
            key = date_key(item["date"])
            if key is None:
                raise DataError(f"example {example.id!r} ({example.task}): field 'profile[{j}].date' "
                                f"(item id {item.get('id')!r}): cannot read date {item['date']!r}")
            dated.append((key, j))
        dated.sort(key=lambda kj: kj[0])  # stable: equal dates keep file order
        oldest_first = undated + [j for _, j in dated]
        return oldest_first[::-1]


def tokenize(text: str, lowercase: bool = False) -> list[str]:
    return (text.lower() if lowercase else text).split()


IDF_FORMS = ("lucene", "okapi_floor")


def _check_idf_form(idf_form: str) -> None:
    if idf_form not in IDF_FORMS:
        raise ValueError(f"bm25 idf_form must be one of {', '.join(IDF_FORMS)}, got {idf_form!r}")


def bm25_scores(query: Sequence[str], docs: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75,
                idf_form: str = "lucene") -> list[float]:
    """Okapi BM25 score of every tokenised document for the tokenised query (formulas in the module docstring):
    idf_form "lucene" (retriever bm25) or "okapi_floor" (bm25okapi, rank_bm25's BM25Okapi)."""
    _check_idf_form(idf_form)
    n_docs = len(docs)
    if n_docs == 0:
        return []
    terms = set(query)
    # Only query terms matter: count just those per document.
    tfs = [Counter(t for t in doc if t in terms) for doc in docs]
    df = Counter(t for tf in tfs for t in tf)
    if idf_form == "lucene":
        idf = {t: math.log(1.0 + (n_docs - df[t] + 0.5) / (df[t] + 0.5)) for t in terms}
    else:  # "okapi_floor"
        idf = _okapi_floor_idf(terms, df, docs)
    avgdl = sum(len(doc) for doc in docs) / n_docs
    scores = []
    for doc, tf in zip(docs, tfs):
        # length normalisation; an all-empty corpus (avgdl 0) has no term matches, so any finite norm will do
        norm = k1 * (1.0 - b + b * len(doc) / avgdl) if avgdl > 0 else k1
        scores.append(sum(idf[t] * tf[t] * (k1 + 1.0) / (tf[t] + norm) for t in query if tf[t]))
    return scores


def _okapi_floor_idf(terms: set[str], df: Counter, docs: Sequence[Sequence[str]]) -> dict[str, float]:
    """rank_bm25's BM25Okapi idf of the query `terms`: ln((N - df + 0.5) / (df + 0.5)), a negative one replaced by
    0.25 x the mean of that idf over every distinct word of the profile (so this, unlike the Lucene form, reads the
    whole profile's vocabulary). A term in no item gets 0, as there."""
    n_docs = len(docs)

    def raw(d: int) -> float:
        return math.log(n_docs - d + 0.5) - math.log(d + 0.5)

    all_df = Counter(t for doc in docs for t in set(doc))
    if not all_df:  # every item empty: no term matches anything
        return {t: 0.0 for t in terms}
    floor = 0.25 * sum(raw(d) for d in all_df.values()) / len(all_df)
    return {t: (raw(df[t]) if raw(df[t]) >= 0 else floor) if df[t] else 0.0 for t in terms}


class BM25Retriever(RankingRetriever):
    name = "bm25"

    def __init__(self, k1: float = 1.5, b: float = 0.75, lowercase: bool = False, idf_form: str = "lucene"):
        if not (math.isfinite(k1) and k1 >= 0):  # k1 < 0 can make a denominator 0 or flip scores' signs
            raise ValueError(f"bm25 k1 must be a finite number >= 0, got {k1!r}")
        if not 0.0 <= b <= 1.0:  # b mixes 1 and |d| / avgdl
            raise ValueError(f"bm25 b must be in [0, 1], got {b!r}")
        _check_idf_form(idf_form)  # at construction, not at the first ranking
        self.k1, self.b, self.lowercase, self.idf_form = k1, b, lowercase, idf_form
        self.name = "bm25" if idf_form == "lucene" else "bm25okapi"

    def scores(self, example: LampExample) -> list[float]:
        query = tokenize(query_text(example), self.lowercase)
        docs = [tokenize(item_document(example.task, item), self.lowercase) for item in example.profile]
        return bm25_scores(query, docs, self.k1, self.b, self.idf_form)

    def rank(self, example: LampExample) -> list[int]:
        scores = self.scores(example)
        return sorted(range(len(scores)), key=lambda j: -scores[j])  # stable sort: ties keep file order


class RandomRetriever(RankingRetriever):
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def rank(self, example: LampExample) -> list[int]:
        # A string seed is hashed with SHA-512 by `random`, so the order is the same in every process and run.
        rng = random.Random(f"{self.seed}|{example.task}|{example.id}")
        order = list(range(len(example.profile)))
        rng.shuffle(order)
        return order


class DenseRetriever(RankingRetriever):
    """Top-k by embedding similarity with any text encoder: `encode_fn(texts) -> (n, d)` array-like.

    similarity="dot" (default) scores the raw inner product of the query and item embeddings, as Contriever is
    trained and as LaMP's reference ranker scores it (mean-pooled, unnormalised embeddings); "cosine" normalises
    both first (for encoders trained with a cosine objective)."""

    name = "dense"

    def __init__(self, encode_fn: Callable[[list[str]], Sequence[Sequence[float]]], similarity: str = "dot"):
        if similarity not in ("dot", "cosine"):
            raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}")
        self.encode_fn = encode_fn
        self.similarity = similarity
        self._ranks: dict[tuple[str, str, int], list[int]] = {}  # (task, example id, hash of its texts) -> ranking

    @staticmethod
    def texts(example: LampExample) -> list[str]:
        """The query, then each profile item's document: what is embedded."""
        return [query_text(example)] + [item_document(example.task, item) for item in example.profile]

    def scores(self, example: LampExample) -> list[float]:
        return self._similarities(self.texts(example))

    def _similarities(self, texts: list[str]) -> list[float]:
        emb = np.asarray(self.encode_fn(texts), dtype=np.float64)  # (1 + n, d)
        if emb.ndim != 2 or emb.shape[0] != len(texts):
            raise ValueError(f"encode_fn returned shape {emb.shape} for {len(texts)} texts; expected (n, d)")
        if self.similarity == "cosine":
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # zero vectors score 0
        return (emb[1:] @ emb[0]).tolist()  # (n,) similarities to the query

    def rank(self, example: LampExample) -> list[int]:
        # encoding is the expensive part: once per example. The texts join the key: one id in another split or part
        # (another profile) must not reuse this ranking
        texts = self.texts(example)
        key = (example.task, example.id, hash(tuple(texts)))
        if key not in self._ranks:
            scores = self._similarities(texts)
            self._ranks[key] = sorted(range(len(scores)), key=lambda j: -scores[j])
        return self._ranks[key]


RETRIEVERS = ("recency", "bm25", "bm25okapi", "random", "dense")
ENCODERLESS = ("recency", "bm25", "bm25okapi", "random")  # the ones a recipe without an encoder key can build


def get_retriever(name: str, seed: int = 0, **kwargs) -> RankingRetriever:
    """'recency' | 'bm25' / 'bm25okapi' (k1=, b=, lowercase=) | 'random' (seed) | 'dense' (encode_fn=,
    similarity=)."""
    if name == "recency":
        return RecencyRetriever(**kwargs)
    if name == "bm25":
        return BM25Retriever(**kwargs)
    if name == "bm25okapi":
        return BM25Retriever(idf_form="okapi_floor", **kwargs)
    if name == "random":
        return RandomRetriever(seed=seed, **kwargs)
    if name == "dense":
        if "encode_fn" not in kwargs:
            raise ValueError("the dense retriever needs encode_fn=<callable mapping texts to an (n, d) array>")
        return DenseRetriever(**kwargs)
    raise ValueError(f"unknown retriever {name!r}; expected one of {', '.join(RETRIEVERS)}")

