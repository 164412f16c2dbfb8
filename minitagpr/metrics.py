"""LaMP metrics under the benchmark's official evaluation rules (../shared/docs/lamp-format.md).

`evaluate(task, predictions, golds)` takes {id: text} dicts and returns a dict of floats:

- LaMP-1, LaMP-2 (label tasks). Both sides are stripped; a prediction that is not exactly one label string becomes
  the invalid class -1, which is always wrong.
  * `accuracy` = mean over examples of [pred == gold].
  * `f1_macro` = the official script's F1: per-label F1_l = 2 TP_l / (2 TP_l + FP_l + FN_l) for every label l of
    the task's label set (also labels absent from both sides, which score 0, as sklearn's zero_division=0 does),
    averaged over the label set. The invalid class -1 is *not* a label: it is never averaged, but a -1 prediction
    is a false negative for its gold label.
  * `f1_positive` (tasks with a `positive_label` in their TaskSpec: LaMP-1) = F1 of that class -- the TagPR paper
    reports a positive-class F1 for LaMP-1 without naming the class; we take "[1]", the option the input lists
    first (decision documented here; the other class's F1 differs only through which errors it counts).
- LaMP-3 and PGraphRAG-rating (rating tasks). The prediction is read with Python's float() as the official script
  does; if that fails it becomes whichever of 1 and 5 lies farther from the gold (|1 - y| > |5 - y| -> 1, else 5,
  so a gold 3 gives 5). One documented deviation: "nan"/"inf", which float() accepts, are treated as unparsable
  too, so a single such answer cannot turn the whole MAE into nan. `mae` and `rmse` = sqrt(mean squared error).
- LaMP-4, 5, 7 and PGraphRAG-title (generation tasks). `rouge1`, `rougeL` = the F-measure of Google's
  `rouge-score` (default tokenizer, no stemming; target = stripped gold, prediction = stripped text), averaged
  over examples. The official script goes through the `evaluate` library, whose default aggregator reports the
  bootstrap median of that mean; we report the exact mean (same value up to resampling noise, and deterministic).

Prediction ids must equal gold ids exactly: missing or extra ids raise `DataError` naming them.

By default predictions are scored as given (official rules). `extract=True` first keeps what follows the last
`</think>` and `normalize=True` applies the project's documented per-task normalisation
(`minitagpr.data.answers`), e.g. "2" -> "[2]" for LaMP-1.

Which metrics a task gets follows from its `kind`, and its table columns are its TaskSpec's `columns`
(minitagpr.data.lamp.TASKS); `COLUMNS` is a live view of them. A table refuses a task it has no columns for.

CLI: `python -m minitagpr.metrics PRED OUTPUTS [PRED OUTPUTS ...] [--name NAME] [--extract] [--normalize]`
scores official-format prediction files against outputs files and prints one Table-1-style row.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from typing import Iterable, Mapping

from minitagpr.data.lamp import TASKS, DataError, TaskList, canonical_task, load_outputs

INVALID = -1            # the class of a prediction that is no label


def _check_ids(predictions: Mapping[str, str], golds: Mapping[str, str]) -> None:
    if not golds:
        raise DataError("evaluate: no gold examples")
    missing = [i for i in golds if i not in predictions]
    extra = [i for i in predictions if i not in golds]
    if missing or extra:
        def show(ids):
            return ", ".join(repr(i) for i in ids[:10]) + (f", ... ({len(ids)} in all)" if len(ids) > 10 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} gold id(s) missing from the predictions: {show(missing)}")
        if extra:
            parts.append(f"{len(extra)} prediction id(s) not among the golds: {show(extra)}")
        raise DataError("evaluate: prediction ids must match gold ids one to one; " + "; ".join(parts))


def f1_per_label(golds: list[int], preds: list[int], labels: range) -> list[float]:
    """F1_l = 2 TP / (2 TP + FP + FN) for each label l; 0 where the label never occurs on either side."""
    scores = []
    for label in labels:
        tp = sum(1 for g, p in zip(golds, preds) if g == label and p == label)
        fp = sum(1 for g, p in zip(golds, preds) if g != label and p == label)
        fn = sum(1 for g, p in zip(golds, preds) if g == label and p != label)
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return scores


def _label_indices(task: str, ids: list[str], predictions, golds) -> tuple[list[int], list[int]]:
    """Gold and predicted label indices per example (INVALID for a prediction that is no label)."""
    index = {label: i for i, label in enumerate(TASKS[task].labels)}
    gold_idx, pred_idx = [], []
    for i in ids:
        g = golds[i].strip()
        if g not in index:
            raise DataError(f"evaluate: gold for id {i!r}: {golds[i]!r} is not a {task} label")
        gold_idx.append(index[g])
        pred_idx.append(index.get(predictions[i].strip(), INVALID))
    return gold_idx, pred_idx


def _label_metrics(task: str, ids: list[str], predictions, golds) -> dict[str, float]:
    labels = TASKS[task].labels
    gold_idx, pred_idx = _label_indices(task, ids, predictions, golds)
    per_label = f1_per_label(gold_idx, pred_idx, range(len(labels)))
    out = {
        "accuracy": sum(g == p for g, p in zip(gold_idx, pred_idx)) / len(ids),
        "f1_macro": sum(per_label) / len(labels),
    }
    positive = TASKS[task].positive_label
    if positive is not None:
        out["f1_positive"] = per_label[labels.index(positive)]
    return out


def parse_rating(prediction: str, gold: float) -> float:
    """float(prediction), or the farther of 1 and 5 from the gold when it is no (finite) number."""
    try:
        value = float(prediction)
        if math.isfinite(value):
            return value
    except ValueError:
        pass
    return 1.0 if abs(1.0 - gold) > abs(5.0 - gold) else 5.0  # official tie rule: gold 3 -> 5


def _rating_errors(task: str, ids: list[str], predictions, golds) -> list[float]:
    """prediction - gold per example (unparsable predictions read as `parse_rating` says)."""
    errors = []
    for i in ids:
        try:
            y = float(golds[i])
        except ValueError:
            raise DataError(f"evaluate: gold for id {i!r}: {golds[i]!r} is not a number ({task})") from None
        errors.append(parse_rating(predictions[i].strip(), y) - y)
    return errors


def _rating_metrics(task: str, ids: list[str], predictions, golds) -> dict[str, float]:
    errors = _rating_errors(task, ids, predictions, golds)
    return {
        "mae": sum(abs(e) for e in errors) / len(errors),
        "rmse": math.sqrt(sum(e * e for e in errors) / len(errors)),
    }


_SCORER = None


def _rouge_scorer():
    global _SCORER
    if _SCORER is None:  # building the scorer loads the tokenizer once per process
        from rouge_score import rouge_scorer
        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    return _SCORER


def _rouge_per_example(ids: list[str], predictions, golds) -> list[tuple[float, float]]:
    """(ROUGE-1 F, ROUGE-L F) per example."""
    scorer = _rouge_scorer()
    out = []
    for i in ids:
        s = scorer.score(golds[i].strip(), predictions[i].strip())  # score(target, prediction)
        out.append((s["rouge1"].fmeasure, s["rougeL"].fmeasure))
    return out


def _generation_metrics(task: str, ids: list[str], predictions, golds) -> dict[str, float]:
    pairs = _rouge_per_example(ids, predictions, golds)
    return {"rouge1": sum(p[0] for p in pairs) / len(ids), "rougeL": sum(p[1] for p in pairs) / len(ids)}


def evaluate(task: str, predictions: Mapping[str, str], golds: Mapping[str, str], *,
             extract: bool = False, normalize: bool = False) -> dict[str, float]:
    """Score {id: text} predictions against {id: gold} under the official LaMP rules (see the module docstring)."""
    task = canonical_task(task)
    _check_ids(predictions, golds)
    for what, texts in (("prediction", predictions), ("gold", golds)):
        for i, text in texts.items():
            if not isinstance(text, str):
                raise DataError(f"evaluate: {what} for id {i!r}: expected str, got {type(text).__name__}")
    if extract or normalize:
        from minitagpr.data import answers  # owned by the rewards module; imported only when asked for
        predictions = {i: answers.extract_answer(t) if extract else t for i, t in predictions.items()}
        if normalize:
            predictions = {i: answers.normalize(task, t) for i, t in predictions.items()}
    ids = list(golds)
    kind = TASKS[task].kind
    if kind == "label":
        return _label_metrics(task, ids, predictions, golds)
    if kind == "rating":
        return _rating_metrics(task, ids, predictions, golds)
    return _generation_metrics(task, ids, predictions, golds)


# ----------------------------------------------------------------------------------------------------------------
# Per-example scores and paired comparisons (is method B better than A beyond noise?)

# The main metric of each kind of task, and whether higher is better.
MAIN_METRIC = {"label": ("accuracy", True), "rating": ("mae", False), "generation": ("rouge1", True)}


def main_metric(task: str) -> tuple[str, bool]:
    """(metric key, higher is better) of the task's main metric: accuracy, MAE or ROUGE-1."""
    return MAIN_METRIC[TASKS[canonical_task(task)].kind]


def per_example_scores(task: str, predictions: Mapping[str, str], golds: Mapping[str, str]) -> dict[str, float]:
    """{id: the example's share of the task's main metric}: 1/0 correct (label tasks), |prediction - gold| (rating
    tasks) or ROUGE-1 F (generation tasks). Their mean over the ids is exactly `evaluate`'s accuracy / mae / rouge1
    on the same predictions (scored as given: no extraction, no normalisation)."""
    task = canonical_task(task)
    _check_ids(predictions, golds)
    ids = list(golds)
    kind = TASKS[task].kind
    if kind == "label":
        gold_idx, pred_idx = _label_indices(task, ids, predictions, golds)
        values = [float(g == p) for g, p in zip(gold_idx, pred_idx)]
    elif kind == "rating":
        values = [abs(e) for e in _rating_errors(task, ids, predictions, golds)]
    else:
        values = [r1 for r1, _ in _rouge_per_example(ids, predictions, golds)]
    return dict(zip(ids, values))


def paired_bootstrap(a: Mapping[str, float], b: Mapping[str, float], clusters: Mapping[str, str], *,
                     samples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a over the examples, with a percentile interval from a paired cluster bootstrap.

    a, b: per-example scores of two methods on the same ids (`per_example_scores`); clusters: {id: cluster}, e.g.
    the user, since one user's examples are not independent. Each draw resamples whole clusters with replacement
    and takes the mean difference over the examples drawn. Returns (difference, low, high); seeded, so the same
    inputs give the same interval. With one cluster the interval is the point itself (nothing to resample)."""
    if set(a) != set(b) or not set(a) <= set(clusters):
        raise ValueError("paired_bootstrap: a and b must score the same ids, and every id needs a cluster")
    if not a:
        raise ValueError("paired_bootstrap: no examples")
    if samples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"paired_bootstrap: need samples >= 1 and 0 < level < 1, got {samples} and {level}")
    groups: dict[str, list[float]] = {}
    for i in a:
        groups.setdefault(clusters[i], []).append(b[i] - a[i])
    sums = [(sum(d), len(d)) for d in groups.values()]  # per cluster: (sum of differences, examples)
    point = sum(s for s, _ in sums) / sum(n for _, n in sums)
    rng = random.Random(seed)
    draws = []
    for _ in range(samples):
        picked = [sums[rng.randrange(len(sums))] for _ in range(len(sums))]
        draws.append(sum(s for s, _ in picked) / sum(n for _, n in picked))
    draws.sort()
    k = round((1.0 - level) / 2 * (samples - 1))  # draws left out below the interval, and as many above it
    return point, draws[k], draws[samples - 1 - k]


# ----------------------------------------------------------------------------------------------------------------
# Table-1-style row

# (task, metric key, column header) of every registered task, in registration order: the paper's Table 1, then our
# PGraphRAG tasks. A live view of the TaskSpecs' `columns`.
COLUMNS = TaskList(lambda spec: [(spec.name, key, head) for key, head in spec.columns])


def table_columns(tasks: Iterable[str]) -> list[tuple[str, str, str]]:
    """The (task, metric key, header) columns of `tasks` (canonical names), in table order. A name that is no
    registered task has no columns: DataError naming it, so that no table drops a task silently."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise DataError(f"table: no columns for task(s) {', '.join(map(repr, unknown))}: not a registered task "
                        f"name (registered: {', '.join(TASKS)})")
    return [(t, key, head) for t, key, head in COLUMNS if t in tasks]


def _fmt(value: float) -> str:
    text = f"{value:.3f}"
    return text[1:] if text.startswith("0.") else text  # the paper writes .717


def table_row(name: str, results: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown header + row with the Table-1 columns of the tasks in `results` ({task: evaluate(...)})."""
    cols = table_columns(results)
    missing = [f"{t} {k}" for t, k, _ in cols if k not in results[t]]
    if missing:
        raise DataError(f"table: no value for {', '.join(missing)} (a column of the table)")
    header = "| method | " + " | ".join(h for _, _, h in cols) + " |"
    rule = "|---|" + "---|" * len(cols)
    row = f"| {name} | " + " | ".join(_fmt(results[t][k]) for t, k, _ in cols) + " |"
    return "\n".join([header, rule, row])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minitagpr.metrics",
                                 description="Score LaMP-format prediction files against outputs files.")
    ap.add_argument("files", nargs="+", metavar="PRED OUTPUTS", help="pairs: predictions file, outputs file")
    ap.add_argument("--name", default="predictions", help="the method column of the row")
    ap.add_argument("--extract", action="store_true", help="score what follows the last </think>")
    ap.add_argument("--normalize", action="store_true", help="apply the project's answer normalisation")
    args = ap.parse_args(argv)
    if len(args.files) % 2:
        ap.error("expected pairs of files: PRED OUTPUTS [PRED OUTPUTS ...]")
    results: dict[str, dict[str, float]] = {}
    try:
        for pred_path, gold_path in zip(args.files[::2], args.files[1::2]):
            pred_task, preds = load_outputs(pred_path)
            task, _ = load_outputs(gold_path)
            if pred_task != task:
                raise DataError(f"{pred_path}: task {pred_task} but {gold_path} holds {task}")
            _, golds = load_outputs(gold_path, task)  # every gold must be an answer of the task (no "nan", no "7")
            if task in results:
                raise DataError(f"{gold_path}: task {task} given twice")
            try:
                results[task] = evaluate(task, preds, golds, extract=args.extract, normalize=args.normalize)
            except DataError as e:  # ids that do not match: name both files
                raise DataError(f"{pred_path} against {gold_path}: {str(e).removeprefix('evaluate: ')}") from None
            print(f"{task}: n={len(golds)} " + " ".join(f"{k}={v:.4f}" for k, v in results[task].items()),
                  file=sys.stderr)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table_row(args.name, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
