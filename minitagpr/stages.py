"""Which demo stage may be reused: each stage folder records what it was built from, in `<folder>/stage.json`.

The demo (recipes/guided_rl.py) builds world -> SFT -> PRMU -> guided RL -> exploratory RL once and reuses each
stage afterwards. A folder holding an export says nothing about the settings or the earlier stages behind it, so
each stage writes a stamp before it trains and marks it complete after its export:

    {"format": ..., "stage": "sft", "build": "<random id>", "complete": true, "code": "<git commit>",
     "machine": {torch, cpu, cpu_capability, gpu, processes}, "settings": {the stage's config minus plumbing
     keys}, "upstream": {"world": <fingerprint>, ...}}

`upstream` holds the world's fingerprint and the build ids of the earlier stages it read, so a rebuilt earlier
stage makes every later one stale. `plan` decides, the same on every rank (it only reads):
  - no stamp, no export, no checkpoints: build
  - no stamp but an export or checkpoints: refuse; the settings and the earlier stages behind them are unknown (an
    older minitagpr, a stage run by hand, a deleted stamp). A build always stamps its folder before it trains, so
    its own checkpoints never lack a stamp; a resume's own checks could not tell another SFT policy behind an RL
    stage's checkpoints (same shapes, other weights)
  - rerun, or an earlier stage rebuilt since: build from scratch (no resume: its checkpoints are stale)
  - other settings than this run's: refuse, naming each key, so a finished result is never overwritten or reused
    for settings it was not built with
  - same settings, but not complete or the export is gone: build, resuming from the stage's checkpoints
  - otherwise: reuse (with a note when another version of the code, or another machine, built it)
A build with nothing to resume is a start from scratch (`Plan.resume` False): `begin` then also clears the
`fresh_also` folders the stage would otherwise read (the demo's base model, built by the SFT stage).
`begin` (rank 0) clears what the build must not read and writes the new stamp; `finish` (rank 0) marks it complete.
"""
from __future__ import annotations

import functools
import json
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from minitagpr.atomic import atomic_write_text
from minitagpr.config import ConfigError, default_json_dict, to_json_dict
from minitagpr.distributed import describe_machine, machine, remove_dir

STAMP = "stage.json"
FORMAT = "minitagpr-stage/1"


@dataclass(frozen=True)
class Plan:
    reuse: bool  # True: the export is used as it is; False: the stage trains
    resume: bool  # when training: may continue from the stage's own checkpoints
    reason: str  # one line for the log
    build: str  # the build id of the export this run reads afterwards


def settings(cfg: Any, ignore: Iterable[str]) -> dict[str, Any]:
    """The config as JSON values (tuples become lists), minus the keys that do not change what the stage builds."""
    ignore = set(ignore)
    return {k: v for k, v in to_json_dict(cfg).items() if k not in ignore}


def defaults(cls: type, ignore: Iterable[str]) -> dict[str, Any]:
    """`settings` of the class's defaults: what a stamp written before a key existed built with (`plan`)."""
    ignore = set(ignore)
    return {k: v for k, v in default_json_dict(cls).items() if k not in ignore}


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of this checkout ('+dirty' with uncommitted changes to tracked files), else 'unknown'."""
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def read_stamp(folder: Path) -> dict | None:
    path = Path(folder) / STAMP
    if not path.exists():
        return None
    try:
        stamp = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a readable stage stamp ({err}); delete {folder} to rebuild the stage") from None
    if not isinstance(stamp, dict) or stamp.get("format") != FORMAT:
        raise ConfigError(f"{path}: field 'format': expected {FORMAT!r}; delete {folder} to rebuild the stage")
    for key, kind in (("build", str), ("complete", bool), ("settings", dict), ("upstream", dict)):
        if not isinstance(stamp.get(key), kind):
            raise ConfigError(f"{path}: field {key!r}: expected {kind.__name__}, got {stamp.get(key)!r}; delete "
                              f"{folder} to rebuild the stage")
    return stamp


def _changes(old: dict, new: dict, default: dict) -> list[str]:
    """The settings that differ; a key the old stamp lacks (added to the code since) counts as its default."""
    was = {**{k: v for k, v in default.items() if k in new}, **old}
    return [f"{k} {was.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}" for k in sorted(set(was) | set(new))
            if was.get(k) != new.get(k)]


def plan(folder: Path, export: Path, stage_settings: dict, upstream: dict, *, rerun: bool = False,
         rerun_hint: str = "", default_settings: dict | None = None) -> Plan:
    """Reuse or build the stage in `folder` whose finished product is `export` (a folder with config.json).
    `default_settings` (`defaults` of the config's class): a stamp that lacks a key was built with its default, so
    adding a key to a config does not rebuild every stage built before it."""
    folder, export = Path(folder), Path(export)
    old = read_stamp(folder)
    exported = (export / "config.json").exists()
    new_build = uuid.uuid4().hex[:12]
    checkpoints = (folder / "checkpoints").is_dir()  # without any, a resumed build starts from scratch anyway
    if old is None:
        if exported:
            raise ConfigError(f"{export} exists but {folder / STAMP} does not, so the settings it was built with are "
                              f"unknown (an older minitagpr, or the stage run by hand): delete {folder} and the "
                              "stages after it to rebuild them here, or give this run a new workdir=")
        if checkpoints:  # nothing ties them to this run's settings or earlier stages (a policy rebuilt since?)
            raise ConfigError(f"{folder / 'checkpoints'} exists but {folder / STAMP} does not, so what they were "
                              f"trained from is unknown (the stamp deleted, or the stage run by hand): delete "
                              f"{folder} to rebuild the stage here, or give this run a new workdir=")
        return Plan(False, False, "not built yet", new_build)
    if rerun:
        return Plan(False, False, "rerun=true: building it again", new_build)
    stale = sorted(k for k in set(old["upstream"]) | set(upstream) if old["upstream"].get(k) != upstream.get(k))
    if stale:
        return Plan(False, False, f"rebuilding: its input ({', '.join(stale)}) was rebuilt since", new_build)
    changed = _changes(old["settings"], stage_settings, default_settings or {})
    if changed:
        raise ConfigError(f"{folder} was built with other settings than this run's: {'; '.join(changed)}. To keep "
                          f"it, give this run a new workdir=; to rebuild it, delete {folder}{rerun_hint}")
    if not (old["complete"] and exported):
        return Plan(False, checkpoints, "finishing an interrupted build", new_build)
    here = code_version()
    built_by = old.get("code", "unknown")
    note = f" (built by code {built_by}, this is {here})" if built_by != here else ""
    built_on, this = old.get("machine"), machine()
    if isinstance(built_on, dict) and built_on != this:  # the same settings, but other float rounding: say so
        note += f" (built on {describe_machine(built_on)}; this is {describe_machine(this)})"
    return Plan(True, False, f"reusing {export}{note}", old["build"])


def unstamped(folders: Iterable[tuple[Path, Path]]) -> list[Path]:
    """For each (folder, export) pair whose folder has no stamp, its export, else its checkpoints folder, if present:
    what `plan` would refuse (built by an older minitagpr, by hand, or the stamp deleted), to name them all at once."""
    found = []
    for folder, export in folders:
        folder, export = Path(folder), Path(export)
        if (folder / STAMP).exists():
            continue
        if (export / "config.json").exists():
            found.append(export)
        elif (folder / "checkpoints").is_dir():
            found.append(folder / "checkpoints")
    return found


def _write(folder: Path, stamp: dict) -> None:
    atomic_write_text(folder / STAMP, json.dumps(stamp, indent=1, sort_keys=True))  # a reader sees old or new


def begin(folder: Path, export: Path, p: Plan, stage: str, stage_settings: dict, upstream: dict,
          fresh_also: Iterable[Path] = ()) -> None:
    """Rank 0, before the stage trains: remove what the build must not read (a start from scratch: the stage's
    checkpoints and the `fresh_also` folders; always: the old export), then stamp the folder as the unfinished
    build `p.build`. Checkpoints go first, so a kill in between never lets a later run resume them under this stamp."""
    folder, export = Path(folder), Path(export)
    folder.mkdir(parents=True, exist_ok=True)
    if not p.resume:
        for path in (folder / "checkpoints", *fresh_also):
            remove_dir(Path(path))
    remove_dir(export)
    # "machine" is informative only: `plan` never compares it
    _write(folder, {"format": FORMAT, "stage": stage, "build": p.build, "complete": False, "code": code_version(),
                    "machine": machine(), "settings": stage_settings, "upstream": upstream})


def finish(folder: Path) -> None:
    """Rank 0, after the stage exported: mark its stamp complete."""
    stamp = read_stamp(Path(folder))
    if stamp is None:
        raise ConfigError(f"{Path(folder) / STAMP}: missing at the end of the stage (deleted while it ran?)")
    _write(Path(folder), {**stamp, "complete": True})
