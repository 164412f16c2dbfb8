"""Dense-retriever encoder throughput (minitagpr.model.encoder, the Contriever path of the robustness study):
ours vs transformers' BertModel + mean pooling, same random weights, same texts, no grad.

Texts are LaMP-4 profile documents (title + text, the words the dense retriever embeds) of random words from a
3,000-word vocabulary, so every word is one WordPiece token; each is `--words` words long. Paths:
  transformers     BertModel(**batch).last_hidden_state, masked mean over the text's tokens (Contriever's
                   embedding); batches tokenized before the clock starts
  ours-forward     TextEncoder(input_ids, attention_mask) on the same pre-tokenized batches
  ours-encode      TextEncoder.encode(texts): tokenization, padding and the forward, what DenseRetriever calls
Every path runs in one process, interleaved round by round (alternating the order) after one warm-up call each;
"vs transformers" is the median over rounds of transformers' time / the path's time. Peak memory: the growth of
the resident set (VmHWM, reset after a warm-up call) over one call, in a fresh subprocess per path.

    python bench/encoder.py [--size small|base] [--n 256] [--words 100] [--batch 64] [--repeats 5]

`--size base` is Contriever's shape (BERT-base: 12 layers, hidden 768); `small` (4 layers, hidden 256) is the
CPU default. BENCH_THREADS sets torch's threads (default 2).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from timing import rss_growth_mb, machine_line  # noqa: E402

PATHS = ["transformers", "ours-forward", "ours-encode"]
SIZES = {"small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
         "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)}
WORDS = [f"w{i}" for i in range(3000)]


def make_encoder(folder: Path, size: str) -> None:
    """A seeded random BERT of `size` saved by transformers, with a WordPiece tokenizer over WORDS."""
    import torch
    import transformers

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    cfg = transformers.BertConfig(vocab_size=len(vocab), max_position_embeddings=512, **SIZES[size])
    torch.manual_seed(0)
    transformers.BertModel(cfg).eval().save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)


def make_texts(n: int, words: int) -> list[str]:
    from minitagpr.data.lamp import item_document

    rng = random.Random(0)
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [item_document("LaMP-4", {"id": str(i), "title": text(8), "text": text(max(1, words - 8))})
            for i in range(n)]


def make_call(path: str, folder: Path, texts: list[str], batch: int):
    """A no-argument function embedding all `texts` one way; returns the (n, H) float32 embeddings."""
    import torch

    if path == "ours-encode":
        from minitagpr.model.encoder import TextEncoder
        ours = TextEncoder.from_pretrained(folder)
        return lambda: ours.encode(texts, batch_size=batch)
    import transformers
    tok = transformers.BertTokenizerFast.from_pretrained(folder)
    batches = [tok(texts[s:s + batch], padding=True, truncation=True, max_length=512, return_tensors="pt")
               for s in range(0, len(texts), batch)]
    if path == "transformers":
        model = transformers.BertModel.from_pretrained(folder).eval()

        def embed(b):
            hidden = model(**b).last_hidden_state  # (b, T, H)
            mask = b["attention_mask"][..., None].to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1)
    else:
        from minitagpr.model.encoder import TextEncoder
        ours = TextEncoder.from_pretrained(folder)

        def embed(b):
            return ours(b["input_ids"], b["attention_mask"])

    @torch.no_grad()
    def call():
        return torch.cat([embed(b).float() for b in batches])
    return call


def child_peak_mb(path: str, folder: Path, n: int, words: int, batch: int) -> float:
    """Peak resident-set growth (MiB) over one call of `path`, after a warm-up call, in this fresh process."""
    return rss_growth_mb(make_call(path, folder, make_texts(n, words), batch))


def time_paths(folder: Path, texts: list[str], batch: int, repeats: int) -> tuple[dict, float]:
    """Per path the median seconds and the median over rounds of transformers' time / its time; and the largest
    |difference| between transformers' embeddings and each of ours."""
    calls = {path: make_call(path, folder, texts, batch) for path in PATHS}
    first = {path: call() for path, call in calls.items()}  # warm-up, and the embeddings compared
    diff = max(float((first[p] - first["transformers"]).abs().max()) for p in PATHS[1:])
    secs = {path: [] for path in PATHS}
    for r in range(repeats):
        for path in (PATHS if r % 2 == 0 else PATHS[::-1]):
            t0 = time.perf_counter()
            calls[path]()
            secs[path].append(time.perf_counter() - t0)
    return {path: {"s": statistics.median(secs[path]),
                   "ratio": statistics.median(a / b for a, b in zip(secs["transformers"], secs[path]))}
            for path in PATHS}, diff


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--words", type=int, default=100)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", default="")
    ap.add_argument("--folder", default="")
    args = ap.parse_args()
    print(machine_line())
    import torch
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    if args.child:
        print(json.dumps(child_peak_mb(args.child, Path(args.folder), args.n, args.words, args.batch)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bert"
        make_encoder(folder, args.size)
        texts = make_texts(args.n, args.words)
        from minitagpr.model.encoder import TextEncoder
        enc = TextEncoder.from_pretrained(folder)
        tokens = sum(len(e.ids) for e in enc.tokenizer.encode_batch(texts))
        params = sum(p.numel() for p in enc.parameters())
        del enc
        timed, diff = time_paths(folder, texts, args.batch, args.repeats)
        for path in PATHS:
            cmd = [sys.executable, __file__, "--child", path, "--folder", str(folder), "--n", str(args.n),
                   "--words", str(args.words), "--batch", str(args.batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            timed[path]["peak_mb"] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"Encoder ({args.size}: {params / 1e6:.1f}M params), {args.n} texts ({tokens:,} tokens with [CLS]/[SEP]), "
          f"batch {args.batch}, {threads} threads, median of {args.repeats} interleaved rounds")
    print("| path | ms per call | texts/s | tokens/s | vs transformers | peak RSS growth MB |")
    print("|---|---|---|---|---|---|")
    for path in PATHS:
        r = timed[path]
        print(f"| {path} | {r['s'] * 1e3:.0f} | {args.n / r['s']:,.0f} | {tokens / r['s']:,.0f} | "
              f"{r['ratio']:.2f}x | {r['peak_mb']:.0f} |")
    print(f"largest |ours - transformers| over all embeddings: {diff:.2e}")


if __name__ == "__main__":
    main()
