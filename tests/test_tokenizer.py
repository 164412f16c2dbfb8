"""minitagpr.tokenizer: loading a tokenizer folder, the marker ids, encode/decode, save, and bad inputs.

Most tests use a tiny byte-level BPE trained here with the chat markers at ids unlike Qwen3's (as the demo
world does), so they need no shared assets and catch any hard-coded Qwen3 id.
"""
import json
import warnings
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from minitagpr.tokenizer import Tokenizer, TokenizerError, assistant_target

# Markers in an order of our own, so their ids differ from Qwen3's; "<tool_call>" is an extra added token.
SPECIALS = ["<|endoftext|>", "<think>", "</think>", "<|im_end|>", "<|im_start|>", "<tool_call>"]
CORPUS = ["the user likes short titles", "a paper about graphs", "rating: 4 stars", "hello world, hello again",
          "analyze the input then decide", "think step by step"] * 4


def write_tiny_tokenizer(folder: Path, specials=SPECIALS, config=None) -> Path:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if config is None:
        config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def qwen3(qwen3_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(qwen3_tokenizer_dir)


# ---- ids come from the files ---------------------------------------------------------------------------------

def test_marker_ids_are_read_from_the_tokenizer_file(tiny):
    assert (tiny.pad_id, tiny.think_id, tiny.end_think_id, tiny.im_end_id, tiny.im_start_id) == (0, 1, 2, 3, 4)
    assert tiny.eos_id == tiny.im_end_id


def test_eos_and_pad_follow_tokenizer_config(tmp_path):
    folder = write_tiny_tokenizer(tmp_path, config={"eos_token": {"content": "<|endoftext|>"},
                                                    "pad_token": "<tool_call>"})
    tok = Tokenizer.from_dir(folder)
    assert tok.eos_id == tok.token_to_id("<|endoftext|>") == 0
    assert tok.pad_id == tok.token_to_id("<tool_call>") == 5


def test_qwen3_ids_match_the_published_ones(qwen3):
    assert (qwen3.pad_id, qwen3.im_start_id, qwen3.im_end_id, qwen3.eos_id) == (151643, 151644, 151645, 151645)
    assert (qwen3.think_id, qwen3.end_think_id) == (151667, 151668)
    assert qwen3.vocab_size == 151669  # ids the tokenizer can decode, fewer than the 151,936 embedding rows
    # Qwen3's eos is <|im_end|>; <|endoftext|> must stop a sampler too (the rewards read it as an end of turn)
    assert qwen3.stop_ids == [151643, 151645]
    assert qwen3.encode("Hello") == [9707]


def test_vocab_size_counts_base_and_added_tokens(tiny):
    assert tiny.vocab_size == tiny._tok.get_vocab_size(with_added_tokens=True)
    assert tiny.decode([tiny.vocab_size - 1]) != ""


# ---- encode / decode -----------------------------------------------------------------------------------------

def test_encode_adds_no_special_tokens(tiny):
    ids = tiny.encode("hello world")
    assert tiny.eos_id not in ids and tiny.im_start_id not in ids
    assert tiny.decode(ids) == "hello world"


def test_encode_turns_spelled_markers_into_their_ids(tiny):
    ids = tiny.encode("<think>hello</think><|im_end|>")
    assert ids[0] == tiny.think_id and ids[-2:] == [tiny.end_think_id, tiny.im_end_id]


def test_decode_round_trips_unicode(qwen3):
    text = "Café 🤖 数据集 — naïve\r\n\ttabs"
    assert qwen3.decode(qwen3.encode(text)) == text


def test_decode_can_skip_special_tokens(qwen3):
    ids = [qwen3.im_start_id] + qwen3.encode("hi") + [qwen3.im_end_id]
    assert qwen3.decode(ids) == "<|im_start|>hi<|im_end|>"
    assert qwen3.decode(ids, skip_special_tokens=True) == "hi"


def test_encode_batch_equals_encode_one_by_one(tiny):
    texts = ["hello world", "", "<think>a</think>b", "rating: 4 stars 🙂"]
    assert tiny.encode_batch(texts) == [tiny.encode(t) for t in texts]


def test_decode_batch_equals_decode_one_by_one(tiny):
    batch = [tiny.encode("hello"), [], [tiny.think_id, tiny.im_end_id]]
    assert tiny.decode_batch(batch) == [tiny.decode(ids) for ids in batch]


def test_decode_accepts_tensors(tiny):
    torch = pytest.importorskip("torch")
    ids = tiny.encode("hello world")
    assert tiny.decode(torch.tensor(ids)) == "hello world"


def test_decode_rejects_ids_outside_the_vocabulary(tiny):
    with pytest.raises(ValueError, match=r"decode: id -100 at position 1 is outside \[0, 3"):
        tiny.decode([5, -100])
    with pytest.raises(ValueError, match=rf"id {tiny.vocab_size} at position 0"):
        tiny.decode([tiny.vocab_size])
    with pytest.raises(ValueError, match=r"decode_batch\[1\]: id 99999"):
        tiny.decode_batch([[1], [99999]])


def test_encode_rejects_non_strings(tiny):
    with pytest.raises(TypeError, match="encode takes a string, got list"):
        tiny.encode(["hello"])
    with pytest.raises(TypeError, match=r"texts\[1\] is a NoneType"):
        tiny.encode_batch(["a", None])


def test_token_to_id_names_the_missing_token(tiny, tiny_dir):
    with pytest.raises(KeyError, match=r"'<nope>' is not in the vocabulary of .*tokenizer.json"):
        tiny.token_to_id("<nope>")


# ---- save ----------------------------------------------------------------------------------------------------

def test_save_copies_both_files_byte_for_byte(tiny, tiny_dir, tmp_path):
    out = tiny.save(tmp_path / "ckpt" / "nested")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tiny_dir / name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]  # no temp left
    assert Tokenizer.from_dir(out).encode("hello world") == tiny.encode("hello world")


def test_save_works_after_the_source_folder_is_gone(tmp_path):
    folder = write_tiny_tokenizer(tmp_path / "src")
    tok = Tokenizer.from_dir(folder)
    original = (folder / "tokenizer.json").read_bytes()
    for f in folder.iterdir():
        f.unlink()
    tok.save(tmp_path / "dst")
    assert (tmp_path / "dst" / "tokenizer.json").read_bytes() == original


def test_save_overwrites_an_existing_tokenizer(tiny, tmp_path):
    (tmp_path / "tokenizer.json").write_text("old")
    tiny.save(tmp_path)
    assert Tokenizer.from_dir(tmp_path).vocab_size == tiny.vocab_size


# ---- bad folders and files -----------------------------------------------------------------------------------

def test_missing_folder_is_named(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer folder .*nowhere does not exist"):
        Tokenizer.from_dir(tmp_path / "nowhere")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(TokenizerError, match=r"lacks tokenizer.json and tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(TokenizerError, match=rf"{tmp_path} lacks tokenizer_config.json \(needs"):
        Tokenizer.from_dir(tmp_path)


def test_malformed_tokenizer_json_is_named(tmp_path):
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match=r"tokenizer.json: not a valid tokenizers file"):
        Tokenizer.from_dir(tmp_path)


def test_malformed_config_json_is_named_with_its_position(tmp_path):
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>",\n "pad_token": }')
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: malformed JSON at line 2 column 15"):
        Tokenizer.from_dir(tmp_path)


def test_config_that_is_not_an_object_is_rejected(tmp_path):
    write_tiny_tokenizer(tmp_path, config=["<|im_end|>"])
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: must hold a JSON object, got list"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("field", ["eos_token", "pad_token"])
def test_missing_eos_or_pad_field_is_named(tmp_path, field):
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    config[field] = None
    write_tiny_tokenizer(tmp_path, config=config)
    with pytest.raises(TokenizerError, match=rf"tokenizer_config.json: field '{field}' is missing .*got None"):
        Tokenizer.from_dir(tmp_path)


def test_missing_markers_are_all_named_in_one_error(tmp_path):
    write_tiny_tokenizer(tmp_path, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_dir(tmp_path)
    message = str(err.value)
    assert "tokenizer.json" in message
    assert "'<think>' is not in the vocabulary" in message and "'</think>' is not in the vocabulary" in message
    assert "'<|im_end|>' is not" not in message and "'<|im_start|>' is not" not in message


def test_eos_token_unknown_to_the_vocabulary_is_named(tmp_path):
    write_tiny_tokenizer(tmp_path, config={"eos_token": "</s>", "pad_token": "<|endoftext|>"})
    with pytest.raises(TokenizerError, match=r"'</s>' is not in the vocabulary"):
        Tokenizer.from_dir(tmp_path)


def test_marker_that_is_only_a_plain_vocabulary_entry_is_rejected(tmp_path):
    write_tiny_tokenizer(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    # Keep "<think>" in the BPE vocabulary but drop it from the added tokens: text "<think>" then splits.
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<think>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match=r"'<think>' \(id 1\) is not an added token: its text encodes to \["):
        Tokenizer.from_dir(tmp_path)


def test_a_foreign_chat_template_warns(tmp_path):
    write_tiny_tokenizer(tmp_path, config={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                           "chat_template": "{{ messages }}"})
    with pytest.warns(UserWarning, match="chat_template differs from the official Qwen3 template"):
        Tokenizer.from_dir(tmp_path)


def test_the_official_chat_template_does_not_warn(qwen3_tokenizer_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Tokenizer.from_dir(qwen3_tokenizer_dir)


# ---- training targets ----------------------------------------------------------------------------------------

def test_assistant_target_layout():
    assert assistant_target("step one", "B") == "<think>\nstep one\n</think>\n\nB"


def test_assistant_target_trims_newlines_like_the_template():
    assert assistant_target("\n\nchain\n", "\nanswer \n") == "<think>\nchain\n</think>\n\nanswer \n"


@pytest.mark.parametrize("marker", ["<think>", "</think>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"])
def test_assistant_target_rejects_markers_inside_the_text(marker):
    with pytest.raises(ValueError, match=rf"chain contains {marker}"):
        assistant_target(f"a {marker} b", "x")
    with pytest.raises(ValueError, match=rf"answer contains {marker}"):
        assistant_target("a", f"x{marker}")


def test_assistant_target_rejects_non_strings():
    with pytest.raises(ValueError, match="answer must be a string, got NoneType"):
        assistant_target("chain", None)


PROMPT = [{"role": "system", "content": "You personalise answers."}, {"role": "user", "content": "hello world?"}]


def test_prompt_part_equals_apply_chat_with_generation_prompt(tiny):
    ids, mask = tiny.encode_prompt_and_target(PROMPT, "think step by step", "hello")
    n_prompt = mask.index(True)
    assert ids[:n_prompt] == tiny.apply_chat(PROMPT, add_generation_prompt=True)
    assert not any(mask[:n_prompt]) and all(mask[n_prompt:]) and len(ids) == len(mask)


def test_target_part_is_think_block_answer_and_im_end(tiny):
    ids, mask = tiny.encode_prompt_and_target(PROMPT, "think step by step", "hello")
    target = [i for i, m in zip(ids, mask) if m]
    assert target[0] == tiny.think_id and target[-1] == tiny.im_end_id
    assert tiny.decode(target) == "<think>\nthink step by step\n</think>\n\nhello<|im_end|>"


@pytest.mark.parametrize("enable_thinking", [True, False])
@pytest.mark.parametrize("answer", ["[1]", " 4", "\tTitle", "\r\nX", "\u3000数据", "\n\nlead", "x\n"])
def test_prompt_and_target_equal_the_rendered_full_conversation(qwen3, answer, enable_thinking):
    chain = "<analyze_input>The user asks.</analyze_input>" if enable_thinking else ""
    ids, _ = qwen3.encode_prompt_and_target(PROMPT, chain, answer, enable_thinking=enable_thinking)
    full = PROMPT + [{"role": "assistant", "content": answer, "reasoning_content": chain}]
    assert ids + qwen3.encode("\n") == qwen3.apply_chat(full)


def test_thinking_off_target_is_the_answer_after_the_empty_think_block(tiny):
    ids, mask = tiny.encode_prompt_and_target(PROMPT, "", "hello", enable_thinking=False)
    n_prompt = mask.index(True)
    assert ids[:n_prompt] == tiny.apply_chat(PROMPT, add_generation_prompt=True, enable_thinking=False)
    assert tiny.decode(ids[n_prompt:]) == "hello<|im_end|>"


def test_thinking_off_rejects_a_chain(tiny):
    with pytest.raises(ValueError, match="enable_thinking=False .* chain must be empty, got 5 characters"):
        tiny.encode_prompt_and_target(PROMPT, "chain", "hello", enable_thinking=False)


# ---- pinned by mutation (2026-11-27) ---------------------------------------------------------------------------

def test_the_assistant_target_ends_with_im_end_whatever_the_eos_token(tmp_path):
    """A base model's tokenizer_config names <|endoftext|> as eos; the chat turn still ends with <|im_end|>."""
    folder = write_tiny_tokenizer(tmp_path, config={"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})
    tok = Tokenizer.from_dir(folder)
    assert tok.eos_id != tok.im_end_id
    assert tok.stop_ids == sorted({tok.im_end_id, tok.token_to_id("<|endoftext|>")})
    ids, mask = tok.encode_prompt_and_target([{"role": "user", "content": "hi"}], "c", "a")
    assert ids[-1] == tok.im_end_id and mask[-1]


def test_tiny_checkpoints_round_the_qwen3_vocabulary_up_to_64_rows(qwen3_tokenizer_dir, tmp_path):
    from minitagpr.model.presets import make_tiny_checkpoint
    folder = make_tiny_checkpoint(tmp_path / "m", preset="tiny", seed=0, tokenizer_dir=qwen3_tokenizer_dir)
    rows = json.loads((folder / "config.json").read_text())["vocab_size"]
    assert rows == 151_680 and rows % 64 == 0 and rows >= Tokenizer.from_dir(qwen3_tokenizer_dir).vocab_size


# ---- pinned by mutation (each fails on a mutant the suite let through, 2026-11-29) -----------------------------------

def test_thinking_off_rejects_a_chain_of_newlines_too(tiny):
    """With thinking off the prompt already holds the empty think block, so `chain` must be empty: a chain of
    only newlines is not empty and is refused, not silently dropped."""
    with pytest.raises(ValueError, match="chain must be empty, got 1 characters"):
        tiny.encode_prompt_and_target(PROMPT, "\n", "hello", enable_thinking=False)
