"""PRMU model: HF sequence-classifier layout, user table, Bradley-Terry objective, scoring API."""
import json

import pytest
import torch

from minitagpr.model.checkpoint import CheckpointError
from minitagpr.model.presets import make_tiny_checkpoint, tiny_config
from train_fixtures import randomise_norms
from minitagpr.model.reward import (PRMU, USER_TABLE_FILE, USER_TABLE_KEY, USERS_FILE, PRMUScorer, UserVocab,
                                    bradley_terry_loss, collate, encode_reward_input, load_reward_model,
                                    save_reward_model)

transformers = pytest.importorskip("transformers")


def _hf_config():
    return transformers.Qwen3Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_labels=1, pad_token_id=0, tie_word_embeddings=True,
        max_position_embeddings=256, rope_theta=10_000.0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Qwen3ForSequenceClassification saved by transformers."""
    torch.manual_seed(0)
    model = transformers.Qwen3ForSequenceClassification(_hf_config()).eval()
    with torch.no_grad():  # HF inits the score head tiny; make it matter for the comparison
        model.score.weight.normal_(0, 1.0)
    randomise_norms(model, seed=1)
    out = tmp_path_factory.mktemp("hf_rm")
    model.save_pretrained(out)
    return out


def _batch(seed=1, vocab=96):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([12, 9, 4])
    ids = torch.randint(1, vocab, (3, 12), generator=g)  # pad id 0 never occurs in the text
    ids[torch.arange(12)[None, :] >= lengths[:, None]] = 0  # right padding
    return ids, lengths


def _tiny_prmu(users=("alice", "bob"), use_user_table=True, seed=0):
    model = PRMU(tiny_config("tiny", vocab_size=96), users, use_user_table=use_user_table)
    model.init_weights(seed)
    return model.eval()


def test_transformers_checkpoint_loads_and_scores_like_transformers(hf_dir):
    ref = transformers.Qwen3ForSequenceClassification.from_pretrained(hf_dir).eval()
    ours = load_reward_model(hf_dir).eval()
    assert not ours.use_user_table
    ids, lengths = _batch()
    with torch.no_grad():
        want = ref(input_ids=ids).logits.squeeze(-1)  # HF reads the last non-pad token
        got = ours(ids, lengths)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got, want)


def test_our_checkpoint_without_table_loads_in_transformers(tmp_path):
    ours = _tiny_prmu(use_user_table=False)
    randomise_norms(ours, seed=2)
    save_reward_model(ours, tmp_path / "rm")
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForSequenceClassification"] and cfg["num_labels"] == 1
    ref = transformers.Qwen3ForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ids, lengths = _batch(seed=2)
    ref.config.pad_token_id = 0
    with torch.no_grad():
        assert torch.allclose(ours(ids, lengths), ref(input_ids=ids).logits.squeeze(-1), atol=1e-4, rtol=0)


def test_our_checkpoint_with_table_still_loads_in_transformers(tmp_path):
    save_reward_model(_tiny_prmu(), tmp_path / "rm")
    assert (tmp_path / "rm" / USERS_FILE).exists() and (tmp_path / "rm" / USER_TABLE_FILE).exists()
    # extra files are ignored, and every HF tensor is ours (a head saved under another name would load as a silent
    # random init)
    _, info = transformers.Qwen3ForSequenceClassification.from_pretrained(tmp_path / "rm", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_save_load_round_trip_keeps_table_users_and_scores(tmp_path):
    model = _tiny_prmu(users=("u3", "u1", "u2"))
    with torch.no_grad():
        model.user_table.weight.normal_()  # distinct rows, so a row mix-up would show
    randomise_norms(model, seed=3)
    save_reward_model(model, tmp_path / "rm")
    back = load_reward_model(tmp_path / "rm").eval()
    assert back.users == model.users and back.users.users == ["u1", "u2", "u3"]
    for (n, p), (m, q) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n == m and torch.equal(p, q), n
    ids, lengths = _batch()
    rows = torch.tensor([3, 0, 1])
    with torch.no_grad():
        assert torch.equal(model(ids, lengths, rows), back(ids, lengths, rows))


def test_unknown_and_missing_user_ids_read_row_zero():
    vocab = UserVocab(["b", "a"])
    assert vocab.rows(["a", "b", "stranger", None]) == [1, 2, 0, 0]
    assert UserVocab([5, "7"]).rows([5, "5", 7]) == [1, 1, 2]  # ids are strings: user 5 is user "5"


def test_user_row_enters_as_a_soft_token_before_the_text():
    model = _tiny_prmu()
    ids, lengths = _batch()
    u = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        model.user_table.weight[1:] = u[:2]
        got = model(ids, lengths, torch.tensor([1, 2, 1]))
        # by hand: prepend the row to the token embeddings and read the last real token (shifted by one)
        x = torch.cat([model.user_table.weight[[1, 2, 1]][:, None], model.model.embed_tokens(ids)], dim=1)
        h = model.model(inputs_embeds=x)[torch.arange(3), lengths]
        assert torch.allclose(got, model.score(h).squeeze(-1), atol=1e-6)
        assert not torch.allclose(got, model(ids, lengths, torch.tensor([2, 1, 2])))  # the row matters


def test_fresh_table_scores_every_user_alike():
    model = _tiny_prmu(users=("a", "b", "c"))
    ids, lengths = _batch()
    with torch.no_grad():
        scores = [model(ids, lengths, torch.full((3,), r)) for r in range(4)]
    for s in scores[1:]:
        assert torch.equal(s, scores[0])


def test_score_does_not_depend_on_padding_or_batch_mates():
    model = _tiny_prmu()
    ids, lengths = _batch()
    rows = torch.tensor([1, 2, 0])
    with torch.no_grad():
        full = model(ids, lengths, rows)
        alone = model(ids[2:, :4], lengths[2:], rows[2:])
    assert torch.allclose(full[2], alone[0], atol=1e-5)


def test_bradley_terry_loss_and_gradient_match_hand_computation():
    g = torch.Generator().manual_seed(3)
    fc = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    fr = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    loss = bradley_terry_loss(fc, fr)
    d = (fc - fr).detach()
    want = sum(-torch.log(1 / (1 + torch.exp(-di))) for di in d) / 7
    assert torch.allclose(loss.double(), want, atol=1e-12)
    loss.backward()
    # dJ/df+ = -(1 - sigmoid(d)) / N,  dJ/df- = +(1 - sigmoid(d)) / N
    assert torch.allclose(fc.grad, -(1 - 1 / (1 + torch.exp(-d))) / 7, atol=1e-12)
    assert torch.allclose(fr.grad, (1 - 1 / (1 + torch.exp(-d))) / 7, atol=1e-12)


def test_bradley_terry_shards_with_global_count_add_up_to_the_full_batch_loss():
    fc, fr = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    parts = bradley_terry_loss(fc[:3], fr[:3], num_pairs=10) + bradley_terry_loss(fc[3:], fr[3:], num_pairs=10)
    assert torch.allclose(parts, bradley_terry_loss(fc, fr), atol=1e-12)


def test_bradley_terry_is_finite_for_huge_margins():
    loss = bradley_terry_loss(torch.tensor([-1e4, 1e4]), torch.tensor([1e4, -1e4]))
    assert torch.isfinite(loss) and abs(loss.item() - 1e4) < 1e-2


def test_causal_lm_checkpoint_needs_new_head_and_then_gets_one(tmp_path):
    lm = make_tiny_checkpoint(tmp_path / "lm", vocab_size=96)
    with pytest.raises(CheckpointError, match="score.weight.*new_head=True"):
        load_reward_model(lm)
    rm = load_reward_model(lm, new_head=True, users=["x"])
    assert rm.score.weight.shape == (1, 64) and rm.user_table.weight.shape == (2, 64)
    assert rm.score.weight.abs().sum() > 0


def test_table_file_of_the_wrong_shape_is_named(tmp_path):
    save_reward_model(_tiny_prmu(users=("a", "b")), tmp_path / "rm")
    (tmp_path / "rm" / USERS_FILE).write_text(json.dumps({**UserVocab(["a"]).to_dict()}))
    with pytest.raises(CheckpointError, match=f"{USER_TABLE_FILE}.*{USER_TABLE_KEY}.*shape"):
        load_reward_model(tmp_path / "rm")


def test_reward_input_is_the_template_rendering_of_the_finished_chat_without_system(qwen3_tokenizer_dir):
    from minitagpr.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(qwen3_tokenizer_dir)
    user = {"role": "user", "content": "Tag this movie."}
    prompt = [{"role": "system", "content": "Be brief."}, user]
    response = "<think>\n<analyze_input>a movie</analyze_input>\n</think>\n\ncomedy"
    chat = [user, {"role": "assistant", "content": "comedy",
                   "reasoning_content": "<analyze_input>a movie</analyze_input>"}]
    assert encode_reward_input(tok, prompt, response) == tok.apply_chat(chat)
    assert encode_reward_input(tok, prompt, response + "<|im_end|>") == tok.apply_chat(chat)
    assert encode_reward_input(tok, prompt, response, max_len=5) == tok.apply_chat(chat)[-5:]
    # a response without the template's spacing goes in as the policy wrote it (the template would re-space it)
    squeezed = tok.decode(encode_reward_input(tok, prompt, "<think>x</think>y"))
    assert squeezed.endswith("<|im_start|>assistant\n<think>x</think>y<|im_end|>\n")


class _CharTokenizer:
    """Enough of the Tokenizer interface for the scorer, over a 96-id vocabulary."""
    pad_id, im_end_id = 0, 1

    def encode(self, text):
        return [2 + ord(c) % 90 for c in text]

    def apply_chat(self, messages, add_generation_prompt=False, enable_thinking=True):
        return self.encode("".join(m["content"] for m in messages))


def test_scorer_returns_sigmoid_of_logits_in_input_order_and_handles_unknown_users():
    model = _tiny_prmu(users=("alice", "bob"))
    with torch.no_grad():
        model.user_table.weight.normal_()
        model.score.weight.normal_()
    tok = _CharTokenizer()
    scorer = PRMUScorer(model, tok, batch_size=2)
    users = ["bob", "nobody", None, "alice"]
    prompts = [[{"role": "user", "content": "q" * n}] for n in (3, 9, 1, 6)]
    responses = ["yes", "a longer answer", "no", "maybe"]
    got = scorer.score(users, prompts, responses)
    for i in range(4):  # one at a time, by hand
        ids, lengths = collate([encode_reward_input(tok, prompts[i], responses[i])], tok.pad_id)
        with torch.no_grad():
            f = model(ids, lengths, torch.tensor([model.users.row(users[i])]))
        assert abs(got[i] - torch.sigmoid(f).item()) < 1e-5
    # an unknown id and None both read row 0
    assert scorer.score(["nobody"], prompts[:1], responses[:1]) == pytest.approx(scorer.score([None], prompts[:1],
                                                                                               responses[:1]))


def test_scorer_gives_repeated_inputs_one_forward_and_bit_identical_rewards():
    """A group of identical responses must have exactly zero reward variance (GSPO gives it advantage 0): scored in
    other batches they would differ by rounding, which standardisation turns into advantages of order 1."""
    model = _tiny_prmu(users=("alice", "bob"))
    with torch.no_grad():
        model.user_table.weight.normal_()
        model.score.weight.normal_()
    rows_seen = []
    model.register_forward_hook(lambda module, args, out: rows_seen.append(out.shape[0]))
    scorer = PRMUScorer(model, _CharTokenizer(), batch_size=2)
    prompt = [{"role": "user", "content": "question"}]
    long = [{"role": "user", "content": "a much longer question " * 3}]
    users = ["alice", "alice", "bob", "alice", "alice", "alice"]
    prompts = [prompt, prompt, prompt, long, prompt, prompt]
    responses = ["same", "same", "same", "other", "x", "same"]
    got = scorer.score(users, prompts, responses)
    assert sum(rows_seen) == 4  # (alice, same), (bob, same), (alice, long/other), (alice, x)
    assert got[0] == got[1] == got[5]  # bitwise, not approx
    assert got[2] != got[0]  # another user's row is another input
    alone = PRMUScorer(model, _CharTokenizer(), batch_size=1)
    for i in range(6):
        assert abs(got[i] - alone.score(users[i:i + 1], prompts[i:i + 1], responses[i:i + 1])[0]) < 1e-6


def test_scorer_cuts_long_inputs_as_training_does_and_counts_them(tmp_path):
    """Inputs over max_len were cut silently; the scorer keeps their last max_len tokens (as encode_reward_input
    does in training) and says how many it cut, and a PRMU export scores with the max_len it was trained with."""
    model = _tiny_prmu(users=("alice",))
    with torch.no_grad():
        model.score.weight.normal_()
    tok = _CharTokenizer()
    scorer = PRMUScorer(model, tok, max_len=6)
    prompts = [[{"role": "user", "content": c}] for c in ("q", "a long question")]
    got = scorer.score(["alice"] * 2, prompts, ["ok", "ok"])
    assert scorer.last_cut == 1  # "q" + "ok" + im_end + "\n" is 5 tokens; the other is 18
    ids, lengths = collate([encode_reward_input(tok, prompts[1], "ok", max_len=6)], tok.pad_id)
    with torch.no_grad():
        assert got[1] == pytest.approx(torch.sigmoid(model(ids, lengths, torch.tensor([1]))).item(), abs=1e-6)
    folder = save_reward_model(model, tmp_path / "rm")
    assert PRMUScorer.from_pretrained(folder, tok).max_len == 4096  # records nothing: the default
    (folder / "minitagpr.json").write_text('{"max_len": 6}')
    assert PRMUScorer.from_pretrained(folder, tok).max_len == 6
    assert PRMUScorer.from_pretrained(folder, tok, max_len=9).max_len == 9  # an explicit one wins
    (folder / "minitagpr.json").write_text('{"max_len": "long"}')
    with pytest.raises(CheckpointError, match=r"minitagpr\.json: field 'max_len': expected an integer >= 1"):
        PRMUScorer.from_pretrained(folder, tok)


def test_scorer_runs_without_grad():
    """Scoring inside RL must build no graph (it would keep the reward model's activations per batch); checking
    .grad after scoring could not fail, since no backward runs."""
    model = _tiny_prmu()
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append((torch.is_grad_enabled(), out.requires_grad)))
    scorer = PRMUScorer(model, _CharTokenizer())
    scorer.score(["alice"], [[{"role": "user", "content": "hi"}]], ["ok"])
    assert seen == [(False, False)]


def test_dropping_a_trained_table_at_load_time_warns(tmp_path):
    save_reward_model(_tiny_prmu(), tmp_path / "rm")
    with pytest.warns(UserWarning, match="use_user_table=false"):
        model = load_reward_model(tmp_path / "rm", use_user_table=False)
    assert not model.use_user_table


def test_asking_for_a_table_on_a_checkpoint_without_one_is_an_error_not_a_random_row(tmp_path):
    # e.g. prmu_user_table=true in guided RL on a 'PRMU w/o UE' export: a fresh random soft token before every
    # input would silently change every reward
    save_reward_model(_tiny_prmu(use_user_table=False), tmp_path / "rm")
    with pytest.raises(CheckpointError, match="holds no user table.*prmu_user_table unset or false.*use_user_table=False"):
        load_reward_model(tmp_path / "rm", use_user_table=True)
    assert not load_reward_model(tmp_path / "rm").use_user_table  # the default follows the checkpoint
    fresh = load_reward_model(tmp_path / "rm", use_user_table=True, users=["alice"])  # training starts a table
    assert fresh.use_user_table and fresh.users.row("alice") == 1


def test_an_incomplete_table_or_a_multi_label_head_is_refused_not_scored_otherwise(tmp_path):
    save_reward_model(_tiny_prmu(), tmp_path / "rm")
    (tmp_path / "rm" / "user_vocab.json").unlink()  # half a table: must not be scored as "w/o UE"
    with pytest.raises(CheckpointError, match=r"holds a user table \(user_embeddings.safetensors\) but not its user "
                                              r"ids \(user_vocab.json\)"):
        load_reward_model(tmp_path / "rm")
    save_reward_model(_tiny_prmu(use_user_table=False), tmp_path / "rm3")
    cfg = json.loads((tmp_path / "rm3" / "config.json").read_text())
    for change in ({"num_labels": 3}, {"id2label": {"0": "a", "1": "b"}, "num_labels": 2}):
        (tmp_path / "rm3" / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(CheckpointError, match=r"config.json: num_labels = (3 \(id2label: 1 labels\)|2); a reward "
                                                  r"model gives one score"):
            load_reward_model(tmp_path / "rm3")


# ---- pinned by mutation (2026-11-27) ---------------------------------------------------------------------------

def test_a_tie_counts_as_a_miss_in_pairwise_accuracy():
    """An untrained table scores every user alike: ties must not count as right."""
    from minitagpr.model.reward import pairwise_accuracy
    f = torch.tensor([0.5, 0.5, 1.0])
    assert pairwise_accuracy(f, f).item() == 0.0
    assert pairwise_accuracy(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])).item() == 0.5


@pytest.mark.parametrize("users", [["zoe", "alice"], ["alice", "alice"]])
def test_a_user_vocabulary_out_of_order_or_repeated_is_refused(tmp_path, users):
    save_reward_model(_tiny_prmu(), tmp_path / "rm")
    path = tmp_path / "rm" / USERS_FILE
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "users": users}))  # rows would no longer match the saved table
    with pytest.raises(CheckpointError, match="must be sorted and free of duplicates"):
        load_reward_model(tmp_path / "rm")


# ---- pinned by mutation (each fails on a mutant the suite let through, 2026-11-29) -----------------------------------

def test_collate_right_pads_with_the_pad_id_and_counts_real_tokens():
    ids, lengths = collate([[5, 6, 7], [8]], pad_id=9)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and lengths.tolist() == [3, 1]


def test_an_input_of_exactly_max_len_tokens_is_neither_cut_nor_counted_as_cut():
    """`max_len` tokens fit: only longer inputs lose their oldest tokens (training and scoring alike)."""
    tok = _CharTokenizer()
    prompt = [{"role": "user", "content": "q"}]  # "q" + "ok" + im_end + "\n": 5 tokens
    full = encode_reward_input(tok, prompt, "ok")
    assert len(full) == 5 and encode_reward_input(tok, prompt, "ok", max_len=5) == full
    assert encode_reward_input(tok, prompt, "ok", max_len=4) == full[1:]
    scorer = PRMUScorer(_tiny_prmu(users=("alice",)), tok, max_len=5)
    scorer.score(["alice"], [prompt], ["ok"])
    assert scorer.last_cut == 0


@pytest.mark.parametrize("value", ["true", "0"])
def test_a_recorded_max_len_of_true_or_zero_is_refused(tmp_path, value):
    """max_len must be an integer >= 1: JSON true is no length (Python would read it as 1), 0 is no length."""
    from minitagpr.model.reward import trained_max_len
    (tmp_path / "minitagpr.json").write_text(f'{{"max_len": {value}}}')
    with pytest.raises(CheckpointError, match="field 'max_len': expected an integer >= 1"):
        trained_max_len(tmp_path)


def test_scores_keep_float64_resolution_near_one(monkeypatch):
    """sigmoid(20) = 1 - 2.06e-9 rounds to exactly 1.0 in float32; the scorer works in float64, so a confident
    reward stays below 1 and apart from a more confident one."""
    scorer = PRMUScorer(_tiny_prmu(), _CharTokenizer())
    monkeypatch.setattr(scorer, "logits", lambda *args: [20.0, 25.0])
    got = scorer.score(["alice"] * 2, [[{"role": "user", "content": "q"}]] * 2, ["a", "b"])
    assert got[0] == pytest.approx(1 - 2.0611536e-9, abs=1e-15) and got[0] < got[1] < 1.0
