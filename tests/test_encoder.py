"""The dense retriever's encoder (minitagpr.model.encoder): a tiny random BERT saved by transformers loads and
embeds exactly as transformers' BertModel + mean pooling (Contriever's embedding), its WordPiece ids match, bad
checkpoints fail naming the file, and evaluate.py runs the robustness study's dense retriever with it."""
import os

import numpy as np
import pytest
import torch

from lamp_fixtures import make_examples
from recipe_modules import load_recipe
from minitagpr.config import ConfigError, parse_cli
from minitagpr.data import lamp
from minitagpr.data.retrieval import item_document, query_text
from minitagpr.model.checkpoint import CheckpointError
from minitagpr.model.encoder import TextEncoder, encoder_fn

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: tiny matmuls, one thread

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "the a of and to is it this was for kettle lovely quiet movie great bad review paper title tweet coffee "
    "user item history rating ##s ##ing ##ed ##ly").split()
TEXTS = ["The kettle is lovely", "a quiet movie", "coffee tweets, reviewing!", "bad", "", "UNSEEN words here"]


def _bert(folder, seed=0, head=None, vocab_only=False):
    cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(seed)
    model = (head or transformers.BertModel)(cfg).eval()
    os.makedirs(folder, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    model.save_pretrained(folder)
    tok = transformers.BertTokenizerFast(str(folder / "vocab.txt"))
    if not vocab_only:
        tok.save_pretrained(folder)
    return model, tok


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert") / "ckpt"
    model, tok = _bert(folder)
    return folder, model, tok


@pytest.mark.parametrize("vocab_only", [False, True])
def test_embeddings_equal_transformers_mean_pooled_last_hidden_states(bert, tmp_path, vocab_only):
    folder, model, tok = bert
    if vocab_only:  # tokenizer from vocab.txt alone (Contriever's hub folder has no tokenizer.json)
        folder = tmp_path / "vocab_only"
        model, tok = _bert(folder, vocab_only=True)
        assert not (folder / "tokenizer.json").exists()
    ours = TextEncoder.from_pretrained(folder)
    long_text = " ".join(["kettle"] * 40)  # past max_position_embeddings: truncated to 16 with [SEP] kept
    texts = TEXTS + [long_text]
    batch = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    assert [e.ids for e in ours.tokenizer.encode_batch(texts)] == \
        [tok(t, truncation=True, max_length=16)["input_ids"] for t in texts]
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    got = ours.encode(texts, batch_size=3)  # batches of other widths: padding must not leak into the mean
    assert got.shape == (len(texts), 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_checkpoint_with_other_heads_or_pickles_or_another_model_type_fails_naming_the_file(tmp_path):
    _bert(tmp_path / "mlm", head=transformers.BertForMaskedLM)
    with pytest.raises(CheckpointError, match=r"mlm: checkpoint does not match the model: unexpected tensors: cls\."):
        TextEncoder.from_pretrained(tmp_path / "mlm")
    folder = tmp_path / "pickled"
    _bert(folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        TextEncoder.from_pretrained(folder)
    folder = tmp_path / "gpt"
    _bert(folder)
    config = (folder / "config.json").read_text().replace('"model_type": "bert"', '"model_type": "gpt2"')
    (folder / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=r"config.json: model_type 'gpt2' is not a BERT encoder"):
        TextEncoder.from_pretrained(folder)


@pytest.mark.parametrize("edit,message", [
    ({"is_decoder": True}, r"field 'is_decoder' is True: only a bidirectional BERT encoder"),  # causal attention
    ({"add_cross_attention": True}, r"field 'add_cross_attention' is True"),
    ({"num_attention_heads": 0}, r"field 'num_attention_heads': expected an integer >= 1, got 0"),
    ({"vocab_size": -5}, r"field 'vocab_size': expected an integer >= 1, got -5"),
    ({"type_vocab_size": 0}, r"field 'type_vocab_size': expected an integer >= 1, got 0"),
    ({"pad_token_id": -1}, r"field 'pad_token_id': expected an integer >= 0, got -1"),
    ({"layer_norm_eps": True}, r"field 'layer_norm_eps': expected a finite number > 0, got True"),
    ({"hidden_size": 2.5}, r"field 'hidden_size': expected an integer >= 1, got 2.5"),
    (["a list"], r"expected a JSON object, got list"),
])
def test_an_encoder_config_the_model_cannot_follow_is_refused_naming_file_and_field(bert, tmp_path, edit, message):
    import json
    import shutil
    folder = shutil.copytree(bert[0], tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit} if isinstance(edit, dict) else edit))
    with pytest.raises(CheckpointError, match=r"ckpt/config.json: " + message):  # not a ZeroDivisionError, no silence
        TextEncoder.from_pretrained(folder)


def test_the_dense_retriever_ranks_profile_items_by_the_encoders_dot_product(bert):
    folder, model, tok = bert
    ev = load_recipe("evaluate", "recipe_evaluate")
    chooser = ev.make_retriever("dense", dense_encoder=folder)
    ex = make_examples("LaMP-2", n=1, n_items=8, seed=3)[0][0]
    encode = encoder_fn(folder, device="cpu")
    emb = encode([query_text(ex)] + [item_document("LaMP-2", it) for it in ex.profile])
    scores = emb[1:] @ emb[0]
    expected = [ex.profile[j]["id"] for j in np.argsort(-scores, kind="stable")[:3]]
    assert [it["id"] for it in chooser.select(ex, 3)] == expected
    assert chooser.rank(ex) is chooser.rank(ex)  # encoded once per example, reused by every checkpoint and k


def test_evaluate_runs_the_dense_retriever_only_with_an_encoder(bert, tmp_path, monkeypatch):
    folder, _, _ = bert
    ev = load_recipe("evaluate", "recipe_evaluate")
    with pytest.raises(ConfigError, match="retriever dense needs dense_encoder="):
        parse_cli(ev.EvalConfig, ["checkpoints=t=c", "tasks=LaMP-3", "sweep_retrievers=recency,dense"])
    examples, golds = make_examples("LaMP-3", n=3, n_items=6, seed=1)
    questions, outputs = lamp.split_files(tmp_path / "lamp", "LaMP-3", "user", "dev")
    lamp.write_questions(questions, examples)
    lamp.write_outputs(outputs, "LaMP-3", golds)
    shown = {}
    monkeypatch.setattr(ev, "make_engine", lambda *a, **kw: (None, None))

    def generate(engine, tokenizer, data, *, retriever, k, **kw):  # records which items each setting would show
        for ex in data.examples:
            shown[(getattr(retriever, "name", retriever), ex.id)] = [it["id"] for it in retriever.select(ex, k)]
        return [{"id": ex.id, "text": "4", "finish_reason": "stop", "profile_items": k, "prompt_tokens": 1,
                 "completion_tokens": 1} for ex in data.examples]
    monkeypatch.setattr(ev, "generate_answers", generate)
    cfg = parse_cli(ev.EvalConfig, [f"data={tmp_path / 'lamp'}", "tasks=LaMP-3", "checkpoints=t=unused", "k=2",
                                    "sweep_retrievers=dense", f"dense_encoder={folder}", f"out_dir={tmp_path / 'out'}",
                                    "prompt_style=full"])
    tables = ev.run(cfg)
    assert list(tables["robustness"].rows) == ["t [dense k=2]"]
    dense = ev.make_retriever("dense", dense_encoder=folder)
    for ex in examples:
        assert shown[("dense", ex.id)] == [it["id"] for it in dense.select(ex, 2)]
        assert shown[("recency", ex.id)] == [it["id"] for it in ev.make_retriever("recency").select(ex, 2)]
