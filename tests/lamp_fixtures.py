"""Small LaMP-format fixtures for the data-layer tests: questions and golds for every task, written like the
benchmark's files (input structure of lamp-format.md, profile fields per task, string ids extending the question id).
"""
from __future__ import annotations

import random
from datetime import date, timedelta

from minitagpr.data.lamp import LAMP2_TAGS, LampExample

WORDS = ("graph neural model user review rating movie dark future robot love city music paper learning data "
         "network style news election market storm travel hotel food coffee game space war family story").split()

START = date(2015, 3, 1)
LAMP_TASKS = ("LaMP-1", "LaMP-2", "LaMP-3", "LaMP-4", "LaMP-5", "LaMP-7")


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_item(task: str, item_id: str, rng: random.Random, date: str | None) -> dict:
    if task in ("LaMP-1", "LaMP-5"):
        item = {"title": _text(rng, 5), "abstract": _text(rng, 20)}
    elif task == "LaMP-2":
        item = {"description": _text(rng, 15), "tag": rng.choice(LAMP2_TAGS)}
    elif task == "LaMP-3":
        item = {"text": _text(rng, 20), "score": str(rng.randint(1, 5))}
    elif task == "LaMP-4":
        item = {"text": _text(rng, 30), "title": _text(rng, 6)}
    else:
        item = {"text": _text(rng, 12)}
    item["id"] = item_id
    if date is not None:
        item["date"] = date
    return item


def make_input(task: str, rng: random.Random) -> tuple[str, str]:
    """(input, gold) following the benchmark's input structure."""
    if task == "LaMP-1":
        return (f'For an author who wrote the paper titled "{_text(rng, 5)}", which reference is related? '
                f'Answer with only [1] or [2]. [1]: "{_text(rng, 6)}" [2]: "{_text(rng, 6)}"', rng.choice(["[1]", "[2]"]))
    if task == "LaMP-2":
        return (f"Which tag does this movie relate to among the following tags? Just answer with the tag name "
                f"without further explanation. tags: [{', '.join(LAMP2_TAGS)}] description: {_text(rng, 15)}",
                rng.choice(LAMP2_TAGS))
    if task == "LaMP-3":
        return (f"What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
                f"without further explanation. review: {_text(rng, 20)}", str(rng.randint(1, 5)))
    if task == "LaMP-4":
        return f"Generate a headline for the following article: {_text(rng, 30)}", _text(rng, 6)
    if task == "LaMP-5":
        return f"Generate a title for the following abstract of a paper: {_text(rng, 20)}", _text(rng, 6)
    return f"Paraphrase the following tweet without any explanation before or after it: {_text(rng, 12)}", _text(rng, 12)


def make_examples(task: str, n: int = 4, n_items: int = 6, seed: int = 0, split: str = "user",
                  dated: bool = True) -> tuple[list[LampExample], dict[str, str]]:
    """n examples of `task` with n_items profile items each (dates shuffled so file order is not time order)."""
    rng = random.Random(f"{task}-{seed}-{split}")
    examples, golds = [], {}
    for q in range(n):
        qid = str(100 + q)
        days = rng.sample(range(3 * n_items), n_items)
        profile = [make_item(task, f"{qid}{j}", rng, str(START + timedelta(days=d)) if dated else None)
                   for j, d in enumerate(days)]
        text, gold = make_input(task, rng)
        user_id = f"u{q}" if split == "time" else None
        examples.append(LampExample(qid, task, text, profile, user_id))
        golds[qid] = gold
    return examples, golds
