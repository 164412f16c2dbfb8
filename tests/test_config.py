"""Recipe config machinery: defaults < YAML file < key=value, typed coercion, unknown keys named with a suggestion."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest

from minitagpr.config import ConfigError, load_config, parse_cli, save_config


@dataclass
class Optim:
    lr: float = 1e-5
    betas: tuple[float, ...] = (0.9, 0.95)


@dataclass
class Recipe:
    model: str = "tiny"
    steps: int = 10
    bf16: bool = False
    data: Optional[str] = None
    optim: Optim = field(default_factory=Optim)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def test_defaults_when_no_overrides():
    cfg = parse_cli(Recipe, [])
    assert cfg == Recipe()


def test_cli_values_are_coerced_to_field_types():
    cfg = parse_cli(Recipe, ["steps=7", "bf16=true", "optim.lr=3e-4", "optim.betas=0.8,0.9", "data=none"])
    assert cfg.steps == 7 and cfg.bf16 is True and cfg.optim.lr == 3e-4
    assert cfg.optim.betas == (0.8, 0.9) and cfg.data is None


def test_cli_lists_may_be_written_as_yaml_writes_them():
    for text in ("0.8,0.9", "[0.8,0.9]", "[0.8, 0.9]", " [ '0.8', \"0.9\" ] "):
        assert parse_cli(Recipe, [f"optim.betas={text}"]).optim.betas == (0.8, 0.9), text
    assert parse_cli(Recipe, ["optim.betas=[]"]).optim.betas == ()
    with pytest.raises(ConfigError, match=r"config key 'optim.betas' \(from command line\): unbalanced brackets"):
        parse_cli(Recipe, ["optim.betas=[0.8,0.9"])


def test_a_quoted_list_item_may_hold_a_comma_and_a_stray_quote_is_refused():
    """As YAML reads them: ['a', 'b,c'] is two items (it was split into three, two with a stray quote)."""
    from minitagpr.config import _split_list
    assert _split_list("[a, 'b,c']", "files", "command line") == ["a", "b,c"]
    assert _split_list('x,"y, z",w', "files", "command line") == ["x", "y, z", "w"]
    assert _split_list("it's,fine", "files", "command line") == ["it's", "fine"]  # an apostrophe inside a word
    with pytest.raises(ConfigError, match=r"config key 'files' \(from command line\): unbalanced quote '"):
        _split_list("[a, 'b,c]", "files", "command line")


def test_yaml_merge_keys_work_and_a_second_config_file_is_refused(tmp_path):
    """`<<: *anchor` was "not valid YAML" (the duplicate-key check ran before SafeLoader merged); a second --config
    silently replaced the first."""
    merged = tmp_path / "m.yaml"
    merged.write_text("optim:\n  <<: &shared {lr: 0.25}\n  betas: [0.5, 0.6]\n")
    cfg = load_config(Recipe, merged)
    assert (cfg.optim.lr, cfg.optim.betas) == (0.25, (0.5, 0.6))
    other = tmp_path / "o.yaml"
    other.write_text("steps: 3\n")
    with pytest.raises(ConfigError, match="--config given twice"):
        parse_cli(Recipe, ["--config", str(other), f"config={merged}"])


def test_yaml_file_then_cli_override_wins(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps: 5\nmodel: big\noptim:\n  lr: 0.001\n")
    cfg = parse_cli(Recipe, ["--config", str(path), "steps=6"])
    assert (cfg.steps, cfg.model, cfg.optim.lr) == (6, "big", 0.001)
    assert parse_cli(Recipe, [f"config={path}"]).steps == 5


def test_yaml_accepts_dotted_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim.lr: 0.5\n")
    assert load_config(Recipe, path).optim.lr == 0.5


def test_unknown_cli_key_suggests_the_closest_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.llr' \(from command line\); did you mean 'optim.lr'"):
        parse_cli(Recipe, ["optim.llr=1"])


def test_unknown_yaml_key_names_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stesp: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'stesp' \(from config file .*r.yaml\); did you mean 'steps'"):
        parse_cli(Recipe, ["--config", str(path)])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"config key 'steps' \(from command line\): expected int, got 'many'"):
        parse_cli(Recipe, ["steps=many"])
    with pytest.raises(ConfigError, match="expected bool"):
        parse_cli(Recipe, ["bf16=maybe"])


def test_post_init_validation_becomes_config_error():
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        parse_cli(Recipe, ["steps=0"])


def test_missing_config_file_fails_clearly(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_cli(Recipe, ["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        parse_cli(Recipe, ["--config", str(tmp_path)])
    (tmp_path / "latin1.yaml").write_bytes(b"steps: 4\nname: caf\xe9\n")  # a UnicodeDecodeError traceback before
    with pytest.raises(ConfigError, match=r"latin1\.yaml is not UTF-8 text \(byte 0xe9 on line 2\)"):
        parse_cli(Recipe, ["--config", str(tmp_path / "latin1.yaml")])


def test_argument_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_cli(Recipe, ["steps"])
    with pytest.raises(ConfigError, match="'--bf16' is not of the form"):  # a bare flag at the end has no value
        parse_cli(Recipe, ["steps=3", "--bf16"])
    with pytest.raises(ConfigError, match="'--bf16' is not of the form"):  # nor one followed by another option
        parse_cli(Recipe, ["--bf16", "--steps=3"])


def test_double_dash_key_space_value_is_accepted():
    cfg = parse_cli(Recipe, ["--steps", "4", "--optim.lr", "2e-4", "--bf16=true", "data=x"])
    assert (cfg.steps, cfg.optim.lr, cfg.bf16, cfg.data) == (4, 2e-4, True, "x")
    with pytest.raises(ConfigError, match="stepz"):  # unknown keys are still named
        parse_cli(Recipe, ["--stepz", "4"])


def test_saved_config_loads_back_identically(tmp_path):
    cfg = parse_cli(Recipe, ["steps=3", "optim.lr=0.25", "data=x.jsonl"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(Recipe, tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("text, read_as", [("model: 0123\n", "83"), ("model: 1.10\n", "1.1")])
def test_a_yaml_number_for_a_string_field_is_refused_not_rewritten(tmp_path, text, read_as):
    """YAML reads 0123 as octal 83 and 1.10 as 1.1; str() of that silently became the value."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"'model'.*expected a string, got the number {read_as}; quote it"):
        load_config(Recipe, path)
    path.write_text(text.replace(": ", ': "').replace("\n", '"\n'))
    assert load_config(Recipe, path).model == text.split(": ")[1].strip()


def test_a_key_given_nested_and_dotted_in_one_file_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1.0e-5\noptim.lr: 2.0e-5\n")  # the later one silently won
    with pytest.raises(ConfigError, match=r"key 'optim\.lr' is given twice \(nested and dotted\)"):
        load_config(Recipe, path)


def test_help_lists_the_keys_on_stdout_and_exits_0(capsys):
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        lr: float = 1e-3
        out_dir: str = "runs/x"
    with pytest.raises(SystemExit) as stop:
        parse_cli(Cfg, ["lr=2", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "lr" in out and "out_dir" in out


# --- --help reads each key's comments from the dataclass source ---------------------------------------------------
@dataclass
class Commented:
    """A docstring is not a comment."""
    # inputs: where the data comes from
    data: str = ""  # a JSONL file
    k: int = 8
    out_dir: str = "runs/x"  # where the run goes; a comment too long for its line
    #                          continues indented past the hash
    # optimisation
    lr: float = 1e-3  # peak learning rate

    def __post_init__(self):
        # a comment inside a method belongs to no key
        pass


@dataclass
class CommentedChild(Commented):
    lr: float = 3e-4  # the child's reason for its default
    k: int = 4
    steps: int = 10  # new in the child


def test_help_shows_headings_and_the_comment_beside_each_key():
    from minitagpr.config import describe
    lines = describe(Commented).splitlines()[2:]  # after the title and the docstring
    assert lines == [
        "  # inputs: where the data comes from",
        "  data: str = ''  # a JSONL file",
        "  k: int = 8",
        "  out_dir: str = 'runs/x'  # where the run goes; a comment too long for its line continues indented past "
        "the hash",
        "  # optimisation",
        "  lr: float = 0.001  # peak learning rate",
    ]


def test_help_of_a_subclass_keeps_the_base_layout_and_prefers_its_own_comments():
    from minitagpr.config import describe
    text = describe(CommentedChild)
    assert "  lr: float = 0.0003  # the child's reason for its default" in text
    assert "  k: int = 4\n" in text  # no comment in either class
    assert text.index("# optimisation") < text.index("  lr:") < text.index("  steps: int = 10  # new in the child")
    assert "docstring" not in text.split("\n", 2)[2] and "method" not in text  # not as a comment of a key


def test_help_starts_with_the_class_docstring_never_the_dataclass_signature():
    from minitagpr.config import describe
    assert describe(Commented).splitlines()[1] == "  A docstring is not a comment."
    assert describe(CommentedChild).splitlines()[1] == "  # inputs: where the data comes from"


def test_help_of_nested_configs_reads_the_nested_class_comments():
    from minitagpr.config import describe

    @dataclass
    class Outer:
        inner: Commented = field(default_factory=Commented)  # not printed: the nested keys are
        seed: int = 0  # the run's seed
    text = describe(Outer)
    assert "  inner.data: str = ''  # a JSONL file" in text and "  seed: int = 0  # the run's seed" in text


def test_help_of_every_recipe_documents_the_main_keys():
    """The recipes' configs put their comments where --help finds them (a key's meaning beside it or above it)."""
    from minitagpr.config import describe
    from recipe_modules import load_recipe
    module = load_recipe("guided_rl")
    text = describe(module.GuidedConfig)
    assert "  builtin_decode: str = 'auto'  # the built-in engine's loop" in text and "dynamic on CPUs" in text
    assert "  # data: LaMP-format root" in text  # a base-class heading
    assert "the tiny demo model" in text  # the recipe's own comment on an inherited key


@dataclass
class Irregular:
    a: list = field(default_factory=lambda: [1,  # first line of a multi-line default
                                             2])
    LIMIT = 7  # a constant among the fields: its comment is its own
    # heading after the constant
    b: int = 1  # b's help


@dataclass
class OverrideWithHeading(Commented):
    # the subclass's heading above an override
    k: int = 2


def test_help_reads_comments_around_multiline_defaults_constants_and_subclass_headings():
    """A constant among the fields stopped the reading (every later key lost its comments); a comment on the first
    line of a multi-line default was dropped; a subclass's heading above a key it overrides was dropped."""
    from minitagpr.config import describe
    text = describe(Irregular)
    assert "  a: list = [1, 2]  # first line of a multi-line default" in text
    assert "  # heading after the constant\n  b: int = 1  # b's help" in text and "its own" not in text
    lines = describe(OverrideWithHeading).splitlines()
    assert lines[lines.index("  k: int = 2") - 1] == "  # the subclass's heading above an override"


def test_help_of_a_class_defined_in_a_function_reads_its_comments():
    from minitagpr.config import describe

    @dataclass
    class Local:
        """Docstring
whose second line starts at column 0 (the class's source slice then does not parse on its own)."""
        n: int = 3  # n's help
    assert "  n: int = 3  # n's help" in describe(Local)


# ---- pinned by mutation (each fails on a mutant the suite let through, 2026-11-29) -----------------------------------

@pytest.mark.parametrize("text", ["false", "no", "off", "0", " FALSE "])
def test_every_false_spelling_reads_as_false(text):
    assert parse_cli(Recipe, ["bf16=true", f"bf16={text}"]).bf16 is False


@pytest.mark.parametrize("text", ["None", "NULL", "~"])
def test_none_spellings_are_case_insensitive_for_optional_fields(text):
    assert parse_cli(Recipe, ["data=x", f"data={text}"]).data is None


def test_a_bool_for_a_float_field_is_refused_and_a_yaml_int_becomes_a_float(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lr: true\n")
    with pytest.raises(ConfigError, match=r"config key 'optim.lr' \(from config file .*\): expected float, got True"):
        load_config(Recipe, path)
    path.write_text("optim:\n  lr: 1\n")
    assert type(load_config(Recipe, path).optim.lr) is float


def test_a_quoted_empty_list_item_is_the_empty_string():
    @dataclass
    class Tags:
        tags: list[str] = field(default_factory=list)
    assert parse_cli(Tags, ["tags=[a, '', \"\"]"]).tags == ["a", "", ""]


@pytest.mark.parametrize("arg, key", [("optim=3", "optim"), ("steps.x=1", "steps.x")])
def test_a_nested_config_given_a_value_or_a_value_given_a_subkey_is_an_unknown_key(arg, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        parse_cli(Recipe, [arg])


def test_range_checks_refuse_bools_and_zero_fractions_and_allow_a_zero_table_lr():
    import math
    from types import SimpleNamespace

    from minitagpr.config import check_fraction, check_number, check_optimizer
    with pytest.raises(ValueError, match="x must be a finite number >= 0, got True"):
        check_number("x", True, 0.0)
    with pytest.raises(ValueError, match=r"f must be in \(0, 1\], got 0"):
        check_fraction("f", 0)
    cfg = SimpleNamespace(lr=1e-3, table_lr=0.0, min_lr_ratio=0.1, warmup_steps=0, grad_clip=1.0, weight_decay=0.0)
    check_optimizer(cfg, lrs=("lr", "table_lr"), grad_clip="grad_clip", warmup="warmup_steps", warmup_max=math.inf)


def test_integers_follow_pythons_underscore_rule():
    assert parse_cli(Recipe, ["steps=1_000"]).steps == 1000
    for text in ("1__000", "5_", "_5"):
        with pytest.raises(ConfigError, match=f"config key 'steps' \\(from command line\\): expected int, got '{text}'"):
            parse_cli(Recipe, [f"steps={text}"])
