"""The demo world: seeded LaMP-schema files that the real readers load, planted profile regularities with a clear
margin, user-dependent recurring queries, a tokenizer with the Qwen3 markers, and tagged SFT chains."""
import dataclasses
import json
import random
import re

import pytest

from minitagpr.data import demo_world as dw
from minitagpr.data.lamp import LAMP2_TAGS, LampExample, load_outputs, load_questions, query_text, split_files
from minitagpr.data.prompts import build_messages
from minitagpr.data.retrieval import get_retriever
from minitagpr.tokenizer import Tokenizer, assistant_target

SMALL = dict(num_users=8, dev_users=3, per_user=3, vocab_size=1000)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The default-size world, as the demo pipeline builds it."""
    return dw.build(tmp_path_factory.mktemp("demo"), seed=0)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return dw.build(tmp_path_factory.mktemp("small"), seed=3, **SMALL)


def _sft(world):
    return [json.loads(line) for line in world.sft_chains.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ files and layout
def test_same_seed_writes_identical_files(small, tmp_path):
    again = dw.build(tmp_path / "again", seed=3, **SMALL)
    for a, b in zip(small.paths(), again.paths(), strict=True):
        assert a.relative_to(small.root) == b.relative_to(again.root)
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs between two builds with seed 3"
    assert small.user_dependent_groups == again.user_dependent_groups
    assert small.reasoning_styles == again.reasoning_styles


def test_another_seed_gives_other_data(small, tmp_path):
    other = dw.build(tmp_path / "other", seed=4, **SMALL)
    assert small.questions["LaMP-2"]["train"].read_bytes() != other.questions["LaMP-2"]["train"].read_bytes()


def test_files_sit_in_the_lamp_layout_and_load_with_the_real_readers(world):
    for task in dw.TASK_NAMES:
        for split in ("train", "dev"):
            q_path, o_path = split_files(world.root, task, "user", split)
            assert world.task_files(task, split) == (q_path, o_path)
            examples = load_questions(q_path, task.replace("-", "_"))
            name, golds = load_outputs(o_path)
            assert name == task and {e.id for e in examples} == set(golds)
            assert json.loads(o_path.read_text())["task"] == task.replace("-", "_")  # the benchmark's spelling
            for e in examples:
                assert all(item["id"].startswith(e.id) for item in e.profile)
                assert e.user_id is not None and query_text(e)
    assert "LaMP_2/new/train" in str(world.questions["LaMP-2"]["train"])


def test_default_sizes_fit_the_cpu_demo(world):
    for task in dw.TASK_NAMES:
        assert 100 <= len(world.examples(task, "train")) <= 400
        assert 50 <= len(world.examples(task, "dev")) <= 100
    train_users = {e.user_id for e in world.examples("LaMP-1", "train")}
    dev_users = {e.user_id for e in world.examples("LaMP-1", "dev")}
    assert not train_users & dev_users  # user split: dev users are unseen in training
    assert world.stats["prompt_tokens_max"] <= world.params["max_prompt_tokens"]


def test_inputs_follow_the_benchmark_structure(world):
    for task, pattern in [
        ("LaMP-1", r'^For an author who has written the paper with the title ".+", which reference is related\? '
                   r'Just answer with \[1\] or \[2\] without explanation\. \[1\]: ".+" \[2\]: ".+"$'),
        ("LaMP-2", r"^Which tag does this movie relate to among the following tags\? .* tags: \[" +
                   re.escape(", ".join(LAMP2_TAGS)) + r"\] description: .+$"),
        ("LaMP-3", r"^What is the score of the following review on a scale of 1 to 5\? .* review: .+$"),
        ("LaMP-4", r"^Generate a headline for the following article: .+$"),
        ("LaMP-5", r"^Generate a title for the following abstract of a paper: .+$"),
        ("LaMP-7", r"^Paraphrase the following tweet without any explanation before or after it: [^:]+$"),
    ]:
        for e in world.examples(task, "dev"):
            assert re.match(pattern, e.input), (task, e.input)


def test_golds_are_valid_answers(world):
    for split in ("train", "dev"):
        assert set(world.golds("LaMP-1", split).values()) == {"[1]", "[2]"}
        assert set(world.golds("LaMP-2", split).values()) <= set(LAMP2_TAGS)
        assert set(world.golds("LaMP-3", split).values()) <= {"1", "2", "3", "4", "5"}


def test_test_split_has_questions_only(tmp_path):
    w = dw.build(tmp_path, seed=1, **{**SMALL, "num_users": 10, "test_users": 2})
    for task in dw.TASK_NAMES:
        assert "test" in w.questions[task] and "test" not in w.outputs[task]
        with pytest.raises(dw.DataError, match=rf"no {task} 'test' split with golds"):
            w.task_files(task, "test")
        assert len(load_questions(w.questions[task]["test"], task)) == 2 * SMALL["per_user"]


# ------------------------------------------------------------------------------------------------------- idempotency
def test_build_reuses_a_matching_world_and_rebuilds_a_different_one(small):
    stamp = {p: p.stat().st_mtime_ns for p in small.paths()}
    same = dw.build(small.root, seed=3, **SMALL)
    assert {p: p.stat().st_mtime_ns for p in same.paths()} == stamp  # nothing rewritten
    changed = dw.build(small.root, seed=3, **{**SMALL, "per_user": 2})
    assert changed.params["per_user"] == 2
    assert len(changed.examples("LaMP-3", "train")) == 2 * (SMALL["num_users"] - SMALL["dev_users"])
    dw.build(small.root, seed=3, **SMALL)  # restore for the other tests of this module


def test_missing_manifest_or_file_means_rebuild(tmp_path):
    w = dw.build(tmp_path, seed=5, **SMALL)
    w.sft_chains.unlink()
    assert dw.build(tmp_path, seed=5, **SMALL).sft_chains.exists()
    (tmp_path / dw.MANIFEST).write_text("{not json")
    assert dw.build(tmp_path, seed=5, **SMALL).params["seed"] == 5


def test_a_rebuild_killed_halfway_is_not_taken_for_the_world_it_replaced(tmp_path, monkeypatch):
    """A rebuild with other parameters overwrites files one by one: the old world.json must not survive it, or a
    later build with the old parameters reuses a mixture of two worlds."""
    dw.build(tmp_path / "w", seed=0, **SMALL)
    calls, write_outputs = [], dw.write_outputs

    def killed_at_the_fourth(*args, **kwargs):
        calls.append(args)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return write_outputs(*args, **kwargs)

    monkeypatch.setattr(dw, "write_outputs", killed_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        dw.build(tmp_path / "w", seed=1, **SMALL)
    monkeypatch.setattr(dw, "write_outputs", write_outputs)
    again, fresh = dw.build(tmp_path / "w", seed=0, **SMALL), dw.build(tmp_path / "fresh", seed=0, **SMALL)
    for path in fresh.paths():
        assert (again.root / path.relative_to(fresh.root)).read_bytes() == path.read_bytes(), path.name


def test_the_fingerprint_follows_every_tasks_prompt_layout(monkeypatch):
    """SFT records embed every task's rendered prompts: a changed heading or item layout of any task is a new world."""
    from minitagpr.data import lamp
    before = dw._prompt_fingerprint("brief")
    for task, change in [("LaMP-1", dict(history_name="other papers")), ("LaMP-5", dict(item_layout=(
            ("title", "title", True),)))]:
        with monkeypatch.context() as m:
            m.setitem(lamp.TASKS, task, dataclasses.replace(lamp.TASKS[task], **change))
            assert dw._prompt_fingerprint("brief") != before, task
    assert dw._prompt_fingerprint("brief") == before  # and nothing else moves it


@pytest.mark.parametrize("bad, message", [
    (dict(num_users=10, test_users=-1), r"test_users >= 0"),
    (dict(num_users=4, dev_users=3), r"at least 2 train and 2 dev users"),
    (dict(per_user=0), r"1 <= per_user <= 99"),
    (dict(shared_per_user=5, per_user=3), r"shared_per_user <= per_user"),
    (dict(profile_size=(8, 4)), r"profile_size\[0\] <= profile_size\[1\]"),
])
def test_bad_sizes_fail_with_a_message_naming_them(tmp_path, bad, message):
    with pytest.raises(dw.DataError, match=message):
        dw.build(tmp_path, **{**SMALL, **bad})
    assert not (tmp_path / dw.MANIFEST).exists()


def test_fingerprint_follows_the_parameters(small):
    assert small.fingerprint == dw.DemoWorld.load(small.root).fingerprint
    assert dataclasses.replace(small, params={**small.params, "seed": 9}).fingerprint != small.fingerprint


def test_load_without_a_world_names_the_folder(tmp_path):
    with pytest.raises(dw.DataError, match=r"world\.json: no demo world here"):
        dw.DemoWorld.load(tmp_path)


# -------------------------------------------------------------------------------------------- planted regularities
@pytest.mark.parametrize("split", ["train", "dev"])
def test_profile_aware_heuristic_beats_every_profile_blind_answer(world, split):
    rows = {r.task: r for r in dw.margins(world, split)}
    assert rows["LaMP-1"].margin >= 0.15 and rows["LaMP-2"].margin >= 0.15  # accuracy points
    assert rows["LaMP-3"].metric == "mae" and rows["LaMP-3"].margin >= 0.3  # MAE lower by 0.3
    for task in ("LaMP-4", "LaMP-5", "LaMP-7"):
        assert rows[task].margin > 0.05, rows[task]  # ROUGE-1: style words come from the profile only


def test_cli_prints_the_margin_table(world, capsys):
    assert dw.main([str(world.root)]) == 0
    out = capsys.readouterr().out
    for task in dw.TASK_NAMES:
        assert re.search(rf"\| {task} \| dev \| \w+ \| [0-9.]+ \| [0-9.]+ \|", out)


def test_user_dependent_groups_share_the_input_but_not_the_answer(world):
    examples = {e.id: e for t in dw.TASK_NAMES for s in ("train", "dev") for e in world.examples(t, s)}
    golds = {i: (s, g) for t in dw.TASK_NAMES for s in ("train", "dev") for i, g in world.golds(t, s).items()}
    by_task = {}
    for group in world.user_dependent_groups:
        task, split = examples[group[0]].task, golds[group[0]][0]
        assert len({examples[i].input for i in group}) == 1
        assert len({examples[i].user_id for i in group}) == len(group)
        assert len({golds[i][1] for i in group}) == len(group)
        by_task.setdefault(task, set()).add(split)
    assert all(by_task.get(t) == {"train", "dev"} for t in dw.TASK_NAMES), by_task
    assert len(world.user_dependent_ids) >= 2 * len(world.user_dependent_groups)


def test_reasoning_styles_split_every_split_in_half_independently_of_the_tastes(world):
    users = {s: sorted({e.user_id for t in dw.TASK_NAMES for e in world.examples(t, s)}) for s in ("train", "dev")}
    assert set(world.reasoning_styles) == set(users["train"]) | set(users["dev"])
    for split, ids in users.items():
        styles = [world.reasoning_styles[u] for u in ids]
        assert styles.count("concise") == len(ids) // 2 and set(styles) <= set(dw.REASONING_STYLES)
    # drawn on its own stream: not a function of any taste the profile shows (each is dealt by the user's index
    # modulo a small number), i.e. for every such taste some value has users of both styles
    _, users_by_split = dw._lexicon_and_users(world.params)
    for taste in ("topic", "usual", "headline_style", "title_style", "tweet_style", "voice", "interj"):
        by_value = {}
        for u in users_by_split["train"]:
            by_value.setdefault(getattr(u, taste), set()).add(world.reasoning_styles[u.id])
        assert any(len(styles) == 2 for styles in by_value.values()), (taste, by_value)


# ---------------------------------------------------------------------------------------------------------- chains
def test_sft_records_follow_the_contract(world):
    records = _sft(world)
    tok = Tokenizer.from_dir(world.tokenizer_dir)
    assert len(records) == sum(len(world.examples(t, "train")) for t in dw.TASK_NAMES)
    examples = {e.id: e for t in dw.TASK_NAMES for e in world.examples(t, "train")}
    recency = get_retriever("recency")
    for r in records[::37]:
        assert set(r) == {"id", "user", "task", "messages", "chain", "answer"}
        ex = examples[r["id"]]
        assert r["user"] == ex.user_id and r["task"] == ex.task
        assert r["answer"] == world.golds(r["task"], "train")[r["id"]]
        assert r["messages"] == build_messages(ex, recency.select(ex, world.params["k"]),
                                                 style=world.params["prompt_style"])  # nothing trimmed
        ids, mask = tok.encode_prompt_and_target(r["messages"], r["chain"], r["answer"])
        assert tok.decode([i for i, m in zip(ids, mask) if m]).endswith(r["answer"] + "<|im_end|>")


def test_every_chain_passes_the_tag_and_format_rewards(world):
    from minitagpr.rewards import check_tags, format_reward, tag_reward
    for r in _sft(world):
        assert tag_reward(r["chain"]) == 0.0, (r["id"], check_tags(r["chain"]), r["chain"])
        assert format_reward(assistant_target(r["chain"], r["answer"])) == 1.0, r["id"]
        segments = re.findall(r"<(\w+)>(.*?)</\1>", r["chain"])
        assert 3 <= len(segments) <= 6 and len(r["chain"].splitlines()) == len(segments)
        assert all(len(text.split()) <= 30 for _, text in segments)


@pytest.mark.parametrize("task", dw.TASK_NAMES)
def test_make_chain_argues_for_any_answer_with_or_without_a_profile(world, task):
    from minitagpr.rewards import tag_reward
    ex = world.examples(task, "dev")[0]
    items = get_retriever("recency").select(ex, 4)
    other = {"LaMP-1": "[2]", "LaMP-2": "dystopia", "LaMP-3": "1"}.get(task, "some other text entirely")
    for profile in (items, []):
        chain = dw.make_chain(task, ex, profile, other, random.Random(0))
        assert tag_reward(chain) == 0.0, chain
        if task in ("LaMP-1", "LaMP-2", "LaMP-3"):
            assert other in chain  # the decision names the answer it was given
    assert dw.make_chain(task, ex, items, other, random.Random(7)) == dw.make_chain(task, ex, items, other,
                                                                                     random.Random(7))


@pytest.mark.parametrize("task", dw.TASK_NAMES)
def test_make_chain_with_a_fixed_number_of_segments(world, task):
    ex = world.examples(task, "train")[0]
    items = get_retriever("recency").select(ex, 4)
    n = lambda chain: len(re.findall(r"</\w+>", chain))  # noqa: E731
    for profile in (items, []):
        assert n(dw.make_chain(task, ex, profile, "x", random.Random(0), segments=3)) == 3
        most = n(dw.make_chain(task, ex, profile, "x", random.Random(0), segments=dw.REASONING_STYLES["thorough"]))
        assert most == (5 if not profile and task in ("LaMP-4", "LaMP-5", "LaMP-7") else 6)  # or all it offers
        assert n(dw.make_chain(task, ex, profile, "x", random.Random(0), segments=99)) >= most
    with pytest.raises(ValueError, match="segments=2, but every chain has the 3 required ones"):
        dw.make_chain(task, ex, items, "x", random.Random(0), segments=2)


def test_chain_wording_and_tag_sequences_vary(world):
    chains = [r["chain"] for r in _sft(world) if r["task"] == "LaMP-2"]
    shapes = {tuple(re.findall(r"<(\w+)>", c)) for c in chains}
    assert len(shapes) >= 6 and len(set(chains)) >= 0.9 * len(chains)
    used = {t for s in shapes for t in s}
    assert used <= set(dw.REASONING_TAGS) and len(used) >= 6


def test_chain_states_the_evidence_the_prompt_shows():
    profile = [{"id": f"q{j}", "description": "x", "tag": t, "date": f"2020-01-0{j + 1}"}
               for j, t in enumerate(["comedy", "romance", "comedy"])]
    ex = LampExample("q", "LaMP-2", "Which tag? description: Full of dragon and wizard.", profile)
    chain = dw.make_chain("LaMP-2", ex, profile, "comedy", random.Random(1))
    assert re.search(r"<identify_patterns>[^<]*comedy[^<]*\(2 of 3\)", chain), chain


# ------------------------------------------------------------------------------------------------------- tokenizer
def test_the_demo_policy_has_no_padded_vocabulary_tail(world, tmp_path):
    """The demo's base model, built as the SFT stage builds it (its rows: the tokenizer's size rounded up to 64), has
    exactly the default world's tokenizer ids: every row is sampleable, so GSPO's all-row pi is the sampled one
    (README, "GSPO notes": tau = 0 in the demo)."""
    from minitagpr.model.presets import make_tiny_checkpoint
    base = make_tiny_checkpoint(tmp_path / "base", preset="demo", tokenizer_dir=world.tokenizer_dir)
    rows = json.loads((base / "config.json").read_text())["vocab_size"]
    assert rows == Tokenizer.from_dir(world.tokenizer_dir).vocab_size == 2048


def test_tokenizer_loads_with_qwen3_markers(world):
    tok = Tokenizer.from_dir(world.tokenizer_dir)
    assert 1000 <= tok.vocab_size <= 4096
    assert tok.eos_id == tok.im_end_id and tok.pad_id == tok.token_to_id("<|endoftext|>")
    config = json.loads((world.tokenizer_dir / "tokenizer_config.json").read_text())
    flags = {v["content"]: v["special"] for v in config["added_tokens_decoder"].values()}
    assert flags["<|im_start|>"] and flags["<|im_end|>"] and flags["<|endoftext|>"]
    assert not flags["<think>"] and not flags["</think>"]  # as in Qwen3: added, not special
    for marker in dw.TAG_MARKERS:
        assert len(tok.encode(marker)) == 1 and not flags[marker]


def test_tokenizer_round_trips_any_text(world):
    tok = Tokenizer.from_dir(world.tokenizer_dir)
    for text in ["", "plain words", "Ünïcödé e\u0301 \u00e9 中文 🙂\t\n\r\x00\x7f", "  lead and trail  ",
                 "<|im_start|>user\nhi<|im_end|>", "<think>\n<analyze_input>a</analyze_input>\n</think>\n\n[1]",
                 "".join(chr(c) for c in range(0, 0x3000, 7))]:
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_compresses_the_demo_text(world):
    tok = Tokenizer.from_dir(world.tokenizer_dir)
    r = _sft(world)[0]
    text = r["messages"][1]["content"]
    assert len(tok.encode(text)) < 0.4 * len(text.encode())  # well under one token per byte


def test_tokenizer_config_carries_the_qwen3_chat_template(world, qwen3_tokenizer_dir):
    ours = json.loads((world.tokenizer_dir / "tokenizer_config.json").read_text())
    official = json.loads((qwen3_tokenizer_dir / "tokenizer_config.json").read_text())
    assert ours["chat_template"] == official["chat_template"]
    assert ours["eos_token"] == official["eos_token"] and ours["pad_token"] == official["pad_token"]


def test_transformers_reads_the_tokenizer_the_same_way(world, qwen3_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(world.tokenizer_dir))
    tok = Tokenizer.from_dir(world.tokenizer_dir)
    r = _sft(world)[5]
    assert hf.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) == \
        tok.render_chat(r["messages"], add_generation_prompt=True)
    text = tok.render_chat(r["messages"] + [{"role": "assistant", "content": assistant_target(r["chain"], r["answer"])}])
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)


# ---- pinned by mutation (2026-11-27) ---------------------------------------------------------------------------

def test_a_users_usual_score_rounds_half_up():
    assert dw._usual_score([{"score": 2}, {"score": 3}]) == 3  # 2.5 -> 3 (Python's round() would give 2)
    assert dw._usual_score([{"score": 4}, {"score": 5}, {"score": 4}]) == 4


def test_a_manifest_that_is_not_an_object_is_named_and_the_world_is_rebuilt(tmp_path):
    built = dw.build(tmp_path / "w", seed=3, **SMALL)
    (tmp_path / "w" / "world.json").write_text("[1, 2]")
    with pytest.raises(dw.DataError, match=r"world.json: want a JSON object \(the world's manifest\), got list"):
        dw.DemoWorld.load(tmp_path / "w")
    assert dw.build(tmp_path / "w", seed=3, **SMALL).user_dependent_groups == built.user_dependent_groups


@pytest.mark.parametrize("styles", ["missing", ["concise"], "thorough", {"u000": "verbose"}])
def test_a_manifest_with_missing_or_malformed_reasoning_styles_is_named_and_rebuilt(tmp_path, styles):
    built = dw.build(tmp_path / "w", seed=3, **SMALL)
    manifest = json.loads((tmp_path / "w" / "world.json").read_text())
    if styles == "missing":  # a format 2 manifest
        del manifest["reasoning_styles"]
    else:
        manifest["reasoning_styles"] = styles
    (tmp_path / "w" / "world.json").write_text(json.dumps(manifest))
    with pytest.raises(dw.DataError, match="world.json: field 'reasoning_styles'"):
        dw.DemoWorld.load(tmp_path / "w")
    assert dw.build(tmp_path / "w", seed=3, **SMALL).reasoning_styles == built.reasoning_styles


def test_an_input_two_users_share_has_different_golds(world):
    for task in world.tasks:
        for split in ("train", "dev"):
            golds = world.golds(task, split)
            by_input = {}
            for ex in world.examples(task, split):
                by_input.setdefault(ex.input, []).append(golds[ex.id])
            shared = [g for g in by_input.values() if len(g) > 1]
            assert all(len(set(g)) == len(g) for g in shared), (task, split)


def test_the_cli_says_when_it_rebuilt_and_ends_bad_paths_in_one_line(tmp_path, capsys):
    import subprocess
    import sys
    args = [str(tmp_path / "w"), "--num-users", "8", "--dev-users", "3", "--per-user", "3", "--vocab-size", "1000"]
    dw.main(args)
    assert "rebuilt" not in capsys.readouterr().out
    dw.main(args + ["--seed", "1"])
    assert f"rebuilt {tmp_path / 'w'}: its parameters differed (seed)" in capsys.readouterr().out
    res = subprocess.run([sys.executable, "-m", "minitagpr.data.demo_world", str(tmp_path / "v"), "--test-users",
                          "-1"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr and "test_users >= 0" in res.stderr
    (tmp_path / "file").write_text("x")
    res = subprocess.run([sys.executable, "-m", "minitagpr.data.demo_world", str(tmp_path / "file" / "w")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("[demo_world] error:") and "Not a directory" in res.stderr


# ------------------------------------------------------------------------------------ held-out data stays held out
TASTES = ("topic", "fav_tag", "usual", "headline_style", "title_style", "tweet_style", "voice", "interj")


def test_no_held_out_user_repeats_a_training_users_tastes():
    """Dealt by the index within the split, dev user i had training user i's tastes (new only in its signature
    words), so 'unseen users' shared every preference with a seen one."""
    p = dict(dw.DEFAULTS, seed=0)
    users = dw._make_users(dw._make_lexicon(0, p["num_users"]), 0,
                           {"train": p["num_users"] - p["dev_users"] - 4, "dev": p["dev_users"], "test": 4})
    seen = {tuple(getattr(u, t) for t in TASTES) for u in users["train"]}
    for split in ("dev", "test"):
        assert not [u.id for u in users[split] if tuple(getattr(u, t) for t in TASTES) in seen]
    for split, us in users.items():  # each split still balanced: neighbours differ in every dealt taste
        for a, b in zip(us, us[1:]):
            assert all(getattr(a, t) != getattr(b, t) for t in TASTES), (split, a.id, b.id)


@pytest.mark.parametrize("split", ["train", "dev"])
def test_no_generation_gold_is_one_of_its_users_own_past_outputs(world, split):
    """The generator repeated a title now and then: 8 of the 60 LaMP-5 dev golds sat in their own profiles (5 of
    them among the k items the prompt shows), an answer to copy."""
    for task in ("LaMP-4", "LaMP-5", "LaMP-7"):
        golds = world.golds(task, split)
        for ex in world.examples(task, split):
            written = {v for item in ex.profile for v in item.values() if isinstance(v, str)}
            assert golds[ex.id] not in written, (task, ex.id)


def test_the_tokenizer_and_the_sft_records_see_training_questions_only(world):
    """The BPE was trained on the dev prompts too (47 dev-only token ids, from dev users' signature words): its
    training text is what _draft_records returns (build passes it to train_tokenizer as is)."""
    questions, golds, _ = dw._generate(world.params)
    records, texts = dw._draft_records(questions, golds, world.params)
    p = world.params
    users = dw._make_users(dw._make_lexicon(p["seed"], p["num_users"]), p["seed"],
                           {"train": p["num_users"] - p["dev_users"], "dev": p["dev_users"]})
    signatures = [w.lower() for u in users["dev"] for w in (u.desk, u.system, u.hashtag)]  # in every dev profile
    corpus = "\n".join(texts).lower()
    assert len(signatures) == 30 and not [w for w in signatures if w in corpus]
    assert all(any(w in corpus for w in (u.desk.lower(), u.system.lower(), u.hashtag)) for u in users["train"])
    assert {r["id"] for r in records} == {ex.id for task in dw.TASK_NAMES for ex in questions[task]["train"]}


# ---- pinned by mutation (2026-11-29) ---------------------------------------------------------------------------------

def test_the_majority_tag_breaks_a_tie_toward_the_item_listed_first():
    """Retrievers list the most relevant item first, so a tie goes to the tag seen first."""
    profile = [{"id": f"q{j}", "description": "x", "tag": t} for j, t in enumerate(["romance", "comedy", "comedy",
                                                                                    "romance"])]
    ex = LampExample("q", "LaMP-2", "Which tag? description: Full of dragon and wizard.", profile)
    assert dw.aware_answer(ex, profile) == "romance"
    assert dw.aware_answer(ex, profile[1:]) == "comedy"


def test_signature_words_leave_out_the_words_of_the_query():
    ex = LampExample("q", "LaMP-4", "Generate a headline for the following article: Zorp officials met.", [])
    items = [{"id": "q0", "title": "Zorp to fund blik"}, {"id": "q1", "title": "Zorp votes, blik says"}]
    assert dw.signature_words("LaMP-4", ex, items) == ["blik"]


@pytest.mark.parametrize("task,text,blind", [
    ("LaMP-7", "Paraphrase the following tweet without any explanation before or after it: Just finished a walk",
     {"copy the tweet": "Just finished a walk"}),
    ("LaMP-3", "What is the score? review: The Zorp kettle is easy to clean.", {"3 + cue shift": "3"}),  # no cue
    ("LaMP-3", "What is the score? review: The Zorp kettle; worse than I hoped.", {"3 + cue shift": "2"}),
])
def test_profile_blind_answers_read_the_query_alone(task, text, blind):
    assert dw.blind_answers(LampExample("q", task, text, [])) == blind


def test_a_margin_row_is_ok_only_when_the_profile_helps():
    row = dw.MarginRow("LaMP-4", "dev", "rouge1", aware=0.2, blind=0.3, blind_name="query keywords", margin=-0.1,
                       required=None)
    assert not row.ok
    assert dataclasses.replace(row, aware=0.4, margin=0.1).ok
    assert not dataclasses.replace(row, task="LaMP-3", margin=0.2, required=0.3).ok


def test_the_best_profile_blind_answer_has_the_lowest_mae_of_the_candidates(world):
    """For MAE lower is better: the reference must be the best blind candidate, not the worst."""
    from minitagpr.metrics import evaluate
    _, name, _ = dw.rule_predictions(world, "LaMP-3", "dev")
    examples, golds = world.examples("LaMP-3", "dev"), world.golds("LaMP-3", "dev")
    candidates = {"3 + cue shift": {e.id: dw.blind_answers(e)["3 + cue shift"] for e in examples}}
    candidates.update({f"always {label}": {e.id: label for e in examples} for label in "12345"})
    mae = {n: evaluate("LaMP-3", preds, golds)["mae"] for n, preds in candidates.items()}
    assert mae[name] == min(mae.values()) < max(mae.values())


@pytest.mark.parametrize("task", dw.TASK_NAMES)
def test_a_three_segment_chain_holds_the_input_the_tasks_evidence_and_the_decision(world, task):
    evidence = {"LaMP-1": "compare_entities", "LaMP-3": "synthesize_findings"}.get(task, "identify_patterns")
    ex = world.examples(task, "train")[0]
    items = get_retriever("recency").select(ex, 4)
    for profile, key in ((items, evidence), ([], "identify_patterns")):
        chain = dw.make_chain(task, ex, profile, "x", random.Random(0), segments=3)
        assert set(re.findall(r"<(\w+)>", chain)) == {"analyze_input", key, "make_decision"}, (task, chain)


def test_profile_item_ids_extend_the_question_id(world):
    """lamp-format.md: question "600" has items "6000", "6001", ..."""
    for task in dw.TASK_NAMES:
        for ex in world.examples(task, "dev"):
            assert all(re.fullmatch(re.escape(ex.id) + r"\d+", item["id"]) for item in ex.profile), ex.id


def test_a_shared_review_gets_a_cue_under_which_the_users_scores_differ():
    """Users of usual score 4 and 5 agree on a 'better than usual' review (both 5): that cue must not be drawn."""
    lex = dw._make_lexicon(0, 10)
    u = dw._make_users(lex, 0, {"train": 10})["train"][0]
    pair = [dataclasses.replace(u, usual=4), dataclasses.replace(u, id="u999", usual=5)]
    for seed in range(30):
        _, golds = dw._lamp3_question(lex, random.Random(seed), pair)
        assert golds[0] != golds[1], seed


def test_neighbours_who_agree_on_a_tasks_preference_share_no_question():
    """Six dev users: the wrap-around pair (the 6th and the 1st) was dealt the same usual LaMP-3 score."""
    params = dict(dw.DEFAULTS, seed=0, num_users=30, dev_users=6)
    dev = dw._lexicon_and_users(params)[1]["dev"]
    assert dev[0].usual == dev[-1].usual
    questions, _, _ = dw._generate(params)
    by_input = {}
    for ex in questions["LaMP-3"]["dev"]:
        by_input.setdefault(ex.input, set()).add(ex.user_id)
    shared = [users for users in by_input.values() if len(users) > 1]
    assert shared and {dev[0].id, dev[-1].id} not in shared


@pytest.fixture(scope="module")
def trimmed(world):
    """The LaMP-2 SFT records of the default world fitted to a budget that half of their prompts exceed:
    (records, their token counts, the budget, their counts before trimming)."""
    questions, golds, _ = dw._generate(world.params)
    records, _ = dw._draft_records(questions, golds, world.params)
    records = [r for r in records if r["task"] == "LaMP-2"]
    tok = Tokenizer.from_dir(world.tokenizer_dir)
    before = [len(tok.apply_chat(r["messages"], add_generation_prompt=True)) for r in records]
    budget = sorted(before)[len(before) // 2]
    lengths = dw._fit_records(records, tok, {**world.params, "max_prompt_tokens": budget})
    return records, lengths, budget, before


def test_sft_prompts_over_the_budget_are_trimmed_to_fit_it(trimmed):
    records, lengths, budget, before = trimmed
    assert sum(n > budget for n in before) >= 5
    assert max(lengths) <= budget


def test_a_trimmed_sft_prompts_chain_argues_from_the_items_it_still_shows(trimmed):
    """LaMP-2 chains always state '(n of N)' over the N items the prompt shows."""
    records, _, _, _ = trimmed
    checked = 0
    for r in records:
        shown = re.search(r"\((\d+), most relevant first\)", r["messages"][1]["content"])
        if shown:
            assert re.search(rf" of {shown.group(1)}\)", r["chain"]), (r["id"], r["chain"])
            checked += 1
    # a prompt layout that no longer says "(N, most relevant first)" would otherwise check nothing and pass
    assert checked >= 5, f"only {checked} of {len(records)} prompts say how many items they show"
