"""Small inputs for the training-core tests: a byte-level BPE tokenizer with the chat markers, synthetic SFT
records in the docs/interfaces.md format, a tiny random Qwen3 checkpoint, and a torchrun launcher."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
WORDS = ["user", "likes", "short", "titles", "graphs", "rating", "stars", "review", "movie", "comedy", "the",
         "a", "of", "paper", "about", "answer", "profile", "item", "pattern", "decide"]
TAGS = ["analyze_input", "examine_examples", "identify_patterns", "make_decision"]


def write_tokenizer(folder: Path) -> Path:
    """A ~400-id byte-level BPE with the Qwen3 chat markers as special tokens."""
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] + [f"<{t}> </{t}>" for t in TAGS] * 3
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                              "pad_token": "<|endoftext|>"}))
    return folder


def sft_record(i: int) -> dict:
    """One record whose chain and answer follow from the prompt (so a model can learn them). Chains restate 1-4
    profile words, so records (and packed rows, and ranks) hold different numbers of target tokens: a loss divided
    per rank or per micro-batch instead of by the global count would show."""
    words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 4)]
    tag = TAGS[i % len(TAGS)]
    liked = " ".join(words[:1 + (i * 5) % 4])
    chain = f"<{tag}>the user likes {liked}</{tag}>\n<make_decision>{words[-1]}</make_decision>"
    return {"id": f"r{i}", "user": f"u{i % 5}", "task": "LaMP-2",
            "messages": [{"role": "user", "content": "profile: " + " ".join(words)}],
            "chain": chain, "answer": words[-1]}


def write_sft_data(path: Path, n: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(sft_record(i)) + "\n" for i in range(n)))
    return path


def make_inputs(root: Path) -> dict[str, Path]:
    """tokenizer/, base/ (tiny Qwen3 checkpoint sized to the tokenizer), sft.jsonl under root (built once)."""
    from minitagpr.model import presets
    tok = root / "tokenizer"
    if not (tok / "tokenizer.json").exists():
        write_tokenizer(tok)
    base = root / "base"
    if not (base / "config.json").exists():
        presets.make_tiny_checkpoint(base, preset="tiny", seed=0, tokenizer_dir=tok)
    data = root / "sft.jsonl"
    if not data.exists():
        write_sft_data(data)
    return {"tokenizer": tok, "model": base, "data": data}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run recipes/sft.py with `args` under torchrun (nproc > 1) or as a plain process (nproc == 1)."""
    return launch_recipe("sft", args, nproc, env, timeout)


def launch_recipe(stem: str, args: list[str], nproc: int, env: dict | None = None,
                  timeout: float = 180) -> subprocess.CompletedProcess:
    """Run recipes/<stem>.py with `args` under torchrun (nproc > 1) or as a plain process (nproc == 1)."""
    return _run([str(REPO / "recipes" / f"{stem}.py")], args, nproc, env, timeout)


def launch_sequence(runs: list[list[str]], nproc: int, timeout: float = 240) -> subprocess.CompletedProcess:
    """Several SFT runs one after another inside one torchrun job (one process group, as recipes/guided_rl.py
    calls `run` for its stages); saves the start-up of a launch per run."""
    args = [a for run in runs for a in [*run, "--"]][:-1]
    return _run(["-m", "train_fixtures"], args, nproc, None, timeout)


def _run(target: list[str], args: list[str], nproc: int, env: dict | None, timeout: float):
    if nproc == 1:
        cmd = [sys.executable, *target, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", *target, *args]
    path = os.pathsep.join([str(REPO), str(REPO / "tests")])
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **(env or {}))
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def grad_norms(out_dir: Path) -> list[float]:
    """grad_norm of every line of a run's metrics.jsonl: a gradient averaged instead of summed over ranks halves
    it, where clipping and Adam hide that from the losses and weights."""
    return [json.loads(line)["grad_norm"] for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(out_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every line of a run's metrics.jsonl, in file order."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def _run_sequence(argv: list[str]) -> None:
    """Entry point of `launch_sequence`: runs separated by "--", all in this process group."""
    import importlib.util

    from minitagpr import distributed as D
    spec = importlib.util.spec_from_file_location("sft_recipe", REPO / "recipes" / "sft.py")
    sft = importlib.util.module_from_spec(spec)
    sys.modules["sft_recipe"] = sft
    spec.loader.exec_module(sft)
    D.init_distributed()
    groups, current = [], []
    for arg in argv:
        if arg == "--":
            groups.append(current)
            current = []
        else:
            current.append(arg)
    for group in groups + [current]:
        sft.run(sft.parse_cli(sft.SftConfig, group))
    D.destroy_distributed()


def randomise_norms(model, seed):
    """Every *norm.weight drawn from U(0.5, 1.5): at init they are all 1, so a loader that dropped them would pass."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norms = [p for name, p in model.named_parameters() if name.endswith("norm.weight")]
        for p in norms:
            p.uniform_(0.5, 1.5, generator=gen)
    assert norms  # the names this relies on are the HF ones both models use


if __name__ == "__main__":
    from minitagpr import distributed as D
    _run_sequence(sys.argv[1:])
    D.end_process()  # as the recipes do: skip interpreter finalization (minitagpr.distributed.end_process)
