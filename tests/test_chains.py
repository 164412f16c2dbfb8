"""The chain pipeline, stage by stage, on crafted inputs with fake transports (no network): reply parsing, the
response cache, ordering and retries of the client, each filter's drop reasons and counts, SFT records."""
import json
import random
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from minitagpr.config import load_config
from minitagpr.data import chain_prompts
from minitagpr.data.chain_client import (
    CacheError, ChatClient, ChatRequest, EndpointConfig, EndpointError, ResponseCache, redacted_config,
    request_key, resolve_endpoint,
)
from minitagpr.data.chains import (
    ChainDataError, ChainsConfig, ReplyError, cluster_tag_names, extract_tagged_chain, instance_digest,
    parse_free_tags, parse_judge_reply, run_stages, split_reasoning, tfidf_embed, word_overlap,
)
from minitagpr.train.sft_data import read_sft_records

SCORES = {"logical_coherence": 5, "step_accuracy": 4, "reasoning_completeness": 4, "relevance": 5}
CHAIN = "The user asks for a rating. Their past reviews of kettles score 4. This one is praised. So 4 it is."


def connection_error():
    """openai's connection error, built on whichever HTTP library this openai version uses."""
    import openai
    try:
        import httpx2 as http
    except ImportError:
        import httpx as http
    return openai.APIConnectionError(request=http.Request("POST", "http://unused.invalid/v1"))


def reply(text, finish="stop", reasoning=None):
    return {"content": text, "reasoning": reasoning, "finish_reason": finish, "usage": None}


def make_cfg(tmp_path, **overrides):
    values = {"out_dir": str(tmp_path / "out"), "data.seed": 0}
    for role in ("teacher", "judge", "tagger"):
        values.update({f"{role}.base_url": "http://unused.invalid/v1", f"{role}.model": "fake",
                       f"{role}.backoff_s": 0.0, f"{role}.concurrency": 2})
    values.update(overrides)
    return load_config(ChainsConfig, overrides=values)


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def stats(cfg, stage):
    return json.loads((cfg_out(cfg) / "stats" / f"{stage}.json").read_text())


def cfg_out(cfg):
    from pathlib import Path
    return Path(cfg.out_dir)


PROFILE_ITEM = {"LaMP-1": {"title": "Kettle physics"}, "LaMP-3": {"text": "fine kettle", "score": "4"},
                "LaMP-4": {"text": "The council met.", "title": "Council meets"}}


def instance(task="LaMP-3", example_id="7", gold="4"):
    return {"id": f"{task}/{example_id}", "task": task, "example_id": example_id, "user": "u1",
            "input": "What is the score of this review? review: lovely kettle",
            "profile": [{"id": "70", **PROFILE_ITEM[task]}], "gold": gold}


def chain_record(inst, sample, chain=CHAIN, answer="4", **extra):
    return {"id": f"{inst['id']}/{sample}", "instance": inst["id"], "task": inst["task"], "sample": sample,
            "chain": chain, "answer": answer, "finish_reason": "stop", **extra}


# ---------------------------------------------------------------------------------------------------------------
# Reading replies
# ---------------------------------------------------------------------------------------------------------------
def test_reasoning_comes_from_the_reasoning_field_when_the_endpoint_separates_it():
    assert split_reasoning(reply("  [2] ", reasoning="Look at both titles.")) == ("Look at both titles.", "[2]")


def test_reasoning_inline_in_think_tags_is_split_at_the_last_close():
    assert split_reasoning(reply("<think>\nStep one.\n</think>\n\n[1]<|im_end|>")) == ("Step one.", "[1]")
    assert split_reasoning(reply("Step one.\n</think>\n\n[1]")) == ("Step one.", "[1]")  # template opened <think>


@pytest.mark.parametrize("content", ["[1]", "<think>a</think> b <think>c</think> [1]", "<think>\n</think>\n\n[1]"])
def test_a_response_without_one_usable_reasoning_block_has_no_chain(content):
    assert split_reasoning(reply(content))[0] is None


def judge_json(scores=SCORES, **extra):
    return json.dumps({**{k: {"reason": "ok", "score": v} for k, v in scores.items()}, **extra})


@pytest.mark.parametrize("text", [
    judge_json(total=18),
    "Sure! Here is my assessment:\n```json\n" + judge_json(total=99) + "\n```\nHope this helps.",
    "<think>draft {\"logical_coherence\": 1}</think>" + judge_json(),
    json.dumps({"scores": {"Logical Coherence": 5, "step-accuracy": "4", "completeness": "4/5", "relevance": 5.0}}),
    '{"logical_coherence": 5, "step_accuracy": 4, "reasoning_completeness": 4, "relevance": 5,}',
])
def test_judge_replies_are_read_through_prose_fences_aliases_and_trailing_commas(text):
    assert parse_judge_reply(text) == SCORES  # a stated total is ignored: the total is the sum


@pytest.mark.parametrize("text", [
    json.dumps({"evaluation": {"scores": SCORES}}),                 # two levels down
    json.dumps({"relevance": "high", "scores": SCORES}),            # a stray dimension-named key outside
    '{"step_accuracy": 4} and then, in full: ' + judge_json(),      # a partial object before the full one
    json.dumps({"reasoning": {k: "short reason" for k in SCORES}, "scores": SCORES}),  # reasons first
    json.dumps({"scores": SCORES, "reasoning": {k: "short reason" for k in SCORES}}),
])
def test_the_judge_object_naming_the_most_dimensions_wins_at_any_depth(text):
    assert parse_judge_reply(text) == SCORES


@pytest.mark.parametrize("text,reason", [
    ("The reasoning is good, 18/20.", "judge_no_json"),
    ("", "judge_no_json"),
    (None, "judge_no_json"),
    ('{"verdict": "fine"}', "judge_no_json"),
    (judge_json({k: v for k, v in SCORES.items() if k != "relevance"}), "judge_missing_field"),
    (judge_json({**SCORES, "relevance": 6}), "judge_bad_score"),
    (judge_json({**SCORES, "relevance": 0}), "judge_bad_score"),
    (judge_json({**SCORES, "step_accuracy": 3.5}), "judge_bad_score"),
    (judge_json({**SCORES, "step_accuracy": True}), "judge_bad_score"),
    # Python's json reads these as floats; int() of them raised (and the cached reply crashed every rerun)
    ('{"logical_coherence": NaN, "step_accuracy": 4, "reasoning_completeness": 4, "relevance": 5}', "judge_bad_score"),
    ('{"logical_coherence": Infinity, "step_accuracy": 4, "reasoning_completeness": 4, "relevance": 5}',
     "judge_bad_score"),
    ('{"logical_coherence": 1e999, "step_accuracy": 4, "reasoning_completeness": 4, "relevance": 5}',
     "judge_bad_score"),
    (judge_json({**SCORES, "step_accuracy": "high"}), "judge_bad_score"),
    (json.dumps({**SCORES, "relevance": {"reason": "no score given"}}), "judge_bad_score"),
    # a reasoning judge cut off inside its think block: its draft is no verdict
    ("<think>\nFirst impression: " + judge_json() + " But wait, step 2 is", "judge_unfinished"),
])
def test_unusable_judge_replies_raise_with_their_drop_reason(text, reason):
    with pytest.raises(ReplyError) as err:
        parse_judge_reply(text)
    assert err.value.reason == reason


def test_free_tags_are_folded_to_snake_case_and_need_a_closing_tag():
    text = "Here:\n<Restate Task>a</Restate Task><look-at-history>b</look-at-history> 3 < 4 <stray> and x"
    assert parse_free_tags(text) == ["restate_task", "look_at_history"]
    assert parse_free_tags("<_>We read the task.</_><__>We decide.</__><decide>x</decide>") == ["decide"]


def test_the_tagged_span_is_cut_out_of_prose_and_fences():
    text = "Sure:\n```xml\n<analyze_input>a</analyze_input>\n<make_decision>b</make_decision>\n```\nDone."
    assert extract_tagged_chain(text) == "<analyze_input>a</analyze_input>\n<make_decision>b</make_decision>"
    assert extract_tagged_chain("no tags at all") is None


def test_an_unclosed_last_segment_is_kept_for_the_format_check_not_cut_off():
    text = "<analyze_input>a</analyze_input>\n<make_decision>So 4 it is."
    assert extract_tagged_chain(text) == text  # was "<analyze_input>a</analyze_input>": the decision vanished


def test_word_overlap_is_one_when_only_tags_were_inserted_and_drops_when_text_changes():
    assert word_overlap("a b c d", "<x>a b</x><y>c d</y>") == 1.0
    assert word_overlap("a b c d", "<x>a b</x>") == 0.5
    assert word_overlap("a b c d", "<x>a b c d e f g h</x>") == 0.5
    assert word_overlap("a b c d", "<y>c d</y><x>a b</x>") == 0.5  # reordered: as multisets this was 1.0


@pytest.mark.parametrize("tags, message", [
    ("analyse_input,examine_examples,make_decision", "'analyse_input' is not one of the nine tags"),
    ("analyze_input,make_decision,make_decision=again", "'make_decision' is given more than once"),
    ("analyze_input,think", "'think' is the reasoning block's own marker"),
    ("analyze_input=", "'analyze_input' has an empty definition"),
    ("analyze_input,weigh=weigh the options", "'weigh' is not one of the nine tags"),
])
def test_the_restricted_tag_set_refuses_typos_repeats_and_reserved_names(tmp_path, tags, message):
    with pytest.raises(ValueError, match=message):
        make_cfg(tmp_path, **{"tagging.tags": tags})


# ---------------------------------------------------------------------------------------------------------------
# The response cache
# ---------------------------------------------------------------------------------------------------------------
def test_request_key_changes_with_model_messages_params_and_sample_only():
    m = [{"role": "user", "content": "hi"}]
    base = request_key("m", m, {"temperature": 1.0}, 0)
    assert base == request_key("m", [dict(m[0])], {"temperature": 1.0}, 0)
    others = [request_key("m2", m, {"temperature": 1.0}, 0), request_key("m", m, {"temperature": 0.5}, 0),
              request_key("m", m, {"temperature": 1.0}, 1),
              request_key("m", [{"role": "user", "content": "hi!"}], {"temperature": 1.0}, 0),
              request_key("m", m, {"temperature": 1.0}, 0, cache_tag="step-200")]
    assert len({base, *others}) == 6
    assert request_key("m", m, {"temperature": 1.0}, 0, cache_tag="") == base  # unset: the keys caches hold


def test_a_cache_tag_asks_again_what_the_same_model_name_answered_before(tmp_path):
    """A local server restarted on a retrained checkpoint answers under the same model name."""
    calls = []
    client, _ = make_client(tmp_path, lambda kw: calls.append(1) or reply("old weights"))
    with client.cache:
        list(client.run(requests(2)))
    client, _ = make_client(tmp_path, lambda kw: calls.append(1) or reply("new weights"), cache_tag="step-200")
    with client.cache:
        assert [r["content"] for _, r in client.run(requests(2))] == ["new weights"] * 2
    assert len(calls) == 4


def test_a_torn_last_line_from_a_kill_is_cut_off_and_appends_continue_cleanly(tmp_path):
    path = tmp_path / "cache.jsonl"
    with ResponseCache(path) as cache:
        cache.put("a", "s", "m", reply("A"))
        cache.put("b", "s", "m", reply("B"))
    with open(path, "ab") as f:
        f.write(b'{"key": "c", "stage": "s", "resp')  # killed mid-write
    with ResponseCache(path) as cache:
        assert cache.torn_lines == 1 and len(cache) == 2 and cache.get("b")["content"] == "B"
        cache.put("c", "s", "m", reply("C"))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["key"] for r in lines] == ["a", "b", "c"]


def test_a_damaged_line_before_the_end_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text('{"key": "a", "stage": "s", "response": {}}\nnot json\n{"key": "b", "response": {}}\n')
    with pytest.raises(CacheError, match=r"cache\.jsonl: line 2"):
        ResponseCache(path)


def test_two_users_of_one_cache_file_are_refused(tmp_path):
    with ResponseCache(tmp_path / "cache.jsonl"):
        with pytest.raises(CacheError, match="another process"):
            ResponseCache(tmp_path / "cache.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------------------------
def make_client(tmp_path, transport, stage="teacher", **cfg_kwargs):
    cfg = EndpointConfig(**{"backoff_s": 0.0, "concurrency": 4, **cfg_kwargs})
    endpoint = resolve_endpoint(cfg, "teacher", env={"MINITAGPR_TEACHER_BASE_URL": "http://x/v1",
                                                     "MINITAGPR_TEACHER_MODEL": "m",
                                                     "OPENAI_API_KEY": "sk-secret-123"})
    logs = []
    client = ChatClient(endpoint, cfg, ResponseCache(tmp_path / "cache.jsonl"), stage, transport=transport,
                        log=logs.append, rng=random.Random(0))
    return client, logs


def requests(n):
    return [ChatRequest(f"r{i}", [{"role": "user", "content": f"q{i}"}], sample=i % 2, seed=i) for i in range(n)]


def test_answers_come_back_in_request_order_and_a_second_run_calls_nothing(tmp_path):
    calls = []

    def transport(kwargs):
        time.sleep(random.random() * 0.01)  # finish out of order
        calls.append(kwargs["messages"][0]["content"])
        return reply("answer to " + kwargs["messages"][0]["content"])

    client, _ = make_client(tmp_path, transport)
    got = [(r.label, resp["content"]) for r, resp in client.run(requests(20))]
    assert got == [(f"r{i}", f"answer to q{i}") for i in range(20)]
    assert sorted(calls) == sorted(f"q{i}" for i in range(20))
    client.cache.close()
    again, _ = make_client(tmp_path, lambda kwargs: pytest.fail("called the endpoint for a cached answer"))
    assert [resp["content"] for _, resp in again.run(requests(20))] == [c for _, c in got]


def test_no_more_than_concurrency_calls_are_in_flight(tmp_path):
    in_flight, peak, lock = [0], [0], threading.Lock()

    def transport(kwargs):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.01)
        with lock:
            in_flight[0] -= 1
        return reply("x")

    client, _ = make_client(tmp_path, transport, concurrency=3)
    assert len(list(client.run(requests(15)))) == 15
    assert peak[0] <= 3


def test_seed_and_sampling_parameters_are_sent_and_thinking_goes_in_chat_template_kwargs(tmp_path):
    seen = []
    client, _ = make_client(tmp_path, lambda kw: seen.append(kw) or reply("x"), temperature=0.6,
                            max_tokens=99, enable_thinking=True, token_limit_param="max_completion_tokens")
    list(client.run(requests(1)))
    assert seen[0]["seed"] == 0 and seen[0]["temperature"] == 0.6 and seen[0]["max_completion_tokens"] == 99
    assert seen[0]["extra_body"] == {"chat_template_kwargs": {"enable_thinking": True}}
    assert seen[0]["model"] == "m"


def test_the_api_key_reaches_no_cache_log_error_or_saved_config(tmp_path):
    def transport(kwargs):
        if kwargs["messages"][0]["content"] == "q1":
            raise connection_error()
        return reply("x")

    client, logs = make_client(tmp_path, transport, max_retries=1)
    with pytest.raises(EndpointError) as err:
        list(client.run(requests(3)))
    client.cache.close()
    cfg = make_cfg(tmp_path, **{"teacher.api_key": "sk-secret-123"})
    texts = [(tmp_path / "cache.jsonl").read_text(), "\n".join(logs), str(err.value), repr(client.endpoint),
             str(client.endpoint), json.dumps(redacted_config(cfg)), repr(cfg)]
    assert client.endpoint.api_key == "sk-secret-123"
    assert not any("sk-secret" in t for t in texts)


def test_endpoint_settings_fall_back_to_the_environment_and_missing_ones_are_named():
    env = {"MINITAGPR_JUDGE_BASE_URL": "http://judge/v1/", "MINITAGPR_JUDGE_MODEL": "gpt-x",
           "MINITAGPR_JUDGE_API_KEY": "k1", "OPENAI_API_KEY": "k2"}
    ep = resolve_endpoint(EndpointConfig(), "judge", env=env)
    assert (ep.base_url, ep.model, ep.api_key) == ("http://judge/v1", "gpt-x", "k1")
    assert resolve_endpoint(EndpointConfig(model="m2"), "judge", env=env).model == "m2"
    assert resolve_endpoint(EndpointConfig(base_url="http://local/v1", model="m"), "teacher", env={}).api_key == "EMPTY"
    with pytest.raises(EndpointError, match="teacher.base_url"):
        resolve_endpoint(EndpointConfig(model="m"), "teacher", env={})
    with pytest.raises(EndpointError, match=r"\$MY_KEY"):
        resolve_endpoint(EndpointConfig(base_url="http://x", model="m", api_key_env="MY_KEY"), "teacher", env={})



@pytest.mark.parametrize("url,why", [("127.0.0.1:8000", "needs http:// or https://"),
                                     ("http://127.0.0.1:99999/v1", "Port out of range"),
                                     ("http:///v1", "names no host")])
def test_an_endpoint_url_no_retry_can_reach_is_refused_at_once(url, why):
    """Each of these was retried six times per request (~40 s) before the stage failed."""
    with pytest.raises(EndpointError, match=f"teacher: base_url '{re.escape(url)}': {why}"):
        resolve_endpoint(EndpointConfig(base_url=url, model="m"), "teacher", env={})


# ---------------------------------------------------------------------------------------------------------------
# Stages on crafted inputs
# ---------------------------------------------------------------------------------------------------------------
def test_teacher_samples_n_chains_per_instance_with_a_fixed_seed_each(tmp_path):
    cfg = make_cfg(tmp_path, samples=3)
    inst = instance()
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    seen = []

    def teacher(kwargs):
        seen.append(kwargs)
        return reply(f"<think>Think {kwargs['seed']}.</think>\n\n4")

    run_stages(cfg, ["teacher"], transports={"teacher": teacher}, log=lambda m: None)
    out = read_jsonl(cfg_out(cfg) / "teacher.jsonl")
    assert [r["id"] for r in out] == ["LaMP-3/7/0", "LaMP-3/7/1", "LaMP-3/7/2"]
    assert len({kw["seed"] for kw in seen}) == 3 and all(r["answer"] == "4" for r in out)
    assert "review: lovely kettle" in seen[0]["messages"][1]["content"]
    assert stats(cfg, "teacher")["tasks"]["LaMP-3"] == {"in": 1, "out": 3, "dropped": {}}


def test_a_reply_with_a_lone_surrogate_is_cached_and_written_not_lost(tmp_path):
    """json.loads of a server's "\\ud83d" escape gives a lone surrogate, which UTF-8 cannot encode: the cache write
    raised in the worker thread (a traceback, nothing cached, and a rerun paid for the answer again)."""
    cfg = make_cfg(tmp_path)
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [instance()])
    content = json.loads('"<think>I think \\ud83d it is fine.</think>\\n\\n4"')
    run_stages(cfg, ["teacher"], transports={"teacher": lambda kw: reply(content)}, log=lambda m: None)
    out = read_jsonl(cfg_out(cfg) / "teacher.jsonl")
    assert out[0]["chain"] == "I think \ufffd it is fine." and out[0]["answer"] == "4"
    run_stages(cfg, ["teacher"], transports={"teacher": lambda kw: pytest.fail("asked again")}, log=lambda m: None)


def test_accuracy_keeps_normalised_exact_matches_and_rouge_above_the_threshold(tmp_path):
    cfg = make_cfg(tmp_path, **{"filters.rouge_threshold": 0.5})
    l1, l4 = instance("LaMP-1", "1", gold="[2]"), instance("LaMP-4", "2", gold="city council delays the vote")
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [l1, l4])
    write_jsonl(cfg_out(cfg) / "teacher.jsonl", [
        chain_record(l1, 0, answer="2"),                    # normalised to [2]: kept
        chain_record(l1, 1, answer="[1]"),                  # wrong
        chain_record(l1, 2, chain=None, answer="[2]"),      # no reasoning
        chain_record(l1, 3, answer="", ),                   # no answer
        chain_record(l1, 4, answer="[2]", finish_reason="length"),
        chain_record(l4, 0, answer="City council delays vote"),  # ROUGE-L F 8/9 (P 1, R 4/5): kept
        chain_record(l4, 1, answer="weather is nice"),           # low ROUGE
    ])
    run_stages(cfg, ["accuracy"], log=lambda m: None)
    kept = read_jsonl(cfg_out(cfg) / "accurate.jsonl")
    assert [r["id"] for r in kept] == ["LaMP-1/1/0", "LaMP-4/2/0"]
    assert kept[0]["accuracy"] == 1.0 and kept[1]["accuracy"] == pytest.approx(8 / 9)  # F, not recall 0.8
    s = stats(cfg, "accuracy")["tasks"]
    assert s["LaMP-1"] == {"in": 5, "out": 1, "dropped": {"no_answer": 1, "no_reasoning": 1, "truncated": 1,
                                                          "wrong_answer": 1}}
    assert s["LaMP-4"] == {"in": 2, "out": 1, "dropped": {"low_rouge": 1}}


def test_judge_keeps_totals_above_15_and_counts_every_unusable_reply(tmp_path):
    cfg = make_cfg(tmp_path)
    inst = instance()
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    replies = ["Verdict:\n" + judge_json() + "\nThanks",           # 18: kept
               judge_json({**SCORES, "step_accuracy": 1}),          # 15: not > 15
               "I refuse.",                                          # no JSON
               judge_json({k: v for k, v in SCORES.items() if k != "step_accuracy"}),  # missing field
               judge_json({**SCORES, "relevance": 9}),               # out of range
               judge_json()]                                         # cut off at max_tokens (below)
    write_jsonl(cfg_out(cfg) / "accurate.jsonl", [chain_record(inst, j, accuracy=1.0) for j in range(6)])
    by_chain = {}

    def judge(kwargs):
        user = kwargs["messages"][1]["content"]
        assert CHAIN in user and "Final answer given: 4" in user and kwargs["temperature"] == 0.0
        by_chain.setdefault("n", 0)
        by_chain["n"] += 1
        return reply(replies[by_chain["n"] - 1], finish="length" if by_chain["n"] == 6 else "stop")

    cfg.judge.concurrency = 1  # replies are handed out in call order
    run_stages(cfg, ["judge"], transports={"judge": judge}, log=lambda m: None)
    kept = read_jsonl(cfg_out(cfg) / "judged.jsonl")
    assert [r["id"] for r in kept] == ["LaMP-3/7/0"] and kept[0]["judge"] == {"scores": SCORES, "total": 18}
    s = stats(cfg, "judge")
    assert s["tasks"]["LaMP-3"] == {"in": 6, "out": 1, "dropped": {
        "judge_bad_score": 1, "judge_missing_field": 1, "judge_no_json": 1, "low_score": 1, "judge_truncated": 1}}
    assert s["extra"]["histogram"] == {"LaMP-3": {"15": 1, "18": 1}}


@pytest.mark.parametrize("limit", [3, 0])
def test_a_judge_that_gives_no_verdict_again_and_again_stops_the_run(tmp_path, limit):
    # a judge answering "yes" to every chain ran through the whole set: 0 chains, exit 0 (the budget spent)
    cfg = make_cfg(tmp_path, **{"judge.max_unusable_in_a_row": limit, "judge.concurrency": 1})
    inst = instance()
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    write_jsonl(cfg_out(cfg) / "accurate.jsonl", [chain_record(inst, j, accuracy=1.0) for j in range(6)])
    replies = iter(["yes", "yes", judge_json(), "yes", "yes", "yes"])  # a verdict resets the count
    judge = lambda kwargs: reply(next(replies))  # noqa: E731
    if limit:
        with pytest.raises(ChainDataError, match=r"judge: 3 replies in a row gave no verdict, the last 'LaMP-3/7/5': "
                                                 r"judge_no_json: .*\(reply: 'yes'\); check judge.model"):
            run_stages(cfg, ["judge"], transports={"judge": judge}, log=lambda m: None)
        assert len((cfg_out(cfg) / "cache" / "judge.jsonl").read_text().splitlines()) == 6  # every answer kept
    else:
        run_stages(cfg, ["judge"], transports={"judge": judge}, log=lambda m: None)
        assert stats(cfg, "judge")["tasks"]["LaMP-3"]["dropped"] == {"judge_no_json": 5}


def test_every_record_a_filter_drops_is_listed_with_its_reason_and_detail(tmp_path):
    cfg = make_cfg(tmp_path, **{"filters.rouge_threshold": 0.5})
    l1, l4 = instance("LaMP-1", "1", gold="[2]"), instance("LaMP-4", "2", gold="city council delays the vote")
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [l1, l4])
    write_jsonl(cfg_out(cfg) / "teacher.jsonl", [
        chain_record(l1, 0, answer="[2]"), chain_record(l1, 1, answer="[1]"),
        chain_record(l1, 2, answer="[2]", finish_reason="length"), chain_record(l4, 0, answer="weather is nice")])
    run_stages(cfg, ["accuracy"], log=lambda m: None)
    lines = read_jsonl(cfg_out(cfg) / "dropped" / "accuracy.jsonl")
    assert [(d["id"], d["reason"]) for d in lines] == [
        ("LaMP-1/1/1", "wrong_answer"), ("LaMP-1/1/2", "truncated"), ("LaMP-4/2/0", "low_rouge")]
    assert "'[1]'" in lines[0]["detail"] and "'[2]'" in lines[0]["detail"]  # the answer and the gold
    assert "rougeL" in lines[2]["detail"] and "0.5" in lines[2]["detail"]
    dropped = sum(sum(r["dropped"].values()) for r in stats(cfg, "accuracy")["tasks"].values())
    assert dropped == len(lines)


def test_an_unusable_judge_reply_is_listed_with_the_parsers_reason_and_the_reply(tmp_path):
    cfg = make_cfg(tmp_path, **{"judge.concurrency": 1})
    inst = instance()
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    write_jsonl(cfg_out(cfg) / "accurate.jsonl", [chain_record(inst, j, accuracy=1.0) for j in range(3)])
    replies = iter([judge_json(), "I refuse.", judge_json({**SCORES, "relevance": 9})])
    run_stages(cfg, ["judge"], transports={"judge": lambda kw: reply(next(replies))}, log=lambda m: None)
    lines = read_jsonl(cfg_out(cfg) / "dropped" / "judge.jsonl")
    assert [(d["id"], d["reason"]) for d in lines] == [("LaMP-3/7/1", "judge_no_json"),
                                                       ("LaMP-3/7/2", "judge_bad_score")]
    assert "I refuse." in lines[0]["detail"] and "relevance: {'reason': 'ok', 'score': 9} is not" in lines[1]["detail"]


def test_a_stage_killed_midway_and_rerun_lists_each_drop_once(tmp_path):
    """The drop list is written like the stage output: nothing of a failed run, each drop once after the rerun."""
    cfg = make_cfg(tmp_path, **{"judge.concurrency": 1, "judge.max_retries": 0})
    inst = instance()
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    write_jsonl(cfg_out(cfg) / "accurate.jsonl", [chain_record(inst, j, accuracy=1.0) for j in range(4)])
    calls = []

    def failing_after_two(kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise connection_error()
        return reply("I refuse.")

    with pytest.raises(EndpointError):
        run_stages(cfg, ["judge"], transports={"judge": failing_after_two}, log=lambda m: None)
    assert not (cfg_out(cfg) / "dropped" / "judge.jsonl").exists()
    run_stages(cfg, ["judge"], transports={"judge": lambda kw: reply("I refuse.")}, log=lambda m: None)
    lines = read_jsonl(cfg_out(cfg) / "dropped" / "judge.jsonl")
    assert [d["id"] for d in lines] == [f"LaMP-3/7/{j}" for j in range(4)]


def judged(inst, sample, chain=CHAIN, total=18):
    return chain_record(inst, sample, chain=chain, accuracy=1.0, judge={"scores": SCORES, "total": total})


def test_exploration_tags_a_seeded_subset_and_drops_untagged_replies(tmp_path):
    cfg = make_cfg(tmp_path, **{"tagging.explore_subset": 3})
    inst = instance()
    write_jsonl(cfg_out(cfg) / "judged.jsonl", [judged(inst, j) for j in range(5)])
    calls = []

    def tagger(kwargs):
        calls.append(kwargs)
        return reply("<Restate Task>x</Restate Task><decide>y</decide>" if len(calls) > 1 else "no tags here")

    cfg.tagger.concurrency = 1
    run_stages(cfg, ["explore"], transports={"tagger": tagger}, log=lambda m: None)
    out = read_jsonl(cfg_out(cfg) / "explored.jsonl")
    assert len(calls) == 3 and len(out) == 2 and out[0]["tags"] == ["restate_task", "decide"]
    assert stats(cfg, "explore")["tasks"]["LaMP-3"] == {"in": 5, "out": 2, "dropped": {"no_tags": 1,
                                                                                      "outside_subset": 2}}


def test_kmeans_groups_spelling_variants_and_ranks_clusters_by_occurrences():
    counts = {"examine_examples": 6, "examining_examples": 2, "make_decision": 4, "making_decisions": 1}
    clusters = cluster_tag_names(counts, tfidf_embed(list(counts)), n_clusters=2)
    assert [c["representative"] for c in clusters] == ["examine_examples", "make_decision"]
    assert [c["occurrences"] for c in clusters] == [8, 5]
    assert clusters[0]["names"] == [["examine_examples", 6], ["examining_examples", 2]]
    assert sum(c["share"] for c in clusters) == pytest.approx(1.0, abs=1e-3)


def test_cluster_stage_writes_the_report_and_accepts_a_policy_embedding(tmp_path):
    cfg = make_cfg(tmp_path, **{"tagging.n_clusters": 2, "tagging.embedder": "policy",
                                "tagging.policy_checkpoint": "unused"})
    write_jsonl(cfg_out(cfg) / "explored.jsonl", [
        {"id": "a", "task": "LaMP-3", "tags": ["look_at_items", "decide", "decide"]},
        {"id": "b", "task": "LaMP-3", "tags": ["look_at_items", "decide_now"]}])
    seen = []

    def embed(names):  # a fake "policy": decide* at one point, the rest at another
        seen.extend(names)
        return np.array([[1.0, 0.0] if n.startswith("decide") else [0.0, 1.0] for n in names])

    run_stages(cfg, ["cluster"], embed_fn=embed, log=lambda m: None)
    result = json.loads((cfg_out(cfg) / "clusters.json").read_text())
    assert seen == ["decide", "look_at_items", "decide_now"]  # most frequent first
    assert [c["representative"] for c in result["clusters"]] == ["decide", "look_at_items"]
    assert result["clusters"][0]["occurrences"] == 3 and result["suggested_tags"] == ["decide", "look_at_items"]
    assert "| 1 | decide |" in (cfg_out(cfg) / "clusters.md").read_text()


def test_restricted_tagging_sends_the_nine_tags_with_definitions_reworded_where_asked(tmp_path):
    from minitagpr.rewards import TAGS
    tags = [t if t != "compare_entities" else "compare_entities=put the options side by side" for t in TAGS]
    cfg = make_cfg(tmp_path, **{"tagging.tags": tags})
    inst = instance()
    write_jsonl(cfg_out(cfg) / "judged.jsonl", [judged(inst, 0)])
    seen = []
    tagged = "<analyze_input>a</analyze_input><compare_entities>b</compare_entities><make_decision>c</make_decision>"
    run_stages(cfg, ["tag"], transports={"tagger": lambda kw: seen.append(kw) or reply("Here:\n" + tagged)},
               log=lambda m: None)
    system = seen[0]["messages"][0]["content"]
    assert "- analyze_input: work out what the request asks" in system
    assert "- compare_entities: put the options side by side" in system and "at least 3 segments" in system
    assert all(f"- {t}: " in system for t in TAGS)
    assert read_jsonl(cfg_out(cfg) / "tagged.jsonl")[0]["tagged"] == tagged


@pytest.mark.parametrize("overrides", [
    {"tagging.tags": "analyze_input,examine_examples,make_decision"},  # a subset
    {"tagging.tags": "make_decision,analyze_input,examine_examples,identify_patterns,evaluate_reference,"
                     "compare_entities,synthesize_findings,verify_conclusion,formulate_conclusion"},  # reordered
    {"filters.min_tags": 2},
    {"filters.min_tags": 4},
])
def test_a_tag_set_or_minimum_other_than_rl_tag_reward_uses_is_refused_in_one_line(tmp_path, overrides):
    """RL's R_tag (rl/loop.py) and the SFT prompt always use the nine tags and >= 3 segments: a dataset tagged with
    another set or minimum fails R_tag on every chain, so Stage 0 refuses it up front."""
    from minitagpr.config import ConfigError
    with pytest.raises(ConfigError, match="R_tag") as err:
        make_cfg(tmp_path, **overrides)
    assert "\n" not in str(err.value)


def test_the_cluster_report_does_not_offer_its_clusters_as_the_tag_set(tmp_path):
    cfg = make_cfg(tmp_path)
    write_jsonl(cfg_out(cfg) / "explored.jsonl", [{"id": "a", "task": "LaMP-3", "tags": ["decide", "look"]}])
    run_stages(cfg, ["cluster"], log=lambda m: None)
    text = (cfg_out(cfg) / "clusters.md").read_text()
    assert "pass it as `tagging.tags`" not in text and "nine tags" in text


def test_format_filter_drops_malformed_tags_rewritten_text_and_markers(tmp_path):
    cfg = make_cfg(tmp_path)
    inst = instance()
    s = ["The user asks for a rating.", "Their past reviews of kettles score 4.", "This one is praised.",
         "So 4 it is."]
    good = (f"<analyze_input>{s[0]}</analyze_input>\n<examine_examples>{s[1]}</examine_examples>\n"
            f"<synthesize_findings>{s[2]}</synthesize_findings>\n<make_decision>{s[3]}</make_decision>")
    cases = {
        "good": good,
        "unclosed": good.replace("</make_decision>", ""),
        "unknown": good.replace("synthesize_findings", "ponder"),
        "nested": f"<analyze_input>{s[0]} <make_decision>{s[1]}</make_decision></analyze_input>"
                  f"<examine_examples>{s[2]}</examine_examples><make_decision>{s[3]}</make_decision>",
        "outside": f"{s[0]} <examine_examples>{s[1]}</examine_examples><synthesize_findings>{s[2]}"
                   f"</synthesize_findings><make_decision>{s[3]}</make_decision>",
        "too_few": f"<analyze_input>{' '.join(s[:2])}</analyze_input><make_decision>{' '.join(s[2:])}</make_decision>",
        "rewritten": "<analyze_input>Rating wanted.</analyze_input><examine_examples>Kettles got 4."
                     "</examine_examples><make_decision>Four.</make_decision>",
        "markers": good.replace(s[3], s[3] + " <|im_end|>"),
        "none": None,
    }
    records = [{**judged(inst, j), "tagged": t} for j, t in enumerate(cases.values())]
    write_jsonl(cfg_out(cfg) / "tagged.jsonl", records)
    run_stages(cfg, ["format"], log=lambda m: None)
    kept = read_jsonl(cfg_out(cfg) / "formatted.jsonl")
    assert [r["id"] for r in kept] == ["LaMP-3/7/0"]
    assert kept[0]["chain"] == good and kept[0]["untagged_chain"] == CHAIN
    st = stats(cfg, "format")
    assert st["tasks"]["LaMP-3"] == {"in": 9, "out": 1, "dropped": {"markers": 1, "no_tags": 1, "rewritten": 1,
                                                                    "tag_check": 5}}
    assert set(st["extra"]["tag_errors"]) == {"unclosed tag <tag>", "unknown tag <tag>",
                                               "nested tag <tag> inside <tag>", "text outside segments before <tag>",
                                               "N segments, fewer than N"}


def test_tagger_replies_cut_off_or_left_unclosed_never_lose_the_chains_end_silently(tmp_path):
    """The tag stage kept only up to the last closing tag, so a reply cut off at max_tokens (its decision segment
    unclosed) passed the format stage without its decision."""
    cfg = make_cfg(tmp_path, **{"tagger.concurrency": 1})
    inst = instance()
    s = ["The user asks for a rating.", "Their past reviews of kettles score 4.", "This one is praised.",
         "So 4 it is."]
    head = (f"<analyze_input>{s[0]}</analyze_input>\n<examine_examples>{s[1]}</examine_examples>\n"
            f"<synthesize_findings>{s[2]}</synthesize_findings>\n")
    replies = {0: reply(head + f"<make_decision>{s[3]}", finish="length"),  # cut off by the token limit
               1: reply(head + f"<make_decision>{s[3]}"),  # finished, but the last segment is never closed
               2: reply(head + f"<make_decision>{s[3]}</make_decision>\nDone.")}
    write_jsonl(cfg_out(cfg) / "judged.jsonl", [judged(inst, j) for j in replies])
    order = iter(replies)  # one request at a time (tagger.concurrency=1), in record order
    run_stages(cfg, ["tag", "format"], transports={"tagger": lambda kw: replies[next(order)]}, log=lambda m: None)
    assert [r["id"] for r in read_jsonl(cfg_out(cfg) / "formatted.jsonl")] == ["LaMP-3/7/2"]
    st = stats(cfg, "format")
    assert st["tasks"]["LaMP-3"] == {"in": 3, "out": 1, "dropped": {"tagger_truncated": 1, "tag_check": 1}}
    assert set(st["extra"]["tag_errors"]) == {"unclosed tag <tag>"}


def test_chain_text_the_tagger_leaves_outside_its_tags_drops_the_chain_but_its_own_prose_does_not(tmp_path):
    """Only the span from the first tag to the last closer was kept, so a decision sentence left untagged at the end
    vanished and the overlap filter's 10% slack let the cut chain through (it kept 0.98 of the words)."""
    cfg = make_cfg(tmp_path, **{"tagger.concurrency": 1})
    inst = instance()
    s = ["The user asks for a rating.", "Their past reviews of kettles score 4.", "This one is praised.",
         "So 4 it is."]
    middle = " ".join(s[1:3] * 12)
    long_chain = f"{s[0]} {middle} {s[3]}"  # long enough that the last sentence is under 3% of the words
    body = (f"<analyze_input>{s[0]}</analyze_input>\n<examine_examples>{middle}</examine_examples>\n"
            f"<synthesize_findings>{s[2]}</synthesize_findings>")
    decision = f"\n<make_decision>{s[3]}</make_decision>"
    replies = [reply("Here is the tagged chain:\n" + body + decision + "\nDone."),
               reply(body + f"\n{s[3]}"),  # the decision left outside every tag
               reply(f"{s[0]}\n" + body.replace(f"<analyze_input>{s[0]}</analyze_input>\n", "") + decision),
               # the tagger's own words share a run with the chain ("their past reviews of"), which its span holds
               reply("Tagged by what their past reviews of kettles show:\n" + body + decision),
               reply(body)]  # the decision dropped altogether: 4 of 100 words, within the overlap's slack
    write_jsonl(cfg_out(cfg) / "judged.jsonl", [judged(inst, j, chain=long_chain) for j in range(len(replies))])
    order = iter(replies)
    run_stages(cfg, ["tag", "format"], transports={"tagger": lambda kw: next(order)}, log=lambda m: None)
    assert [r["id"] for r in read_jsonl(cfg_out(cfg) / "formatted.jsonl")] == ["LaMP-3/7/0", "LaMP-3/7/3"]
    st = stats(cfg, "format")["tasks"]["LaMP-3"]
    assert st["dropped"] == {"untagged_text": 2, "ending_lost": 1}
    details = [d["detail"] for d in read_jsonl(cfg_out(cfg) / "dropped" / "format.jsonl")]
    assert details == ["the reply left chain text outside its tags (e.g. 'so 4 it is')",
                       "the reply left chain text outside its tags (e.g. 'the user asks for')",
                       "the tagged chain does not end with the teacher's last words 'so 4 it is'"]


_TAGGED_CHAIN = "<analyze_input>a</analyze_input><examine_examples>b</examine_examples><make_decision>c</make_decision>"


def test_an_sft_stage_that_keeps_no_chain_ends_without_measuring_them_against_seq_len(tmp_path, tiny_tokenizer_dir):
    """With sft_tokenizer set, an empty sft.jsonl was read for the seq_len count and refused ("holds no records"),
    hiding build_chains' line naming the stage that kept none."""
    cfg = make_cfg(tmp_path, sft_tokenizer=str(tiny_tokenizer_dir))
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [instance("LaMP-1", "9", gold="[2]")])
    write_jsonl(cfg_out(cfg) / "formatted.jsonl", [])
    run_stages(cfg, ["sft"], log=lambda m: None)
    assert (cfg_out(cfg) / "sft.jsonl").read_text() == ""
    assert stats(cfg, "sft")["extra"].get("seq_len_fit") is None


def _run_sft_stage(tmp_path, answers_by_total: dict[int, str]):
    """The sft stage (max 1 chain per instance) over formatted chains of one LaMP-1 instance, one per judge total."""
    cfg = make_cfg(tmp_path, **{"filters.max_per_instance": 1})
    inst = instance("LaMP-1", "9", gold="[2]")
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    write_jsonl(cfg_out(cfg) / "formatted.jsonl", [
        {**judged(inst, j, chain=_TAGGED_CHAIN, total=t), "answer": a}
        for j, (t, a) in enumerate(answers_by_total.items())])
    run_stages(cfg, ["sft"], log=lambda m: None)
    return cfg, inst


def test_sft_records_follow_the_sft_format_with_canonical_labels(tmp_path):
    cfg, inst = _run_sft_stage(tmp_path, {17: " 2", 19: "Reference [2]."})
    records = read_sft_records(cfg_out(cfg) / "sft.jsonl")
    assert [(r.id, r.answer, r.user) for r in records] == [("LaMP-1/9/1", "[2]", "u1")]  # the better judged one
    assert records[0].chain == _TAGGED_CHAIN and records[0].messages[0]["role"] == "system"
    assert records[0].messages[1]["content"].endswith(inst["input"])
    assert "- analyze_input: " in records[0].messages[0]["content"]  # the full style lists tag meanings
    assert stats(cfg, "sft")["tasks"]["LaMP-1"] == {"in": 2, "out": 1, "dropped": {"over_instance_cap": 1}}


def test_chains_over_the_instance_cap_are_listed_with_their_judge_total(tmp_path):
    cfg, _ = _run_sft_stage(tmp_path, {17: "[2]", 19: "[2]", 16: "[2]"})
    lines = read_jsonl(cfg_out(cfg) / "dropped" / "sft.jsonl")
    assert [(d["id"], d["reason"]) for d in lines] == [("LaMP-1/9/0", "over_instance_cap"),
                                                       ("LaMP-1/9/2", "over_instance_cap")]
    assert "judge total 17" in lines[0]["detail"]


def test_the_report_states_the_final_count_against_the_spec_and_names_the_drop_lists(tmp_path):
    cfg = make_cfg(tmp_path, **{"filters.max_per_instance": 2})
    inst = instance("LaMP-1", "9", gold="[2]")
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    write_jsonl(cfg_out(cfg) / "formatted.jsonl", [
        {**judged(inst, j, chain=_TAGGED_CHAIN, total=17), "answer": "[2]"} for j in range(3)])
    (cfg_out(cfg) / "stats").mkdir()
    (cfg_out(cfg) / "stats" / "sample.json").write_text(json.dumps(
        {"stage": "sample", "tasks": {"LaMP-1": {"in": 5, "out": 1, "dropped": {"not_sampled": 4}}}, "extra": {}}))
    run_stages(cfg, ["sft", "report"], log=lambda m: None)
    report = (cfg_out(cfg) / "report.md").read_text()
    assert "**2 SFT chains** in sft.jsonl; tagpr-method.md's Stage 0 has about 10,000" in report
    assert "filters.max_per_instance=2 allows at most 2 x 1 sampled instances = 2" in report
    assert "`dropped/sft.jsonl`" in report


def test_the_paper_scale_config_caps_the_chains_near_the_specs_10000():
    """tagpr-method.md: about 10,000 chains; 6 tasks x 1,000 instances x 16 candidates would keep far more."""
    from pathlib import Path
    cfg = load_config(ChainsConfig, Path(__file__).resolve().parents[1] / "recipes" / "configs" /
                      "build_chains_lamp.yaml")
    cap = cfg.filters.max_per_instance * cfg.data.per_task * len(cfg.data.tasks)
    assert 10_000 <= cap <= 12_000


def test_sft_prompt_style_brief_gives_the_short_instruction(tmp_path):
    from minitagpr.data.prompts import instruction
    cfg = make_cfg(tmp_path, prompt_style="brief")
    inst = instance("LaMP-3")
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    write_jsonl(cfg_out(cfg) / "formatted.jsonl", [judged(inst, 0)])
    run_stages(cfg, ["sft"], log=lambda m: None)
    assert read_sft_records(cfg_out(cfg) / "sft.jsonl")[0].messages[0]["content"] == instruction("LaMP-3", "brief")


def test_a_bad_stage_input_names_file_line_record_and_field(tmp_path):
    cfg = make_cfg(tmp_path)
    inst = instance()
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    bad = chain_record(inst, 1)
    del bad["answer"]
    write_jsonl(cfg_out(cfg) / "teacher.jsonl", [chain_record(inst, 0), bad])
    with pytest.raises(ChainDataError, match=r"teacher\.jsonl: line 2 \(id 'LaMP-3/7/1'\): field 'answer': missing"):
        run_stages(cfg, ["accuracy"], log=lambda m: None)
    (cfg_out(cfg) / "teacher.jsonl").write_text(json.dumps({**chain_record(inst, 0), "sample": "0"}) + "\n")
    with pytest.raises(ChainDataError, match=r"line 1 \(id 'LaMP-3/7/0'\): field 'sample': expected int, got str"):
        run_stages(cfg, ["accuracy"], log=lambda m: None)


def test_a_later_stage_refuses_chains_of_an_instance_that_sample_has_since_changed(tmp_path):
    cfg = make_cfg(tmp_path)
    inst = instance()
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    run_stages(cfg, ["teacher"], transports={"teacher": lambda kw: reply("<think>Kettles score 4.</think>\n\n4")},
               log=lambda m: None)
    assert read_jsonl(cfg_out(cfg) / "teacher.jsonl")[0]["instance_digest"] == instance_digest(inst)
    run_stages(cfg, ["accuracy"], log=lambda m: None)  # unchanged: fine
    changed = {**inst, "profile": [{"id": "70", "text": "awful toaster", "score": "1"}]}  # same id, other items
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [changed])
    with pytest.raises(ChainDataError, match=r"teacher\.jsonl was built from another instances\.jsonl \(it changed "
                                             r"since: stage 'sample' was rerun, or the file edited\); rerun stages "
                                             r"teacher before 'accuracy'"):
        run_stages(cfg, ["accuracy"], log=lambda m: None)  # the lineage in stats/teacher.json says so first
    (cfg_out(cfg) / "stats" / "teacher.json").unlink()  # without it, each record's instance digest still does
    with pytest.raises(ChainDataError, match=r"teacher\.jsonl: record id 'LaMP-3/7/0': field 'instance_digest': "
                                             r"instance 'LaMP-3/7' in instances\.jsonl is not the one"):
        run_stages(cfg, ["accuracy"], log=lambda m: None)
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [{**inst, "gold": "2"}])  # another gold: refused too
    with pytest.raises(ChainDataError, match="field 'instance_digest'"):
        run_stages(cfg, ["accuracy"], log=lambda m: None)


def test_a_teacher_reply_cut_off_inside_its_reasoning_counts_as_truncated(tmp_path):
    cfg = make_cfg(tmp_path)
    l1 = instance("LaMP-1", "1", gold="[2]")
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [l1])
    write_jsonl(cfg_out(cfg) / "teacher.jsonl", [chain_record(l1, 0, chain=None, answer="Let me think about",
                                                              finish_reason="length")])
    run_stages(cfg, ["accuracy"], log=lambda m: None)
    assert stats(cfg, "accuracy")["tasks"]["LaMP-1"]["dropped"] == {"truncated": 1}


@pytest.mark.parametrize("key,value", [("filters.rouge_threshold", 30), ("filters.rouge_threshold", -0.1),
                                       ("filters.min_judge_total", 150), ("filters.min_judge_total", 2)])
def test_filter_thresholds_outside_their_scale_are_refused(tmp_path, key, value):
    with pytest.raises(Exception, match=key.replace(".", r"\.") + " must be"):
        make_cfg(tmp_path, **{key: value})


def test_a_bad_stored_profile_item_names_the_instances_file_and_record(tmp_path):
    cfg = make_cfg(tmp_path)
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [{**instance(), "profile": [{"id": "70", "text": "no score"}]}])
    with pytest.raises(ChainDataError, match=r"instances\.jsonl: record id 'LaMP-3/7': .*field 'score': missing"):
        run_stages(cfg, ["teacher"], transports={"teacher": lambda kw: pytest.fail("called")}, log=lambda m: None)


def test_a_stage_input_line_that_is_not_utf8_names_file_and_line(tmp_path):
    cfg = make_cfg(tmp_path)
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [instance()])
    with open(cfg_out(cfg) / "instances.jsonl", "ab") as f:
        f.write(b'{"id": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(ChainDataError, match=r"instances\.jsonl: line 2: not valid UTF-8 \(byte 0xe9 at byte 12"):
        run_stages(cfg, ["teacher"], transports={"teacher": lambda kw: pytest.fail("called")}, log=lambda m: None)


@pytest.mark.parametrize("stage", ["teacher", "accuracy"])
def test_an_instance_id_on_two_lines_is_an_error_naming_both(tmp_path, stage):
    cfg = make_cfg(tmp_path)
    inst = instance()
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst, instance("LaMP-1", "8", gold="[1]"), {**inst, "gold": "5"}])
    write_jsonl(cfg_out(cfg) / "teacher.jsonl", [chain_record(inst, 0)])
    with pytest.raises(ChainDataError, match=r"instances\.jsonl: line 3 \(id 'LaMP-3/7'\): field 'id': duplicate "
                                             r"instance id \(first on line 1\)"):
        run_stages(cfg, [stage], transports={"teacher": lambda kw: pytest.fail("called")}, log=lambda m: None)


def test_config_rejects_a_task_named_twice(tmp_path):
    with pytest.raises(ValueError, match="data.tasks names LaMP-1 more than once"):
        make_cfg(tmp_path, **{"data.tasks": "LaMP-1,LaMP-3,LaMP_1"})


def test_a_stage_whose_input_is_missing_names_the_stage_to_run_first(tmp_path):
    cfg = make_cfg(tmp_path)
    with pytest.raises(ChainDataError, match=r"judged\.jsonl: file not found; it is written by stage 'judge'"):
        run_stages(cfg, ["tag"], log=lambda m: None)
    (Path(cfg.out_dir) / "judged.jsonl").mkdir(parents=True)  # a folder in its place: no "run that stage first"
    with pytest.raises(ChainDataError, match=r"judged\.jsonl: is a folder, not a file \(stage 'judge' writes this"):
        run_stages(cfg, ["tag"], log=lambda m: None)


def test_a_failed_stage_leaves_its_previous_output_untouched(tmp_path):
    cfg = make_cfg(tmp_path, **{"teacher.max_retries": 0})
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [instance()])
    (cfg_out(cfg) / "teacher.jsonl").write_text("previous\n")

    def failing(kwargs):
        raise connection_error()

    with pytest.raises(EndpointError, match="stage 'teacher'"):
        run_stages(cfg, ["teacher"], transports={"teacher": failing}, log=lambda m: None)
    assert (cfg_out(cfg) / "teacher.jsonl").read_text() == "previous\n"
    assert not list(cfg_out(cfg).glob(".*.tmp"))


def test_config_rejects_unknown_stages_and_bad_tag_names(tmp_path):
    with pytest.raises(ValueError, match="unknown bake"):
        make_cfg(tmp_path, stages="teacher,bake")
    with pytest.raises(ValueError, match="not a tag name"):
        make_cfg(tmp_path, **{"tagging.tags": "analyze input"})


def test_prompts_are_ours_and_name_the_four_dimensions():
    messages = chain_prompts.judge_messages("LaMP-3", "review: x", [], "chain", "4")
    for dim in chain_prompts.JUDGE_DIMENSIONS:
        assert f'"{dim}"' in messages[0]["content"]
    teacher = chain_prompts.teacher_messages("LaMP-3", "review: x", [])
    assert "analyze_input" not in teacher[0]["content"]  # the teacher reasons freely; tags come later


def test_a_temp_file_orphaned_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    cfg = make_cfg(tmp_path)
    inst = instance()
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    write_jsonl(cfg_out(cfg) / "teacher.jsonl", [chain_record(inst, 0)])
    orphan = cfg_out(cfg) / ".accurate.jsonl.999999999.0badc0de.tmp"  # no such process
    orphan.write_text("half a file")
    run_stages(cfg, ["accuracy"], log=lambda m: None)
    assert not orphan.exists() and len(read_jsonl(cfg_out(cfg) / "accurate.jsonl")) == 1


@pytest.mark.parametrize("name", ["build_chains_lamp.yaml", "build_chains_demo.yaml"])
def test_shipped_configs_load(name):
    from pathlib import Path
    cfg = load_config(ChainsConfig, Path(__file__).resolve().parents[1] / "recipes" / "configs" / name)
    assert cfg.stage_list()[0] == "sample" and cfg.teacher.temperature == 0.6 and cfg.judge.temperature == 0.0


# ---- pinned by mutation (2026-11-27) ---------------------------------------------------------------------------

def test_the_teacher_seed_depends_on_data_seed():
    """Otherwise another data.seed sends the same requests and reads the same cached answers."""
    from minitagpr.data.chains import sample_seed
    assert sample_seed(0, "LaMP-3/7", 0) != sample_seed(1, "LaMP-3/7", 0)
    assert sample_seed(0, "LaMP-3/7", 0) != sample_seed(0, "LaMP-3/7", 1)


def test_the_instance_cap_keeps_the_best_judged_lower_samples_first_in_sample_order(tmp_path):
    cfg = make_cfg(tmp_path, **{"filters.max_per_instance": 2})
    inst = instance("LaMP-1", "9", gold="[2]")
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    tagged = "<analyze_input>a</analyze_input><examine_examples>b</examine_examples><make_decision>c</make_decision>"
    totals = {0: 17, 1: 16, 2: 19, 3: 17}  # keep 2 (19) and, of the tied 17s, sample 0 (the lower index)
    write_jsonl(cfg_out(cfg) / "formatted.jsonl", [
        {**judged(inst, j, chain=tagged, total=t), "answer": "[2]"} for j, t in totals.items()])
    run_stages(cfg, ["sft"], log=lambda m: None)
    assert [r.id for r in read_sft_records(cfg_out(cfg) / "sft.jsonl")] == ["LaMP-1/9/0", "LaMP-1/9/2"]


def test_filter_thresholds_are_strict_where_documented_and_inclusive_where_not(tmp_path):
    # accuracy: ROUGE must be > rouge_threshold (an exact answer at threshold 1.0 is dropped)
    cfg = make_cfg(tmp_path, **{"filters.rouge_threshold": 1.0})
    l4 = instance("LaMP-4", "2", gold="city council delays the vote")
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [l4])
    write_jsonl(cfg_out(cfg) / "teacher.jsonl", [chain_record(l4, 0, answer="city council delays the vote")])
    run_stages(cfg, ["accuracy"], log=lambda m: None)
    assert stats(cfg, "accuracy")["tasks"]["LaMP-4"] == {"in": 1, "out": 0, "dropped": {"low_rouge": 1}}
    # format: overlap >= min_overlap, so min_overlap = 1.0 keeps a chain whose tagger only inserted tags
    cfg = make_cfg(tmp_path / "f", **{"filters.min_overlap": 1.0})
    inst = instance()
    s = ["The user asks for a rating.", "Their past reviews of kettles score 4.", "This one is praised.",
         "So 4 it is."]
    good = (f"<analyze_input>{s[0]}</analyze_input>\n<examine_examples>{s[1]}</examine_examples>\n"
            f"<synthesize_findings>{s[2]}</synthesize_findings>\n<make_decision>{s[3]}</make_decision>")
    write_jsonl(cfg_out(cfg) / "tagged.jsonl", [{**judged(inst, 0), "tagged": good}])
    run_stages(cfg, ["format"], log=lambda m: None)
    assert stats(cfg, "format")["tasks"]["LaMP-3"]["out"] == 1


def test_data_per_task_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="data.per_task must be >= 1"):
        make_cfg(tmp_path, **{"data.per_task": 0})


@pytest.mark.parametrize("status, retryable, refused", [
    (408, True, False), (409, True, False), (429, True, False), (500, True, False),
    (400, False, True), (413, False, True), (422, False, True), (401, False, False), (404, False, False)])
def test_retryable_and_refused_statuses(status, retryable, refused):
    import openai

    from minitagpr.data.chain_client import classify_error
    response = SimpleNamespace(status_code=status, headers={}, request=None)  # what APIStatusError reads
    err = openai.APIStatusError("busy", response=response, body=None)
    failure = classify_error(err, 30.0)
    assert (failure.retryable, failure.refused) == (retryable, refused)


def status_error(status, message="refused"):
    import openai
    return openai.APIStatusError(message, body=None,
                                 response=SimpleNamespace(status_code=status, headers={}, request=None))


def test_a_request_the_endpoint_refuses_drops_its_record_in_every_stage_and_is_asked_again_on_a_rerun(tmp_path):
    """One HTTP 400 (a content filter, a prompt over the served context) used to stop the stage for good: the same
    request was refused again on every rerun, so the records after it were never built."""
    cfg = make_cfg(tmp_path, **{"tagging.explore_subset": 3, "teacher.concurrency": 1})
    inst = instance()
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    asked = []

    def refusing(text):  # refuses every request whose prompt holds sample 1's chain, else answers `text`
        def transport(kwargs):
            asked.append(kwargs)
            if "Sample one." in json.dumps(kwargs["messages"]) or kwargs.get("seed") == refused_seed:
                raise status_error(400, "content_filter")
            return reply(text)
        return transport

    from minitagpr.data.chains import sample_seed
    refused_seed = sample_seed(0, inst["id"], 1)  # the teacher's request for sample 1
    cfg.samples = 3
    run_stages(cfg, ["teacher", "accuracy"], transports={"teacher": refusing("<think>Four.</think>\n\n4")},
               log=lambda m: None)
    assert len(asked) == 3  # a refusal is not retried
    assert [r["id"] for r in read_jsonl(cfg_out(cfg) / "accurate.jsonl")] == ["LaMP-3/7/0", "LaMP-3/7/2"]
    assert stats(cfg, "accuracy")["tasks"]["LaMP-3"]["dropped"] == {"endpoint_refused": 1}
    drop = read_jsonl(cfg_out(cfg) / "dropped" / "accuracy.jsonl")[0]
    assert drop["id"] == "LaMP-3/7/1" and drop["reason"] == "endpoint_refused" and "HTTP 400" in drop["detail"]
    assert len((tmp_path / "out" / "cache" / "teacher.jsonl").read_text().splitlines()) == 2  # refusals: not cached
    asked.clear()
    run_stages(cfg, ["teacher"], transports={"teacher": refusing("<think>Four.</think>\n\n4")}, log=lambda m: None)
    assert len(asked) == 1  # the rerun asks the refused request again, the answered ones come from the cache

    chains = ["Sample zero.", "Sample one.", "Sample two."]
    import shutil
    shutil.rmtree(cfg_out(cfg) / "stats")  # the files below are made by hand: no lineage to check them against
    write_jsonl(cfg_out(cfg) / "accurate.jsonl", [chain_record(inst, j, chain=c, accuracy=1.0)
                                                 for j, c in enumerate(chains)])
    run_stages(cfg, ["judge"], transports={"judge": refusing(judge_json())}, log=lambda m: None)
    assert stats(cfg, "judge")["tasks"]["LaMP-3"] == {"in": 3, "out": 2, "dropped": {"endpoint_refused": 1}}

    shutil.rmtree(cfg_out(cfg) / "stats")
    write_jsonl(cfg_out(cfg) / "judged.jsonl", [judged(inst, j, chain=c) for j, c in enumerate(chains)])
    run_stages(cfg, ["explore"], transports={"tagger": refusing("<decide>y</decide>")}, log=lambda m: None)
    assert stats(cfg, "explore")["tasks"]["LaMP-3"] == {"in": 3, "out": 2, "dropped": {"endpoint_refused": 1}}
    run_stages(cfg, ["tag", "format"], transports={"tagger": refusing("no tags")}, log=lambda m: None)
    assert stats(cfg, "format")["tasks"]["LaMP-3"]["dropped"] == {"endpoint_refused": 1, "no_tags": 2}
    assert "tagger_refusal" not in json.dumps(read_jsonl(cfg_out(cfg) / "dropped" / "format.jsonl"))


def test_refusals_in_a_row_stop_the_run_as_a_configuration_error(tmp_path):
    """A setting every request trips (a parameter the server does not take) must not drop the whole data set."""
    client, logs = make_client(tmp_path, lambda kw: (_ for _ in ()).throw(status_error(400, "unknown field 'seed'")),
                               concurrency=1, max_refused_in_a_row=3)
    seen = []
    with pytest.raises(EndpointError, match=r"3 request\(s\) in a row were refused \(max_refused_in_a_row=3\), the "
                                            r"last 'r2' \(sample 0\): HTTP 400: unknown field 'seed'"), client.cache:
        for request, response in client.run(requests(6)):
            seen.append((request.label, response["finish_reason"]))
    assert seen == [("r0", "refused"), ("r1", "refused")] and client.refused == 3
    assert "r3" not in "".join(logs)  # nothing started after the third refusal


def test_a_refusal_between_answers_resets_the_count(tmp_path):
    client, _ = make_client(tmp_path, lambda kw: (_ for _ in ()).throw(status_error(422)) if kw["seed"] % 2 else
                            reply("ok"), concurrency=2, max_refused_in_a_row=2)
    with client.cache:
        got = [response["finish_reason"] for _, response in client.run(requests(6))]
    assert got == ["stop", "refused"] * 3


def test_backoff_is_capped_and_jittered_between_half_and_all_of_the_base(tmp_path):
    client, _ = make_client(tmp_path, lambda kw: reply("x"), backoff_s=2.0, max_backoff_s=8.0)
    client._rng = SimpleNamespace(random=lambda: 0.0)
    assert client._delay(1, None) == 2.0  # base 4 s, the lowest jitter is half of it
    client._rng = SimpleNamespace(random=lambda: 1.0)
    assert client._delay(10, None) == 8.0  # 2 * 2**10 capped at max_backoff_s


def test_no_answer_is_handed_on_after_a_request_failed_for_good(tmp_path):
    import openai

    q2_started = threading.Event()

    def transport(kwargs):
        q = kwargs["messages"][0]["content"]
        if q == "q1":  # refused outright (HTTP 401, a configuration error) once q2 is in flight: the run stops
            q2_started.wait(5)
            raise openai.APIStatusError("bad key", body=None,
                                        response=SimpleNamespace(status_code=401, headers={}, request=None))
        if q == "q2":
            q2_started.set()
            time.sleep(0.2)  # answered (and cached) after q1 failed
        return reply("answer to " + q)
    client, _ = make_client(tmp_path, transport, concurrency=3)
    seen = []
    with pytest.raises(EndpointError, match="was refused"), client.cache:
        for request, response in client.run(requests(3)):
            seen.append(request.label)
    assert seen == ["r0"]  # r2 is answered but comes after the failed r1: never handed on


def test_a_failed_cache_write_leaves_no_partial_line_for_the_next_append_to_follow(tmp_path, monkeypatch):
    """A write cut short by a full disk left its prefix; the next answer's line followed it, and the next run called
    the file damaged mid-way (hours of paid answers stuck until repaired by hand)."""
    import errno
    import os

    from minitagpr.data import chain_client
    real_write, fail = os.write, [True]

    def full_disk(fd, data):
        if fail[0]:
            fail[0] = False
            real_write(fd, bytes(data[:10]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)
    cache = ResponseCache(tmp_path / "c.jsonl")
    with cache:
        cache.put("a", "teacher", "m", reply("first"))
        monkeypatch.setattr(chain_client.os, "write", full_disk)
        with pytest.raises(OSError, match="No space left"):
            cache.put("b", "teacher", "m", reply("lost"))
        cache.put("c", "teacher", "m", reply("third"))
        monkeypatch.setattr(chain_client.os, "write", real_write)
    with ResponseCache(tmp_path / "c.jsonl") as again:
        assert len(again) == 2 and again.get("a")["content"] == "first" and again.get("c")["content"] == "third"
        assert again.get("b") is None and again.torn_lines == 0


def test_putting_an_answered_key_twice_writes_one_line(tmp_path):
    cache = ResponseCache(tmp_path / "c.jsonl")
    with cache:
        cache.put("k", "teacher", "m", reply("a"))
        cache.put("k", "teacher", "m", reply("b"))
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 1


# ---- pinned by mutation (each fails on a mutant the suite let through, 2026-11-29) -------------------------------

ONES = {k: 1 for k in SCORES}


def test_the_judge_reply_is_read_after_its_last_think_block():
    """A reasoning judge may write several think blocks; a complete draft scoring in any of them is not its
    answer, only the JSON after the last `</think>` is."""
    text = "<think>first thoughts</think><think>draft " + judge_json(ONES) + "</think>\n" + judge_json()
    assert parse_judge_reply(text) == SCORES


def test_of_two_complete_judge_objects_the_shallower_one_wins_breadth_first():
    """Nested objects are searched breadth first (outer ones first), so on a tie in dimensions named the object
    nearer the top wins, whatever order the keys come in."""
    assert parse_judge_reply(json.dumps({"final": SCORES, "notes": {"draft": ONES}})) == SCORES
    assert parse_judge_reply(json.dumps({"notes": {"draft": ONES}, "final": SCORES})) == SCORES


def test_a_think_segment_in_another_case_is_no_free_tag_name():
    """`think` is never a segment name, whatever its case (`<Think>` is not stripped as a think block, since only
    the model's own lowercase `</think>` closes one, but it folds to `think`)."""
    assert parse_free_tags("<Think>draft</Think><Look at History>a</Look at History>") == ["look_at_history"]


def test_accuracy_follows_the_configured_normalisation_and_rouge_variant(tmp_path):
    """normalize_answers=false is the official strict rule: "2" for gold "[2]" is wrong, "[2]" is right.
    rouge_variant=rouge1: "vote delays council" vs gold "council delays vote" shares every unigram (ROUGE-1 = 1.0,
    kept at threshold 0.5) while its ROUGE-L is 1/3 (LCS of one word in three), which would drop it."""
    cfg = make_cfg(tmp_path, **{"filters.normalize_answers": False, "filters.rouge_variant": "rouge1",
                                "filters.rouge_threshold": 0.5})
    l1, l4 = instance("LaMP-1", "1", gold="[2]"), instance("LaMP-4", "2", gold="council delays vote")
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [l1, l4])
    write_jsonl(cfg_out(cfg) / "teacher.jsonl", [chain_record(l1, 0, answer="2"), chain_record(l1, 1, answer="[2]"),
                                                 chain_record(l4, 0, answer="vote delays council")])
    run_stages(cfg, ["accuracy"], log=lambda m: None)
    kept = read_jsonl(cfg_out(cfg) / "accurate.jsonl")
    assert [(r["id"], r["accuracy"]) for r in kept] == [("LaMP-1/1/1", 1.0), ("LaMP-4/2/0", pytest.approx(1.0))]
    assert stats(cfg, "accuracy")["tasks"]["LaMP-1"] == {"in": 2, "out": 1, "dropped": {"wrong_answer": 1}}


def test_sft_answers_are_written_as_given_when_normalisation_is_off(tmp_path):
    """filters.normalize_answers=false also leaves the SFT records' classification answers as written (stripped):
    " 2" stays "2", where normalisation would make it "[2]"."""
    cfg = make_cfg(tmp_path, **{"filters.normalize_answers": False})
    inst = instance("LaMP-1", "9", gold="[2]")
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    write_jsonl(cfg_out(cfg) / "formatted.jsonl", [{**judged(inst, 0, chain=_TAGGED_CHAIN, total=17), "answer": " 2"}])
    run_stages(cfg, ["sft"], log=lambda m: None)
    assert [r.answer for r in read_sft_records(cfg_out(cfg) / "sft.jsonl")] == ["2"]


def test_a_tagged_chain_with_no_words_overlaps_nothing():
    """Either side without words shares none: overlap 0.0, so a reply of bare tags cannot pass min_overlap."""
    assert word_overlap(CHAIN, "<analyze_input> </analyze_input><make_decision></make_decision>") == 0.0
    assert word_overlap("", "<analyze_input>So 4 it is.</analyze_input>") == 0.0


# ---- pinned by mutation (2026-11-29) ---------------------------------------------------------------------------------

def _lamp_download(tmp_path, task="LaMP-3", n=12, golds_left_out=()):
    """A user-split LaMP training part of `n` questions under tmp_path/lamp (the layout the sample stage reads)."""
    from lamp_fixtures import make_examples
    from minitagpr.data.lamp import split_files, write_outputs, write_questions
    examples, golds = make_examples(task, n=n)
    q_path, o_path = split_files(tmp_path / "lamp", task, "user", "train")
    write_questions(q_path, examples)
    write_outputs(o_path, task, {i: g for i, g in golds.items() if i not in golds_left_out})
    return [ex.id for ex in examples]


def _sample(tmp_path, per_task):
    cfg = make_cfg(tmp_path, **{"data.lamp_root": str(tmp_path / "lamp"), "data.tasks": "LaMP-3",
                                "data.per_task": per_task})
    run_stages(cfg, ["sample"], log=lambda m: None)
    return cfg, read_jsonl(cfg_out(cfg) / "instances.jsonl")


def test_sampled_questions_keep_their_file_order(tmp_path):
    ids = _lamp_download(tmp_path)
    _, instances = _sample(tmp_path, per_task=6)
    picked = [inst["example_id"] for inst in instances]
    assert len(picked) == 6 and picked == [i for i in ids if i in picked]


def test_a_task_with_fewer_questions_than_per_task_is_sampled_whole(tmp_path):
    ids = _lamp_download(tmp_path, n=4)
    cfg, instances = _sample(tmp_path, per_task=50)
    assert [inst["example_id"] for inst in instances] == ids
    assert stats(cfg, "sample")["tasks"]["LaMP-3"]["out"] == 4


def test_a_user_split_instance_names_its_question_as_the_user(tmp_path):
    """User split: one user per question (LampExample.user), so the SFT records and PRMU rows have a user key."""
    _lamp_download(tmp_path, n=3)
    _, instances = _sample(tmp_path, per_task=3)
    assert [inst["user"] for inst in instances] == [inst["example_id"] for inst in instances]


def test_a_sampled_question_without_a_gold_is_an_error_naming_the_outputs_file_and_the_id(tmp_path):
    _lamp_download(tmp_path, n=3, golds_left_out={"101"})
    with pytest.raises(ChainDataError, match=r"train_outputs.json: no gold output for question id '101' \(record 1 "
                                             r"of .*train_questions.json\)"):
        _sample(tmp_path, per_task=3)


def test_stages_named_out_of_order_run_in_pipeline_order(tmp_path):
    cfg = make_cfg(tmp_path, stages="report,sft")
    assert cfg.stage_list() == ["sft", "report"]
    inst = instance("LaMP-1", "9", gold="[2]")
    write_jsonl(cfg_out(cfg) / "instances.jsonl", [inst])
    write_jsonl(cfg_out(cfg) / "formatted.jsonl", [{**judged(inst, 0, chain=_TAGGED_CHAIN), "answer": "[2]"}])
    assert list(run_stages(cfg, ["report", "sft"], log=lambda m: None)) == ["sft", "report"]
    assert "**1 SFT chains** in sft.jsonl" in (cfg_out(cfg) / "report.md").read_text()  # the report came after


def test_the_report_counts_judge_totals_up_to_20_and_each_tagged_chain_once_per_tag(tmp_path):
    cfg = make_cfg(tmp_path)
    inst = instance("LaMP-1", "9", gold="[2]")
    repeated = "<analyze_input>a</analyze_input><analyze_input>b</analyze_input><make_decision>c</make_decision>"
    write_jsonl(cfg_out(cfg) / "formatted.jsonl", [{**judged(inst, 0, chain=repeated, total=20), "answer": "[2]"}])
    (cfg_out(cfg) / "stats").mkdir()
    (cfg_out(cfg) / "stats" / "judge.json").write_text(json.dumps(
        {"stage": "judge", "tasks": {"LaMP-1": {"in": 1, "out": 1, "dropped": {}}},
         "extra": {"histogram": {"LaMP-1": {"20": 1}}}}))
    run_stages(cfg, ["report"], log=lambda m: None)
    report = (cfg_out(cfg) / "report.md").read_text()
    assert "| 20 | 1 |" in report  # four dimensions of 5: the top total
    assert "| analyze_input | 2 | 66.7% | 1 (100%) |" in report  # two segments, one chain
