"""Chat-prompt tokenization speed: minitagpr.tokenizer vs transformers' apply_chat_template, in one run.

Workload: LaMP-like conversations (system + a user turn holding 8 profile items), rendered with the generation
prompt (thinking on) and tokenized with the Qwen3 tokenizer. Times are medians over repeats after one warm-up.
Memory: the peak resident-set growth while loading each tokenizer, each in a fresh process after its imports (in
one process the second load reuses what the first freed); and each row's peak Python allocations during one call
(tracemalloc: the lists of ids and strings; the Rust library's own buffers are not seen, and the resident set does
not grow over a call once the warm-up has sized the heap).

    python bench/tokenizer_chat.py [--n 256] [--repeats 5] [--tokenizer-dir ../shared/assets/qwen3-tokenizer]
"""
from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

from minitagpr.tokenizer import Tokenizer
from timing import PeakMemory, child_output, machine_line, median_seconds, python_peak_mb

REPO = Path(__file__).resolve().parents[1]


def load_peak_child(kind: str, tokenizer_dir: str) -> None:
    """In a fresh process: print the peak resident-set growth (MiB) of loading one tokenizer, imports excluded."""
    if kind == "transformers":
        import transformers
        load = lambda: transformers.AutoTokenizer.from_pretrained(tokenizer_dir)  # noqa: E731
    else:
        load = lambda: Tokenizer.from_dir(tokenizer_dir)  # noqa: E731
    memory = PeakMemory("cpu")
    memory.start()
    tokenizer = load()
    print(memory.peak() / 2**20, tokenizer is not None)


def load_peak_mb(kind: str, tokenizer_dir: str) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return float(child_output([__file__, "--load-child", kind, "--tokenizer-dir", tokenizer_dir], env).split()[0])


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
    ap.add_argument("--load-child", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_child:
        return load_peak_child(args.load_child, args.tokenizer_dir)
    print(machine_line())
    chats = conversations(args.n)
    ours_load_mb, ref_load_mb = (load_peak_mb(kind, args.tokenizer_dir) for kind in ("ours", "transformers"))
    import transformers

    ours = Tokenizer.from_dir(args.tokenizer_dir)
    ref = transformers.AutoTokenizer.from_pretrained(args.tokenizer_dir)

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
    print("| path | ms | conv/s | tokens/s | vs transformers | call peak Python MiB | tokenizer load peak RSS "
          "growth (MiB, own process) |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for name, fn, load_mb in rows:
        sec = median_seconds(fn, args.repeats)
        base = base or sec
        print(f"| {name} | {sec * 1e3:.1f} | {args.n / sec:,.0f} | {n_tokens / sec:,.0f} | {base / sec:.2f}x | "
              f"{python_peak_mb(fn):.1f} | {load_mb:.0f} |")


if __name__ == "__main__":
    main()
