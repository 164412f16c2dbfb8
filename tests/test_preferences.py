"""Preference pairs for PRMU: PRP / PQP from rollouts, the JSONL format, held-out splits, and bad input."""
import json
from dataclasses import replace

import pytest

from minitagpr.data.preferences import (PreferenceDataError, PreferencePair, Response, RolloutRecord,
                                        build_pairs_from_rollouts, build_pqp, build_prp, format_response,
                                        read_pairs, read_rollouts, split_heldout, split_response, write_pairs,
                                        write_rollouts)

PROMPT = [{"role": "system", "content": "Reason, then answer."}, {"role": "user", "content": "Which tag? profile..."}]
BARE = [{"role": "system", "content": "Reason, then answer."}, {"role": "user", "content": "Which tag?"}]


def _resp(chain, answer):
    return format_response(chain, answer)


def _rollouts():
    return [
        RolloutRecord("q1", "u1", "LaMP-2", "profile", PROMPT, "comedy",
                      [_resp("<analyze_input>p</analyze_input>", "comedy"), _resp("x", "action"), _resp("y", "comedy")]),
        RolloutRecord("q1", "u1", "LaMP-2", "no_profile", BARE, "comedy",
                      [_resp("z", "action"), _resp("x", "action"), _resp("w", "fantasy")]),
        RolloutRecord("q2", "u2", "LaMP_3", "profile", PROMPT, "4", [_resp("a", "4"), _resp("b", "4")]),
    ]


def _exact(task, answer, gold):
    return float(answer.strip() == gold)


def _pair(i=0, **kw):
    base = dict(id=f"p{i}", set="PRP", source="synthetic", user="u1", task="LaMP-2", example_id=f"q{i}",
                prompt=PROMPT, chosen=Response(_resp("c", "comedy"), "c", "comedy"),
                rejected=Response(_resp("d", "action"), "d", "action"))
    base.update(kw)
    return PreferencePair(**base)


def test_split_response_takes_chain_inside_think_and_answer_after_it():
    assert split_response(_resp("<make_decision>x</make_decision>", "[1]")) == ("<make_decision>x</make_decision>",
                                                                                 "[1]")
    assert split_response("no think block here") == ("", "no think block here")


def test_prp_pairs_profile_answer_over_bare_answer_scored_on_the_profile_prompt():
    pairs, cut, bare = build_prp(_rollouts(), max_per_example=5)
    assert cut == 0 and bare == 0 and pairs and {p.example_id for p in pairs} == {"q1"}  # q2 has no no_profile record
    for p in pairs:
        assert p.set == "PRP" and p.source == "rollout" and p.user == "u1" and p.task == "LaMP-2"
        assert p.prompt == PROMPT  # both sides are judged in the context the reward model sees in RL
    texts = {(p.chosen.text, p.rejected.text) for p in pairs}
    assert (_resp("x", "action"), _resp("x", "action")) not in texts  # identical responses carry no preference
    profile, bare = (next(r for r in _rollouts() if r.id == "q1" and r.mode == m) for m in ("profile", "no_profile"))
    for p in pairs:  # the profile-mode response is the one preferred (a swapped build still passed the rest)
        assert p.chosen.text in profile.responses and p.rejected.text in bare.responses
    assert len(pairs) == 2


def test_pqp_prefers_the_higher_verifiable_reward_and_drops_ties():
    pairs, cut = build_pqp(_rollouts(), reward_fn=_exact, max_per_example=10)
    assert cut == 0 and {p.example_id for p in pairs} == {"q1"}  # q2: both answers right -> every pair is a tie
    for p in pairs:
        assert p.chosen.answer == "comedy" and p.rejected.answer == "action"
    assert len(pairs) == 2  # (0, 1) and (2, 1); (0, 2) is a tie


def test_pqp_caps_pairs_per_example():
    assert len(build_pqp(_rollouts(), reward_fn=_exact, max_per_example=1)[0]) == 1


@pytest.mark.parametrize("cap", [0, -1])
def test_a_cap_below_one_pair_per_query_is_refused(tmp_path, cap):
    """-1 silently dropped each query's last candidate (candidates[:-1]); 0 built nothing."""
    from minitagpr.data.preferences import build_pairs_from_rollouts
    write_rollouts(tmp_path / "r.jsonl", _rollouts())
    with pytest.raises(PreferenceDataError, match=f"max_per_example must be >= 1, got {cap}"):
        build_pairs_from_rollouts([tmp_path / "r.jsonl"], max_per_example=cap)


def test_pqp_uses_rouge_for_generation_tasks_by_default():
    rec = RolloutRecord("g1", "u9", "LaMP-4", "profile", PROMPT, "local team wins the final",
                        [_resp("a", "local team wins final"), _resp("b", "weather is cold today")])
    (pair,), _ = build_pqp([rec])
    assert pair.chosen.answer == "local team wins final"


def test_pqp_reads_answers_as_the_rl_reward_does():
    """A finished response whose think block never closed has answer "" (answers.extract_answer, R_v's reading):
    its chain's words are no answer. Reading its whole text as the answer ranked it above a real answer by ROUGE."""
    gold = "local team wins the final"
    unclosed = "<think>\nlocal team wins the final, as the profile suggests"
    rec = RolloutRecord("g1", "u9", "LaMP-4", "profile", PROMPT, gold, [unclosed, _resp("a", "team wins")])
    (pair,), _ = build_pqp([rec])
    assert pair.chosen.answer == "team wins" and pair.rejected.text == unclosed and pair.rejected.answer == ""
    assert split_response("<think>x</think>\n\n[2]<|im_end|>") == ("x", "[2]")  # an end marker is no answer text


def test_pairs_round_trip_through_jsonl(tmp_path):
    pairs = [_pair(0), _pair(1, set="PQP", user=None, user_dependent=True)]
    write_pairs(tmp_path / "pairs.jsonl", pairs)
    assert read_pairs(tmp_path / "pairs.jsonl") == pairs


def test_rollouts_round_trip_and_accept_lamp_underscore_task_names(tmp_path):
    write_rollouts(tmp_path / "r.jsonl", _rollouts())
    back = read_rollouts(tmp_path / "r.jsonl")
    assert [r.task for r in back] == ["LaMP-2", "LaMP-2", "LaMP-3"]


def test_empty_preference_set_names_the_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PreferenceDataError, match=r"empty\.jsonl: empty preference set"):
        read_pairs(tmp_path / "empty.jsonl")


def _write_lines(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


def _good_record(i=0):
    d = json.loads(json.dumps(_pair(i).__dict__, default=lambda o: o.__dict__))
    return d


@pytest.mark.parametrize("mutate, pattern", [
    (lambda d: d.pop("chosen"), r"bad\.jsonl:2 \(record id 'p1'\): field 'chosen': missing"),
    (lambda d: d["rejected"].update(answer=3), r"bad\.jsonl:2 \(record id 'p1'\): field 'rejected\.answer': expected str"),
    (lambda d: d.update(set="XYZ"), r"bad\.jsonl:2 \(record id 'p1'\): field 'set': unknown set 'XYZ'"),
    (lambda d: d.update(task="LaMP-9"), r"bad\.jsonl:2 \(record id 'p1'\): field 'task': unknown task"),
    (lambda d: d.update(prompt=[]), r"bad\.jsonl:2 \(record id 'p1'\): field 'prompt': empty"),
    (lambda d: d["prompt"][0].update(role="robot"), r"field 'prompt\[0\]\.role': unknown role 'robot'"),
    (lambda d: d.update(id="p0"), r"bad\.jsonl:2 \(record id 'p0'\): field 'id': duplicate pair id \(first on line 1\)"),
    (lambda d: d.update(user_dependent="yes"), r"field 'user_dependent': expected bool"),
    # a prompt of system turns only failed six frames deep in the PRMU recipe, naming no file; one ending with an
    # assistant turn was scored as a second assistant reply
    (lambda d: d.update(prompt=d["prompt"][:1]), r"field 'prompt\[0\]\.role': the prompt must end with a user turn"),
    (lambda d: d["prompt"].append({"role": "assistant", "content": "old"}),
     r"field 'prompt\[2\]\.role': the prompt must end with a user turn, got 'assistant'"),
    (lambda d: d["rejected"].update(text=d["chosen"]["text"]), r"field 'rejected\.text': identical to chosen\.text"),
    # a forgotten key read as the unknown user, scoring every pair with row 0 of the table; null still means that
    (lambda d: d.pop("user"), r"bad\.jsonl:2 \(record id 'p1'\): field 'user': missing \(null if there is none\)"),
])
def test_malformed_pair_records_name_file_line_record_and_field(tmp_path, mutate, pattern):
    bad = _good_record(1)
    mutate(bad)
    path = _write_lines(tmp_path / "bad.jsonl", [_good_record(0), bad])
    with pytest.raises(PreferenceDataError, match=pattern):
        read_pairs(path)


def test_bad_json_line_names_file_and_line(tmp_path):
    path = _write_lines(tmp_path / "bad.jsonl", [_good_record(0), "{not json"])
    with pytest.raises(PreferenceDataError, match=r"bad\.jsonl:2: not valid JSON"):
        read_pairs(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(PreferenceDataError, match=r"nope\.jsonl: file not found"):
        read_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(PreferenceDataError, match=r": is a folder, not a file"):
        read_pairs(tmp_path)  # a folder given for a file is named as such, not "not found"


def test_malformed_rollout_record_names_file_line_and_field(tmp_path):
    rec = json.loads(json.dumps(_rollouts()[0].__dict__))
    rec["mode"] = "sometimes"
    path = _write_lines(tmp_path / "r.jsonl", [rec])
    with pytest.raises(PreferenceDataError, match=r"r\.jsonl:1 \(record id 'q1'\): field 'mode': unknown mode"):
        read_rollouts(path)
    rec["mode"], rec["responses"] = "profile", ["ok", 7]
    _write_lines(path, [rec])
    with pytest.raises(PreferenceDataError, match=r"field 'responses\[1\]': expected str"):
        read_rollouts(path)
    rec["responses"] = ["ok"]
    del rec["user"]
    _write_lines(path, [rec])
    with pytest.raises(PreferenceDataError, match=r"field 'user': missing \(null if there is none\)"):
        read_rollouts(path)
    rec["user"] = None  # null: the unknown user
    _write_lines(path, [rec])
    assert read_rollouts(path)[0].user is None


def test_heldout_split_is_by_query_and_deterministic():
    pairs = [_pair(i, id=f"p{i}-{k}", example_id=f"q{i}") for i in range(20) for k in range(2)]
    train, held = split_heldout(pairs, 0.25, seed=3)
    assert len(held) == 10 and len(train) == 30
    assert not {p.example_id for p in train} & {p.example_id for p in held}
    assert split_heldout(pairs, 0.25, seed=3) == (train, held)


def test_heldout_split_keeps_linked_queries_on_one_side():
    # q{2i} and q{2i+1} share one input (two users, opposite golds): they must never be split apart
    pairs = [_pair(i, id=f"p{i}", example_id=f"q{i}") for i in range(40)]
    linked = [[f"q{2 * i}", f"q{2 * i + 1}"] for i in range(20)]
    for seed in range(5):
        train, held = split_heldout(pairs, 0.3, seed=seed, linked=linked)
        assert len(train) + len(held) == 40 and len(held) == 12  # 6 of 20 linked queries, 2 ids each
        held_ids = {p.example_id for p in held}
        for a, b in linked:
            assert (a in held_ids) == (b in held_ids)
    # without links the same pairs split per id, and the two members of a group do get separated
    separated = 0
    for seed in range(5):
        held_ids = {p.example_id for p in split_heldout(pairs, 0.3, seed=seed)[1]}
        separated += sum((a in held_ids) != (b in held_ids) for a, b in linked)
    assert separated > 0


def test_cli_builds_both_sets_from_rollout_files(tmp_path, capsys):
    from minitagpr.data.preferences import main
    write_rollouts(tmp_path / "r.jsonl", _rollouts())
    assert main(["from-rollouts", str(tmp_path / "r.jsonl"), "--out-dir", str(tmp_path / "pairs")]) == 0
    prp, pqp = read_pairs(tmp_path / "pairs" / "prp.jsonl"), read_pairs(tmp_path / "pairs" / "pqp.jsonl")
    assert {p.set for p in prp} == {"PRP"} and {p.set for p in pqp} == {"PQP"}
    assert all(p.source == "rollout" for p in prp + pqp)


def test_cli_refuses_to_write_an_empty_set_and_names_the_input(tmp_path, capsys):
    from minitagpr.data.preferences import main
    write_rollouts(tmp_path / "only_profile.jsonl", [r for r in _rollouts() if r.mode == "profile"])
    assert main(["from-rollouts", str(tmp_path / "only_profile.jsonl"), "--out-dir", str(tmp_path / "p")]) == 1
    assert "only_profile.jsonl: no PRP pairs could be built" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_cli_names_an_out_dir_it_cannot_write_and_refuses_a_negative_cap(tmp_path, capsys):
    from minitagpr.data.preferences import main
    write_rollouts(tmp_path / "r.jsonl", _rollouts())
    (tmp_path / "a_file").write_text("")
    assert main(["from-rollouts", str(tmp_path / "r.jsonl"), "--out-dir", str(tmp_path / "a_file")]) == 1
    out = capsys.readouterr()
    assert out.err.strip() == (f"error: --out-dir={tmp_path / 'a_file'}: cannot write there ({tmp_path / 'a_file'} "
                               f"is a file, not a folder)")  # no traceback
    with pytest.raises(SystemExit):  # was taken as 0, no cap
        main(["demo", str(tmp_path / "world"), "--out-dir", str(tmp_path / "p"), "--max-per-set", "-5"])
    assert "--max-per-set must be >= 0 (0 = no cap), got -5" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Bad rollout and pair files: every one is refused with the file, line or query, and field named
# ---------------------------------------------------------------------------------------------------------------
def _rollout_row(rec):
    return {k: v for k, v in rec.__dict__.items() if k != "origin"}


@pytest.mark.parametrize("reader, good", [(read_rollouts, lambda: _rollout_row(_rollouts()[0])),
                                          (read_pairs, lambda: _good_record(0))])
def test_a_line_that_is_not_utf8_names_file_and_line(tmp_path, reader, good):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(good()).encode() + b"\n\xff\xfe\n")
    with pytest.raises(PreferenceDataError, match=r"latin\.jsonl:2: not valid UTF-8 \(byte 0xff at byte 1"):
        reader(path)


def test_an_empty_response_list_names_file_line_and_field(tmp_path):
    path = _write_lines(tmp_path / "r.jsonl", [{**_rollout_row(_rollouts()[0]), "responses": []}])
    with pytest.raises(PreferenceDataError, match=r"r\.jsonl:1 \(record id 'q1'\): field 'responses': empty"):
        read_rollouts(path)


def _query(task="LaMP-2", rid="q1", user="u1", gold="comedy", n_profile=3, n_bare=3):
    return [RolloutRecord(rid, user, task, "profile", PROMPT, gold, [_resp(f"p{i}", gold) for i in range(n_profile)]),
            RolloutRecord(rid, user, task, "no_profile", BARE, gold, [_resp(f"b{i}", "x") for i in range(n_bare)])]


def test_prp_refuses_a_query_whose_modes_hold_different_numbers_of_responses(tmp_path):
    write_rollouts(tmp_path / "r.jsonl", _query(n_profile=3, n_bare=1))
    with pytest.raises(PreferenceDataError, match=r"r\.jsonl:1 and .*r\.jsonl:2 \(query 'q1' of LaMP-2\): "
                                                  r"field 'responses': 3 in the 'profile' record, 1 in"):
        build_pairs_from_rollouts([tmp_path / "r.jsonl"])


@pytest.mark.parametrize("name, value", [("user", "u2"), ("gold", "action")])
def test_prp_refuses_a_query_whose_two_records_disagree(tmp_path, name, value):
    with_p, without_p = _query()
    write_rollouts(tmp_path / "a.jsonl", [with_p])
    write_rollouts(tmp_path / "b.jsonl", [replace(without_p, **{name: value})])
    with pytest.raises(PreferenceDataError, match=rf"a\.jsonl:1 and .*b\.jsonl:1 \(query 'q1' of LaMP-2\): "
                                                  rf"field '{name}': "):
        build_pairs_from_rollouts([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])


def test_a_no_profile_record_is_never_paired_with_another_tasks_profile_record(tmp_path):
    write_rollouts(tmp_path / "r.jsonl", [_query(task="LaMP-1", gold="[1]")[0], _query(task="LaMP-2")[1]])
    with pytest.raises(PreferenceDataError, match=r"r\.jsonl:2 \(query 'q1' of LaMP-2\): field 'mode': a 'no_profile' "
                                                  r"record without its 'profile' record \(id 'q1' has one for LaMP-1"):
        build_pairs_from_rollouts([tmp_path / "r.jsonl"])


def test_one_query_in_two_files_names_both(tmp_path):
    write_rollouts(tmp_path / "a.jsonl", _query())
    write_rollouts(tmp_path / "b.jsonl", _query()[:1])
    with pytest.raises(PreferenceDataError, match=r"a\.jsonl:1 and .*b\.jsonl:1 \(query 'q1' of LaMP-2\): "
                                                  r"field 'mode': two 'profile' records"):
        build_pairs_from_rollouts([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])


def test_two_tasks_may_reuse_a_question_id_and_their_pairs_stay_apart(tmp_path):
    write_rollouts(tmp_path / "r.jsonl", _query(task="LaMP-2") + _query(task="LaMP-3", gold="4"))
    assert "origin" not in (tmp_path / "r.jsonl").read_text()  # where a record was read is no part of the file
    prp = build_pairs_from_rollouts([tmp_path / "r.jsonl"], max_per_example=1).sets["PRP"]
    assert sorted(p.id for p in prp) == ["PRP/LaMP-2/q1/0", "PRP/LaMP-3/q1/0"]
    write_pairs(tmp_path / "prp.jsonl", prp)
    assert read_pairs(tmp_path / "prp.jsonl") == prp  # read_pairs refuses a repeated pair id


def test_heldout_split_merges_linked_groups_that_share_an_id():
    # [q0, q1] and [q1, q2] share q1, so q0, q1 and q2 are one query; chains of overlaps merge too
    pairs = [_pair(i, id=f"p{i}", example_id=f"q{i}") for i in range(12)]
    linked = [["q0", "q1"], ["q1", "q2"], ["q5", "q6"], ["q7", "q6"], ["q4", "q5"]]
    for seed in range(10):
        held_ids = {p.example_id for p in split_heldout(pairs, 0.5, seed=seed, linked=linked)[1]}
        assert len({i in held_ids for i in ("q0", "q1", "q2")}) == 1
        assert len({i in held_ids for i in ("q4", "q5", "q6", "q7")}) == 1


def test_a_rollout_gold_that_is_no_answer_of_its_task_is_named(tmp_path):
    # no response could ever match it: without the check the only sign was "no PQP pairs could be built"
    write_rollouts(tmp_path / "r.jsonl", _query(task="LaMP-1", gold="[3]"))
    with pytest.raises(PreferenceDataError, match=r"r\.jsonl:1 .*field 'gold': '\[3\]' is not a LaMP-1 label"):
        read_rollouts(tmp_path / "r.jsonl")


# ---- pinned by mutation (2026-11-27) ---------------------------------------------------------------------------

def test_the_answer_follows_the_last_think_close():
    text = "<think>I will write </think> at the end</think>\n\n[2]"
    assert split_response(text) == ("I will write </think> at the end", "[2]")


def test_a_positive_heldout_fraction_always_holds_out_a_query():
    pairs = [_pair(i) for i in range(4)]
    train, held = split_heldout(pairs, 0.1)
    assert len(held) == 1 and len(train) == 3


# ---- responses cut by the length limit (recipes/prmu_rollouts.py max_new_tokens) -------------------------------

def _cut_query():
    """q1 with 3 samples per mode: profile sample 1 and bare sample 2 ran into the length limit."""
    with_p, without_p = _query()
    return [replace(with_p, responses=[_resp("p0", "comedy"), "<think>p1 cut mid-", _resp("p2", "x")],
                    truncated=[False, True, False]),
            replace(without_p, truncated=[False, False, True])]


def test_a_query_whose_profile_prompt_holds_no_profile_gives_no_prp_pair_and_is_counted(tmp_path):
    """k=0, or no retrieved item fitting max_prompt_tokens, leaves the 'profile' prompt equal to the bare one: its
    two sides are draws from one distribution, so a PRP pair of them is noise (pinned 2026-11-29)."""
    records = [replace(r, prompt=BARE) if r.mode == "profile" and r.id == "q1" else r for r in _rollouts()]
    pairs, cut, bare = build_prp(records, max_per_example=5)
    assert (pairs, cut, bare) == ([], 0, 1)
    write_rollouts(tmp_path / "r.jsonl", records)
    built = build_pairs_from_rollouts([tmp_path / "r.jsonl"], max_per_example=5, reward_fn=_exact)
    assert built.sets["PRP"] == [] and built.sets["PQP"]  # its profile-mode responses still make PQP pairs
    assert ("queries whose 'profile' prompt held no profile item (k=0, or none fit max_prompt_tokens), left out "
            "of PRP: 1 of 1") in built.summary()


def test_prp_leaves_out_every_pair_with_a_cut_side_and_counts_them():
    pairs, cut, _ = build_prp(_cut_query(), max_per_example=5)
    assert cut == 2  # (p1, b1): the profile side was cut; (p2, b2): the bare side
    assert [(p.chosen.text, p.rejected.text) for p in pairs] == [(_resp("p0", "comedy"), _resp("b0", "x"))]


def test_pqp_leaves_out_every_pair_with_a_cut_side_and_counts_them():
    pairs, cut = build_pqp(_cut_query(), reward_fn=_exact, max_per_example=5)
    assert cut == 1  # (p0 over p1): p1 was cut; (p0, p2) is whole; (p1, p2) is a tie and never a candidate
    assert [(p.chosen.answer, p.rejected.answer) for p in pairs] == [("comedy", "x")]


def test_the_cap_applies_after_cut_pairs_are_left_out():
    # a query keeps up to max_per_example whole pairs however many cut candidates the shuffle put first
    for seed in range(10):
        pairs, _, _ = build_prp(_cut_query(), max_per_example=1, seed=seed)
        assert len(pairs) == 1


def test_truncation_flags_round_trip_and_a_bad_flag_list_is_named(tmp_path):
    write_rollouts(tmp_path / "r.jsonl", _cut_query())
    assert [r.truncated for r in read_rollouts(tmp_path / "r.jsonl")] == [[False, True, False], [False, False, True]]
    row = _rollout_row(_cut_query()[0])
    path = _write_lines(tmp_path / "bad.jsonl", [{**row, "truncated": [False, True]}])
    with pytest.raises(PreferenceDataError, match=r"bad\.jsonl:1 \(record id 'q1'\): field 'truncated': 2 flags for 3"):
        read_rollouts(path)
    _write_lines(path, [{**row, "truncated": [False, 1, False]}])
    with pytest.raises(PreferenceDataError, match=r"field 'truncated\[1\]': expected bool, got int"):
        read_rollouts(path)
    _write_lines(path, [{**row, "profile_items_dropped": -1}])
    with pytest.raises(PreferenceDataError, match=r"field 'profile_items_dropped': expected a count >= 0"):
        read_rollouts(path)


def test_cli_reports_what_the_length_limit_and_the_prompt_budget_left_out(tmp_path, capsys):
    from minitagpr.data.preferences import main
    with_p, without_p = _cut_query()
    write_rollouts(tmp_path / "r.jsonl", [replace(with_p, profile_items_dropped=3),
                                          replace(without_p, profile_items_dropped=0)])
    assert main(["from-rollouts", str(tmp_path / "r.jsonl"), "--out-dir", str(tmp_path / "pairs")]) == 0
    out = capsys.readouterr().out
    assert "responses cut by the length limit: 2 of 6; left out 2 PRP, 1 PQP candidate pairs with a cut side" in out
    assert "profile prompts that dropped retrieved items to fit max_prompt_tokens: 1 of 1 (3 items in all)" in out
    assert "no 'truncated' field" not in out


def test_cli_refuses_a_set_the_length_limit_emptied_and_says_why(tmp_path, capsys):
    """max_new_tokens=8 cut every response, and every cut response still became a PRP pair (rejected = a fragment)."""
    from minitagpr.data.preferences import main
    cut_all = [replace(r, truncated=[True] * len(r.responses)) for r in _query()]
    write_rollouts(tmp_path / "r.jsonl", cut_all)
    assert main(["from-rollouts", str(tmp_path / "r.jsonl"), "--out-dir", str(tmp_path / "pairs")]) == 1
    err = capsys.readouterr().err
    assert "no PRP pairs could be built" in err and "3 candidate pairs were left out because a response was cut" in err
    assert not (tmp_path / "pairs").exists()


def test_rollouts_from_before_truncation_was_recorded_are_kept_and_said_once(tmp_path, capsys):
    from minitagpr.data.preferences import main
    rows = [_rollout_row(r) for r in _rollouts()]
    for row in rows:  # what an older prmu_rollouts.py wrote
        del row["truncated"], row["profile_items_dropped"]
    _write_lines(tmp_path / "old.jsonl", rows)
    built = build_pairs_from_rollouts([tmp_path / "old.jsonl"], max_per_example=5)
    assert len(built.sets["PRP"]) == 2 and built.cut_pairs == {"PRP": 0, "PQP": 0} and built.unrecorded == 3
    assert main(["from-rollouts", str(tmp_path / "old.jsonl"), "--out-dir", str(tmp_path / "pairs")]) == 0
    out = capsys.readouterr().out
    assert out.count("have no 'truncated' field") == 1
    assert "3 of 3 rollout records have no 'truncated' field" in out and "cut by the length limit: " not in out


# ---- pinned by mutation (each fails on a mutant the suite let through, 2026-11-29) -------------------------------

def test_a_think_opening_after_the_last_close_does_not_start_the_chain():
    """The chain starts at a `<think>` only when it comes before the last `</think>`; one after it is answer text,
    and the chain then runs from the start of the response (as for a response without `<think>`), not empty."""
    assert split_response("step one</think> answer <think>") == ("step one", "answer <think>")


def test_a_zero_heldout_fraction_holds_out_nothing():
    """heldout_frac = 0 means no held-out set: the "at least one query" rule is only for a positive fraction."""
    pairs = [_pair(i) for i in range(4)]
    assert split_heldout(pairs, 0.0) == (pairs, [])


def test_the_summary_counts_only_profile_prompts_that_dropped_items(tmp_path):
    """`short_prompts` counts the profile prompts with profile_items_dropped > 0: of two recorded prompts, one
    dropped 2 items and one dropped none -> "1 of 2 (2 items in all)"."""
    counts = {("q1", "profile"): 2, ("q1", "no_profile"): 0, ("q2", "profile"): 0}
    write_rollouts(tmp_path / "r.jsonl", [replace(r, profile_items_dropped=counts[r.id, r.mode]) for r in _rollouts()])
    built = build_pairs_from_rollouts([tmp_path / "r.jsonl"], max_per_example=5, reward_fn=_exact)
    assert (built.profile_prompts, built.short_prompts, built.items_dropped) == (2, 1, 2)
    assert ("profile prompts that dropped retrieved items to fit max_prompt_tokens: 1 of 2 (2 items in all)"
            in built.summary())
