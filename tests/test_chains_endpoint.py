"""Endpoint failures through the real `openai` client against a stdlib fake server on 127.0.0.1: what is retried,
how long it waits, what the final error says, and that every answer obtained before a failure is kept."""
import json
import socket
import time

import pytest

pytest.importorskip("openai")

from chains_fakes import FakeServer, completion, slow  # noqa: E402
from minitagpr.config import load_config  # noqa: E402
from minitagpr.data.chain_client import EndpointError  # noqa: E402
from minitagpr.data.chains import ChainsConfig, run_stages  # noqa: E402

OK = (200, completion("<think>Reason.</think>\n\n4"), {})


def cfg_for(tmp_path, base_url, **overrides):
    values = {"out_dir": str(tmp_path / "out"), "samples": 2, "teacher.base_url": base_url,
              "teacher.model": "teacher-x", "teacher.concurrency": 1, "teacher.max_retries": 2,
              "teacher.backoff_s": 0.01, "teacher.timeout_s": 10}
    values.update(overrides)
    cfg = load_config(ChainsConfig, overrides=values)
    instances = [{"id": f"LaMP-3/{i}", "task": "LaMP-3", "example_id": str(i), "user": "u", "input": f"review: r{i}",
                  "profile": [{"id": f"{i}0", "text": "ok", "score": "3"}], "gold": "4"} for i in range(3)]
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "instances.jsonl").write_text("".join(json.dumps(r) + "\n" for r in instances))
    return cfg


def teacher(cfg, logs=None):
    return run_stages(cfg, ["teacher"], log=(logs.append if logs is not None else lambda m: None))


def cache_lines(tmp_path):
    path = tmp_path / "out" / "cache" / "teacher.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def test_connection_refused_is_retried_then_reported_with_endpoint_and_stage(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    logs = []
    with pytest.raises(EndpointError) as err:
        teacher(cfg_for(tmp_path, url), logs)
    message = str(err.value)
    assert "stage 'teacher'" in message and url in message and "teacher-x" in message
    assert "after 3 attempt(s)" in message and "connection error" in message
    assert sum("retry" in line for line in logs) == 2


def test_429_waits_for_retry_after_then_succeeds(tmp_path):
    stamps = []

    def reply(body, number):
        stamps.append(time.monotonic())
        if number == 1:
            return 429, {"error": {"message": "slow down"}}, {"retry-after": "0.4"}
        return OK

    with FakeServer(reply) as server:
        counts = teacher(cfg_for(tmp_path, server.base_url, **{"teacher.backoff_s": 0.0}))
    assert counts["teacher"].total("out") == 6 and len(stamps) == 7
    assert stamps[1] - stamps[0] >= 0.4  # the server's wait, not the (zero) backoff


def test_retry_after_ms_takes_precedence_and_is_capped(tmp_path):
    stamps = []

    def reply(body, number):
        stamps.append(time.monotonic())
        if number == 1:
            return 429, {"error": {"message": "busy"}}, {"retry-after-ms": "150", "retry-after": "30"}
        if number == 2:
            return 503, {"error": {"message": "busy"}}, {"retry-after": "3600"}
        return OK

    with FakeServer(reply) as server:
        teacher(cfg_for(tmp_path, server.base_url, **{"teacher.max_retry_after_s": 1.0}))
    # 150 ms, not the 30 s of retry-after capped to 1 s (with a cap under 150 ms both readings passed); then 1 s
    assert 0.15 <= stamps[1] - stamps[0] < 0.9 and 1.0 <= stamps[2] - stamps[1] < 5


def test_server_errors_exhaust_retries_and_keep_every_answer_obtained_before(tmp_path):
    healthy = [True]

    def reply(body, number):
        if number > 3 and not healthy[0]:
            return 500, {"error": {"message": "the GPU fell over"}}, {}
        return OK

    healthy[0] = False
    with FakeServer(reply) as server:
        cfg = cfg_for(tmp_path, server.base_url)
        with pytest.raises(EndpointError) as err:
            teacher(cfg)
        message = str(err.value)
        assert "HTTP 500" in message and "stage 'teacher'" in message and server.base_url in message
        assert "3 answered requests are kept" in message
        assert len(cache_lines(tmp_path)) == 3 and len(server.bodies) == 3 + 3  # 3 answers, then 1 + 2 retries
        assert not (tmp_path / "out" / "teacher.jsonl").exists()
        healthy[0] = True
        teacher(cfg)  # resume: only the three missing answers are asked for
        assert len(server.bodies) == 6 + 3
    assert len(cache_lines(tmp_path)) == 6
    assert len((tmp_path / "out" / "teacher.jsonl").read_text().splitlines()) == 6


def test_timeouts_are_retried_then_reported(tmp_path):
    with FakeServer(slow(1.5, lambda body, number: OK)) as server:
        cfg = cfg_for(tmp_path, server.base_url, **{"teacher.timeout_s": 0.3, "teacher.max_retries": 1})
        with pytest.raises(EndpointError, match=r"after 2 attempt\(s\): timed out after 0.3 s"):
            teacher(cfg)
        assert len(server.bodies) == 2


def test_a_request_refused_for_good_is_not_retried_and_stops_the_run(tmp_path):
    with FakeServer(lambda body, number: (403, {"error": {"message": "no access to teacher-x"}}, {})) as server:
        with pytest.raises(EndpointError, match=r"was refused: HTTP 403"):
            teacher(cfg_for(tmp_path, server.base_url))
        assert len(server.bodies) == 1


def test_a_request_refused_as_asked_is_not_retried_and_its_record_carries_the_reason(tmp_path):
    def reply(body, number):
        if body["seed"] % 3 == 0:
            return 400, {"error": {"message": "This model's maximum context length is 64 tokens"}}, {}
        return OK
    with FakeServer(reply) as server:
        logs = []
        teacher(cfg_for(tmp_path, server.base_url), logs)
        records = [json.loads(line) for line in (tmp_path / "out" / "teacher.jsonl").read_text().splitlines()]
        refused = [r for r in records if r["finish_reason"] == "refused"]
        assert len(server.bodies) == 6 == len(records) and len(cache_lines(tmp_path)) == 6 - len(refused)
        assert refused and all(r["refusal"].startswith("HTTP 400: ") and "maximum context length is 64" in r["refusal"]
                               for r in refused)
        assert any("was refused: HTTP 400" in line and "its record is dropped" in line for line in logs)


def test_a_reply_that_is_no_chat_completion_is_reported_not_a_traceback(tmp_path):
    with FakeServer(lambda body, number: (200, ["not", "a", "completion"], {})) as server:
        with pytest.raises(EndpointError, match=r"stage 'teacher'.*after 3 attempt\(s\): the reply is not a chat"):
            teacher(cfg_for(tmp_path, server.base_url))
    assert cache_lines(tmp_path) == []  # never cached: a rerun asks again


def test_content_sent_as_text_parts_is_joined_into_one_reply(tmp_path):
    parts = [{"type": "text", "text": "<think>Reason.</think>"}, {"type": "text", "text": "\n\n4"}]
    with FakeServer(lambda body, number: (200, completion(parts), {})) as server:
        teacher(cfg_for(tmp_path, server.base_url))
    records = [json.loads(line) for line in (tmp_path / "out" / "teacher.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["chain"] == "Reason." and r["answer"] == "4" for r in records)
    cached = [json.loads(line)["response"]["content"] for line in cache_lines(tmp_path)]
    assert cached == ["<think>Reason.</think>\n\n4"] * 6


@pytest.mark.parametrize("content", [42, [{"type": "image_url", "image_url": {"url": "x"}}], {"text": "4"}])
def test_content_that_is_no_text_is_retried_and_never_cached(tmp_path, content):
    def reply(body, number):
        return (200, completion(content), {}) if number == 1 else OK

    with FakeServer(reply) as server:
        counts = teacher(cfg_for(tmp_path, server.base_url, **{"teacher.concurrency": 1}))
        assert counts["teacher"].total("out") == 6 and len(server.bodies) == 7  # the odd reply asked again
    assert len(cache_lines(tmp_path)) == 6
    assert all(isinstance(json.loads(line)["response"]["content"], str) for line in cache_lines(tmp_path))


def test_a_body_that_is_no_json_is_retried_then_reported_with_stage_and_request(tmp_path):
    # the openai client raises a bare JSONDecodeError for a cut 200 body: it crashed the build with a traceback
    cut = json.dumps(completion("<think>Reason.</think>\n\n4")).encode()[:40]
    with FakeServer(lambda body, number: (200, cut, {}) if number == 1 else OK) as server:
        counts = teacher(cfg_for(tmp_path, server.base_url))
        assert counts["teacher"].total("out") == 6 and len(server.bodies) == 7  # asked again, then answered
    (tmp_path / "again").mkdir()
    with FakeServer(lambda body, number: (200, cut, {})) as server:
        with pytest.raises(EndpointError, match=r"stage 'teacher'.*after 3 attempt\(s\): the reply's body is not "
                                                r"valid JSON \("):
            teacher(cfg_for(tmp_path / "again", server.base_url))


def test_content_that_stays_no_text_is_reported_not_a_traceback(tmp_path):
    with FakeServer(lambda body, number: (200, completion(42), {})) as server:
        with pytest.raises(EndpointError, match=r"stage 'teacher'.*after 3 attempt\(s\): the reply's message content "
                                                r"is no text: 42"):
            teacher(cfg_for(tmp_path, server.base_url))
    assert cache_lines(tmp_path) == []  # never cached: a rerun asks again


def test_an_unusable_answer_cached_by_an_older_version_is_asked_again_once(tmp_path, monkeypatch):
    from minitagpr.data import chain_client
    with FakeServer(lambda body, number: (200, completion(42), {})) as server:  # cached unchecked, as before the fix
        with monkeypatch.context() as m:
            m.setattr(chain_client, "checked_response", lambda response: response)
            # the old crash: the number 42 reached the reply parser as if it were text (answers.extract_answer)
            with pytest.raises(AttributeError, match=r"'int' object has no attribute"):
                teacher(cfg_for(tmp_path, server.base_url))
    unusable = len(cache_lines(tmp_path))
    assert unusable >= 1
    logs = []
    with FakeServer(lambda body, number: OK) as server:
        cfg = cfg_for(tmp_path, server.base_url)
        teacher(cfg, logs)
        assert len(server.bodies) == 6 and sum("is unusable" in line for line in logs) == unusable
        teacher(cfg)  # the new answers replaced the unusable ones in the cache
        assert len(server.bodies) == 6
    assert len(cache_lines(tmp_path)) == 6 + unusable
    assert len((tmp_path / "out" / "teacher.jsonl").read_text().splitlines()) == 6
