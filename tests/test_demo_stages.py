"""Stage reuse in the demo pipeline (minitagpr/stages.py, recipes/guided_rl.py): a stage is reused only for the
settings and earlier stages it was built from. The orchestration tests run guided_rl.main in this process with
every heavy stage replaced by a fake that writes its export, so they check which stage trains, resumes or is
reused, and which exports the table reads."""
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from recipe_modules import load_recipe
from minitagpr import stages
from minitagpr.config import ConfigError
from minitagpr.rl.loop import RLConfig

SETTINGS = {"lr": 1e-4, "seed": 0}
UP = {"world": "w1"}


def _export(folder: Path) -> Path:
    export = folder / "hf"
    export.mkdir(parents=True, exist_ok=True)
    (export / "config.json").write_text("{}")
    return export


def _built(folder: Path, settings=SETTINGS, upstream=UP) -> stages.Plan:
    """A stage built and finished with `settings` / `upstream`."""
    p = stages.plan(folder, folder / "hf", settings, upstream)
    stages.begin(folder, folder / "hf", p, "sft", settings, upstream)
    _export(folder)
    stages.finish(folder)
    return p


def test_a_new_stage_is_built_and_then_reused_with_its_build_id(tmp_path):
    p = stages.plan(tmp_path, tmp_path / "hf", SETTINGS, UP)
    assert (p.reuse, p.resume) == (False, False)  # nothing to resume
    built = _built(tmp_path)
    again = stages.plan(tmp_path, tmp_path / "hf", dict(SETTINGS), dict(UP))
    assert again.reuse and again.build == built.build
    assert json.loads((tmp_path / stages.STAMP).read_text())["complete"] is True


def test_a_stamp_records_the_machine_and_reuse_ignores_it(tmp_path):
    import torch
    _built(tmp_path)
    stamp = json.loads((tmp_path / stages.STAMP).read_text())
    assert stamp["machine"]["torch"] == torch.__version__ and stamp["machine"]["processes"] == 1
    assert stamp["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "built on" not in stages.plan(tmp_path, tmp_path / "hf", SETTINGS, UP).reason
    stamp["machine"].update(cpu="Other CPU", cpu_capability="AVX512")  # built elsewhere: reused, and said
    (tmp_path / stages.STAMP).write_text(json.dumps(stamp))
    p = stages.plan(tmp_path, tmp_path / "hf", SETTINGS, UP)
    assert p.reuse and "(built on Other CPU (AVX512), " in p.reason


def test_other_settings_are_refused_by_name_unless_rerun(tmp_path):
    built = _built(tmp_path)
    with pytest.raises(ConfigError, match=r"lr 0\.0001 -> 5e-05") as err:
        stages.plan(tmp_path, tmp_path / "hf", {**SETTINGS, "lr": 5e-5}, UP, rerun_hint=", or rerun=true")
    assert str(tmp_path) in str(err.value) and "rerun=true" in str(err.value) and "seed" not in str(err.value)
    with pytest.raises(ConfigError, match=r"new_key '\(unset\)' -> 1"):  # a key the old build did not have
        stages.plan(tmp_path, tmp_path / "hf", {**SETTINGS, "new_key": 1}, UP)
    p = stages.plan(tmp_path, tmp_path / "hf", {**SETTINGS, "lr": 5e-5}, UP, rerun=True)
    assert (p.reuse, p.resume) == (False, False) and p.build != built.build


def test_a_key_added_to_the_code_since_the_build_counts_as_its_default(tmp_path):
    """Adding a config key (whose default keeps the old behaviour) must not rebuild every stage built before it;
    setting it to anything else must still be refused, naming the default the old build ran with."""
    built = _built(tmp_path)
    default = {**SETTINGS, "new_key": 0}
    again = stages.plan(tmp_path, tmp_path / "hf", {**SETTINGS, "new_key": 0}, UP, default_settings=default)
    assert again.reuse and again.build == built.build
    with pytest.raises(ConfigError, match=r"new_key 0 -> 1"):
        stages.plan(tmp_path, tmp_path / "hf", {**SETTINGS, "new_key": 1}, UP, default_settings=default)


def test_stage_defaults_are_the_config_classes_defaults_minus_plumbing():
    sft = load_recipe("sft")
    d = stages.defaults(sft.SftConfig, sft.RESUMABLE_KEYS)
    assert d == stages.settings(sft.SftConfig(), sft.RESUMABLE_KEYS)
    assert "out_dir" not in d and d["lr"] == sft.SftConfig().lr


def test_a_rebuilt_earlier_stage_rebuilds_this_one_from_scratch(tmp_path):
    built = _built(tmp_path, upstream={"world": "w1", "sft": "b1"})
    p = stages.plan(tmp_path, tmp_path / "hf", SETTINGS, {"world": "w1", "sft": "b2"})
    assert (p.reuse, p.resume) == (False, False) and p.build != built.build and "sft" in p.reason
    # an earlier stage that rebuilt *and* other settings: rebuilt (its inputs changed), not refused
    assert not stages.plan(tmp_path, tmp_path / "hf", {"lr": 1.0}, {"world": "w2", "sft": "b1"}).reuse


def test_an_interrupted_build_resumes_and_a_finished_one_without_its_export_is_redone(tmp_path):
    p = stages.plan(tmp_path, tmp_path / "hf", SETTINGS, UP)
    stages.begin(tmp_path, tmp_path / "hf", p, "sft", SETTINGS, UP)
    (tmp_path / "checkpoints").mkdir()
    _export(tmp_path)  # checkpointed and exported, then killed before finish (e.g. in SFT's held-out check)
    again = stages.plan(tmp_path, tmp_path / "hf", SETTINGS, UP)
    assert (again.reuse, again.resume) == (False, True) and "interrupted" in again.reason
    _built(tmp_path)
    (tmp_path / "hf" / "config.json").unlink()
    assert (stages.plan(tmp_path, tmp_path / "hf", SETTINGS, UP).reuse,
            stages.plan(tmp_path, tmp_path / "hf", SETTINGS, UP).resume) == (False, True)


def test_an_export_without_a_stamp_is_refused_and_begin_removes_a_stale_export(tmp_path):
    _export(tmp_path)
    with pytest.raises(ConfigError, match="stage.json does not") as err:
        stages.plan(tmp_path, tmp_path / "hf", SETTINGS, UP)
    assert str(tmp_path / "hf") in str(err.value)
    (tmp_path / "hf" / "config.json").unlink()
    p = stages.plan(tmp_path, tmp_path / "hf", SETTINGS, UP)
    assert (p.reuse, p.resume) == (False, False) and p.reason == "not built yet"
    # stamp-less checkpoints: nothing says which settings or which earlier stage (e.g. which SFT policy) they
    # trained from, and the recipe's own resume checks cannot see another policy of the same shapes
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="checkpoints exists but .*stage.json does not") as err:
        stages.plan(tmp_path, tmp_path / "hf", SETTINGS, UP)
    assert f"delete {tmp_path} to rebuild" in str(err.value)
    p = stages.Plan(False, True, "", "b")  # as an interrupted build's resume
    _export(tmp_path)
    stages.begin(tmp_path, tmp_path / "hf", p, "sft", SETTINGS, UP, fresh_also=[tmp_path / "base"])
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.stale").exists()
    assert (tmp_path / "checkpoints").exists()  # a resumed build keeps them
    (tmp_path / "base").mkdir()
    stages.begin(tmp_path, tmp_path / "hf", stages.Plan(False, False, "", "b"), "sft", SETTINGS, UP,
                 fresh_also=[tmp_path / "base"])
    # a build from scratch: the old build's checkpoints (and what it started from) are gone before the new stamp,
    # so a kill right after cannot let the next run resume them as this build's
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "base").exists()
    assert stages.plan(tmp_path, tmp_path / "hf", SETTINGS, UP).resume is False


def test_a_damaged_stamp_names_the_file_and_field(tmp_path):
    (tmp_path / stages.STAMP).write_text("{not json")
    with pytest.raises(ConfigError, match="stage.json: not a readable"):
        stages.plan(tmp_path, tmp_path / "hf", SETTINGS, UP)
    (tmp_path / stages.STAMP).unlink()
    _built(tmp_path)
    stamp = json.loads((tmp_path / stages.STAMP).read_text())
    (tmp_path / stages.STAMP).write_text(json.dumps({**stamp, "settings": [1]}))
    with pytest.raises(ConfigError, match="field 'settings': expected dict"):
        stages.plan(tmp_path, tmp_path / "hf", SETTINGS, UP)


def test_reuse_by_another_version_of_the_code_is_said(tmp_path, monkeypatch):
    _built(tmp_path)
    stamp = json.loads((tmp_path / stages.STAMP).read_text())
    (tmp_path / stages.STAMP).write_text(json.dumps({**stamp, "code": "0123abcd"}))
    monkeypatch.setattr(stages, "code_version", lambda: "89efcdab")
    p = stages.plan(tmp_path, tmp_path / "hf", SETTINGS, UP)
    assert p.reuse and "built by code 0123abcd, this is 89efcdab" in p.reason


def test_settings_leave_out_plumbing_and_read_tuples_as_lists():
    sft = load_recipe("sft")
    s = stages.settings(sft.SftConfig(out_dir="/x", seed=3), sft.RESUMABLE_KEYS)
    assert s["seed"] == 3 and s["betas"] == [0.9, 0.95] and "out_dir" not in s and "resume" not in s


# ----------------------------------------------------------------------------------------------- the pipeline
class Fakes:
    """Fake world, SFT, PRMU, RL and table for guided_rl.main; `calls` lists (stage, out folder, resume)."""

    def __init__(self, monkeypatch, tmp_path):
        self.g = load_recipe("guided_rl")
        self.calls: list[tuple[str, str, bool]] = []
        self.tables: list[dict] = []
        self.world_fp = "w1"
        self.kill = ("", "")  # (stage, "early": before its first checkpoint | "late": after it)
        self.base_seen: list[bool] = []  # did SFT find the base model (built by the SFT stage) in place?
        self.base_builds: list[int] = []  # seeds of the base models built (presets.make_tiny_checkpoint)
        sft, prmu = load_recipe("sft"), load_recipe("train_prmu")
        from minitagpr.data import demo_world
        monkeypatch.setattr(demo_world, "build", self.world)
        monkeypatch.setattr(sft, "run", lambda cfg: self.stage("sft", cfg, Path(cfg.out_dir) / "hf"))
        monkeypatch.setattr(prmu, "run", lambda cfg: self.stage("prmu", cfg, Path(cfg.out_dir) / "hf"))
        monkeypatch.setattr(self.g, "train", lambda cfg: self.stage(cfg.stage, cfg, Path(cfg.out_dir) / "export"))
        monkeypatch.setattr(self.g, "evaluate_table", self.table)
        monkeypatch.setattr(self.g, "print_demo_report", lambda *a: None)
        from minitagpr.model import presets
        monkeypatch.setattr(presets, "make_tiny_checkpoint", self.make_base)
        self.work = tmp_path / "demo"

    def world(self, root, *a, **kw):
        Path(root).mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(root=Path(root), fingerprint=self.world_fp, params={"prompt_style": "brief"},
                               tokenizer_dir=Path(root) / "tokenizer", reused=False)

    def make_base(self, out_dir, preset, seed, tokenizer_dir):
        self.base_builds.append(seed)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "config.json").write_text(json.dumps({"preset": preset, "seed": seed}))

    def stage(self, name, cfg, export):
        if self.kill == (name, "early"):
            raise RuntimeError(f"killed in {name} before its first checkpoint")
        (Path(cfg.out_dir) / "checkpoints").mkdir(parents=True, exist_ok=True)
        if self.kill == (name, "late"):
            raise RuntimeError(f"killed in {name}")
        if name == "sft":  # the real SFT builds its base (sft.resolve_inputs); the fake one finds it or not
            self.base_seen.append((self.work / "base_demo").exists())
            load_recipe("sft").ensure_demo_base(cfg, self.world(self.work / "world"))
        self.calls.append((name, str(Path(cfg.out_dir).relative_to(self.work.parent)), cfg.resume))
        export.mkdir(parents=True, exist_ok=True)
        source = getattr(cfg, "policy", "") or getattr(cfg, "init", "")
        (export / "config.json").write_text(json.dumps({"lr": getattr(cfg, "lr", None), "from": str(source),
                                                        "n": len(self.calls), "seed": cfg.seed}))
        return export

    def table(self, named, world, cfg, out_dir):
        self.tables.append({name: json.loads((Path(p) / "config.json").read_text()) for name, p in named.items()}
                           | {"out": str(out_dir), "eval_seed": cfg.seed, "eval_style": cfg.prompt_style})

    def run(self, *args):
        self.calls.clear()
        self.g.main([f"workdir={self.work}", *args])
        return [c[:2] for c in self.calls]


@pytest.fixture
def demo(monkeypatch, tmp_path):
    return Fakes(monkeypatch, tmp_path)


ALL = [("sft", "demo/sft"), ("prmu", "demo/prmu"), ("guided", "demo/guided_rl"),
       ("exploratory", "demo/exploratory_rl")]


def test_the_demo_builds_each_stage_once_and_reuses_it(demo):
    assert demo.run() == ALL
    first = demo.tables[-1]
    assert demo.run() == []  # nothing trains the second time, and the table reads the same exports
    assert demo.tables[-1] == first
    assert first["Exploratory RL"]["from"] == str(demo.work / "guided_rl" / "export")
    assert first["out"] == str(demo.work / "eval")


def test_both_rl_stages_checkpoint_every_save_every_steps_so_a_kill_resumes(demo, monkeypatch):
    seen, fake = [], demo.g.train
    monkeypatch.setattr(demo.g, "train", lambda cfg: (seen.append((cfg.stage, cfg.save_every)), fake(cfg))[1])
    demo.run("save_every=3")
    assert seen == [("guided", 3), ("exploratory", 3)]  # Stage 3 ran with 0 (no checkpoints) and restarted


def test_a_changed_rl_setting_is_refused_and_leaves_the_old_run_as_it_was(demo):
    demo.run()
    stamp = (demo.work / "guided_rl" / stages.STAMP).read_text()
    with pytest.raises(ConfigError, match=r"guided_rl was built with other settings.*lr 0\.0001 -> 5e-05.*rerun=true"):
        demo.run("lr=5e-5")
    assert (demo.work / "guided_rl" / stages.STAMP).read_text() == stamp
    # out_dir= puts this run's RL stages and table beside the shared world, SFT and PRMU
    assert demo.run("lr=5e-5", f"out_dir={demo.work.parent / 'lr5'}") == [("guided", "lr5/guided_rl"),
                                                                         ("exploratory", "lr5/exploratory_rl")]
    t = demo.tables[-1]
    assert t["Guided RL"]["lr"] == 5e-5 and t["out"] == str(demo.work.parent / "lr5" / "eval")
    assert t["Exploratory RL"]["from"] == str(demo.work.parent / "lr5" / "guided_rl" / "export")
    assert t["SFT"] == demo.tables[0]["SFT"]


def test_an_sft_stage_trained_on_cut_records_is_not_reused_for_one_that_leaves_them_out(demo):
    # truncate_long and drop_long are plumbing for a resume (the data fingerprint guards it), not for reuse: a
    # finished export is not fingerprinted, so the stamp keeps them
    demo.run("sft_settings=truncate_long=true")
    with pytest.raises(ConfigError, match=r"sft was built with other settings.*drop_long False -> True; "
                                          r"truncate_long True -> False"):
        demo.run("sft_settings=drop_long=true")
    demo.run("sft_settings=truncate_long=true")  # the same settings: reused


def test_a_changed_seed_is_refused_at_the_first_stage_it_changes(demo):
    demo.run()
    with pytest.raises(ConfigError, match=r"sft was built with other settings.*seed 0 -> 1"):
        demo.run("seed=1")


def test_rl_seed_reseeds_the_rl_stages_only(demo):
    demo.run()
    assert demo.run("rl_seed=0") == []  # the seed the RL stages had: the same builds (rl_seed is no setting itself)
    with pytest.raises(ConfigError, match=r"guided_rl was built with other settings.*seed 0 -> 2"):
        demo.run("rl_seed=2")  # SFT and PRMU passed: they do not read rl_seed
    assert demo.run("rl_seed=2", f"out_dir={demo.work.parent / 's2'}") == [("guided", "s2/guided_rl"),
                                                                          ("exploratory", "s2/exploratory_rl")]
    t = demo.tables[-1]
    assert t["Guided RL"]["seed"] == t["Exploratory RL"]["seed"] == 2
    assert t["SFT"] == demo.tables[0]["SFT"] and t["SFT"]["seed"] == 0 and t["eval_seed"] == 0
    assert demo.run("rl_seed=2", f"out_dir={demo.work.parent / 's2'}") == []  # and reused


@pytest.mark.parametrize("args", [["rl_seed=-2"], ["rl_seed=1", "demo=false"]])
def test_rl_seed_is_refused_outside_the_demo_or_below_minus_one(demo, args, tmp_path):
    (tmp_path / "x.yaml").write_text("lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"rl_seed=(-2|1): rl_seed reseeds"):
        demo.g.main([*args, "--config", str(tmp_path / "x.yaml")])


def test_a_stage_2_run_takes_the_papers_defaults_for_every_key_its_yaml_leaves_out(demo, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(demo.g, "train", seen.append)
    (tmp_path / "x.yaml").write_text("demo: false\npolicy: /p\nprmu: /r\ndata_root: /d\nlr: 3.0e-6\n")
    demo.g.main(["--config", str(tmp_path / "x.yaml"), "k=16"])
    cfg, paper = seen[0], {f.name: f.default for f in dataclasses.fields(RLConfig)}
    assert (cfg.lr, cfg.k, cfg.out_dir, cfg.prompt_style) == (3e-6, 16, "runs/guided_rl", "full")
    demo_keys = {k for k, v in demo.g.CONFIG_DEFAULTS.items() if k in paper and v != paper[k]}
    assert {"lr", "max_new_tokens", "max_steps", "tasks"} <= demo_keys  # the tiny demo's own values
    for key in demo_keys - {"lr", "k", "out_dir", "prompt_style"}:  # every other one: the paper's, not the demo's
        assert getattr(cfg, key) == paper[key], key


@pytest.mark.parametrize("arg", ["eval_examples=5", "exploratory_steps=3", "sft_settings=max_steps=2", "rerun=true",
                                 "workdir=elsewhere"])
def test_demo_only_keys_are_refused_in_a_stage_2_run_that_would_not_read_them(demo, arg, tmp_path):
    (tmp_path / "x.yaml").write_text("lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match=rf"{arg.split('=')[0]}=.*: only the demo \(demo=true\) reads"):
        demo.g.main([arg, "demo=false", "--config", str(tmp_path / "x.yaml")])
    assert demo.calls == []


def test_a_prompt_style_other_than_the_one_sft_trained_on_is_refused_in_the_demo(demo):
    with pytest.raises(ConfigError, match=r"prompt_style=full.*the demo world's 'brief' prompts"):
        demo.run("prompt_style=full")  # (the fake world's style is brief, as the real one's)
    assert demo.calls == []
    demo.run("prompt_style=brief")  # its own style, said or not, is fine
    assert demo.run() == [] and [t["eval_style"] for t in demo.tables] == ["brief", "brief"]  # the same stages


def test_a_k_or_retriever_other_than_the_worlds_is_said_not_refused(demo, capsys):
    demo.run()
    assert "[demo] note:" not in capsys.readouterr().out
    demo.run("k=8", "retriever=bm25", f"out_dir={demo.work.parent / 'k8'}")
    assert ("note: SFT's chains and PRMU's pairs show the demo world's k=4 most recent profile items; this run's RL "
            "stages and table use k=8, retriever=bm25") in capsys.readouterr().out


def test_a_rebuilt_world_rebuilds_every_later_stage_from_scratch(demo):
    demo.run()
    demo.world_fp = "w2"
    assert demo.run() == ALL
    assert all(resume is False for *_, resume in demo.calls)  # the old checkpoints are stale: not resumed


def test_rerun_redoes_both_rl_stages_and_a_killed_rerun_is_finished_not_mixed(demo):
    demo.run()
    old_explore = demo.tables[-1]["Exploratory RL"]
    assert demo.run("rerun=true") == ALL[2:]
    assert [c[2] for c in demo.calls] == [False, False]
    # a rerun killed in exploratory RL: the next plain run keeps the new guided model and redoes exploratory
    demo.kill = ("exploratory", "late")
    with pytest.raises(RuntimeError, match=r"^killed in exploratory$"):  # the fake's kill, not another failure
        demo.run("rerun=true")
    assert not (demo.work / "exploratory_rl" / "export").exists()  # the old export is gone, not left to reuse
    demo.kill = ("", "")
    assert demo.run() == [("exploratory", "demo/exploratory_rl")]
    assert demo.tables[-1]["Exploratory RL"]["n"] != old_explore["n"]
    # a rerun killed in guided RL: guided resumes, exploratory is rebuilt from the new guided model
    demo.kill = ("guided", "late")
    with pytest.raises(RuntimeError, match=r"^killed in guided$"):
        demo.run("rerun=true")
    demo.kill = ("", "")
    assert demo.run() == ALL[2:]
    assert [c[2] for c in demo.calls] == [True, False]  # guided resumes the rerun's own checkpoints
    # a rerun killed before its first checkpoint: the old build's checkpoints were cleared, nothing is resumed
    demo.kill = ("guided", "early")
    with pytest.raises(RuntimeError, match=r"^killed in guided before its first checkpoint$"):
        demo.run("rerun=true")
    demo.kill = ("", "")
    assert demo.run() == ALL[2:]
    assert [c[2] for c in demo.calls] == [False, False]


def test_old_exports_without_stamps_are_all_named_before_anything_trains(demo):
    demo.run()
    for stage in ("sft", "prmu", "guided_rl"):
        (demo.work / stage / stages.STAMP).unlink()
    with pytest.raises(ConfigError) as err:
        demo.run()
    assert all(str(demo.work / s) in str(err.value) for s in ("sft/hf", "prmu/hf", "guided_rl/export"))
    assert "exploratory_rl" not in str(err.value) and demo.calls == []


def test_a_fresh_sft_rebuilds_the_base_model_it_starts_from(demo):
    demo.run()
    assert demo.base_seen == [False]
    import shutil
    shutil.rmtree(demo.work / "sft")  # e.g. as the refusal of seed=1 suggests: the old base (seed 0) must go too
    assert demo.run("seed=1") == ALL  # PRMU and both RL stages: rebuilt, their input SFT was rebuilt
    assert demo.base_seen == [False, False]
    with pytest.raises(ConfigError, match=r"exploratory_rl was built with other settings.*exploratory_steps 8 -> 9"):
        demo.run("seed=1", "exploratory_steps=9")


def test_a_reused_sft_whose_base_model_was_deleted_gets_the_same_base_again(demo):
    """The base was only built by SFT itself: with SFT reused, a deleted base failed the table's Base row after both
    RL stages had trained."""
    demo.run()
    assert demo.base_builds == [0]
    import shutil
    shutil.rmtree(demo.work / "base_demo")
    assert demo.run(f"out_dir={demo.work.parent / 'again'}") == [("guided", "again/guided_rl"),
                                                                ("exploratory", "again/exploratory_rl")]
    assert demo.base_builds == [0, 0]  # rebuilt with the seed SFT started from
    assert demo.tables[-1]["Base"] == {"preset": "demo", "seed": 0}
    assert demo.run() == [] and demo.base_builds == [0, 0]  # in place: not built again


def test_two_ranks_agree_on_every_build_id(tmp_path):
    """Each rank plans; a new build id drawn on each rank separately would make the ranks disagree about whether
    the next stage is stale (one trains, the other does not: a hang). Two rounds under torchrun: build, reuse."""
    from test_distributed import _run_script
    script = f'''
import json, sys
from dataclasses import dataclass
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / "recipes")!r})
import guided_rl as G
from minitagpr import distributed as D

@dataclass
class Cfg:
    lr: float = 1.0
    out_dir: str = ""
    resume: bool = True

def fake_run(cfg):
    D.barrier()
    if D.world().is_main:
        export = Path(cfg.out_dir) / "hf"
        export.mkdir(parents=True, exist_ok=True)
        (export / "config.json").write_text("{{}}")
    D.barrier()
    return Path(cfg.out_dir) / "hf"

out = Path(sys.argv[1])
info = D.init_distributed()
rounds = []
for r in range(2):
    _, a = G.build_or_reuse("a", (out / "a", out / "a" / "hf"), Cfg(out_dir=str(out / "a")), {{"out_dir", "resume"}},
                            {{}}, fake_run)
    _, b = G.build_or_reuse("b", (out / "b", out / "b" / "hf"), Cfg(out_dir=str(out / "b")), {{"out_dir", "resume"}},
                            {{"a": a}}, fake_run)
    rounds.append([a, b])
(out / f"rank{{info.rank}}.json").write_text(json.dumps(rounds))
D.destroy_distributed()
'''
    res = _run_script(script, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0 == r1  # the same ids on both ranks ...
    assert r0[0] == r0[1]  # ... and the second round reused both stages
    assert "reusing" in res.stdout and res.stdout.count("not built yet") == 2  # logged by rank 0 only


def test_a_rebuilt_prmu_rebuilds_guided_rl_only_when_guided_rl_reads_it(demo):
    import shutil
    demo.run("gamma=0", f"out_dir={demo.work.parent / 'g0'}")
    demo.run()
    shutil.rmtree(demo.work / "prmu")
    assert demo.run() == [("prmu", "demo/prmu"), ("guided", "demo/guided_rl"), ("exploratory", "demo/exploratory_rl")]
    assert demo.run("gamma=0", f"out_dir={demo.work.parent / 'g0'}") == []  # no R_PRMU: the old run still holds


def test_the_ablations_without_r_prmu_neither_build_nor_check_a_prmu(demo):
    # the PRMU took a third of the demo's time, and its settings could refuse a run that never reads it
    ablation = [("sft", "demo/sft"), ("guided", "demo/guided_rl"), ("exploratory", "demo/exploratory_rl")]
    assert demo.run("use_prmu=false", "prmu_settings=global_batch=3") == ablation
    assert not (demo.work / "prmu").exists() and demo.tables[-1]["Guided RL"]["from"] == str(demo.work / "sft" / "hf")
    assert demo.run("gamma=0", f"out_dir={demo.work.parent / 'g0'}") == [("guided", "g0/guided_rl"),
                                                                        ("exploratory", "g0/exploratory_rl")]


def test_a_batch_that_does_not_split_over_the_ranks_stops_only_a_stage_that_trains(demo, monkeypatch):
    # a finished workdir is reused by any number of processes; a stage that would train is checked before SFT trains
    assert demo.run() == ALL
    monkeypatch.setattr(demo.g.D, "world", lambda: SimpleNamespace(world_size=4, rank=0, is_main=True))
    assert demo.run() == []  # PRMU's 8 pairs in micro-batches of 4 do not split over 4 ranks: no matter, reused
    demo.work = demo.work.parent / "fresh"
    with pytest.raises(ConfigError, match=r"prmu_settings: global_batch=8 must split into micro-batches of 4 pairs "
                                          r"on each of 4 ranks: micro_batch=2 fits \(it changes memory use only"):
        demo.run()
    assert demo.calls == []  # before SFT trained
    assert demo.run("prmu_settings=micro_batch=2") == [(n, p.replace("demo/", "fresh/")) for n, p in ALL]


def test_the_report_counts_well_formed_generations_per_row():
    g = load_recipe("guided_rl")
    counts = {"SFT": {"LaMP-1": {"generations": 60, "format_ok": 60, "tags_ok": 50},
                      "LaMP-4": {"generations": 60, "format_ok": 59, "tags_ok": 40}},
              "Guided RL": {"LaMP-1": {"generations": 60, "format_ok": 60, "tags_ok": 60},
                            "LaMP-4": {"generations": 60, "format_ok": 60, "tags_ok": 58}}}
    lines = g.well_formed_lines(SimpleNamespace(counts=counts), ["SFT", "Guided RL"])
    assert [line.split() for line in lines] == [["SFT", "format", "119", "/", "120", "tags", "90", "/", "120"],
                                                ["Guided", "RL", "format", "120", "/", "120", "tags", "118", "/",
                                                 "120"]]


def test_unstamped_names_every_stamp_less_export_or_checkpoints_folder(tmp_path):
    """The demo names all of them before anything trains (`plan` would refuse each one in turn)."""
    pairs = [(tmp_path / s, tmp_path / s / "hf") for s in ("sft", "prmu", "guided", "exploratory")]
    _export(pairs[0][0])  # an export of an older minitagpr
    (pairs[1][0] / "checkpoints").mkdir(parents=True)  # checkpoints whose stamp was deleted
    (pairs[2][0] / "checkpoints").mkdir(parents=True)
    stages.begin(pairs[2][0], pairs[2][1], stages.Plan(False, True, "", "b"), "guided", SETTINGS, UP)  # stamped
    assert stages.unstamped(pairs) == [pairs[0][1], pairs[1][0] / "checkpoints"]


# ---- pinned by mutation (each fails on a mutant the suite let through, 2026-11-29) -----------------------------------

def test_a_default_key_this_run_does_not_set_is_no_change(tmp_path):
    """A key the defaults hold but neither the stamp nor this run's settings do is not a difference."""
    built = _built(tmp_path)
    again = stages.plan(tmp_path, tmp_path / "hf", SETTINGS, UP, default_settings={**SETTINGS, "other": 1})
    assert again.reuse and again.build == built.build


def test_an_input_the_stage_no_longer_reads_makes_it_stale(tmp_path):
    """upstream compares both ways: a build that read the PRMU is not this run's, which reads none."""
    _built(tmp_path, upstream={"world": "w1", "prmu": "p1"})
    p = stages.plan(tmp_path, tmp_path / "hf", SETTINGS, {"world": "w1"})
    assert (p.reuse, p.resume) == (False, False) and "prmu" in p.reason


def test_a_stamp_whose_complete_field_is_not_a_bool_is_refused(tmp_path):
    _built(tmp_path)
    stamp = json.loads((tmp_path / stages.STAMP).read_text())
    (tmp_path / stages.STAMP).write_text(json.dumps({**stamp, "complete": "yes"}))
    with pytest.raises(ConfigError, match="field 'complete': expected bool"):
        stages.plan(tmp_path, tmp_path / "hf", SETTINGS, UP)


def test_unstamped_names_the_export_only_when_checkpoints_sit_beside_it(tmp_path):
    """One entry per stage: its export, else its checkpoints folder."""
    _export(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    assert stages.unstamped([(tmp_path, tmp_path / "hf")]) == [tmp_path / "hf"]
