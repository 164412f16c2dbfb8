"""Synthetic PRMU pairs from the demo world: PRP, PQP, the user-dependent and the style pairs, built with no policy."""
import pytest

from minitagpr.data import demo_world as dw
from minitagpr.data.preferences import synthesize_demo_pairs
from minitagpr.data.prompts import build_messages
from minitagpr.data.retrieval import get_retriever
from minitagpr.rewards import verifiable_reward


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return dw.build(tmp_path_factory.mktemp("world"), num_users=8, dev_users=2, per_user=3, shared_per_user=1,
                    history=8, vocab_size=600)


@pytest.fixture(scope="module")
def sets(world):
    return synthesize_demo_pairs(world.root)


def test_every_training_question_gives_one_prp_pair_and_all_pairs_are_marked_synthetic(world, sets):
    n_train = sum(len(world.examples(t, "train")) for t in world.tasks)
    assert len(sets["PRP"]) == n_train
    assert all(p.source == "synthetic" for s in sets.values() for p in s)
    assert {p.example_id for p in sets["PQP"]} <= {p.example_id for p in sets["PRP"]}


def test_prp_rejects_the_chain_written_without_the_profile_on_the_same_profile_prompt(world, sets):
    retriever = get_retriever("recency")
    examples = {ex.id: ex for t in world.tasks for ex in world.examples(t, "train")}
    for p in sets["PRP"]:
        ex = examples[p.example_id]
        assert p.chosen.answer == world.golds(p.task, "train")[ex.id] and p.user == ex.user
        style = world.params["prompt_style"]  # the world's, as its SFT records, guided RL and the table render it
        assert p.prompt == build_messages(ex, retriever.select(ex, world.params["k"]), style=style)
        assert p.rejected.answer == next(iter(dw.blind_answers(ex).values()))
        assert p.chosen.chain != p.rejected.chain


def test_every_pair_prompt_is_rendered_in_the_world_prompt_style_and_the_prmu_input_ignores_it(world, sets):
    """The pair files show the prompts guided RL renders; the PRMU's input leaves the system instruction out, so a
    PRMU trained on pairs of either style scores RL's responses alike."""
    from minitagpr.data.prompts import style_of
    from minitagpr.model.reward import encode_reward_input
    from minitagpr.tokenizer import Tokenizer
    assert world.params["prompt_style"] == "brief"  # the demo's default, not build_messages' "full"
    assert {style_of(p.task, p.prompt) for s in sets.values() for p in s} == {"brief"}
    tok, p = Tokenizer.from_dir(world.tokenizer_dir), sets["PRP"][0]
    ex = next(e for e in world.examples(p.task, "train") if e.id == p.example_id)
    full = build_messages(ex, get_retriever("recency").select(ex, world.params["k"]), style="full")
    assert full != p.prompt
    assert encode_reward_input(tok, full, "x") == encode_reward_input(tok, p.prompt, "x")


def test_pqp_prefers_the_gold_answer_by_verifiable_reward_with_no_ties(world, sets):
    assert sets["PQP"]
    for p in sets["PQP"]:
        gold = world.golds(p.task, "train")[p.example_id]
        assert p.chosen.answer == gold
        assert verifiable_reward(p.task, p.rejected.answer, gold) < verifiable_reward(p.task, gold, gold)


def test_user_dependent_pairs_flip_between_the_users_who_share_a_query(world, sets):
    dependent = {p.example_id: p for p in sets["PQP"] if p.user_dependent}
    assert dependent, "the demo world must contain pairs whose winner depends on the user"
    checked = 0
    for group in world.user_dependent_groups:
        if len(group) == 2 and all(i in dependent for i in group):
            a, b = dependent[group[0]], dependent[group[1]]
            assert a.user != b.user and a.prompt[-1]["content"] != b.prompt[-1]["content"]  # own profiles
            assert (a.chosen.answer, a.rejected.answer) == (b.rejected.answer, b.chosen.answer)
            checked += 1
    assert checked > 0


def test_user_dependent_responses_differ_only_in_the_answer(sets):
    """Both chains come from one make_chain wording over no profile items: every segment (one per line) is the same
    but those that state the answer, and at least one of those differs."""
    import re
    decision = {"make_decision", "verify_conclusion", "formulate_conclusion"}  # demo_world._decision_segments
    tag = lambda line: re.fullmatch(r"<([a-z_]+)>.*</\1>", line).group(1)  # noqa: E731
    dependent = [p for p in sets["PQP"] if p.user_dependent]
    assert dependent
    for p in dependent:
        chosen, rejected = p.chosen.chain.splitlines(), p.rejected.chain.splitlines()
        assert len(chosen) == len(rejected), p.id
        assert [tag(line) for line in chosen] == [tag(line) for line in rejected], p.id  # one wording, two answers
        outside = [(a, b) for a, b in zip(chosen, rejected) if tag(a) not in decision]
        assert all(a == b for a, b in outside), (p.id, outside)
        assert any(a != b for a, b in zip(chosen, rejected) if tag(a) in decision), p.id  # the answer is argued
        assert p.chosen.answer != p.rejected.answer


def test_synthesis_is_deterministic_and_capped(world, sets):
    assert synthesize_demo_pairs(world.root) == sets
    capped = synthesize_demo_pairs(world.root, max_per_set=5)
    assert len(capped["PRP"]) == len(capped["PQP"]) == len(capped["style"]) == 5
    assert {p.id for p in capped["PRP"]} <= {p.id for p in sets["PRP"]}


def test_style_pairs_argue_the_gold_alike_and_the_users_hidden_style_decides(world, sets):
    import re
    examples = {ex.id: ex for t in world.tasks for ex in world.examples(t, "train")}
    assert len(sets["style"]) == len(examples)  # one per training question
    n_segments = lambda chain: len(re.findall(r"</[a-z_]+>", chain))  # noqa: E731
    liked = set()
    for p in sets["style"]:
        ex = examples[p.example_id]
        gold = world.golds(p.task, "train")[ex.id]
        assert (p.id, p.set, p.user, p.user_dependent) == (f"style/{ex.id}", "style", ex.user, False)
        assert p.chosen.answer == p.rejected.answer == gold  # the answer does not decide
        # no profile items (the text does not name the user), in the world's prompt style
        assert p.prompt == build_messages(ex, [], style=world.params["prompt_style"])
        short, long_ = sorted((p.chosen.chain, p.rejected.chain), key=n_segments)
        assert n_segments(short) == 3 and n_segments(long_) in (5, 6)
        concise = n_segments(p.chosen.chain) == 3
        assert concise == (world.reasoning_styles[ex.user] == "concise")
        liked.add(concise)
    assert liked == {True, False}  # both styles occur, so no constant answer wins every pair


def test_style_pairs_refuse_a_world_without_a_users_style(world, tmp_path):
    import json
    import shutil
    from minitagpr.data.lamp import DataError
    broken = tmp_path / "world"
    shutil.copytree(world.root, broken)
    manifest = json.loads((broken / dw.MANIFEST).read_text())
    user = sorted(manifest["reasoning_styles"])[0]
    del manifest["reasoning_styles"][user]
    (broken / dw.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"world.json: field 'reasoning_styles': user '{user}'.*has style None"):
        synthesize_demo_pairs(broken)


# ---- pinned by mutation (each fails on a mutant the suite let through, 2026-11-29) -------------------------------

def test_every_classification_question_has_a_quality_pair_even_when_the_blind_answer_is_right(world, sets):
    """PQP/<id>: wrong = the blind answer, or another label when the blind answer is right; a classification task
    always has another label, so every classification question gets its quality pair, and its rejected answer is
    the blind one exactly when that one is wrong."""
    from minitagpr.data.answers import LABELS
    quality = {p.id: p for p in sets["PQP"]}
    blind_right = 0
    for task in (t for t in world.tasks if t in LABELS):
        golds = world.golds(task, "train")
        for ex in world.examples(task, "train"):
            gold, blind = golds[ex.id], next(iter(dw.blind_answers(ex).values()))
            rejected = quality[f"PQP/{ex.id}"].rejected.answer
            if blind == gold:
                blind_right += 1
                assert rejected != gold and rejected in LABELS[task]
            else:
                assert rejected == blind
    assert blind_right > 0  # the world holds questions whose blind answer is right (the case pinned here)


def test_the_prp_rejected_chain_is_written_over_no_profile_items(sets):
    """PRP's rejected side is `make_chain(no items, blind)`: its evidence segment says there is no history, and it
    has no `examine_examples` segment (which only a chain over items can have); the chosen side reads the items."""
    import re
    no_history = re.compile(r"<identify_patterns>(No past [a-z ]+s are given|There is no history)[^<]*"
                            r"</identify_patterns>")
    for p in sets["PRP"]:
        assert no_history.search(p.rejected.chain) and "<examine_examples>" not in p.rejected.chain
        assert not no_history.search(p.chosen.chain)
