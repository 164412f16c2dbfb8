"""LaMP metrics: hand-computed values for every official rule, and errors for mismatched ids."""
import math
import subprocess
import sys

import pytest

from minitagpr.data.lamp import LAMP2_TAGS, DataError, write_outputs
from minitagpr.metrics import evaluate, main, table_row


# --- LaMP-1 / LaMP-2 ----------------------------------------------------------------------------------------------

LAMP1_GOLDS = {"a": "[1]", "b": "[1]", "c": "[2]", "d": "[2]", "e": "[1]"}
LAMP1_PREDS = {"a": "[1]", "b": " [2] ", "c": "[2]", "d": "2", "e": "[1]"}  # d is no label -> invalid class -1


def test_lamp1_accuracy_counts_invalid_labels_as_wrong():
    assert evaluate("LaMP-1", LAMP1_PREDS, LAMP1_GOLDS)["accuracy"] == pytest.approx(3 / 5)


def test_lamp1_macro_f1_treats_invalid_as_an_unaveraged_class():
    # [1]: TP=2 (a, e) FP=0 FN=1 (b) -> 4/5;  [2]: TP=1 (c) FP=1 (b) FN=1 (d, invalid) -> 2/4;  mean = 0.65
    assert evaluate("LaMP-1", LAMP1_PREDS, LAMP1_GOLDS)["f1_macro"] == pytest.approx(0.65)


def test_lamp1_positive_f1_is_the_f1_of_label_1():
    assert evaluate("LaMP-1", LAMP1_PREDS, LAMP1_GOLDS)["f1_positive"] == pytest.approx(0.8)


def test_lamp1_macro_f1_matches_sklearn_with_the_official_label_mapping():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    index = {"[1]": 0, "[2]": 1}
    g = [index[LAMP1_GOLDS[i]] for i in LAMP1_GOLDS]
    p = [index.get(LAMP1_PREDS[i].strip(), -1) for i in LAMP1_GOLDS]
    expected = sklearn_metrics.f1_score(g, p, labels=[0, 1], average="macro")
    assert evaluate("LaMP-1", LAMP1_PREDS, LAMP1_GOLDS)["f1_macro"] == pytest.approx(expected)


def test_lamp2_macro_f1_averages_over_all_fifteen_tags():
    golds = {"1": "comedy", "2": "comedy", "3": "action"}
    preds = {"1": "comedy", "2": "drama", "3": "comedy"}
    # comedy: TP=1 FP=1 FN=1 -> 1/2; action: FN=1 -> 0; the 13 unseen tags -> 0
    out = evaluate("LaMP_2", preds, golds)
    assert out == pytest.approx({"accuracy": 1 / 3, "f1_macro": 0.5 / 15})
    assert len(LAMP2_TAGS) == 15


def test_label_match_is_exact_after_stripping():
    out = evaluate("LaMP-2", {"1": "Comedy", "2": "  comedy\n"}, {"1": "comedy", "2": "comedy"})
    assert out["accuracy"] == 0.5


def test_a_gold_that_is_no_label_is_an_error():
    with pytest.raises(DataError, match=r"gold for id 'x': 'maybe' is not a LaMP-1 label"):
        evaluate("LaMP-1", {"x": "[1]"}, {"x": "maybe"})


# --- LaMP-3 -------------------------------------------------------------------------------------------------------

def test_lamp3_unparsable_ratings_become_the_farther_extreme():
    golds = {"a": "1", "b": "3", "c": "5", "d": "2"}
    preds = {"a": "2", "b": "three", "c": "4.5", "d": "nan"}
    # errors: 1; gold 3 is a tie -> 5 -> 2; 0.5; gold 2 -> 5 is farther -> 3
    out = evaluate("LaMP-3", preds, golds)
    assert out["mae"] == pytest.approx((1 + 2 + 0.5 + 3) / 4)
    assert out["rmse"] == pytest.approx(math.sqrt((1 + 4 + 0.25 + 9) / 4))


def test_lamp3_extremes_map_to_the_opposite_end():
    out = evaluate("LaMP-3", {"a": "", "b": "five stars"}, {"a": "1", "b": "5"})
    assert out["mae"] == pytest.approx(4.0)


def test_lamp3_out_of_range_numbers_are_not_clamped():
    assert evaluate("LaMP-3", {"a": " 7 "}, {"a": "5"})["mae"] == pytest.approx(2.0)


def test_pgraphrag_rating_is_scored_like_lamp3():
    preds, golds = {"a": "4", "b": "?"}, {"a": "5", "b": "4"}
    assert evaluate("PGraphRAG-rating", preds, golds) == evaluate("LaMP-3", preds, golds)


# --- generation ---------------------------------------------------------------------------------------------------

def test_rouge_is_the_mean_f_measure_without_stemming():
    golds = {"1": "The cat sat", "2": "running fast", "3": "alpha beta gamma delta"}
    preds = {"1": "the cat", "2": "run fast", "3": "delta gamma beta alpha"}
    # 1: P=1 R=2/3 -> 0.8 (LCS also 2);  2: no stemming, one of two -> 0.5;  3: all unigrams, LCS 1 -> 1.0 / 0.25
    out = evaluate("LaMP-5", preds, golds)
    assert out["rouge1"] == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    assert out["rougeL"] == pytest.approx((0.8 + 0.5 + 0.25) / 3)


def test_pgraphrag_title_is_scored_like_lamp5():
    preds, golds = {"1": "great soft towels"}, {"1": "Soft towels, great price"}
    assert evaluate("PGraphRAG-title", preds, golds) == evaluate("LaMP-5", preds, golds)


# --- ids ----------------------------------------------------------------------------------------------------------

def test_missing_and_extra_prediction_ids_are_named():
    with pytest.raises(DataError, match=r"1 gold id\(s\) missing from the predictions: 'b'; "
                                        r"1 prediction id\(s\) not among the golds: 'z'"):
        evaluate("LaMP-7", {"a": "x", "z": "y"}, {"a": "x", "b": "y"})


def test_empty_gold_set_is_an_error():
    with pytest.raises(DataError, match="no gold examples"):
        evaluate("LaMP-7", {}, {})


# --- the CLI ------------------------------------------------------------------------------------------------------

def test_table_row_uses_the_paper_layout():
    row = table_row("Base", {"LaMP-3": {"mae": 0.291, "rmse": 1.645}})
    assert row.splitlines() == ["| method | L3 MAE | L3 RMSE |", "|---|---|---|", "| Base | .291 | 1.645 |"]


def test_cli_scores_prediction_files_against_outputs(tmp_path, capsys):
    write_outputs(tmp_path / "p1.json", "LaMP-1", LAMP1_PREDS)
    write_outputs(tmp_path / "g1.json", "LaMP_1", LAMP1_GOLDS)
    write_outputs(tmp_path / "p3.json", "LaMP-3", {"a": "2"})
    write_outputs(tmp_path / "g3.json", "LaMP-3", {"a": "4"})
    args = [str(tmp_path / n) for n in ("p1.json", "g1.json", "p3.json", "g3.json")]
    assert main(args + ["--name", "mine"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "| mine | .600 | .800 | .650 | 2.000 | 2.000 |"


def test_cli_reports_mismatched_ids_without_a_traceback(tmp_path):
    write_outputs(tmp_path / "p.json", "LaMP-7", {"1": "x"})
    write_outputs(tmp_path / "g.json", "LaMP-7", {"2": "x"})
    proc = subprocess.run([sys.executable, "-m", "minitagpr.metrics", str(tmp_path / "p.json"),
                           str(tmp_path / "g.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {tmp_path / 'p.json'} against {tmp_path / 'g.json'}: prediction ids must "
                                  f"match") and "Traceback" not in proc.stderr  # both files named


def test_cli_rejects_a_prediction_file_of_another_task(tmp_path, capsys):
    write_outputs(tmp_path / "p.json", "LaMP-4", {"1": "x"})
    write_outputs(tmp_path / "g.json", "LaMP-5", {"1": "x"})
    assert main([str(tmp_path / "p.json"), str(tmp_path / "g.json")]) == 2
    assert "task LaMP-4 but" in capsys.readouterr().err


# --- answer extraction and normalisation (off by default) ---------------------------------------------------------

def test_extract_and_normalize_are_off_by_default_and_switchable():
    preds = {"a": "<think>\n<make_decision>two</make_decision>\n</think>\n\n2", "b": "[1]"}
    golds = {"a": "[2]", "b": "[1]"}
    assert evaluate("LaMP-1", preds, golds)["accuracy"] == 0.5  # official: the raw text is no label
    assert evaluate("LaMP-1", preds, golds, extract=True)["accuracy"] == 0.5  # "2" is still no label
    assert evaluate("LaMP-1", preds, golds, extract=True, normalize=True)["accuracy"] == 1.0


def test_metric_label_sets_agree_with_the_answers_module():
    from minitagpr.data import answers
    from minitagpr.data.lamp import TASKS
    for task, labels in answers.LABELS.items():
        assert list(TASKS[task].labels) == list(labels)
    assert {t for t, s in TASKS.items() if s.is_classification} == set(answers.CLASSIFICATION_TASKS)


# --- per-example scores and the paired cluster bootstrap -----------------------------------------------------------

@pytest.mark.parametrize("task, preds, golds", [
    ("LaMP-1", LAMP1_PREDS, LAMP1_GOLDS),
    ("LaMP-3", {"a": "4", "b": "x", "c": "2.5", "d": "nan"}, {"a": "5", "b": "3", "c": "1", "d": "2"}),
    ("LaMP-5", {"a": "deep nets for graphs", "b": "", "c": "a b c"}, {"a": "deep graph nets", "b": "x y", "c": "a b"}),
])
def test_per_example_scores_average_to_the_official_main_metric(task, preds, golds):
    from minitagpr.metrics import main_metric, per_example_scores
    key, _ = main_metric(task)
    per = per_example_scores(task, preds, golds)
    assert set(per) == set(golds)
    assert sum(per.values()) / len(per) == pytest.approx(evaluate(task, preds, golds)[key], abs=1e-12)


def test_per_example_scores_values_by_hand():
    from minitagpr.metrics import main_metric, per_example_scores
    assert per_example_scores("LaMP-1", LAMP1_PREDS, LAMP1_GOLDS) == {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0, "e": 1.0}
    # "x" is unparsable: gold 3 reads it as 5 (official tie rule) -> |5 - 3| = 2
    assert per_example_scores("LaMP-3", {"a": "4", "b": "x"}, {"a": "5", "b": "3"}) == {"a": 1.0, "b": 2.0}
    assert main_metric("LaMP-3") == ("mae", False) and main_metric("LaMP_4") == ("rouge1", True)
    with pytest.raises(DataError, match="missing"):
        per_example_scores("LaMP-1", {"a": "[1]"}, {"a": "[1]", "b": "[2]"})


def test_paired_bootstrap_point_interval_and_determinism():
    from minitagpr.metrics import paired_bootstrap
    ids = [f"q{i}" for i in range(40)]
    clusters = {i: f"u{n % 8}" for n, i in enumerate(ids)}  # 8 users, 5 examples each
    a = {i: 0.0 for i in ids}
    assert paired_bootstrap(a, dict(a), clusters) == (0.0, 0.0, 0.0)  # identical methods: no difference at all
    b = {i: (1.0 if clusters[i] in ("u0", "u1") else 0.0) for i in ids}  # B wins only for 2 of 8 users
    point, lo, hi = paired_bootstrap(a, b, clusters, samples=4000, seed=1)
    assert point == pytest.approx(0.25) and lo <= point <= hi
    assert lo < 0.1 and hi > 0.4  # resampling users: whether those 2 users are drawn dominates -> wide interval
    assert paired_bootstrap(a, b, clusters, samples=4000, seed=1) == (point, lo, hi)  # seeded
    per_example = {i: i for i in ids}  # every example its own cluster: the same gain looks far more certain
    _, lo_ex, hi_ex = paired_bootstrap(a, b, per_example, samples=4000, seed=1)
    assert hi_ex - lo_ex < hi - lo
    assert paired_bootstrap(a, b, {i: "u" for i in ids}) == (0.25, 0.25, 0.25)  # one cluster: nothing to resample
    with pytest.raises(ValueError, match="same ids"):
        paired_bootstrap(a, {"q0": 1.0}, clusters)


def _bootstrap_by_hand(samples: int, level: float, seed: int):
    """paired_bootstrap's interval on 30 examples, each its own cluster with a distinct difference 0..29, and the
    sorted bootstrap means drawn by hand with the same generator: ((lo, hi), sorted draws)."""
    import random
    from minitagpr.metrics import paired_bootstrap
    ids = [f"q{i}" for i in range(30)]
    a = {i: 0.0 for i in ids}
    b = {i: float(n) for n, i in enumerate(ids)}
    _, lo, hi = paired_bootstrap(a, b, {i: i for i in ids}, samples=samples, level=level, seed=seed)
    rng, draws = random.Random(seed), []
    for _ in range(samples):
        picked = [rng.randrange(30) for _ in range(30)]
        draws.append(sum(picked) / 30)
    return (lo, hi), sorted(draws)


def test_paired_bootstrap_interval_is_the_symmetric_percentile_range():
    from minitagpr.metrics import paired_bootstrap
    ids = [f"q{i}" for i in range(30)]
    a = {i: 0.0 for i in ids}
    b = {i: float(n) for n, i in enumerate(ids)}
    clusters = {i: i for i in ids}
    interval, draws = _bootstrap_by_hand(samples=101, level=0.9, seed=3)
    assert interval == (draws[5], draws[95])  # 5 of the 101 sorted means lie below, 5 above
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap(a, b, clusters, level=1.0)


# ---- pinned by mutation (each fails on a mutant the suite let through, 2026-11-27) ----------------------------------

def test_golds_are_stripped_like_predictions():
    assert evaluate("LaMP-1", {"1": "[1]"}, {"1": " [1]\n"})["accuracy"] == 1.0


def test_normalize_alone_does_not_extract_the_answer():
    """Two labels in the raw text are ambiguous; only extract=True reads the one after </think>."""
    preds, golds = {"1": "<think>[2]</think>[1]"}, {"1": "[1]"}
    assert evaluate("LaMP-1", preds, golds, normalize=True)["accuracy"] == 0.0
    assert evaluate("LaMP-1", preds, golds, normalize=True, extract=True)["accuracy"] == 1.0


def test_per_example_generation_scores_are_rouge_1_not_rouge_l():
    from minitagpr.metrics import per_example_scores
    assert per_example_scores("LaMP-4", {"1": "beta alpha"}, {"1": "alpha beta"}) == {"1": 1.0}  # ROUGE-L: 0.5


def test_paired_bootstrap_pools_examples_across_clusters_of_unequal_size():
    """Cluster A holds four differences of 1, clusters B and C one 0 each: the point is 4/6 (the plain mean over
    examples), not 1/3 (a mean of cluster means). A draw with k copies of A gives 4k / (3k + 3): 0, 2/3, 8/9 or 1;
    its 40th-60th percentiles both fall on k = 1 (P(k = 0) = 8/27, P(k <= 1) = 20/27)."""
    from minitagpr.metrics import paired_bootstrap
    ids = ["a1", "a2", "a3", "a4", "b", "c"]
    a = dict.fromkeys(ids, 0.0)
    b = {i: 1.0 if i.startswith("a") else 0.0 for i in ids}
    clusters = {i: i[0] for i in ids}
    point, low, high = paired_bootstrap(a, b, clusters, samples=4000, level=0.2, seed=1)
    assert point == pytest.approx(4 / 6) and low == pytest.approx(2 / 3) and high == pytest.approx(2 / 3)


# ---- pinned by mutation (each fails on a mutant the suite let through, 2026-11-29) -----------------------------------

def test_parse_rating_tie_at_gold_3_reads_an_unparsable_answer_as_5():
    """lamp-format.md: an unparsable rating becomes whichever of 1 and 5 lies farther from the gold; at gold 3 both
    lie 2 away and the official rule (|1 - y| > |5 - y| -> 1, else 5) picks 5. MAE cannot see the tie, so pin the
    value itself; gold 2 -> 5 and gold 4 -> 1 are the plain cases."""
    from minitagpr.metrics import parse_rating
    assert parse_rating("three", 3.0) == 5.0
    assert parse_rating("", 2.0) == 5.0 and parse_rating("", 4.0) == 1.0
    assert parse_rating("4.5", 3.0) == 4.5


def test_paired_bootstrap_percentile_index_is_nearest_rank_over_samples_minus_one():
    """The interval's ends are the sorted draws at k = round((1 - level) / 2 * (samples - 1)) and samples - 1 - k,
    the nearest ranks over the draws' index range 0 .. samples - 1. With 31 draws and level 0.9: 0.05 * 30 = 1.5
    (1.4999... in floats) -> k = 1, so draws[1] and draws[29]; indexing over `samples` instead (0.05 * 31 = 1.55
    -> 2) gives draws[2] and draws[28]."""
    interval, draws = _bootstrap_by_hand(samples=31, level=0.9, seed=7)
    assert len(set(draws)) > 25  # distinct neighbours, so an index off by one shows
    assert interval == (draws[1], draws[29])


def test_a_prediction_that_is_no_string_is_a_data_error():
    """evaluate() checks the prediction values' type up front and names the id, rather than failing deep inside
    with an AttributeError (an int rating read from a hand-made JSON file, a None for a missing answer)."""
    with pytest.raises(DataError, match=r"prediction for id 'a': expected str, got int"):
        evaluate("LaMP-3", {"a": 4}, {"a": "4"})
    with pytest.raises(DataError, match=r"prediction for id 'b': expected str, got NoneType"):
        evaluate("LaMP-1", {"a": "[1]", "b": None}, {"a": "[1]", "b": "[2]"})
    # golds too (a caller of the API with golds of its own; load_outputs checks a file's): was an AttributeError
    with pytest.raises(DataError, match=r"gold for id 'a': expected str, got int"):
        evaluate("LaMP-1", {"a": "[1]"}, {"a": 1})
    with pytest.raises(DataError, match=r"gold for id 'b': expected str, got NoneType"):
        evaluate("LaMP-4", {"a": "x", "b": "y"}, {"a": "x", "b": None})
