"""PGraphRAG user-review histories (../shared/data/pgraphrag) as two LaMP-style tasks.

Source files (Amazon and Hotel, dev and test user splits of the PGraphRAG benchmark) are JSON arrays of users:
`{"id": str, "profile": [{"rating": int 1-5, "title": str, "text": str, "pid": str}, ...]}`. Reviews carry no
date, so the file order is taken as the time order.

For every user with at least `min_reviews` (default 2) reviews, the last review is held out and the others become
the profile -- minus verbatim copies of the held-out review. The files hold such copies (the same title and text
scraped twice): about one multi-review user in seven, mostly users whose whole history is one review repeated.
Left in, the gold would sit in the profile, so `drop_copies=True` (default) removes them and skips users who then
have no other review (amazon_dev: 126 users with 2+ reviews -> 109 examples; `main` prints every file's counts).
- `PGraphRAG-title` (the paper's AmazonReviewTitle): given the held-out review's text, write its title; gold = the
  title; scored like LaMP-5 (ROUGE-1 / ROUGE-L).
- `PGraphRAG-rating`: given the held-out review's title and text, predict its 1-5 rating; gold = the rating as a
  string; scored like LaMP-3 (MAE / RMSE).
Profile items look like LaMP-3/4 items: `{"id": "<user>-<j>", "title", "text", "score": "<rating>", "pid"}` (plus
`"date"` if a source review ever has one). Example ids and `user_id` are the source user ids. """
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from minitagpr.data.lamp import (
    DataError, LampExample, canonical_task, date_key, read_json, surrogate_problem, type_name, where, write_outputs,
    write_questions,
)

PGRAPHRAG_TASKS = ("PGraphRAG-title", "PGraphRAG-rating")
FILES = ("amazon_dev.json", "amazon_test.json", "hotel_dev.json", "hotel_test.json")

TITLE_INPUT = "Write the title this user gave to the following review. Give the title only. review: {text}"
RATING_INPUT = ("Predict the rating from 1 to 5 that this user gave together with the following review. "
                "Give one integer only. title: {title} review: {text}")


def load_users(path: str | os.PathLike) -> list[dict]:
    """Read and validate one PGraphRAG split file; returns the parsed user records as they are."""
    path = Path(path)
    users = read_json(path)
    if not isinstance(users, list):
        raise DataError(f"{path}: expected a JSON array of users, got {type_name(users)}")
    if not users:
        raise DataError(f"{path}: no users (an empty array)")
    seen: dict[str, int] = {}
    for index, user in enumerate(users):
        if not isinstance(user, dict):
            raise DataError(f"{where(path, index)}: expected an object, got {type_name(user)}")
        uid = user.get("id")
        for name, kind in (("id", str), ("profile", list)):
            if name not in user:
                raise DataError(f"{where(path, index, uid, name)}: missing")
            if not isinstance(user[name], kind):
                raise DataError(f"{where(path, index, uid, name)}: expected {kind.__name__}, "
                                f"got {type_name(user[name])}")
        if uid in seen:
            raise DataError(f"{where(path, index, uid, 'id')}: duplicate id (first at record {seen[uid]})")
        seen[uid] = index
        if why := surrogate_problem(uid):
            raise DataError(f"{where(path, index, uid, 'id')}: {why}")
        if not user["profile"]:
            raise DataError(f"{where(path, index, uid, 'profile')}: empty profile")
        for j, review in enumerate(user["profile"]):
            at = lambda f: where(path, index, uid, f"profile[{j}]" + (f".{f}" if f else ""))  # noqa: E731
            if not isinstance(review, dict):
                raise DataError(f"{at(None)}: expected an object, got {type_name(review)}")
            for name in ("title", "text", "pid"):
                if name not in review:
                    raise DataError(f"{at(name)}: missing")
                if not isinstance(review[name], str):
                    raise DataError(f"{at(name)}: expected a string, got {type_name(review[name])}")
                if why := surrogate_problem(review[name]):
                    raise DataError(f"{at(name)}: {why}")
            rating = review.get("rating")
            if "rating" not in review:
                raise DataError(f"{at('rating')}: missing")
            if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
                raise DataError(f"{at('rating')}: expected an integer from 1 to 5, got {rating!r}")
            # null is an undated review, as the recency retriever treats it; a date that is there must be readable
            if review.get("date") is not None and date_key(review["date"]) is None:
                raise DataError(f"{at('date')}: cannot read date {review['date']!r} (expected a year or 'YYYY-MM-DD')")
    return users


def _item(uid: str, j: int, review: dict) -> dict:
    item = {"id": f"{uid}-{j}", "title": review["title"], "text": review["text"], "score": str(review["rating"]),
            "pid": review["pid"]}
    if "date" in review:
        item["date"] = review["date"]
    return item


def make_task(source: str | os.PathLike | list[dict], task: str, min_reviews: int = 2,
              drop_copies: bool = True) -> tuple[list[LampExample], dict[str, str]]:
    """(examples, {id: gold}) of `task` ('PGraphRAG-title' | 'PGraphRAG-rating') from a split file or its users."""
    task = canonical_task(task)
    if task not in PGRAPHRAG_TASKS:
        raise DataError(f"make_task: {task} is not a PGraphRAG task ({', '.join(PGRAPHRAG_TASKS)})")
    if min_reviews < 2:
        raise ValueError("min_reviews must be at least 2: one review is held out, the profile needs the rest")
    users = source if isinstance(source, list) else load_users(source)
    examples, golds = [], {}
    for user in users:
        reviews = user["profile"]
        if len(reviews) < min_reviews:
            continue
        uid, held_out = user["id"], reviews[-1]
        profile = [_item(uid, j, r) for j, r in enumerate(reviews[:-1])
                   if not (drop_copies and (r["title"], r["text"]) == (held_out["title"], held_out["text"]))]
        if not profile:
            continue  # the whole history was copies of the held-out review (only with drop_copies)
        if task == "PGraphRAG-title":
            text, gold = TITLE_INPUT.format(text=held_out["text"]), held_out["title"]
        else:
            text, gold = RATING_INPUT.format(title=held_out["title"], text=held_out["text"]), str(held_out["rating"])
        examples.append(LampExample(uid, task, text, profile, uid))
        golds[uid] = gold
    return examples, golds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minitagpr.data.pgraphrag",
                                 description="Build the PGraphRAG tasks, print their sizes, optionally write them "
                                             "as LaMP-format questions/outputs files.")
    ap.add_argument("data_dir", help="folder with amazon_dev.json, ... (../shared/data/pgraphrag)")
    ap.add_argument("--out", help="write <out>/<task>/<file stem>_{questions,outputs}.json")
    args = ap.parse_args(argv)
    print("| file | users | users with >= 2 reviews | task | examples | mean profile size |")
    print("|---|---|---|---|---|---|")
    try:
        for name in FILES:
            path = Path(args.data_dir) / name
            users = load_users(path)
            for task in PGRAPHRAG_TASKS:
                examples, golds = make_task(users, task)
                mean = sum(len(e.profile) for e in examples) / max(len(examples), 1)
                multi = sum(len(u["profile"]) >= 2 for u in users)
                print(f"| {name} | {len(users)} | {multi} | {task} | {len(examples)} | {mean:.2f} |")
                if args.out:
                    stem = Path(args.out) / task / path.stem
                    write_questions(f"{stem}_questions.json", examples)
                    write_outputs(f"{stem}_outputs.json", task, golds)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
