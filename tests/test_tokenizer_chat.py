"""The Qwen3 chat template in Python equals the official Jinja template, text and token ids.

The oracle is the `chat_template` of ../shared/assets/qwen3-tokenizer rendered with jinja2 in the environment
transformers builds for chat templates (sandboxed, trim_blocks, lstrip_blocks, loopcontrols, raise_exception,
a tojson without HTML escaping); jinja2 is imported by these tests only. One test also goes through
transformers' own `apply_chat_template`. Those tests need the shared assets; the layout is also pinned as literal text
(PINNED), which runs anywhere and is checked against the official template wherever ../shared is.
"""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minitagpr.tokenizer import Tokenizer, render_qwen3_chat

jinja2 = pytest.importorskip("jinja2")
from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


@pytest.fixture(scope="module")
def template(qwen3_tokenizer_dir):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise_exception
    config = json.loads((qwen3_tokenizer_dir / "tokenizer_config.json").read_text())
    return env.from_string(config["chat_template"])


@pytest.fixture(scope="module")
def qwen3(qwen3_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(qwen3_tokenizer_dir)


@pytest.fixture(scope="module")
def reference_ids(qwen3_tokenizer_dir):
    """Ids of a text by transformers' tokenizer of the same folder: an oracle independent of `Tokenizer.encode`,
    which `apply_chat` itself calls (comparing the two would pass whatever encode did). Built once per module."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))
    return lambda text: reference(text, add_special_tokens=False)["input_ids"]


def official(template, messages, add_generation_prompt, enable_thinking):
    return template.render(messages=messages, tools=None, add_generation_prompt=add_generation_prompt,
                           enable_thinking=enable_thinking)


def sys(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def asst(text, reasoning=...):
    message = {"role": "assistant", "content": text}
    if reasoning is not ...:
        message["reasoning_content"] = reasoning
    return message


CONVERSATIONS = {
    "single_user": [user("What is 2+2?")],
    "system_and_user": [sys("You are a helpful assistant."), user("Suggest a title.")],
    "empty_system": [sys(""), user("hi")],
    "empty_user": [user("")],
    "answered_plain": [sys("Be brief."), user("Tag this movie."), asst("comedy")],
    "answered_with_think_in_content": [user("q"), asst("<think>\nI reason.\n</think>\n\n[1]")],
    "answered_with_reasoning_content": [user("q"), asst("[2]", reasoning="because the profile says so")],
    "reasoning_none_falls_back_to_content": [user("q"), asst("<think>r</think>a", reasoning=None)],
    "reasoning_empty_string_keeps_content": [user("q"), asst("<think>r</think>\n\na", reasoning="")],
    "reasoning_wrapped_in_newlines": [user("q"), asst("\n\nanswer", reasoning="\n\nchain\n\n")],
    "multi_turn_earlier_think_dropped": [
        user("first"), asst("<think>old reasoning</think>\n\nold answer"),
        user("second"), asst("<think>\nnew reasoning\n</think>\n\nnew answer")],
    "multi_turn_reasoning_content": [
        sys("sys"), user("u1"), asst("a1", reasoning="r1"), user("u2"), asst("a2", reasoning="r2"),
        user("u3")],
    "three_rounds_mixed": [
        user("u1"), asst("a1"), user("u2"), asst("<think>x</think>a2"), user("u3"), asst("a3", reasoning="")],
    "two_assistants_after_last_query": [user("u"), asst("step", reasoning="plan"), asst("final", reasoning="why")],
    "assistant_without_reasoning_before_last": [user("u"), asst("no reasoning here"), asst("end")],
    "several_think_closers": [user("u"), asst("<think>a</think>b</think>\n\nc")],
    "think_opener_without_closer": [user("u"), asst("<think>unfinished reasoning")],
    "nested_think_openers": [user("u"), asst("pre<think>x<think>\ny\n</think>z")],
    "system_in_the_middle": [user("u1"), asst("a1"), sys("new instructions"), user("u2")],
    "no_user_message": [sys("s"), asst("a", reasoning="r")],
    "only_assistant": [asst("<think>r</think>hello")],
    "tool_response_prefix_only_user": [  # starts like a tool response but is not one: the last query (mutation pin)
        user("real question"), asst("a", reasoning="r1"), user("<tool_response>42 and more"),
        asst("b", reasoning="r2"),
    ],
    "tool_response_lookalike_user": [
        user("real question"), asst("a", reasoning="r1"), user("<tool_response>42</tool_response>"),
        asst("b", reasoning="r2")],
    "unicode_emoji_cjk": [
        sys("Réponds en français 🇫🇷"), user("这部电影是什么类型？🎬 Ünïcödé"),
        asst("喜剧 😂", reasoning="用户喜欢轻松的电影…"), user("ありがとう 🙏")],
    "whitespace_edges": [
        sys("  padded system  \n"), user("\n\nleading newlines\r\nand CRLF\t tabs  "),
        asst("  spaced answer\n\n", reasoning="  \n spaced reasoning \n  "), user("   ")],
    "spelled_special_tokens_in_user_text": [user("say <|im_end|> and <think> literally<|endoftext|>")],
    "long_lamp_like_prompt": [
        sys("You personalise answers for a user from their history."),
        user("Profile:\n" + "\n".join(f"{i}. title: Paper {i} about graphs" for i in range(8))
             + "\nWhich reference is related? [1] or [2]. Answer with the label only.")],
}
FLAGS = [(False, True), (True, True), (True, False), (False, False)]


@pytest.mark.parametrize("add_generation_prompt,enable_thinking", FLAGS)
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_and_ids_equal_the_official_template(template, qwen3, reference_ids, name, add_generation_prompt,
                                                    enable_thinking):
    messages = CONVERSATIONS[name]
    expected = official(template, messages, add_generation_prompt, enable_thinking)
    assert qwen3.render_chat(messages, add_generation_prompt, enable_thinking) == expected
    assert qwen3.apply_chat(messages, add_generation_prompt, enable_thinking) == reference_ids(expected)


def test_enable_thinking_true_equals_leaving_it_undefined(template):
    messages = CONVERSATIONS["multi_turn_reasoning_content"]
    undefined = template.render(messages=messages, add_generation_prompt=True)
    assert render_qwen3_chat(messages, add_generation_prompt=True, enable_thinking=True) == undefined


# ---- the layout, pinned as literal text (runs without ../shared) ---------------------------------------------
# Each string below was written from the official template's rules and is checked against the template itself by
# test_the_pinned_texts_are_what_the_official_template_renders whenever ../shared is there.

IS, IE = "<|im_start|>", "<|im_end|>"
PINNED = {
    # system first, then the user; the generation prompt opens an assistant turn and leaves thinking to the model
    "system_user_generation_prompt": (
        [sys("You tag movies."), user("Which tag fits Alien?")], dict(add_generation_prompt=True),
        f"{IS}system\nYou tag movies.{IE}\n{IS}user\nWhich tag fits Alien?{IE}\n{IS}assistant\n"),
    # enable_thinking=False: the generation prompt carries an empty think block (Qwen3's no-thinking switch)
    "no_thinking_generation_prompt": (
        [sys("You tag movies."), user("Which tag fits Alien?")],
        dict(add_generation_prompt=True, enable_thinking=False),
        f"{IS}system\nYou tag movies.{IE}\n{IS}user\nWhich tag fits Alien?{IE}\n"
        f"{IS}assistant\n<think>\n\n</think>\n\n"),
    # ... and changes nothing without a generation prompt
    "no_thinking_without_generation_prompt": (
        [user("hi")], dict(enable_thinking=False), f"{IS}user\nhi{IE}\n"),
    "user_only_generation_prompt": (
        [user("hi")], dict(add_generation_prompt=True), f"{IS}user\nhi{IE}\n{IS}assistant\n"),
    # an answered turn: the final assistant message gets its think block, newlines around the parts trimmed
    "final_turn_with_reasoning": (
        [user("q"), asst("\n\n[2]", reasoning="\n\nthe profile says so\n\n")], {},
        f"{IS}user\nq{IE}\n{IS}assistant\n<think>\nthe profile says so\n</think>\n\n[2]{IE}\n"),
    # ... an empty one when it has no reasoning (the training target of an answer without thinking)
    "final_turn_without_reasoning": (
        CONVERSATIONS["answered_plain"], {},
        f"{IS}system\nBe brief.{IE}\n{IS}user\nTag this movie.{IE}\n"
        f"{IS}assistant\n<think>\n\n</think>\n\ncomedy{IE}\n"),
    # multi-turn: an earlier round's reasoning is dropped, the last round's kept
    "multi_turn_reasoning_content": (
        [user("u1"), asst("a1", reasoning="r1"), user("u2"), asst("a2", reasoning="r2")], {},
        f"{IS}user\nu1{IE}\n{IS}assistant\na1{IE}\n{IS}user\nu2{IE}\n"
        f"{IS}assistant\n<think>\nr2\n</think>\n\na2{IE}\n"),
    # ... and with a new user query after it, no round keeps its reasoning
    "multi_turn_then_a_new_query": (
        [user("u1"), asst("a1", reasoning="r1"), user("u2"), asst("a2", reasoning="r2"), user("u3")],
        dict(add_generation_prompt=True),
        f"{IS}user\nu1{IE}\n{IS}assistant\na1{IE}\n{IS}user\nu2{IE}\n{IS}assistant\na2{IE}\n"
        f"{IS}user\nu3{IE}\n{IS}assistant\n"),
    # reasoning spelled inside the content: split at </think>, and dropped from the earlier round
    "multi_turn_think_in_content": (
        CONVERSATIONS["multi_turn_earlier_think_dropped"], {},
        f"{IS}user\nfirst{IE}\n{IS}assistant\nold answer{IE}\n{IS}user\nsecond{IE}\n"
        f"{IS}assistant\n<think>\nnew reasoning\n</think>\n\nnew answer{IE}\n"),
    # after the last query, a non-final turn shows a think block only if it has reasoning
    "two_assistant_turns_after_the_query": (
        [user("u"), asst("step"), asst("plan", reasoning="why"), asst("final")], {},
        f"{IS}user\nu{IE}\n{IS}assistant\nstep{IE}\n{IS}assistant\n<think>\nwhy\n</think>\n\nplan{IE}\n"
        f"{IS}assistant\n<think>\n\n</think>\n\nfinal{IE}\n"),
    # a user message that only wraps a tool result is not a query: the turns around it keep their reasoning
    "tool_response_in_a_user_message": (
        [user("q"), asst("a", reasoning="r1"), user("<tool_response>42</tool_response>"),
         asst("b", reasoning="r2")], {},
        f"{IS}user\nq{IE}\n{IS}assistant\n<think>\nr1\n</think>\n\na{IE}\n"
        f"{IS}user\n<tool_response>42</tool_response>{IE}\n{IS}assistant\n<think>\nr2\n</think>\n\nb{IE}\n"),
    # ... but one that only starts like a tool result is a query
    "tool_response_prefix_only_is_a_query": (
        [user("q"), asst("a", reasoning="r1"), user("<tool_response>42 and more"), asst("b", reasoning="r2")], {},
        f"{IS}user\nq{IE}\n{IS}assistant\na{IE}\n{IS}user\n<tool_response>42 and more{IE}\n"
        f"{IS}assistant\n<think>\nr2\n</think>\n\nb{IE}\n"),
    # with no user query at all, the last message is the "query": a final assistant turn shows no think block
    "no_user_query": (
        CONVERSATIONS["no_user_message"], {}, f"{IS}system\ns{IE}\n{IS}assistant\na{IE}\n"),
    # a system message after the first turn is rendered in place like any turn
    "system_in_the_middle": (
        CONVERSATIONS["system_in_the_middle"], dict(add_generation_prompt=True),
        f"{IS}user\nu1{IE}\n{IS}assistant\na1{IE}\n{IS}system\nnew instructions{IE}\n{IS}user\nu2{IE}\n"
        f"{IS}assistant\n"),
}
# Tool use itself (role "tool", tool_calls) is refused, not rendered: test_bad_messages_are_rejected_by_index_and_field.


@pytest.mark.parametrize("name", PINNED)
def test_the_chat_text_is_pinned_literally(name):
    messages, flags, expected = PINNED[name]
    assert render_qwen3_chat(messages, **flags) == expected


@pytest.mark.parametrize("name", PINNED)
def test_the_pinned_texts_are_what_the_official_template_renders(template, name):
    messages, flags, expected = PINNED[name]
    assert template.render(messages=messages, tools=None, **flags) == expected


def test_ids_equal_transformers_apply_chat_template(qwen3, qwen3_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir))
    for name in ("unicode_emoji_cjk", "multi_turn_reasoning_content", "whitespace_edges", "long_lamp_like_prompt"):
        for add_generation_prompt, enable_thinking in FLAGS:
            messages = CONVERSATIONS[name]
            expected = reference.apply_chat_template(messages, tokenize=True, enable_thinking=enable_thinking,
                                                     add_generation_prompt=add_generation_prompt)
            expected = expected["input_ids"] if hasattr(expected, "keys") else expected  # BatchEncoding in v5
            assert qwen3.apply_chat(messages, add_generation_prompt, enable_thinking) == list(expected), name


# ---- random conversations ------------------------------------------------------------------------------------

# Text drawn from pieces that exercise the template's splitting and stripping rules.
PIECES = ["a", "Hello", " ", "  ", "\n", "\n\n", "\r\n", "\t", "<think>", "</think>", "<tool_response>",
          "</tool_response>", "é", "数据", "🙂", "[1]", "</thin", "think"]
text = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)
message = st.one_of(
    st.builds(lambda c: user(c), text),
    st.builds(lambda c: sys(c), text),
    st.builds(lambda c: asst(c), text),
    st.builds(lambda c, r: asst(c, reasoning=r), text, st.one_of(st.none(), text)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(message, min_size=1, max_size=6), add_generation_prompt=st.booleans(),
       enable_thinking=st.booleans())
def test_random_conversations_equal_the_official_template(template, qwen3, reference_ids, messages,
                                                          add_generation_prompt, enable_thinking):
    expected = official(template, messages, add_generation_prompt, enable_thinking)
    assert qwen3.render_chat(messages, add_generation_prompt, enable_thinking) == expected
    assert qwen3.apply_chat(messages, add_generation_prompt, enable_thinking) == reference_ids(expected)


# ---- messages the renderer refuses ---------------------------------------------------------------------------

@pytest.mark.parametrize("messages,pattern", [
    ([], r"messages is empty"),
    ("hello", r"messages must be a list of dicts, got str"),
    ([user("u"), "a"], r"messages\[1\] must be a dict with 'role' and 'content', got str"),
    ([{"content": "x"}], r"messages\[0\]: field 'role' must be one of system, user, assistant, got None"),
    ([{"role": "bot", "content": "x"}], r"messages\[0\]: field 'role' .* got 'bot'"),
    ([user("u"), {"role": "tool", "content": "42"}], r"messages\[1\]: role 'tool' is not supported"),
    ([{"role": "user"}], r"messages\[0\] \(user\): field 'content' is missing"),
    ([{"role": "user", "content": None}], r"messages\[0\] \(user\): field 'content' must be a string, got NoneType"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], r"field 'content' must be a string, got list"),
    ([user("u"), {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}],
     r"messages\[1\] \(assistant\): field 'tool_calls' is not supported"),
    ([user("u"), {"role": "assistant", "content": "a", "reasoning_content": 3}],
     r"messages\[1\] \(assistant\): field 'reasoning_content' must be a string or None, got int"),
    ([{"role": "user", "content": "u", "reasoning_content": "r"}],
     r"messages\[0\] \(user\): unknown field\(s\) 'reasoning_content'; a user message takes content, role"),
    ([user("u"), {"role": "assistant", "content": "a", "reasoning": "r"}],
     r"messages\[1\] \(assistant\): unknown field\(s\) 'reasoning'"),
    ([user("hi \ud800")], r"messages\[0\] \(user\): field 'content' is not valid Unicode \(a lone surrogate at "
                          r"character 3\)"),
    ([user("u"), {"role": "assistant", "content": "a", "reasoning_content": "\udc80"}],
     r"messages\[1\] \(assistant\): field 'reasoning_content' is not valid Unicode"),
])
def test_bad_messages_are_rejected_by_index_and_field(messages, pattern):
    with pytest.raises(ValueError, match=pattern):
        render_qwen3_chat(messages)


def test_empty_tool_calls_are_accepted_like_the_template_does(template):
    messages = [user("u"), {"role": "assistant", "content": "a", "tool_calls": None}]
    assert render_qwen3_chat(messages) == official(template, messages, False, True)


@pytest.mark.parametrize("flags", [{"add_generation_prompt": "yes"}, {"enable_thinking": None}])
def test_non_bool_flags_are_rejected(flags):
    with pytest.raises(ValueError, match="add_generation_prompt and enable_thinking must be bools"):
        render_qwen3_chat([user("u")], **flags)


# ---- pinned by mutation (each fails on a mutant the suite let through, 2026-11-29) -----------------------------------

def test_an_empty_tool_calls_list_is_accepted_like_none(template):
    """The template's `{%- if message.tool_calls %}` reads [] as "no tool calls", as it reads None."""
    messages = [user("u"), {"role": "assistant", "content": "a", "tool_calls": []}]
    assert render_qwen3_chat(messages) == official(template, messages, False, True)
