"""Chat-prompt tokenization speed: minitagpr.tokenizer vs transformers' apply_chat_template, in one run.

Workload: LaMP-like conversations (system + a user turn holding 8 profile items), rendered with the generation
prompt (thinking on) and tokenized with the Qwen3 tokenizer. Times are medians over repeats after one warm-up.
Memory: resident-set growth while loading each tokenizer (ours is loaded before transformers is imported).

    python bench/tokenizer_chat.py [--n 256] [--repeats 5] [--tokenizer-dir ../shared/assets/qwen3-tokenizer]
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from minitagpr.tokenizer import Tokenizer
from timing import median_seconds, status_kib, machine_line

REPO = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    return status_kib("VmRSS") / 1024


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    words = "graph user paper title review rating model learning data neural café 数据 🙂 short long".split()
    out = []
    for i in range(n):
        profile = "\n".join(f"{k + 1}. title: " + " ".join(rng.choices(words, k=rng.randint(6, 14))) for k in range(8))
        out.append([{"role": "system", "content": "You personalise answers using the user's history."},
                    {"role": "user", "content": f"History:\n{profile}\nQuestion {i}: which title fits this user?"}])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokenizer-dir", default=str(REPO.parent / "shared" / "assets" / "qwen3-tokenizer"))
    args = ap.parse_args()
    print(machine_line())
    chats = conversations(args.n)

    rss0 = rss_mb()
    ours = Tokenizer.from_dir(args.tokenizer_dir)
    ours_load_mb = rss_mb() - rss0
    import transformers  # imported late so its own footprint is not charged to our tokenizer
    rss0 = rss_mb()
    ref = transformers.AutoTokenizer.from_pretrained(args.tokenizer_dir)
    ref_load_mb = rss_mb() - rss0

    def hf_loop():
        return [list(ref.apply_chat_template(c, tokenize=True, add_generation_prompt=True)["input_ids"])
                for c in chats]

    def ours_loop():
        return [ours.apply_chat(c, add_generation_prompt=True) for c in chats]

    def ours_batch():
        return ours.encode_batch([ours.render_chat(c, add_generation_prompt=True) for c in chats])

    def ours_sft():
        return [ours.encode_prompt_and_target(c, "<analyze_input>x</analyze_input>", "[1]") for c in chats]

    expected = hf_loop()
    assert ours_loop() == expected and ours_batch() == expected, "ids differ from transformers"
    n_tokens = sum(map(len, expected))

    rows = [("transformers apply_chat_template", hf_loop, ref_load_mb),
            ("ours apply_chat (loop)", ours_loop, ours_load_mb),
            ("ours render_chat + encode_batch", ours_batch, ours_load_mb),
            ("ours encode_prompt_and_target", ours_sft, ours_load_mb)]
    print(f"{args.n} conversations, {n_tokens} prompt tokens, median of {args.repeats}")
    print("| path | ms | conv/s | tokens/s | vs transformers | tokenizer load RSS (MB) |")
    print("|---|---|---|---|---|---|")
    base = None
    for name, fn, load_mb in rows:
        sec = median_seconds(fn, args.repeats)
        base = base or sec
        print(f"| {name} | {sec * 1e3:.1f} | {args.n / sec:,.0f} | {n_tokens / sec:,.0f} | {base / sec:.2f}x | "
              f"{load_mb:.0f} |")


if __name__ == "__main__":
    main()
