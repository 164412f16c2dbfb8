"""minitagpr.serve's request handling without a model or a socket: a fake engine and tokenizer, so the stop ids,
usage counts, stop strings and request limits are pinned exactly (each test fails on a mutant that the
end-to-end server tests let through, 2026-11-27)."""
import threading
from types import SimpleNamespace

import pytest

from minitagpr.rollout import Completion
from minitagpr.serve import ChatServer, RequestError, apply_stop_strings, parse_chat_request

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
    from minitagpr.serve import main
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
