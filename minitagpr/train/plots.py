"""Curves of a run's metrics: `python -m minitagpr.train.plots RUN.jsonl OUT.png [--keys loss,lr,...]`.

One panel per numeric key against `step` (default: every numeric key except bookkeeping ones)."""
from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path

from minitagpr.atomic import atomic_write_bytes
from minitagpr.train.metrics import read_jsonl

SKIP_KEYS = {"step", "epoch", "time", "elapsed_s"}


def numeric_keys(records: list[dict]) -> list[str]:
    """Every numeric key of any record, in order of first appearance: a per-task reward first shows up at the first
    step that sampled that task, so the first record alone would miss it."""
    return list(dict.fromkeys(k for r in records for k, v in r.items()
                              if k not in SKIP_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)))


def plot_metrics(jsonl_path: str | Path, out_path: str | Path, keys: list[str] | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    out_path = Path(out_path)
    if out_path.is_dir():  # before the drawing: it would fail at the write
        raise ValueError(f"output {out_path} is a folder; give a file path, e.g. {out_path / 'curves.png'}")
    records = read_jsonl(jsonl_path)
    if not records:
        raise ValueError(f"{jsonl_path} holds no metrics records")
    if keys is None:
        keys = numeric_keys(records)
    missing = [k for k in keys if not any(k in r for r in records)]
    if missing:
        raise KeyError(f"{jsonl_path}: no record has the key(s) {', '.join(missing)}; available: "
                       f"{', '.join(sorted({k for r in records for k in r}))}")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r.get("step", i), r[key]) for i, r in enumerate(records) if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(Path(jsonl_path).name, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    try:  # the suffix picks the format; a name without one gets a PNG
        fig.savefig(buf, dpi=110, format=out_path.suffix[1:].lower() or "png")
    finally:
        plt.close(fig)
    return atomic_write_bytes(out_path, buf.getvalue())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl", help="a run's per-step metrics (metrics.jsonl)")
    ap.add_argument("out", help="image file to write (its suffix picks the format: .png, .pdf, .svg, ...; none: PNG)")
    ap.add_argument("--keys", default=None, help="comma-separated metric names (default: all numeric)")
    args = ap.parse_args(argv)
    try:
        out = plot_metrics(args.jsonl, args.out, args.keys.split(",") if args.keys else None)
    except (OSError, KeyError, ValueError) as err:  # OSError: the out path cannot be written
        sys.exit(f"error: {err}")
    print(out)


if __name__ == "__main__":
    main()
