"""minitagpr.serve's request handling without a model: a fake engine and tokenizer, so the stop ids, usage counts,
stop strings and request limits are pinned exactly (each test fails on a mutant that the end-to-end server tests
let through, 2026-11-27). The tests near the end serve the fakes on a loopback socket, for what only a connection
shows: hung-up clients, bodies on a GET, binding."""
import json
import random
import re
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from minitagpr.rollout import Completion
from minitagpr.serve import ChatServer, RequestError, apply_stop_strings, main, parse_chat_request

LETTERS = "abcdefghij"
USER = [{"role": "user", "content": "hi"}]


class FakeTokenizer:
    """One letter per id; <|im_end|> = 7, eos = 8 and <|endoftext|> = 9 are different ids, as for a base model's
    tokenizer."""
    im_end_id, eos_id, endoftext_id = 7, 8, 9
    stop_ids = [7, 8, 9]

    def apply_chat(self, messages, add_generation_prompt=True, enable_thinking=True):
        return [1, 2, 3]

    def decode(self, ids):
        return "".join(LETTERS[i] for i in ids)


class FakeEngine:
    def __init__(self, completion):
        self.completion, self.calls = completion, []

    def generate(self, prompts, **kwargs):
        self.calls.append(kwargs)
        return [[self.completion]]


def fake_server(completion, max_position=10):
    """The attributes chat_completion reads, without binding a port."""
    return SimpleNamespace(tokenizer=FakeTokenizer(), engine=FakeEngine(completion), max_position=max_position,
                           generate_lock=threading.Lock(), model_name="fake")


def request(**body):
    return parse_chat_request({"messages": USER, **body}, max_position=10)


def test_generation_stops_on_the_tokenizers_stop_ids_and_usage_counts_the_stop_id():
    server = fake_server(Completion([0, 1, 2, 7], "abc", [0.0] * 4, "stop"))
    answer = ChatServer.chat_completion(server, request(max_tokens=4))
    assert server.engine.calls[0]["stop_token_ids"] == [7, 8, 9]
    assert answer["usage"]["completion_tokens"] == 4  # the stop id was generated too
    assert answer["choices"][0]["message"]["content"] == "abc"


def test_max_tokens_may_fill_the_context_exactly():
    server = fake_server(Completion([0], "a", [0.0], "length"))
    ChatServer.chat_completion(server, request(max_tokens=7))  # 3 prompt tokens + 7 = max_position 10
    with pytest.raises(RequestError, match="max_tokens=8 plus the prompt's 3 tokens exceeds"):
        ChatServer.chat_completion(server, request(max_tokens=8))


def test_stop_strings_cut_at_the_earliest_and_count_the_token_that_reached_it():
    assert apply_stop_strings(FakeTokenizer(), [0, 1, 2, 3, 4, 5], "abcdef", ["ef", "cd"]) == ("ab", 3)
    assert apply_stop_strings(FakeTokenizer(), [0, 1, 2], "abc", ["x"]) == ("abc", None)


def test_request_limits_are_exact():
    assert len(request(stop=["a", "b", "c", "d"])["stop"]) == 4
    with pytest.raises(RequestError, match="stop"):
        request(stop=["a", "b", "c", "d", "e"])
    assert request(max_completion_tokens=7)["max_tokens"] == 7 and request(max_tokens=5)["max_tokens"] == 5
    assert request(max_tokens=7, max_completion_tokens=7)["max_tokens"] == 7
    with pytest.raises(RequestError, match=r"'max_tokens' \(5\) and 'max_completion_tokens' \(7\) differ"):
        request(max_tokens=5, max_completion_tokens=7)  # one of them silently won
    assert request(temperature=2.0)["temperature"] == 2.0 and request(temperature=1e-4)["temperature"] == 1e-4
    with pytest.raises(RequestError, match="'temperature' must be in"):
        request(temperature=2.5)


@pytest.mark.parametrize("name, neutral, active", [
    ("top_k", -1, 5), ("top_k", 0, 50), ("min_p", 0.0, 0.1), ("presence_penalty", 0, 0.5),
    ("frequency_penalty", 0.0, -1.0), ("repetition_penalty", 1.0, 1.2), ("logit_bias", {}, {"5": 100}),
    ("response_format", {"type": "text"}, {"type": "json_object"}), ("top_logprobs", 0, 3),
    ("repetition_penalty", None, True)])
def test_unimplemented_sampling_knobs_are_refused_unless_off(name, neutral, active):
    """The server does not implement these knobs: an 'off' value (or none) passes, any other is refused by name
    rather than silently decoding without it."""
    assert request(**{name: neutral})["temperature"] == 1.0
    with pytest.raises(RequestError, match=f"'{name}' is not implemented") as err:
        request(**{name: active})
    assert err.value.param == name


@pytest.mark.parametrize("name, value", [("min_tokens", 5), ("ignore_eos", True), ("best_of", 3),
                                         ("guided_json", {}), ("use_beam_search", True)])
def test_request_fields_the_server_does_not_implement_are_refused_by_name(name, value):
    """They were accepted and ignored: a client asking for 5 tokens at least, or no stop at eos, got neither."""
    with pytest.raises(RequestError, match=rf"'{name}': not a request field minitagpr.serve implements") as err:
        request(**{name: value})
    assert err.value.param == name
    assert request(user="u-17")["n"] == 1  # the end-user id is metadata


@pytest.mark.parametrize("flag", ["--threads", "--max-batch-rows"])
def test_thread_and_batch_counts_below_one_are_refused_by_the_command_line(flag, capsys):
    """--threads -1 was a traceback from torch.set_num_threads."""
    with pytest.raises(SystemExit) as exit_:
        main(["/no/such/checkpoint", "--port", "0", flag, "-1"])
    assert exit_.value.code == 2
    assert f"argument {flag}: must be a positive integer, got '-1'" in capsys.readouterr().err


def test_n_may_be_max_n_but_no_more():
    from minitagpr.serve import MAX_N
    assert request(n=MAX_N)["n"] == MAX_N
    with pytest.raises(RequestError, match=rf"'n' must be in \[1, {MAX_N}\]"):
        request(n=MAX_N + 1)


def test_top_p_0_is_refused():
    """top_p is in (0, 1]: 0 keeps no token."""
    assert request(top_p=1.0)["top_p"] == 1.0
    with pytest.raises(RequestError, match=r"'top_p' must be in \(0.0, 1.0\], got 0") as err:
        request(top_p=0)
    assert err.value.param == "top_p"


def test_an_empty_stop_string_is_refused():
    """"" occurs in every text: it would cut every completion to nothing."""
    with pytest.raises(RequestError, match="'stop' must be a non-empty string") as err:
        request(stop=["</answer>", ""])
    assert err.value.param == "stop"


def test_a_boolean_seed_is_refused():
    """true is an int to Python, so it would silently seed 1."""
    assert request(seed=7)["seed"] == 7
    server = fake_server(Completion([0], "a", [0.0], "length"))
    ChatServer.chat_completion(server, request(seed=7, max_tokens=1))
    assert server.engine.calls[0]["seed"] == 7  # the parsed seed is the one the engine samples with
    with pytest.raises(RequestError, match="'seed' must be an integer, got true") as err:
        request(seed=True)
    assert err.value.param == "seed"


def test_a_prompt_that_fills_the_context_is_refused():
    """No room for even one generated token."""
    server = fake_server(Completion([0], "a", [0.0], "length"), max_position=3)  # the fake prompt has 3 tokens
    with pytest.raises(RequestError, match="the prompt has 3 tokens, the model's limit is 3") as err:
        ChatServer.chat_completion(server, request())
    assert err.value.param == "messages" and not server.engine.calls


def test_without_max_tokens_the_answer_gets_the_room_the_prompt_leaves():
    server = fake_server(Completion([0], "a", [0.0], "length"), max_position=10)
    ChatServer.chat_completion(server, request())
    assert server.engine.calls[0]["max_new_tokens"] == 7  # 10 - 3 prompt tokens, under DEFAULT_MAX_TOKENS


def test_the_requests_model_name_is_echoed_back():
    """A pipeline may give its roles their own names; without one, the served model's id."""
    server = fake_server(Completion([0], "a", [0.0], "length"))
    assert ChatServer.chat_completion(server, request(model="planner", max_tokens=1))["model"] == "planner"
    assert ChatServer.chat_completion(server, request(max_tokens=1))["model"] == "fake"


def test_tool_choice_none_is_accepted_as_no_tools():
    assert request(tool_choice="none")["n"] == 1
    with pytest.raises(RequestError, match="tool calling is not supported"):
        request(tool_choice="auto")


def test_the_stop_strings_token_count_bisects_instead_of_decoding_every_prefix():
    """Decoding every prefix was quadratic: 4000 generated tokens took 4 s per choice."""
    class CountingTokenizer(FakeTokenizer):
        decodes = 0

        def decode(self, ids):
            self.decodes += 1
            return super().decode(ids)
    tok = CountingTokenizer()
    ids = [0] * 999 + [1]  # "a" * 999 + "b"
    assert apply_stop_strings(tok, ids, "a" * 999 + "b", ["b"]) == ("a" * 999, 1000)
    assert tok.decodes <= 12


def test_the_bisected_token_count_is_the_shortest_prefix_reaching_the_stop_string():
    """Tokens of 0 to 3 characters, as a BPE's are: the count is the one the plain scan over prefixes gives."""
    pieces = ["", "a", "bc", "def"]

    class PieceTokenizer:
        def decode(self, ids):
            return "".join(pieces[i] for i in ids)
    rng = random.Random()
    for _ in range(50):
        ids = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        text = PieceTokenizer().decode(ids)
        if not text:
            continue
        start = rng.randrange(len(text))
        stop = text[start:start + rng.randrange(1, 3)]
        cut = text.find(stop)
        shortest = next(k for k in range(1, len(ids) + 1) if len(PieceTokenizer().decode(ids[:k])) > cut)
        assert apply_stop_strings(PieceTokenizer(), ids, text, [stop]) == (text[:cut], shortest), (ids, stop)


def test_max_tokens_true_is_refused_beside_max_completion_tokens_1():
    """true == 1 to Python: the two fields were compared before either was type-checked."""
    with pytest.raises(RequestError, match="'max_tokens' must be an integer, got true") as err:
        request(max_tokens=True, max_completion_tokens=1)
    assert err.value.param == "max_tokens"


def test_the_context_room_error_names_the_field_the_client_sent():
    server = fake_server(Completion([0], "a", [0.0], "length"))
    with pytest.raises(RequestError, match="max_completion_tokens=8 plus the prompt's 3 tokens exceeds") as err:
        ChatServer.chat_completion(server, request(max_completion_tokens=8))
    assert err.value.param == "max_completion_tokens"


# ----------------------------------------------------------------------------------------------------------------------
# The fakes on a loopback socket


class BlockingEngine(FakeEngine):
    """generate() records the call, says it started, and waits for `release`: the test decides how long the
    generation lock is held."""

    def __init__(self, completion):
        super().__init__(completion)
        self.started, self.release = threading.Event(), threading.Event()

    def generate(self, prompts, **kwargs):
        self.calls.append(kwargs)
        self.started.set()
        self.release.wait(60)  # the test releases it; 60 s only bounds a failing test
        return [[self.completion]]


@pytest.fixture
def serve_fake(tmp_path):
    """start(engine, host) serves `engine` with the fake tokenizer on a free port, logging to tmp_path."""
    servers = []

    def start(engine, host="127.0.0.1"):
        engine.model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=10))
        server = ChatServer((host, 0), engine, FakeTokenizer(), "fake", tmp_path / "requests.jsonl")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def post_on_a_socket(server, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    conn = socket.create_connection(server.server_address[:2], timeout=5)
    conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return conn


def log_lines(server, count: int) -> list[dict]:
    """The request log once it has `count` lines (handler threads write them a little after the answers)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        lines = server.request_log.read_text().splitlines() if server.request_log.exists() else []
        if len(lines) >= count:
            return [json.loads(line) for line in lines]
        time.sleep(0.01)
    raise AssertionError(f"the request log has {len(lines)} lines, expected {count}")


def test_a_request_whose_client_hung_up_while_queued_is_not_generated_and_logged_499(serve_fake):
    """It took the generation lock in turn and generated the whole answer for nobody, then logged 200."""
    engine = BlockingEngine(Completion([0], "a", [0.0], "length"))
    server = serve_fake(engine)
    first = post_on_a_socket(server, {"messages": USER, "max_tokens": 1})
    assert engine.started.wait(60)  # the first request holds the generation lock
    post_on_a_socket(server, {"messages": USER, "max_tokens": 1}).close()  # queued behind it, then gone
    engine.release.set()
    with first:
        assert first.recv(65536).startswith(b"HTTP/1.1 200")
    assert sorted(line["status"] for line in log_lines(server, 2)) == [200, 499]
    assert len(engine.calls) == 1


def test_a_client_that_hangs_up_during_its_generation_gets_a_note_not_a_traceback(serve_fake, capsys):
    engine = BlockingEngine(Completion([0], "a", [0.0], "length"))
    server = serve_fake(engine)
    tracebacks = []
    server.handle_error = lambda request, address: tracebacks.append(address)  # socketserver's traceback printer
    conn = post_on_a_socket(server, {"messages": USER, "max_tokens": 1})
    assert engine.started.wait(60)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    conn.close()
    engine.release.set()
    assert log_lines(server, 1)[0]["status"] == 200  # the status it was meant to get
    err, deadline = "", time.time() + 60
    while "hung up" not in err and not tracebacks and time.time() < deadline:
        err += capsys.readouterr().err
        time.sleep(0.01)
    assert not tracebacks
    assert "minitagpr.serve: the client of POST /v1/chat/completions hung up before its 200 answer was sent" in err


def test_a_body_on_a_get_is_not_parsed_as_the_next_request(serve_fake):
    server = serve_fake(FakeEngine(Completion([0], "a", [0.0], "length")))
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = b""
    with socket.create_connection(server.server_address[:2], timeout=5) as conn:
        conn.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled
                     + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        while chunk := conn.recv(65536):
            answer += chunk
    assert re.findall(rb"HTTP/1.1 (\d+)", answer) == [b"200", b"200"]
    assert [line["path"] for line in log_lines(server, 2)] == ["/v1/models", "/health"]


def test_an_ipv6_loopback_host_is_served_over_ipv6(serve_fake):
    """::1 passed the loopback check, then failed: http.server's socket is IPv4."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))  # an IPv6 socket can exist while loopback IPv6 is switched off (some containers)
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    server = serve_fake(FakeEngine(Completion([0], "a", [0.0], "length")), host="::1")
    assert re.fullmatch(r"http://\[::1\]:\d+/v1", server.base_url)
    with urllib.request.urlopen(server.base_url + "/models", timeout=5) as reply:
        assert json.loads(reply.read())["data"][0]["id"] == "fake"


@pytest.fixture
def loads(monkeypatch) -> list:
    """Every checkpoint resolution and model load make_server attempts, recorded (and not done)."""
    import minitagpr.model as M
    import minitagpr.model.checkpoint as C

    calls = []
    monkeypatch.setattr(C, "resolve_checkpoint", lambda path: calls.append(("resolve", path)) or Path(path))
    monkeypatch.setattr(M, "load_pretrained", lambda *args, **kwargs: calls.append(("load", args)))
    return calls


def test_a_busy_port_is_named_before_the_checkpoint_loads(loads):
    """The whole model loaded before the bind found the port taken."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as stop:
            main(["/some/checkpoint", "--port", str(port)])
    assert stop.value.code == f"minitagpr.serve: cannot start: --host/--port 127.0.0.1:{port}: cannot listen there " \
                              f"(Address already in use)"
    assert loads == []


@pytest.mark.parametrize("host", ["no-such-host.invalid", "192.0.2.1"])  # unknown; a TEST-NET address not ours
def test_a_host_that_cannot_be_bound_is_one_line_naming_it(host, loads):
    """Only a busy port named the address: these were a bare "[Errno -2] Name or service not known"."""
    if host == "192.0.2.1":
        try:
            with socket.socket() as probe:
                probe.bind((host, 0))
            pytest.skip("this machine binds addresses it does not have (net.ipv4.ip_nonlocal_bind=1)")
        except OSError:
            pass
    with pytest.raises(SystemExit) as stop:
        main(["/some/checkpoint", "--host", host, "--port", "0"])
    assert stop.value.code.startswith(f"minitagpr.serve: cannot start: --host/--port {host}:0: cannot listen there (")
    assert "\n" not in stop.value.code and loads == []
