"""Tokenizer and Qwen3 chat template: `tokenizers` for the BPE, plain Python for the template.

A checkpoint folder holds `tokenizer.json` (the BPE, read with the `tokenizers` library) and
`tokenizer_config.json` (which names the eos and pad tokens). The Qwen3 chat template is re-implemented here
rule by rule (`render_qwen3_chat`), so nothing renders Jinja at run time; tests check it against the official
template rendered with jinja2.

Layout of one rendered conversation (thinking on, generation prompt added):

    <|im_start|>system\n{system}<|im_end|>\n
    <|im_start|>user\n{query}<|im_end|>\n
    <|im_start|>assistant\n                        <- end of the prompt
    <think>\n{chain}\n</think>\n\n{answer}<|im_end|>  <- the training target (`encode_prompt_and_target`)

No token id is hard-coded: every id is looked up in the files, so a small BPE trained with the same special
tokens (the demo world's) loads the same way as Qwen3's.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import tokenizers

from minitagpr.atomic import atomic_write_bytes

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
ENDOFTEXT = "<|endoftext|>"
REQUIRED_TOKENS = (IM_START, IM_END, THINK, END_THINK, ENDOFTEXT)

# sha256 of the official Qwen3 `chat_template` string (../shared/assets/qwen3-tokenizer), the one mirrored below.
QWEN3_TEMPLATE_SHA256 = "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5"

ROLES = ("system", "user", "assistant")
_FIELDS = {"system": {"role", "content"}, "user": {"role", "content"},
           "assistant": {"role", "content", "reasoning_content", "tool_calls"}}
_NL = "\n"


class TokenizerError(ValueError):
    """A tokenizer folder or file that cannot be used; the message names the folder or file."""


# --------------------------------------------------------------------------------------------------------------
# The Qwen3 chat template, in Python
# --------------------------------------------------------------------------------------------------------------

def check_messages(messages) -> None:
    """Raise a ValueError naming the message index and field for anything the renderer does not take."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("messages is empty: a chat needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role == "tool":
            raise ValueError(f"messages[{i}]: role 'tool' is not supported (tool use is out of scope for minitagpr)")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]: field 'role' must be one of {', '.join(ROLES)}, got {role!r}")
        unknown = sorted(set(m) - _FIELDS[role])
        if unknown:
            raise ValueError(f"messages[{i}] ({role}): unknown field(s) {', '.join(map(repr, unknown))}; "
                             f"a {role} message takes {', '.join(sorted(_FIELDS[role]))}")
        if "content" not in m:
            raise ValueError(f"messages[{i}] ({role}): field 'content' is missing")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}] ({role}): field 'content' must be a string, "
                             f"got {type(m['content']).__name__}")
        if m.get("tool_calls"):  # the template treats None / [] as "no tool calls"; anything else is tool use
            raise ValueError(f"messages[{i}] (assistant): field 'tool_calls' is not supported "
                             f"(tool use is out of scope for minitagpr)")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"messages[{i}] (assistant): field 'reasoning_content' must be a string or None, "
                             f"got {type(reasoning).__name__}")
        for name in ("content", "reasoning_content"):  # json.loads gives "\ud800" as a lone surrogate, which the
            text = m.get(name)                         # tokenizer refuses with a bare TypeError
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise ValueError(f"messages[{i}] ({role}): field {name!r} is not valid Unicode (a lone surrogate "
                                     f"at character {err.start})") from None


def _last_query_index(messages) -> int:
    """Index of the last real user query; turns after it keep their reasoning.

    The template walks backwards and skips user messages that only wrap a tool result
    (`<tool_response>...</tool_response>`); with no user query at all it is the last index.
    """
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m["role"] == "user" and not (m["content"].startswith("<tool_response>")
                                        and m["content"].endswith("</tool_response>")):
            return i
    return len(messages) - 1


def _split_reasoning(message) -> tuple[str, str]:
    """(reasoning, content) of an assistant message, by the template's rules.

    An explicit `reasoning_content` (not None) wins and `content` is kept as is. Otherwise, if the content
    spells `</think>`, the answer is what follows the last `</think>` (leading newlines dropped) and the
    reasoning is what precedes the first `</think>`, after the last `<think>` before it (newlines trimmed).
    """
    content = message["content"]
    if message.get("reasoning_content") is not None:
        return message["reasoning_content"], content
    if END_THINK in content:
        before = content.split(END_THINK)[0]
        return before.rstrip(_NL).split(THINK)[-1].lstrip(_NL), content.split(END_THINK)[-1].lstrip(_NL)
    return "", content


def render_qwen3_chat(messages, add_generation_prompt: bool = False, enable_thinking: bool = True) -> str:
    """Render `messages` exactly as the official Qwen3 chat template does (tool-free conversations).

    Rules mirrored from the template:
    - a first system message opens the chat; a later system message is rendered like any turn;
    - assistant turns after the last user query show `<think>\\n{reasoning}\\n</think>\\n\\n{answer}` when they are
      the final message or have non-empty reasoning; every other assistant turn shows only its answer (the
      reasoning of earlier rounds is dropped);
    - `add_generation_prompt` appends `<|im_start|>assistant\\n`, plus an empty think block when
      `enable_thinking` is False (Qwen3's switch for answering without thinking).
    Unknown roles, tool messages and tool calls raise ValueError (the template would drop or format them).
    """
    if not isinstance(add_generation_prompt, bool) or not isinstance(enable_thinking, bool):
        raise ValueError(f"add_generation_prompt and enable_thinking must be bools, got "
                         f"{add_generation_prompt!r} and {enable_thinking!r}")
    check_messages(messages)
    parts = []
    if messages[0]["role"] == "system":
        parts.append(f"{IM_START}system\n{messages[0]['content']}{IM_END}\n")
    last_query = _last_query_index(messages)
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "user" or (role == "system" and i > 0):
            parts.append(f"{IM_START}{role}\n{m['content']}{IM_END}\n")
        elif role == "assistant":
            reasoning, content = _split_reasoning(m)
            is_last = i == len(messages) - 1
            if i > last_query and (is_last or reasoning):
                parts.append(f"{IM_START}assistant\n{THINK}\n{reasoning.strip(_NL)}\n{END_THINK}\n\n"
                             f"{content.lstrip(_NL)}")
            else:
                parts.append(f"{IM_START}assistant\n{content}")
            parts.append(f"{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
        if not enable_thinking:
            parts.append(f"{THINK}\n\n{END_THINK}\n\n")
    return "".join(parts)


def assistant_target(chain: str, answer: str) -> str:
    """The text the template renders for a final assistant turn with reasoning `chain` and answer `answer`:
    `<think>\\n{chain}\\n</think>\\n\\n{answer}` (newlines around the chain and before the answer are trimmed,
    as the template does). The closing `<|im_end|>` is not part of it.
    """
    for name, text in (("chain", chain), ("answer", answer)):
        if not isinstance(text, str):
            raise ValueError(f"{name} must be a string, got {type(text).__name__}")
        # A marker inside the text would end the think block or the turn early and corrupt the target
        # (<|endoftext|> is one of the stop ids: trained mid-target it teaches the model to stop there).
        spelled = [tok for tok in (THINK, END_THINK, IM_START, IM_END, ENDOFTEXT) if tok in text]
        if spelled:
            raise ValueError(f"{name} contains {', '.join(spelled)}; the chat markers may not appear inside it")
    return f"{THINK}\n{chain.strip(_NL)}\n{END_THINK}\n\n{answer.lstrip(_NL)}"


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror})") from None


def _token_field(config: dict, field: str, cfg_path: Path) -> str:
    """The token string of `eos_token` / `pad_token`, written either as a string or as {"content": ...}."""
    value = config.get(field)
    if isinstance(value, Mapping):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise TokenizerError(f"{cfg_path}: field '{field}' is missing or not a token string (got {value!r})")
    return value


class Tokenizer:
    """A `tokenizers` BPE plus the Qwen3 chat template and the ids of its markers.

    Build it with `Tokenizer.from_dir(folder)`. `encode` never inserts special tokens: the ids are those of the
    text as spelled (a literal `<|im_end|>` in the text is the single `<|im_end|>` id).
    """

    def __init__(self, tokenizer_json: bytes, config_json: bytes, source: Path | str = "<memory>"):
        source = Path(source)
        tok_path, cfg_path = source / TOKENIZER_FILE, source / CONFIG_FILE
        try:
            self._tok = tokenizers.Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{tok_path}: not a valid tokenizers file ({e})") from None
        try:
            config = json.loads(config_json.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{cfg_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{cfg_path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if not isinstance(config, dict):
            raise TokenizerError(f"{cfg_path}: must hold a JSON object, got {type(config).__name__}")

        self.source = source
        self.config = config
        self._files = {TOKENIZER_FILE: tokenizer_json, CONFIG_FILE: config_json}
        self.eos_token = _token_field(config, "eos_token", cfg_path)
        self.pad_token = _token_field(config, "pad_token", cfg_path)

        # Every marker must be one id, and text spelling it must encode to exactly that id (an added token);
        # otherwise a rendered chat would not contain the marker ids the trainer and sampler look for.
        ids, problems = {}, []
        for token in dict.fromkeys(REQUIRED_TOKENS + (self.eos_token, self.pad_token)):
            token_id = self._tok.token_to_id(token)
            encoded = self._tok.encode(token, add_special_tokens=False).ids
            if token_id is None:
                problems.append(f"{token!r} is not in the vocabulary")
            elif encoded != [token_id]:
                problems.append(f"{token!r} (id {token_id}) is not an added token: its text encodes to {encoded}")
            else:
                ids[token] = token_id
        if problems:
            raise TokenizerError(f"{tok_path}: the chat markers must each be a single added token "
                                 f"(needs {', '.join(REQUIRED_TOKENS)} and the eos/pad tokens of {CONFIG_FILE}): "
                                 + "; ".join(problems))
        self.im_start_id, self.im_end_id = ids[IM_START], ids[IM_END]
        self.think_id, self.end_think_id = ids[THINK], ids[END_THINK]
        self.eos_id, self.pad_id = ids[self.eos_token], ids[self.pad_token]
        self.endoftext_id = ids[ENDOFTEXT]
        # Ids are dense in practice; max + 1 is the bound a sampler must mask above (Qwen3: 151,669 < 151,936 rows).
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

        template = config.get("chat_template")
        if isinstance(template, str) and hashlib.sha256(template.encode()).hexdigest() != QWEN3_TEMPLATE_SHA256:
            warnings.warn(f"{cfg_path}: its chat_template differs from the official Qwen3 template; minitagpr "
                          f"renders chats with its own copy of the Qwen3 rules regardless", stacklevel=3)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load `tokenizer.json` + `tokenizer_config.json` from a local folder (e.g. a checkpoint)."""
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"tokenizer folder {folder} does not exist or is not a folder")
        missing = [name for name in (TOKENIZER_FILE, CONFIG_FILE) if not (folder / name).is_file()]
        if missing:
            needs = "" if len(missing) == 2 else f" (needs {TOKENIZER_FILE} and {CONFIG_FILE})"
            raise TokenizerError(f"tokenizer folder {folder} lacks {' and '.join(missing)}{needs}")
        return cls(_read_bytes(folder / TOKENIZER_FILE), _read_bytes(folder / CONFIG_FILE), source=folder)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the two files, byte for byte as loaded, into `out_dir` (each with atomic_write_bytes)."""
        out = Path(out_dir)
        for name, data in self._files.items():
            atomic_write_bytes(out / name, data)
        return out

    # ---- text <-> ids ---------------------------------------------------------------------------------------

    @property
    def stop_ids(self) -> list[int]:
        """The ids that end a generated turn: `<|im_end|>`, the config's eos and `<|endoftext|>` (Qwen3's eos is
        `<|im_end|>`, so `<|endoftext|>` would otherwise run on; the rewards and answer parser read it as an end of
        turn too). Every sampler in minitagpr stops on exactly these."""
        return sorted({self.im_end_id, self.eos_id, self.endoftext_id})

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as spelled: no BOS/EOS added; special tokens count only where the text writes them."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts at once (the Rust side runs them in parallel)."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_batch: texts[{i}] is a {type(text).__name__}, not a string")
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _check_ids(self, ids, where: str) -> list[int]:
        ids = [int(i) for i in ids]  # accepts tensors and numpy arrays too
        for pos, i in enumerate(ids):
            # tokenizers silently drops unknown ids; an id out of range is a caller bug (e.g. a -100 label)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"{where}: id {i} at position {pos} is outside [0, {self.vocab_size})")
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`. With `skip_special_tokens`, drops tokens marked special (for Qwen3 that keeps
        `<think>`/`</think>`, which are added but not special)."""
        return self._tok.decode(self._check_ids(ids, "decode"), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch, skip_special_tokens: bool = False) -> list[str]:
        checked = [self._check_ids(ids, f"decode_batch[{b}]") for b, ids in enumerate(batch)]
        return self._tok.decode_batch(checked, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary of {self.source / TOKENIZER_FILE}")
        return token_id

    # ---- chats ----------------------------------------------------------------------------------------------

    def render_chat(self, messages, add_generation_prompt: bool = False, enable_thinking: bool = True) -> str:
        """The Qwen3 chat text of `messages` (see `render_qwen3_chat`)."""
        return render_qwen3_chat(messages, add_generation_prompt, enable_thinking)

    def apply_chat(self, messages, add_generation_prompt: bool = False, enable_thinking: bool = True) -> list[int]:
        """Ids of `render_chat(...)`; equal to transformers' `apply_chat_template(..., tokenize=True)`."""
        return self.encode(render_qwen3_chat(messages, add_generation_prompt, enable_thinking))

    def encode_prompt_and_target(self, messages, chain: str, answer: str,
                                 enable_thinking: bool = True) -> tuple[list[int], list[bool]]:
        """(ids, mask) of a prompt and the assistant turn that answers it, for SFT and reward-model inputs.

        ids = prompt + target where
          prompt = `apply_chat(messages, add_generation_prompt=True, enable_thinking=enable_thinking)`, exactly
                   the ids a sampler is given at inference;
          target = `encode(assistant_target(chain, answer)) + [im_end_id]` with thinking on, or
                   `encode(answer.lstrip("\\n")) + [im_end_id]` with thinking off (the prompt already holds the
                   empty think block there, so `chain` must be empty).
        mask is True on the target ids (think block, answer, closing `<|im_end|>`), False on the prompt.
        The two parts are encoded separately, so the prompt ids are exactly what the model is given when it
        generates. Whenever messages end with a user turn, the text is the full template rendering of messages
        + the assistant turn (minus its final "\\n"). With thinking on the parts meet at the added `<think>`
        token, so the ids also equal that rendering's ids; with thinking off they meet at "\\n\\n" + answer,
        where a joint encoding could in principle merge across the seam (none found for Qwen3's BPE with
        whitespace-led answers; tests check a set of them).
        """
        if enable_thinking:
            target_text = assistant_target(chain, answer)
        else:
            if chain:
                raise ValueError("enable_thinking=False renders an empty think block in the prompt; chain must be "
                                 f"empty, got {len(chain)} characters")
            assistant_target("", answer)  # same checks on the answer
            target_text = answer.lstrip(_NL)
        prompt = self.apply_chat(messages, add_generation_prompt=True, enable_thinking=enable_thinking)
        target = self.encode(target_text) + [self.im_end_id]
        return prompt + target, [False] * len(prompt) + [True] * len(target)

    def __repr__(self) -> str:
        return (f"Tokenizer(source={str(self.source)!r}, vocab_size={self.vocab_size}, "
                f"eos={self.eos_token!r}, pad={self.pad_token!r})")
