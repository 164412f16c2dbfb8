"""PRMU, the Personalization Reward Model with User embeddings (tagpr-method.md, "PRMU").

    f(u, x, y) = w · h_last,   h = Qwen3Model([E[row(u)] ; embed(tokens(x, y))]),   R_PRMU = sigmoid(f)

- The backbone is our Qwen3 decoder (`model.*`), the head a bias-free `score` Linear(H, 1) reading the hidden state
  of the last real token: the layout of HF `Qwen3ForSequenceClassification` (num_labels = 1), so a
  Skywork-Reward-V2-Qwen3 checkpoint loads unchanged and our checkpoints load in transformers.
- E is the user table, (num_users + 1, H). Row 0 is the shared "unknown user": any user id not seen in the training
  data (or None) reads row 0, never an error. The user's row enters the decoder as one soft token placed before the
  text (position 0; the text starts at position 1). `use_user_table=False` removes the table and the soft token
  (the paper's "PRMU w/o UE"); then the model is exactly the HF sequence classifier.
- Checkpoint folder: `config.json` + `model.safetensors` (HF names, what transformers reads) and beside them
  `user_vocab.json` (user id -> row) and `user_embeddings.safetensors` (E), which transformers ignores.
- The text the model reads is the Qwen3 chat rendering of the prompt's user turn(s), then the response exactly as
  generated inside the assistant turn's markers, closed by `<|im_end|>\\n` (`encode_reward_input`; system messages
  are left out). That equals the template's rendering of the finished conversation when the response has the
  template's whitespace (`<think>\\n...\\n</think>\\n\\n`); otherwise the scorer sees what the policy wrote, which
  the template would re-space.

`bradley_terry_loss` is the training objective; `PRMUScorer.score` is the batched, no-grad reward used by guided RL.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from minitagpr.model.checkpoint import (INDEX_NAME, WEIGHTS_NAME, CheckpointError, _read_header, _read_index,
                                        _read_tensor, atomic_dir, config_dtype, load_state_into, resolve_checkpoint,
                                        save_safetensors_shards)
from minitagpr.model.qwen3 import ConfigError, Qwen3Config, Qwen3Model, embedding

ARCHITECTURE = "Qwen3ForSequenceClassification"
USERS_FILE = "user_vocab.json"
USER_TABLE_FILE = "user_embeddings.safetensors"
USER_TABLE_KEY = "user_table.weight"
_USERS_FORMAT = "minitagpr-prmu-users/1"
DEFAULT_MAX_LEN = 4096  # tokens per scored input for a checkpoint that records no training max_len (a hub RM)


# ----------------------------------------------------------------------------------------------- user ids
class UserVocab:
    """User id -> row of E. Known users get rows 1..N in sorted order (the same on every rank and run); row 0 is
    the unknown user."""

    UNKNOWN_ROW = 0

    def __init__(self, users: Iterable[str] = ()):
        self.users: list[str] = sorted({str(u) for u in users if u is not None})
        self._rows = {u: i + 1 for i, u in enumerate(self.users)}

    def __len__(self) -> int:
        return len(self.users)

    def __eq__(self, other) -> bool:
        return isinstance(other, UserVocab) and self.users == other.users

    def row(self, user_id: str | None) -> int:
        # str(): the vocabulary holds ids as strings, so user 5 and user "5" are one user (as in __init__)
        return self._rows.get(str(user_id), self.UNKNOWN_ROW) if user_id is not None else self.UNKNOWN_ROW

    def rows(self, user_ids: Sequence[str | None]) -> list[int]:
        return [self.row(u) for u in user_ids]

    def to_dict(self) -> dict:
        return {"format": _USERS_FORMAT, "unknown_row": self.UNKNOWN_ROW, "users": self.users}

    @classmethod
    def from_file(cls, path: Path) -> "UserVocab":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != _USERS_FORMAT:
            raise CheckpointError(f"{path}: field 'format': expected {_USERS_FORMAT!r}")
        users = d.get("users")
        if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
            raise CheckpointError(f"{path}: field 'users': expected a list of strings")
        vocab = cls(users)
        if vocab.users != users:
            raise CheckpointError(f"{path}: field 'users': must be sorted and free of duplicates (row i+1 = users[i])")
        return vocab


# ----------------------------------------------------------------------------------------------- model
class PRMU(nn.Module):
    """Qwen3 backbone + bias-free score head + (optional) user table. `forward` returns the logit f, (B,) fp32."""

    def __init__(self, config: Qwen3Config, users: UserVocab | Iterable[str] = (), use_user_table: bool = True):
        super().__init__()
        self.config = config
        self.users = users if isinstance(users, UserVocab) else UserVocab(users)
        self.model = Qwen3Model(config)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)
        # E: row 0 = unknown user, rows 1..N = the training users
        self.user_table = embedding(len(self.users) + 1, config.hidden_size) if use_user_table else None

    @property
    def use_user_table(self) -> bool:
        return self.user_table is not None

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor, user_rows: torch.Tensor | None = None):
        """input_ids (B, T) right-padded, lengths (B,) real tokens per row (>= 1), user_rows (B,) rows of E."""
        B = input_ids.shape[0]
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        last = lengths - 1  # (B,) index of each row's last real token
        if self.user_table is not None:
            if user_rows is None:
                raise ValueError("this PRMU has a user table: forward needs user_rows (use row 0 for unknown users)")
            u = self.user_table(user_rows).to(x.dtype)  # (B, H)
            x = torch.cat([u[:, None, :], x], dim=1)  # (B, 1 + T, H): the user's soft token comes first
            last = last + 1
        # causal attention: right padding sits after every real token, so it never changes the rows' real states
        hidden = self.model(inputs_embeds=x)  # (B, T', H)
        h_last = hidden[torch.arange(B, device=hidden.device), last]  # (B, H)
        # the score in fp32 also under bf16 FSDP (a bf16 f would quantise the Bradley-Terry differences and make
        # ties); a fresh tensor, not a view (FSDP2 hooks the root's output for its backward pass)
        return h_last.float() @ self.score.weight.float()[0]  # (B,) fp32, the logit f

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Seeded HF-style init of backbone and head (normal(0, initializer_range), norms = 1), then the table."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.startswith("user_table."):
                continue
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).to(p.dtype))
        self.init_user_table(seed)

    @torch.no_grad()
    def init_head(self, seed: int = 0) -> None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        w = torch.randn(self.score.weight.shape, generator=g).mul_(self.config.initializer_range)
        self.score.weight.copy_(w.to(self.score.weight.dtype))

    @torch.no_grad()
    def init_user_table(self, seed: int = 0) -> None:
        """Every row := one random vector v ~ N(0, std(token embeddings)^2): all users (and the unknown row) start
        equal, so an untrained table scores every user alike, and v has a token's scale for the first RMSNorm."""
        if self.user_table is None:
            return
        g = torch.Generator(device="cpu").manual_seed(seed + 1)
        std = float(self.model.embed_tokens.weight.float().std())
        v = torch.randn(self.config.hidden_size, generator=g) * std  # (H,)
        self.user_table.weight.copy_(v.expand_as(self.user_table.weight).to(self.user_table.weight.dtype))

    def hf_config(self) -> dict:
        """config.json of the HF sequence classifier (transformers reads num_labels from id2label)."""
        cfg = self.config.to_dict()
        cfg.update(architectures=[ARCHITECTURE], num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        return cfg


# ----------------------------------------------------------------------------------------------- objective
def bradley_terry_loss(f_chosen: torch.Tensor, f_rejected: torch.Tensor,
                       num_pairs: int | torch.Tensor | None = None) -> torch.Tensor:
    """J = -(1/N) * sum_pairs log sigmoid(f(x+) - f(x-)).

    f_chosen, f_rejected (P,) are this process's pairs. N = `num_pairs` is the number of pairs in the whole
    optimizer step across all ranks and micro-batches (default: P), so per-rank sums add up to the mean over the
    global batch. `logsigmoid` is the stable form of log(sigmoid(.)) for large |f+ - f-|."""
    n = f_chosen.numel() if num_pairs is None else num_pairs
    return -F.logsigmoid(f_chosen.float() - f_rejected.float()).sum() / n


def pairwise_accuracy(f_chosen: torch.Tensor, f_rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs ranked right (f(x+) > f(x-) strictly; a tie counts as wrong)."""
    return (f_chosen > f_rejected).float().mean()


# ----------------------------------------------------------------------------------------------- inputs
def encode_reward_input(tokenizer, prompt: list[dict], response: str, max_len: int | None = None) -> list[int]:
    """Token ids of the conversation the reward model judges, laid out as the Qwen3 template renders a finished chat
    (the response itself goes in as generated, not re-spaced around its think block as the template would):

        <|im_start|>user\n{profile + query}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>\n

    (the layout Skywork-Reward-V2 was trained on). System messages are left out: PRMU reads the user id, query,
    profile, chain and answer (tagpr-method.md); the system instruction is the same for every query of a task, so
    it carries no preference and would only double the demo's sequence length. A response that already ends with
    <|im_end|> is not closed twice. Over `max_len`, the oldest tokens are dropped: the score reads the last token,
    so the end must stay."""
    im_end = "<|im_end|>"
    if response.endswith(im_end):
        response = response[: -len(im_end)]
    turns = [m for m in prompt if m["role"] != "system"]
    ids = (tokenizer.apply_chat(turns, add_generation_prompt=True, enable_thinking=True)
           + tokenizer.encode(response) + [tokenizer.im_end_id] + tokenizer.encode("\n"))
    if max_len is not None and len(ids) > max_len:
        ids = ids[-max_len:]
    return ids


def collate(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists: input_ids (B, T_max) long, lengths (B,) long."""
    if any(len(s) == 0 for s in seqs):
        raise ValueError("collate: an empty token sequence has no last token to score")
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)  # (B,)
    return ids.to(device), lengths.to(device)


# ----------------------------------------------------------------------------------------------- checkpoints
def _has_tensor(folder: Path, name: str) -> bool:
    """Whether the checkpoint holds tensor `name`, from the index or the header only (a damaged file is named)."""
    if (folder / INDEX_NAME).exists():
        return name in _read_index(folder / INDEX_NAME)
    single = folder / WEIGHTS_NAME
    return single.exists() and name in _read_header(single)


def _label_count_problem(config_json: Path) -> str | None:
    """What is wrong with the label count a sequence classifier's config.json states (its `num_labels` and the size
    of its `id2label`), or None when it states 1 or nothing. The file was already read by Qwen3Config.from_json."""
    d = json.loads(config_json.read_text(encoding="utf-8"))
    num = d.get("num_labels")
    named = len(d["id2label"]) if isinstance(d.get("id2label"), dict) else None
    if num is not None and named is not None and num != named:
        return f"{num} (id2label: {named} labels)"
    stated = num if num is not None else named
    return None if stated in (None, 1) else str(stated)


def load_reward_model(path_or_hub_id, *, dtype: torch.dtype | None = None, device="cpu",
                      use_user_table: bool | None = None, users: Iterable[str] | None = None,
                      new_head: bool = False, seed: int = 0) -> PRMU:
    """Load a PRMU, a HF `Qwen3ForSequenceClassification` (e.g. Skywork-Reward-V2-Qwen3), or — with
    `new_head=True` — a Qwen3 causal LM whose lm_head is dropped and whose score head is freshly initialised.

    The table: a saved one (user_vocab.json + user_embeddings.safetensors) is loaded as is; `users` builds a fresh
    one for these ids (only for a checkpoint without a table); `use_user_table=False` drops any table;
    `use_user_table=True` on a checkpoint without a table and without `users` is an error (never a random row)."""
    folder = resolve_checkpoint(path_or_hub_id)
    try:
        cfg = Qwen3Config.from_json(folder / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    saved_table = (folder / USERS_FILE).exists()
    if (folder / USER_TABLE_FILE).exists() and not saved_table:  # an incomplete copy: never score it table-less
        raise CheckpointError(f"{folder}: holds a user table ({USER_TABLE_FILE}) but not its user ids ({USERS_FILE}); "
                              "copy the whole PRMU export folder")
    if saved_table and users is not None:
        raise CheckpointError(f"{folder}: already holds a user table ({USERS_FILE}), so it cannot start a fresh one "
                              "(train_prmu: init= a model without a table, e.g. the SFT export with new_head=true)")
    if use_user_table is None:
        use_user_table = saved_table or users is not None
    elif use_user_table and not saved_table and users is None:  # a fresh random row would precede every input
        raise CheckpointError(f"{folder}: holds no user table ({USERS_FILE}), so a user table has no rows to "
                              f"read; score it without one (guided RL: prmu_user_table unset or false; "
                              f"load_reward_model: use_user_table=False), as a 'PRMU w/o UE' or a Skywork checkpoint "
                              f"is scored, or train a table with recipes/train_prmu.py")
    elif saved_table and not use_user_table:
        warnings.warn(f"{folder}: this PRMU was trained with a user table; scoring without it feeds the model inputs "
                      f"it never saw. The paper's 'PRMU w/o UE' is a PRMU trained with use_user_table=false.",
                      stacklevel=2)
    vocab = UserVocab.from_file(folder / USERS_FILE) if saved_table else UserVocab(users or ())

    with torch.device("meta"):
        model = PRMU(cfg, vocab, use_user_table=use_user_table)
    has_head = _has_tensor(folder, "score.weight")
    labels = _label_count_problem(folder / "config.json") if has_head else None  # (a causal LM's mean nothing)
    if labels is not None:
        raise CheckpointError(f"{folder / 'config.json'}: num_labels = {labels}; a reward model gives one score "
                              "(num_labels 1)")
    if not has_head and not new_head:
        raise CheckpointError(f"{folder}: no 'score.weight' tensor: not a sequence-classification checkpoint "
                              f"(pass new_head=True to start a reward model from a causal LM)")
    # lm_head belongs to a causal LM and has no place in the reward model
    skip = {"lm_head.weight"} | (set() if has_head else {"score.weight"})
    backbone = nn.Module()  # the tensors model.safetensors holds: model.* and score.weight; E has its own file
    backbone.model = model.model
    if has_head:
        backbone.score = model.score
    load_state_into(backbone, folder, dtype=dtype, device=device, skip=skip, mixed_dtype=config_dtype(cfg))
    if not has_head:
        _materialize(model.score, device, dtype or model.model.embed_tokens.weight.dtype)
        model.init_head(seed)
    if model.user_table is not None:
        _materialize(model.user_table, device, dtype or model.model.embed_tokens.weight.dtype)
        if saved_table:
            _load_user_table(model, folder)
        else:
            model.init_user_table(seed)
    return model


def _materialize(module: nn.Module, device, dtype: torch.dtype) -> None:
    """Replace a meta-device module's own parameters with empty ones on `device` (what to_empty does, without its
    empty_like from meta, whose first use in a process imports torch's symbolic-shape stack: ~1 s)."""
    for name, p in list(module.named_parameters(recurse=False)):
        setattr(module, name, nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype),
                                           requires_grad=p.requires_grad))


def _load_user_table(model: PRMU, folder: Path) -> None:
    file = folder / USER_TABLE_FILE
    if not file.exists():
        raise CheckpointError(f"{folder}: {USERS_FILE} is present but {USER_TABLE_FILE} is missing")
    header_bytes, header = _read_header(file, with_size=True)  # a truncated or damaged file fails here, by name
    if USER_TABLE_KEY not in header:
        raise CheckpointError(f"{file}: no tensor {USER_TABLE_KEY!r} (found {', '.join(header) or 'none'})")
    info, want = header[USER_TABLE_KEY], tuple(model.user_table.weight.shape)
    if tuple(info["shape"]) != want:
        raise CheckpointError(f"{file}: {USER_TABLE_KEY} has shape {tuple(info['shape'])}, but {USERS_FILE} lists "
                              f"{len(model.users)} users, so ({want[0]}, {want[1]}) = (users + 1, hidden) is expected")
    with open(file, "rb", buffering=0) as f:
        table = _read_tensor(f, 8 + header_bytes, info, file)
    with torch.no_grad():
        model.user_table.weight.copy_(table)


def save_reward_model(model: PRMU, out_dir, *, state_dict: dict[str, torch.Tensor] | None = None,
                      dtype: torch.dtype | None = None, extra_files: dict[str, Path] | None = None,
                      max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write the HF sequence-classifier folder + user files, atomically. `state_dict` overrides the model's tensors
    (a full state dict gathered from FSDP shards); `extra_files` {name: path} are copied in (tokenizer files)."""
    sd = {n: p.detach() for n, p in model.named_parameters()} if state_dict is None else dict(state_dict)
    table = sd.pop(USER_TABLE_KEY, None)
    if model.use_user_table and table is None:
        raise CheckpointError(f"save_reward_model: the model has a user table but the state dict lacks "
                              f"{USER_TABLE_KEY}")
    cfg = model.hf_config()
    cfg["torch_dtype"] = str(dtype or next(iter(sd.values())).dtype).removeprefix("torch.")
    tmp, commit = atomic_dir(Path(out_dir))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        save_safetensors_shards(sd, tmp, max_shard_bytes, dtype)
        if model.use_user_table:
            (tmp / USERS_FILE).write_text(json.dumps(model.users.to_dict(), indent=1))
            t = table.detach().to("cpu", dtype=dtype or table.dtype).contiguous()
            save_file({USER_TABLE_KEY: t}, str(tmp / USER_TABLE_FILE), metadata={"format": "pt"})
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        commit()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------- scoring API
def trained_max_len(folder: Path) -> int | None:
    """The max_len (tokens per scored input) a PRMU export was trained with, from the TRAINING_FILE that
    recipes/train_prmu.py writes into it; None when the folder records none (a hub RM, an older export)."""
    from minitagpr.data.prompts import TRAINING_FILE, recorded
    value = recorded(folder, "max_len")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise CheckpointError(f"{Path(folder) / TRAINING_FILE}: field 'max_len': expected an integer >= 1, got "
                              f"{value!r}")
    return value


class PRMUScorer:
    """R_PRMU for guided RL: a plain (un-sharded) module on each rank, scoring that rank's rollouts without grad.

    `score(user_ids, prompts, responses)` -> list of sigmoid(f) in (0, 1), in input order. Repeated inputs are
    scored once; the distinct ones are sorted by length and run in batches of `batch_size` to keep padding small."""

    def __init__(self, model: PRMU, tokenizer, max_len: int = DEFAULT_MAX_LEN, batch_size: int = 8):
        self.model = model.eval()
        self.tokenizer, self.max_len, self.batch_size = tokenizer, max_len, batch_size
        self.last_cut = 0  # inputs of the last call longer than max_len: their oldest tokens were dropped

    @classmethod
    def from_pretrained(cls, path, tokenizer=None, *, device="cpu", dtype=None, use_user_table=None, max_len=0,
                        **kw):
        """`max_len` 0: the max_len the PRMU was trained with (`trained_max_len`), else DEFAULT_MAX_LEN."""
        from minitagpr.tokenizer import Tokenizer
        model = load_reward_model(path, device=device, dtype=dtype, use_user_table=use_user_table)
        folder = resolve_checkpoint(path)
        max_len = max_len or trained_max_len(folder) or DEFAULT_MAX_LEN
        return cls(model, tokenizer or Tokenizer.from_dir(folder), max_len=max_len, **kw)

    @torch.no_grad()
    def logits(self, user_ids: Sequence[str | None], prompts: Sequence[list[dict]],
               responses: Sequence[str]) -> list[float]:
        if not len(user_ids) == len(prompts) == len(responses):
            raise ValueError(f"score: {len(user_ids)} user ids, {len(prompts)} prompts and {len(responses)} "
                             f"responses; they must be equally many")
        seqs = [encode_reward_input(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        self.last_cut = sum(len(ids) > self.max_len for ids in seqs)
        seqs = [ids[-self.max_len:] for ids in seqs]  # as encode_reward_input cuts: the scored last token stays
        rows = self.model.users.rows(list(user_ids))
        # Each distinct (user row, tokens) input is scored once and its logit copied to every repeat: identical
        # responses of a group then get bit-identical rewards (scored in other batch positions or paddings they
        # could differ by rounding, and GSPO's standardisation would turn that noise into advantages).
        first: dict[tuple, int] = {}
        slot = [first.setdefault((rows[i], tuple(seqs[i])), len(first)) for i in range(len(seqs))]
        unique = list(first)  # (row, tokens) of each distinct input
        device = self.model.score.weight.device
        order = sorted(range(len(unique)), key=lambda j: -len(unique[j][1]))
        f_unique = [0.0] * len(unique)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            ids, lengths = collate([unique[j][1] for j in idx], self.tokenizer.pad_id, device)
            user_rows = torch.tensor([unique[j][0] for j in idx], dtype=torch.long, device=device)  # (b,)
            f = self.model(ids, lengths, user_rows)  # (b,) fp32
            for j, v in zip(idx, f.tolist()):
                f_unique[j] = v
        return [f_unique[k] for k in slot]

    def score(self, user_ids: Sequence[str | None], prompts: Sequence[list[dict]],
              responses: Sequence[str]) -> list[float]:
        """R_PRMU = sigmoid(f) for each (user, prompt, response)."""
        return torch.sigmoid(torch.tensor(self.logits(user_ids, prompts, responses), dtype=torch.float64)).tolist()
