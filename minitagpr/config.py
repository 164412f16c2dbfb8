"""Recipe configuration: one dataclass per recipe, YAML files as saved sets of overrides, `key=value` on the CLI.

Precedence, lowest first: the dataclass defaults, then the YAML file (`--config path.yaml` or `config=path.yaml`),
then `key=value` arguments in the order given. Nested dataclass fields are addressed with dotted keys
(`optim.lr=1e-5`) on the command line and either dotted keys or nested mappings in YAML. Values are coerced to the
field's annotated type (bool, int, float, str, Optional[...], list/tuple of those: `a,b` or `[a, b]` on the command
line); an unknown key fails with the closest valid key suggested. The dataclass's own `__post_init__` runs once on
the final values, so cross-field checks live there.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import math
import os
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from minitagpr.atomic import atomic_write_text

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"none", "null", "~"}


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the source (file or command line) and key."""


def parse_cli(cls: type, argv: list[str]) -> Any:
    """Build a `cls` instance from command-line arguments: `--config FILE`, `config=FILE`, `key=value`, `--key=value`
    and `--key value` (the next argument is the value unless it starts with `--`)."""
    config_file: str | None = None
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            try:
                print(describe(cls), flush=True)
            except BrokenPipeError:  # `--help | head` closed the pipe: not an error; keep exit's flush quiet too
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0)
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path to a YAML file")
            config_file, i = _one_config(config_file, argv[i + 1]), i + 2
            continue
        key, sep, value = arg.lstrip("-").partition("=")
        if not sep:
            if not (arg.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--")):
                raise ConfigError(f"command-line argument {arg!r} is not of the form key=value, --key=value or "
                                  "--key value (or --config FILE)")
            value, i = argv[i + 1], i + 1  # `--key value`
        if key == "config":
            config_file = _one_config(config_file, value)
        else:
            overrides.append((key, value))
        i += 1
    return load_config(cls, config_file, overrides)


def _one_config(earlier: str | None, path: str) -> str:
    """A second --config would silently replace the first (its keys lost): refused."""
    if earlier is not None:
        raise ConfigError(f"--config given twice ({earlier}, {path}); give one file and override keys with key=value")
    return path


def load_config(cls: type, path: str | os.PathLike | None = None,
                overrides: list[tuple[str, Any]] | dict[str, Any] | None = None) -> Any:
    """Defaults, then the YAML file at `path` (if any), then `overrides` (dotted keys; strings are coerced)."""
    values: dict[str, tuple[Any, str]] = {}  # dotted key -> (value, where it came from)
    if path is not None:
        for key, value in _read_yaml(Path(path)).items():
            values[key] = (value, f"config file {path}")
    items = overrides.items() if isinstance(overrides, dict) else (overrides or [])
    for key, value in items:
        values[key] = (value, "command line")
    return _build(cls, values, prefix="")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a nested plain dict (what `save_config` writes and `load_config` reads back)."""
    return dataclasses.asdict(cfg)


def to_json_dict(cfg_or_dict: Any) -> dict[str, Any]:
    """The config (or a saved dict of one) as JSON values, as a checkpoint or stamp stores it: tuples become lists."""
    import json

    raw = cfg_or_dict if isinstance(cfg_or_dict, dict) else to_dict(cfg_or_dict)
    return json.loads(json.dumps(raw, default=str))


def default_json_dict(cls: type) -> dict[str, Any]:
    """The dataclass's field defaults as `to_json_dict` writes a config (nested dataclasses as dicts). A saved config
    or stamp that lacks a key was written before the key existed, by code that behaved as its default does (the rule
    for adding a key): comparisons read a missing key as this default. No instance is built (__post_init__ may refuse
    the defaults, e.g. a required path)."""
    hints = typing.get_type_hints(cls)
    values = {f.name: default_json_dict(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else _default(f)
              for f in dataclasses.fields(cls)}
    return to_json_dict(values)


def check_choice(key: str, value: Any, choices: typing.Iterable[Any]) -> None:
    """For a config's __post_init__: ValueError naming the key unless value is one of choices."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_at_least(key: str, value: Any, low: int | float) -> None:
    """For a config's __post_init__: ValueError naming the key unless value >= low."""
    if not value >= low:
        raise ValueError(f"{key} must be >= {low}, got {value!r}")


def check_number(key: str, value: Any, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
                 hi_open: bool = False) -> None:
    """For a config's __post_init__: ValueError naming the key unless value is a finite number in the range
    (NaN passes no `>=` test, but also no `<` one: a range written with `not` alone lets it through)."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi))
    if not ok:
        show = lambda x: f"{x:g}" if isinstance(x, float) else str(x)  # noqa: E731 -- an int bound stays exact
        if hi == math.inf:
            bound = "" if lo == -math.inf else f" {'>' if lo_open else '>='} {show(lo)}"
        else:
            bound = f" in {'(' if lo_open else '['}{show(lo)}, {show(hi)}{')' if hi_open else ']'}"
        raise ValueError(f"{key} must be a finite number{bound}, got {value!r}")


def check_optimizer(cfg, *, lrs: tuple[str, ...], grad_clip: str, warmup: str, warmup_max: float) -> None:
    """For a config's __post_init__: the optimizer and schedule keys every recipe shares, each a finite number in
    its range (a NaN min_lr_ratio poisoned every weight at the first decay step; a min_lr_ratio above 1 climbed past
    the peak, a negative clip norm turned clipping off). `lrs[0]` must be > 0, any further lr (a table's) >= 0."""
    def finite_in(key: str, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
        check_number(key, getattr(cfg, key), lo, hi, lo_open=lo_open)
    finite_in(lrs[0], 0.0, lo_open=True)
    for key in lrs[1:]:
        finite_in(key, 0.0)
    finite_in("min_lr_ratio", 0.0, 1.0)
    finite_in(warmup, 0.0, warmup_max)
    finite_in(grad_clip, 0.0)
    finite_in("weight_decay", 0.0)


def check_fraction(key: str, value: float) -> None:
    """For a config's __post_init__: ValueError naming the key unless 0 < value <= 1 (a share of a device)."""
    if not 0 < value <= 1:
        raise ValueError(f"{key} must be in (0, 1], got {value}")


def check_writable_dir(folder: Path, key: str, shown: Path | None = None) -> None:
    """Fail now, naming the key, if files cannot be written in `folder` later (a file in its place or above it, no
    permission, a read-only file system): a run must not find that out after hours of work. Creates the folder."""
    import tempfile

    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe.", suffix=".tmp"):
            pass
    except OSError as e:
        in_the_way = next((p for p in (Path(folder), *Path(folder).parents) if p.exists()), None)
        why = f"{in_the_way} is a file, not a folder" if in_the_way is not None and not in_the_way.is_dir() else \
            e.strerror or e
        raise ConfigError(f"{key}={shown or folder}: cannot write there ({why})") from None


def check_writable_file(path: Path, key: str) -> None:
    """`check_writable_dir` for the folder a file will be written to, and no folder in the file's place."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{key}={path} is a folder; give a file path")
    check_writable_dir(path.parent, key, shown=path)


def check_resumed_config(saved: dict[str, Any], cfg: Any, resumable: set[str], where: Any,
                         also_changed: typing.Iterable[str] = (), fields_of: type | None = None) -> None:
    """A resumed run must train as the checkpointed run did. `saved` is the checkpoint's `to_dict(cfg)`; every key
    outside `resumable` (paths, logging, checkpoint cadence, memory knobs) must be unchanged, else ConfigError
    naming each change. Values are compared as the checkpoint stores them (JSON: tuples read back as lists); a key
    the checkpoint lacks (added to the code since) counts as its default (`default_json_dict`); `fields_of`: the
    dataclass whose keys the checkpoint saved when it saved only part of cfg's (RL saves RLConfig's, not a
    recipe's own). A checkpoint without a saved config (written before configs were saved) is not checked."""
    now, saved = to_json_dict(cfg), to_json_dict(saved)
    if not saved:
        return
    defaults = default_json_dict(type(cfg))
    keys = [f.name for f in dataclasses.fields(fields_of)] if fields_of is not None else list(defaults)
    was = {k: saved.get(k, defaults[k]) for k in keys}  # what the checkpointed run trained with
    changed = [k for k in sorted(was) if k in now and k not in resumable and was[k] != now[k]]
    changed += [k for k in also_changed if k not in changed]
    if changed:
        raise ConfigError(f"{where}: resuming with settings that differ from the checkpoint's: "
                          + ", ".join(f"{k} {_saved_value(saved, was, k)} -> {now.get(k)!r}" for k in changed)
                          + " (use a new out_dir, or resume=false to start over)")


def _saved_value(saved: dict, was: dict, key: str) -> str:
    return repr(saved[key]) if key in saved else f"{was.get(key)!r} (not saved: the default when it was written)"


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the full config as YAML, atomically (atomic_write_text)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "") -> str:
    """The `--help` text: one line per key with its type, default and the comment written beside it in the source,
    each key preceded by the full-line comments above it there (section headings such as `# data: ...`)."""
    lines = [] if prefix else [f"{cls.__name__} keys (key=value overrides; --config FILE.yaml):"]
    doc = cls.__dict__.get("__doc__") or ""
    if not prefix and doc and not doc.startswith(f"{cls.__name__}("):  # dataclass makes a signature of a missing one
        lines += [f"  {line.strip()}" for line in doc.strip().split("\n\n")[0].splitlines()]
    hints = typing.get_type_hints(cls)
    above, beside = field_comments(cls)
    for f in dataclasses.fields(cls):
        lines += [f"  # {text}" for text in above.get(f.name, [])]
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(describe(hints[f.name], prefix + f.name + "."))
            continue
        line = f"  {prefix}{f.name}: {_type_name(hints[f.name])} = {_default(f)!r}"
        lines.append(line + (f"  # {beside[f.name]}" if f.name in beside else ""))
    return "\n".join(lines)


def field_comments(cls: type) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The comments of a config dataclass's fields, read from its source (and its bases'): `above[key]` = the
    full-line comments between the previous statement and this field, `beside[key]` = the comments at the end of
    the field's lines, joined with the full-line comments that continue them (a `#` followed by two or more spaces,
    the layout used for a comment too long for its line). A field a subclass overrides keeps its base's place: the
    base's `above` comes first, then any the subclass writes above it; its `beside` is the subclass's where it has
    one, else the base's. Methods, constants and docstrings among the fields keep their own comments. No source
    (a class built at run time, a frozen app): no comments."""
    above: dict[str, list[str]] = {}
    beside: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # bases first
        found = _class_source(klass)
        if found is None:
            continue
        node, comments = found
        after = max([node.lineno] + [b.end_lineno for b in node.bases + node.keywords])  # the class header's end
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                after = stmt.end_lineno  # a docstring, method or constant: its comments are its own
                continue
            key = stmt.target.id
            above[key] = above.get(key, []) + [text.strip() for line, (full, text) in sorted(comments.items())
                                                if full and after < line < stmt.lineno]
            own = [comments[line][1].strip() for line in range(stmt.lineno, stmt.end_lineno + 1)
                   if line in comments and not comments[line][0]]
            line = stmt.end_lineno + 1
            while own and comments.get(line, (False, ""))[0] and comments[line][1].startswith(" "):
                own.append(comments[line][1].strip())  # an indented full-line comment continues the one beside
                line += 1
            if own:
                beside[key] = " ".join(own)
            after = line - 1 if own else stmt.end_lineno
    return above, beside


def _class_source(klass: type) -> tuple[ast.ClassDef, dict[int, tuple[bool, str]]] | None:
    """The class's node in its module's syntax tree and the module's comments by line; None without a source file.
    The whole file is parsed (a slice of it need not parse on its own) and the class found by its first line."""
    try:
        path = inspect.getsourcefile(klass)
        _, first = inspect.getsourcelines(klass)  # the first decorator's line, 1-based
        text = Path(path).read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (OSError, TypeError, SyntaxError, UnicodeDecodeError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == klass.__name__ \
                and min([node.lineno] + [d.lineno for d in node.decorator_list]) == first:
            return node, _line_comments(text)
    return None


def _line_comments(source: str) -> dict[int, tuple[bool, str]]:
    """{line: (whether the comment is the whole line, its text after the `#` and one space)} of Python source."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string[1:]
            out[tok.start[0]] = (not tok.line[:tok.start[1]].strip(), text[1:] if text.startswith(" ") else text)
    return out


# ---------------------------------------------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error instead of silently keeping the last value."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)  # YAML merge keys (`<<: *anchor`) first, as SafeLoader itself does
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} {'is a folder, not a file' if path.is_dir() else 'does not exist'}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line "
                          f"{line})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        what = f"{err.problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else str(err)
        raise ConfigError(f"config file {path} is not valid YAML: {what}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    flat: dict[str, Any] = {}

    def flatten(node: dict, prefix: str) -> None:
        for key, value in node.items():
            # A nested mapping addresses a nested dataclass; a mapping-typed leaf would be ambiguous, so none exist.
            if isinstance(value, dict):
                flatten(value, f"{prefix}{key}.")
            elif f"{prefix}{key}" in flat:  # e.g. `optim: {lr: ...}` and `optim.lr: ...` in one file
                raise ConfigError(f"config file {path}: key '{prefix}{key}' is given twice (nested and dotted)")
            else:
                flat[f"{prefix}{key}"] = value

    flatten(data, "")
    return flat


def _build(cls: type, values: dict[str, tuple[Any, str]], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    nested = {name for name in fields if dataclasses.is_dataclass(hints[name])}
    kwargs: dict[str, Any] = {}
    mine = {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)} if prefix else values
    for key, (value, source) in mine.items():
        head = key.split(".", 1)[0]
        if head not in fields or ("." in key and head not in nested) or (key == head and head in nested):
            raise ConfigError(_unknown_key_message(cls, prefix, key, source))
        if head not in nested:
            kwargs[head] = _coerce(value, hints[head], prefix + key, source)
    for name in nested:
        kwargs[name] = _build(hints[name], values, prefix + name + ".")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        sources = ", ".join(dict.fromkeys(source for _, source in mine.values())) or "the defaults"
        raise ConfigError(f"invalid {cls.__name__} config: {err} (settings from {sources})") from None


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key_message(cls: type, prefix: str, key: str, source: str) -> str:
    valid = _all_keys(cls, prefix)
    close = []
    if "." in key:  # a misplaced nested key ("optim.lr" for "lr"): match its last part against the keys' last parts
        last = {k.rsplit(".", 1)[-1]: k for k in valid}
        close = [last[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(last), n=1, cutoff=0.8)]
    close = close or difflib.get_close_matches(prefix + key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return f"unknown config key '{prefix + key}' (from {source}){hint}"


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """`value` (a YAML scalar or a command-line string) as an instance of the annotated type `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"config key '{key}' (from {source}): cannot be None")
    if origin in (list, tuple):
        items = value
        if isinstance(value, str):
            items = _split_list(value, key, source)
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"config key '{key}' (from {source}): expected a list, got {value!r}")
        item_type = args[0] if args else str
        coerced = [_coerce(v, item_type, key, source) for v in items]
        return tuple(coerced) if origin is tuple else coerced
    if tp is Any:
        return value

    def bad() -> ConfigError:
        return ConfigError(f"config key '{key}' (from {source}): expected {_type_name(tp)}, got {value!r}")

    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())  # Python's own rule: 1_000 is fine, 1__000 or 5_ is refused
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # YAML read it as a number: 0123 is
            # octal 83 and 1.10 is 1.1, so str() of it is not what was written
            raise ConfigError(f"config key '{key}' (from {source}): expected a string, got the number {value!r}; "
                              f"quote it (\"...\") so YAML keeps it as written")
        raise bad()
    raise ConfigError(f"config key '{key}': unsupported field type {tp!r}")


def _split_list(value: str, key: str, source: str) -> list[str]:
    """A command-line list: `a,b`, or written as YAML would, `[a, b]` / `['a', "b"]`; `[]` and `` are empty."""
    text = value.strip()
    if text.startswith("[") != text.endswith("]"):
        raise ConfigError(f"config key '{key}' (from {source}): unbalanced brackets in the list {value!r}; "
                          f"write a,b or [a,b]")
    if text.startswith("["):
        text = text[1:-1].strip()
    raw, buf, quote = [], "", None  # split at commas outside quotes: ['a', 'b,c'] is two items
    for ch in text:
        if quote is None and ch == ",":
            raw.append(buf)
            buf = ""
            continue
        if quote is None and ch in "'\"" and not buf.strip():  # a quote opens only at an item's start
            quote = ch
        elif ch == quote:
            quote = None
        buf += ch
    if quote is not None:
        raise ConfigError(f"config key '{key}' (from {source}): unbalanced quote {quote} in the list {value!r}")
    if text:
        raw.append(buf)
    items = []
    for item in raw:
        item = item.strip()
        if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
            item = item[1:-1]
        items.append(item)
    return items


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None
