"""Pure functions of the recipes pinned by a mutation sweep (2026-11-27): each test fails on a mutant that the
recipe tests let through. No model is trained here; recipes are loaded as modules."""
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from lamp_fixtures import make_examples
from recipe_modules import load_recipe
from minitagpr.data import lamp
from minitagpr.data.preferences import PreferenceDataError, PreferencePair, Response, write_pairs

prmu = load_recipe("train_prmu")
ev = load_recipe("evaluate", "recipe_evaluate")
guided = load_recipe("guided_rl")

PROMPT = [{"role": "user", "content": "pick a tag"}]


def _pair(i, example_id=None, **kw):
    return PreferencePair(id=f"p{i}", set="PQP", source="synthetic", user="u1", task="LaMP-2",
                          example_id=example_id or f"q{i}", prompt=PROMPT,
                          chosen=Response("c", "", "comedy"), rejected=Response("d", "", "action"), **kw)


def test_held_out_buckets_count_accuracy_and_loss_per_set(monkeypatch):
    from minitagpr import distributed as D
    E = prmu.EncodedPair
    held = [E([1], [2], 0, "PRP", False), E([2], [2], 0, "PQP", True), E([3], [2], 0, "PQP", False),
            E([4], [2], 0, "PQP", False), E([5], [2], 0, "style", False)]  # distinct, so held.index finds each
    # right, right, wrong, a tie (wrong), right
    margins = {0: (1.0, 0.0), 1: (1.0, 0.0), 2: (0.0, 1.0), 3: (0.5, 0.5), 4: (2.0, 0.0)}

    def score_pairs(model, pairs, rows, pad_id, device):
        idx = [held.index(p) for p in pairs]
        return (torch.tensor([margins[i][0] for i in idx]), torch.tensor([margins[i][1] for i in idx]), None)
    monkeypatch.setattr(prmu, "score_pairs", score_pairs)
    D.init_distributed()
    try:
        out = prmu.evaluate(torch.nn.Linear(1, 1), held, SimpleNamespace(eval_batch=2), 0,
                            SimpleNamespace(rank=0, world_size=1, device="cpu"))
    finally:
        D.destroy_distributed()
    loss = lambda d: -torch.nn.functional.logsigmoid(torch.tensor(d)).item()  # noqa: E731
    assert (out["PRP_acc"], out["PRP_pairs"], out["PRP_loss"]) == pytest.approx((1.0, 1, loss(1.0)))
    assert (out["PQP_acc"], out["PQP_pairs"]) == pytest.approx((1 / 3, 3))
    assert out["PQP_loss"] == pytest.approx((loss(1.0) + loss(-1.0) + loss(0.0)) / 3)
    assert (out["user_dependent_acc"], out["user_dependent_pairs"]) == (1.0, 1)
    assert (out["style_acc"], out["style_pairs"], out["style_loss"]) == pytest.approx((1.0, 1, loss(2.0)))
    assert (out["all_acc"], out["all_pairs"]) == (0.6, 5)


def test_encode_pair_keeps_the_set_the_user_row_and_the_user_dependent_flag(monkeypatch):
    from minitagpr.model.reward import UserVocab
    monkeypatch.setattr(prmu, "encode_reward_input", lambda tok, prompt, response: [ord(c) for c in response])
    users = UserVocab(["u0", "u1"])
    e = prmu.encode_pair(_pair(0, user_dependent=True), None, users, 64)
    f = prmu.encode_pair(_pair(1), None, users, 64)
    assert (e.set, e.user_row, e.user_dependent, e.chosen, e.rejected) == ("PQP", 2, True, [ord("c")], [ord("d")])
    assert f.user_dependent is False  # the held-out user-dependent bucket counts only flagged pairs
    assert not e.cut
    long = prmu.encode_pair(dataclasses.replace(_pair(0), chosen=Response("abcdef", "", "comedy")), None, users, 4)
    assert long.chosen == [ord(c) for c in "cdef"] and long.cut  # the oldest tokens go, and the pair says so


def test_a_held_out_file_sharing_only_a_query_with_training_is_refused(tmp_path):
    write_pairs(tmp_path / "train.jsonl", [_pair(0), _pair(1)])
    write_pairs(tmp_path / "held.jsonl", [_pair(9, example_id="q1")])  # a new id, but training's query q1
    cfg = SimpleNamespace(demo_world="", pairs=[str(tmp_path / "train.jsonl")],
                          heldout_pairs=[str(tmp_path / "held.jsonl")], heldout_frac=0.3, seed=0)
    with pytest.raises(PreferenceDataError, match="share an id or a query"):
        prmu.load_pair_sets(cfg)


def test_the_held_out_split_follows_the_seed(tmp_path):
    write_pairs(tmp_path / "p.jsonl", [_pair(i) for i in range(20)])
    held = {}
    for seed in (0, 1):
        cfg = SimpleNamespace(demo_world="", pairs=[str(tmp_path / "p.jsonl")], heldout_pairs=[],
                              heldout_frac=0.3, seed=seed)
        held[seed] = {p.id for p in prmu.load_pair_sets(cfg)[1]}
    assert held[0] != held[1]


def test_the_data_fingerprint_covers_the_user_names():
    from minitagpr.model.reward import UserVocab
    train = [prmu.EncodedPair([1, 2], [3], 1, "PQP", False)]
    assert prmu.data_fingerprint(train, UserVocab(["alice"])) != prmu.data_fingerprint(train, UserVocab(["bob"]))


def test_checkpoint_tables_apply_normalize_and_write_what_they_scored(tmp_path, monkeypatch):
    examples, golds = make_examples("LaMP-3", n=2, n_items=3, seed=1)
    questions, outputs = lamp.split_files(tmp_path / "lamp", "LaMP-3", "user", "dev")
    lamp.write_questions(questions, examples)
    lamp.write_outputs(outputs, "LaMP-3", golds)
    monkeypatch.setattr(ev, "make_engine", lambda *a, **kw: (None, None))
    monkeypatch.setattr(ev, "generate_answers", lambda engine, tok, data, **kw: [
        {"id": ex.id, "text": f"<think>c</think>**{golds[ex.id]}** stars", "finish_reason": "stop",
         "profile_items": 1, "prompt_tokens": 1, "completion_tokens": 1} for ex in data.examples])
    table = ev.evaluate_checkpoints({"m": "unused"}, ["LaMP-3"], data=tmp_path / "lamp", normalize=True,
                                    out_dir=tmp_path / "out", log=lambda *a: None)
    assert table.rows["m"]["LaMP-3"]["mae"] == 0.0
    _, written = lamp.load_outputs(ev.predictions_file(tmp_path / "out", "m", "LaMP-3"))
    assert written == {i: golds[i] for i in golds}  # the predictions file re-scores to the table


def test_small_recipe_helpers():
    assert ev._fmt(0.717) == ".717" and ev._fmt(2.5) == "2.500" and ev._fmt(None) == "—"
    with pytest.raises(Exception, match="k must be >= 0"):
        ev.EvalConfig(checkpoints=["t=c"], tasks=["LaMP-3"], k=-1)


def test_the_first_and_last_windows_round_the_share(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text("".join(json.dumps({"step": s, "r": float(s)}) + "\n" for s in range(8)))
    assert guided.first_last_share(log, ["r"], 0.2)["r"] == (0.5, 6.5)  # round(1.6) = 2 rows a window


def test_the_demo_reports_trend_lines_with_and_without_the_correlation_log(tmp_path):
    log = tmp_path / "m.jsonl"
    rows = [{"step": s + 1, "tag_pass_rate": 0.5 + s / 20, "reward_mean/LaMP-1": 0.1 * s, "responses/LaMP-1": 5,
             "group/adv_corr/tag": 0.9 - s / 10, "group/adv_corr/r_v": 0.4} for s in range(5)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = ["tag_pass_rate", "reward_mean/LaMP-1", "group/adv_corr/tag", "group/adv_corr/r_v",
            "group/adv_corr/prmu"]
    lines = guided.trend_lines(guided.first_last_share(log, keys, 0.2), ["LaMP-1"])
    assert lines[0] == f"{'tag_pass_rate':18s} 0.500 -> 0.700"
    assert lines[1].startswith(f"{'reward, balanced':18s} 0.000 -> 0.400")
    # a term the log lacks (prmu here) is left out, not printed as nan
    assert lines[2] == "advantage vs term  tag 0.90 -> 0.50; r_v 0.40 -> 0.40"
    assert "within-group correlation" in lines[3] and len(lines) == 4
    # a log from before the correlations were logged: no such line, and no explanation of it
    old = guided.trend_lines(guided.first_last_share(log, keys[:2], 0.2), ["LaMP-1"])
    assert len(old) == 3 and not any("advantage vs term" in line or "correlation" in line for line in old)
    # a task the last window never sampled (a short run) reads n/a, not nan
    rows[0]["r_v_mean/LaMP-1"] = 0.2
    rows[-1] = {k: v for k, v in rows[-1].items() if not k.endswith("LaMP-1")} | {"r_v_mean/LaMP-2": 0.3}
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    short = guided.trend_lines(guided.first_last_share(log, ["r_v_mean/LaMP-1", "reward_mean/LaMP-1"], 0.2),
                               ["LaMP-1"])
    assert short[0] == f"{'r_v_mean/LaMP-1':18s} 0.200 -> n/a"
    assert short[1].startswith(f"{'reward, balanced':18s} n/a -> n/a")  # no task has both windows


def test_stage_config_takes_the_users_settings_over_the_yaml_and_refuses_what_the_demo_sets(tmp_path):
    prmu = load_recipe("train_prmu")
    yaml_file = guided.RECIPES / "configs" / "prmu_demo.yaml"
    demo = {"demo_world": str(tmp_path / "world"), "init": str(tmp_path / "sft" / "hf"), "new_head": True,
            "out_dir": str(tmp_path / "prmu"), "seed": 3}
    cfg = guided.stage_config(prmu.PrmuConfig, yaml_file, "prmu_settings", "max_steps=7  'table_lr=0.5'", demo)
    assert (cfg.max_steps, cfg.table_lr, cfg.seed, cfg.heldout_frac) == (7, 0.5, 3, 0.3)  # heldout_frac: the YAML's
    assert guided.stage_config(prmu.PrmuConfig, yaml_file, "prmu_settings", "", demo).max_steps == 480
    for text, message in (("max_steps", r"prmu_settings: 'max_steps' is not of the form key=value"),
                          ("=3", r"prmu_settings: '=3' is not of the form key=value"),
                          ("seed=1", r"prmu_settings: seed is set by the demo itself"),
                          ("out_dir=/x", r"prmu_settings: out_dir is set by the demo itself"),
                          ("lr=1 lr=2", r"prmu_settings: lr is given twice"),
                          ("max_stepz=3", r"prmu_settings: .*max_stepz"),
                          ("max_steps=many", r"prmu_settings: .*max_steps"),
                          ("max_steps='3", r"prmu_settings: .*No closing quotation")):
        with pytest.raises(guided.ConfigError, match=message):
            guided.stage_config(prmu.PrmuConfig, yaml_file, "prmu_settings", text, demo)
    sft = load_recipe("sft")
    for key, cls, yaml in (("sft_settings", sft.SftConfig, None), ("prmu_settings", prmu.PrmuConfig, yaml_file)):
        for owned in guided.DEMO_OWNED[key]:
            with pytest.raises(guided.ConfigError, match=rf"{key}: {owned} is set by the demo itself"):
                guided.stage_config(cls, yaml, key, f"{owned}=x", {"out_dir": str(tmp_path)})
    # a batch that does not split over the ranks is named by the setting to change (checked before a stage trains)
    cfg = guided.stage_config(prmu.PrmuConfig, yaml_file, "prmu_settings", "micro_batch=8", demo)
    with pytest.raises(guided.ConfigError, match=r"prmu_settings: global_batch=8 must split into micro-batches of 8 "
                                                 r"pairs on each of 2 ranks"):
        guided.named_check("prmu_settings", lambda: prmu.check_batch_split(cfg, 2))()
    cfg = guided.stage_config(sft.SftConfig, None, "sft_settings", "global_batch=3", {"out_dir": str(tmp_path)})
    with pytest.raises(guided.ConfigError, match=r"sft_settings: global_batch=3 must be a multiple of micro_batch"):
        guided.named_check("sft_settings", lambda: sft.accumulation_steps(cfg, 2))()


@pytest.mark.parametrize("argv, message", [
    (["policy=/my/policy", "data_root=/my/data"], r"policy=, data_root= given, but the demo \(demo=true, the default\) "
                                                  r"builds its own"),  # were silently left unused: exit 0
    (["exploratory_steps=0"], r"exploratory_steps=0: Stage 3's RL steps must be >= 1"),  # was: after guided RL
    (["eval_examples=-5"], r"eval_examples=-5: examples per task must be >= 0"),  # was: 55 of 60 scored
    (["rl_seed=-2"], r"rl_seed=-2: rl_seed reseeds the demo's RL stages"),
    (["part=dev"], r"part=dev: the demo's table scores the dev questions"),  # RL trained on the table's questions
    (["workdir="], r"workdir= is empty"),  # six stage folders in the current one
])
def test_main_refuses_settings_the_demo_would_ignore_before_anything_runs(argv, message):
    with pytest.raises(guided.ConfigError, match=message):
        guided.main(argv)


def test_arguments_are_checked_against_the_defaults_they_run_with():
    # demo=false runs over the paper's defaults (128 prompts per step): 32 mini-batches split them; the demo's 16 not
    cfg = guided.parse_config(["demo=false", "num_minibatches=32", "policy=/p", "data_root=/d", "prmu=/r"])
    assert (type(cfg).__name__, cfg.num_minibatches, cfg.prompts_per_step) == ("GuidedStageConfig", 32, 128)
    with pytest.raises(guided.ConfigError, match=r"prompts_per_step=16 is not a multiple of num_minibatches=32"):
        guided.parse_config(["num_minibatches=32"])
    with pytest.raises(guided.ConfigError, match=r"prompts_per_step=96 is not a multiple of num_minibatches=64"):
        guided.parse_config(["demo=false", "prompts_per_step=96", "num_minibatches=64"])  # refused over both
    assert type(guided.parse_config(["k=2"])).__name__ == "GuidedConfig"


def test_the_demo_table_is_always_decoded_by_the_built_in_engine(monkeypatch, tmp_path):
    """engine=auto would pick vLLM on a GPU box that has it: another table than the CPU's (bf16 greedy ties), and
    vLLM engines built on some ranks only when the ranks hold unequal numbers of checkpoints."""
    from minitagpr import distributed as D
    guided = load_recipe("guided_rl")
    evaluate = load_recipe("evaluate")
    seen = {}

    def fake_evaluate(mine, tasks, **kw):
        seen.update(kw)
        return evaluate.EvalTable()

    monkeypatch.setattr(evaluate, "evaluate_checkpoints", fake_evaluate)
    monkeypatch.setattr(guided, "recipe", lambda name: evaluate)
    monkeypatch.setattr(guided, "add_rule_rows", lambda table, world, cfg: None)
    monkeypatch.setattr(D, "world", lambda: SimpleNamespace(world_size=1, rank=0, is_main=False))
    guided.evaluate_table({"SFT": tmp_path}, tmp_path, guided.GuidedConfig(), tmp_path)
    assert seen["engine"] == "builtin"
