"""Stage 0: build the tagged reasoning-chain SFT data from a LaMP download with a teacher, a judge and a tagger.

    python recipes/build_chains.py --config recipes/configs/build_chains_lamp.yaml data.lamp_root=/data/LaMP \\
        teacher.base_url=http://localhost:8000/v1 teacher.model=Qwen/Qwen3-235B-A22B-Thinking-2507
    python recipes/build_chains.py --config ... stages=judge          # rerun one stage (answers come from its cache)

Endpoints are any OpenAI-compatible server (a hosted API, vLLM, `python -m minitagpr.serve`). URL, model and key
come from `teacher.*`, `judge.*`, `tagger.*` or the environment (MINITAGPR_TEACHER_BASE_URL, ..._MODEL, ..._API_KEY,
then OPENAI_BASE_URL / OPENAI_API_KEY); keys are never written anywhere. A killed or failed run resumes from the
per-stage caches under out_dir/cache: rerun the same command. Ctrl-C stops scheduling, lets the calls in flight
finish into the cache and exits with status 130.

Outputs under out_dir: one JSONL per stage, stats/<stage>.json, dropped/<stage>.jsonl (every dropped record and
why), clusters.md (the exploratory tag clusters, for inspection: the restricted tagging uses the paper's nine tags),
sft.jsonl (the SFT data), report.md + report.png (with the final count against the paper's ~10,000), config.yaml
(the run's settings, keys redacted).

1. config   2. policy embeddings (tagging.embedder=policy only)   3. stages
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import yaml

from minitagpr.cli import is_user_error
from minitagpr.config import ConfigError, parse_cli
from minitagpr.data.chain_client import redacted_config
from minitagpr.data.chains import SPEC_CHAINS, ChainsConfig, run_stages, write_text
from minitagpr.data.lamp import DataError


# ----------------------------------------------------------------------------------------------- 2. policy embeddings
def policy_embed_fn(checkpoint: str):
    """Tag name -> mean of the checkpoint's input embeddings over the name's tokens (`_` read as a space)."""
    import torch

    from minitagpr.model.checkpoint import CheckpointError, _read_header, _read_tensor
    from minitagpr.tokenizer import Tokenizer

    folder = Path(checkpoint)
    if not folder.is_dir():
        raise DataError(f"tagging.policy_checkpoint: {folder} is not a checkpoint folder")
    tokenizer = Tokenizer.from_dir(folder)
    table = None
    try:
        for shard in sorted(folder.glob("*.safetensors")):
            header_bytes, header = _read_header(shard, with_size=True)  # a truncated or damaged file fails by name
            if "model.embed_tokens.weight" in header:
                with open(shard, "rb") as f:
                    table = _read_tensor(f, 8 + header_bytes, header["model.embed_tokens.weight"], shard)
                table = table.float()  # (V, H) fp32
                break
    except CheckpointError as err:
        raise DataError(f"tagging.policy_checkpoint: {err}") from None
    if table is None:
        raise DataError(f"{folder}: no model.embed_tokens.weight in any *.safetensors file")
    if table.dim() != 2:
        raise DataError(f"{folder}: model.embed_tokens.weight has shape {tuple(table.shape)}, expected (vocab, hidden)")

    def embed(names: list[str]) -> np.ndarray:
        rows = []
        for name in names:
            ids = tokenizer.encode(name.replace("_", " "))
            rows.append(table[torch.tensor(ids)].mean(dim=0) if ids else torch.zeros(table.shape[1]))  # (H,)
        return torch.stack(rows).numpy()  # (n_names, H)

    return embed


def main(argv: list[str]) -> int:
    # ------------------------------------------------------------------------------------------- 1. config
    try:
        cfg = parse_cli(ChainsConfig, argv)
    except ConfigError as err:  # one line and status 1, as every recipe's bad input (minitagpr.cli)
        print(f"build_chains: error: {err}", file=sys.stderr)
        return 1
    out = Path(cfg.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", yaml.safe_dump(redacted_config(cfg), sort_keys=False))
    except OSError as err:
        what = "is a file, not a folder" if out.is_file() else f"cannot be created or written ({err})"
        print(f"build_chains: error: out_dir {out} {what}", file=sys.stderr)
        return 1

    # ------------------------------------------------------------------------------------------- 3. stages
    try:
        embed_fn = None  # the table is read only when the cluster stage runs (8B: ~2.5 GB; another stage needs none)
        if cfg.tagging.embedder == "policy" and "cluster" in cfg.stage_list():
            embed_fn = policy_embed_fn(cfg.tagging.policy_checkpoint)
        results = run_stages(cfg, embed_fn=embed_fn)
    except KeyboardInterrupt:
        print("build_chains: interrupted; every answer received is in the caches under "
              f"{out / 'cache'}; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:  # a user error (minitagpr.cli: bad settings, data, endpoint, a path, a full disk)
        if not is_user_error(err):
            raise  # a bug: keep its traceback
        print(f"build_chains: error: {err}", file=sys.stderr)
        return 1
    for stage, counts in results.items():
        print(f"{stage:>9}: {counts.total('in'):>7} in  {counts.total('out'):>7} out")
    if "sft" in results:
        print(f"{results['sft'].total('out')} SFT chains (tagpr-method.md: about {SPEC_CHAINS:,})")
    print(f"outputs in {out} (sft.jsonl, report.md, report.png, clusters.md, dropped/)")
    if "sft" in results and not results["sft"].total("out"):  # SFT would refuse the file: say where they went
        emptied = next((s for s, c in results.items() if c.total("in") and not c.total("out")), "sft")
        print(f"build_chains: error: 0 SFT chains: the {emptied} stage kept none of its {results[emptied].total('in')} "
              f"records (the reasons: {out / 'dropped'}, {out / 'report.md'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
