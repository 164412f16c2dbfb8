"""minitagpr.serve spoken to by the real `openai` client on 127.0.0.1, over a tiny random Qwen3 with a tiny BPE that
has Qwen3's chat markers (conftest.py's tiny_tokenizer_dir; the checkpoint folder carries the tokenizer files)."""
import hashlib
import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

from minitagpr.model import presets  # noqa: E402
from minitagpr.serve import make_server  # noqa: E402
from minitagpr.tokenizer import Tokenizer  # noqa: E402

MESSAGES = [{"role": "system", "content": "You tag movies."}, {"role": "user", "content": "Which tag fits Alien?"}]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: tiny matmuls, one thread


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer_dir):
    # Untied with a wide init, so the random model's continuations vary instead of repeating one token.
    return presets.make_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny-chat", preset="tiny",
                                        tokenizer_dir=tiny_tokenizer_dir, tie_word_embeddings=False,
                                        initializer_range=0.3)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "requests.jsonl"
    srv = make_server(checkpoint, port=0, request_log=log)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def chat(client, **kwargs):
    request = dict(model="tiny-chat", messages=MESSAGES, max_tokens=8, seed=0)
    request.update(kwargs)
    return client.chat.completions.create(**request)


def post_raw(server, body: bytes):
    req = urllib.request.Request(server.base_url + "/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_lists_the_served_checkpoint(client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]


def test_chat_completion_with_usage_counts(client, checkpoint):
    answer = chat(client)
    prompt_ids = Tokenizer.from_dir(checkpoint).apply_chat(MESSAGES, add_generation_prompt=True)
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert answer.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= answer.usage.completion_tokens <= 8
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_n_returns_n_distinct_choices(client):
    answer = chat(client, n=3, temperature=1.0)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert len({c.message.content for c in answer.choices}) == 3


def test_max_tokens_bounds_the_completion(client, checkpoint):
    answer = chat(client, max_tokens=5, temperature=0.0)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 5
    tok = Tokenizer.from_dir(checkpoint)
    assert len(tok.encode(answer.choices[0].message.content)) <= 6  # re-encoding may merge differently, never longer


def test_same_seed_same_answer(client):
    first, again = chat(client, seed=42, n=2), chat(client, seed=42, n=2)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    other = chat(client, seed=43, n=2)  # the seed reaches the sampler (a server sampling with one fixed seed passed)
    assert [c.message.content for c in other.choices] != [c.message.content for c in first.choices]


def test_stop_string_cuts_the_content(client):
    full = chat(client, temperature=0.0, max_tokens=16).choices[0].message.content
    start = next(i for i in range(2, len(full) - 3) if full.find(full[i:i + 3]) == i)
    stop = full[start:start + 3]
    answer = chat(client, temperature=0.0, max_tokens=16, stop=[stop, "never-in-the-text"])
    assert answer.choices[0].message.content == full[:start]
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens < 16


def test_malformed_requests_get_a_400_naming_the_field_and_the_server_keeps_serving(client, server):
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\].*role"):
        chat(client, messages=[MESSAGES[0], {"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="'n' must be in"):
        chat(client, n=0)
    with pytest.raises(openai.BadRequestError, match="'temperature'"):
        chat(client, temperature="hot")
    with pytest.raises(openai.BadRequestError, match=r"'temperature' must be 0 \(greedy\) or at least"):
        chat(client, temperature=1e-39)  # was a 200 whose answer repeated the last token id
    status, body = post_raw(server, b'{"messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post_raw(server, json.dumps({"messages": MESSAGES, "stream": True}).encode())
    assert status == 400 and body["error"]["param"] == "stream"
    assert chat(client).choices[0].message.content  # still serving


def test_a_lone_surrogate_is_a_400_naming_the_message_and_a_diverged_model_a_500(server, monkeypatch):
    """json.loads reads "\\ud800" as a lone surrogate: the tokenizer's bare TypeError was a 500 naming no field."""
    body = b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 2}'
    status, answer = post_raw(server, body)
    assert status == 400 and "messages[0] (user): field 'content' is not valid Unicode" in answer["error"]["message"]
    from minitagpr.rollout.base import DivergedError

    def diverged(*a, **kw):
        raise DivergedError("prompt_token_ids[0], sample 0: the logits for generated token 0 are not finite")
    monkeypatch.setattr(server.engine, "generate", diverged)
    status, answer = post_raw(server, json.dumps({"messages": MESSAGES, "max_tokens": 2}).encode())
    assert status == 500 and answer["error"]["type"] == "server_error" and "not finite" in answer["error"]["message"]


def test_concurrent_requests_equal_sequential_ones(client):
    seeds = [1, 2, 3, 4]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda s: chat(client, seed=s).choices[0].message.content, seeds))
    sequential = [chat(client, seed=s).choices[0].message.content for s in seeds]
    assert parallel == sequential
    assert len(set(sequential)) > 1  # each request kept its own seed (one shared seed makes the equality trivial)


def test_request_log_has_one_line_per_request_with_the_body_hash(server):
    before = server.request_log.read_text().splitlines() if server.request_log.exists() else []
    body = json.dumps({"model": "x", "messages": MESSAGES, "max_tokens": 2, "seed": 0}).encode()
    post_raw(server, body)
    post_raw(server, b"not json")
    lines = [json.loads(x) for x in server.request_log.read_text().splitlines()]
    assert len(lines) == len(before) + 2
    ok, bad = lines[-2], lines[-1]
    assert ok["status"] == 200 and ok["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert ok["prompt_tokens"] > 0 and ok["completion_tokens"] >= 1
    assert bad["status"] == 400 and bad["body_sha256"] == hashlib.sha256(b"not json").hexdigest()


def test_command_line_server_answers_the_openai_client(checkpoint, tmp_path):
    log = tmp_path / "cli.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "minitagpr.serve", str(checkpoint), "--port", "0",
                             "--request-log", str(log), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"at (http://127\.0\.0\.1:\d+/v1)", line)
        assert match, line + proc.stderr.read() if proc.poll() is not None else line
        cli = openai.OpenAI(base_url=match.group(1), api_key="unused", max_retries=0, timeout=60)
        assert chat(cli, max_tokens=3).usage.completion_tokens <= 3
        assert len(log.read_text().splitlines()) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_server_decodes_on_the_gpu_when_there_is_one(checkpoint, pretend_cuda):
    import torch

    make_server(checkpoint, port=0).server_close()
    assert pretend_cuda == [(torch.float32, "cuda")]


def test_a_body_too_long_to_read_closes_the_connection(server):
    """The unread body must not be parsed as the next request on a kept-alive connection."""
    import socket
    host, port = server.server_address[:2]
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n" + smuggled)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except socket.timeout:  # still open: the server waits for another request
            pass
    assert answer.startswith(b"HTTP/1.1 400") and answer.count(b"HTTP/1.1 ") == 1


@pytest.mark.parametrize("body, reason", [
    (b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
    (b'{"messages": [], "seed": ' + b"1" * 5000 + b"}", "Exceeds the limit (4300 digits)")])
def test_a_body_nested_too_deeply_or_with_a_huge_integer_is_a_400_naming_why(server, body, reason):
    """json.loads raises RecursionError and a ValueError that is not a JSONDecodeError for these: they were 500s."""
    status, answer = post_raw(server, body)
    assert status == 400 and "the request body is not valid JSON" in answer["error"]["message"]
    assert reason in answer["error"]["message"]


def test_the_default_model_id_is_the_checkpoint_argument_not_its_resolved_folder(checkpoint, monkeypatch, tmp_path):
    """"." was served as "" and a hub id as its snapshot's hash, the folder resolve_checkpoint returns."""
    import minitagpr.model.checkpoint as C

    monkeypatch.chdir(checkpoint)
    server = make_server(".", port=0)
    server.server_close()
    assert server.model_name == "tiny-chat"
    link = tmp_path / "latest"  # a symlinked folder keeps its own name, not its target's
    link.symlink_to(checkpoint, target_is_directory=True)
    server = make_server(str(link), port=0)
    server.server_close()
    assert server.model_name == "latest"
    monkeypatch.chdir(checkpoint.parent)
    monkeypatch.setattr(C, "resolve_checkpoint", lambda name: checkpoint)  # as if from the hub cache
    server = make_server("org/tiny-chat-instruct", port=0)
    server.server_close()
    assert server.model_name == "org/tiny-chat-instruct"
