import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from customdiff import __version__, cli, config, demo, files, toyworld
from customdiff.errors import CustomDiffError


def read_metadata(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def assert_one_line_error(code: int, err: str, *parts: str) -> None:
    assert code == 2
    assert err.startswith("customdiff: error: ") and err.count("\n") == 1
    assert "Traceback" not in err
    for part in parts:
        assert part in err


# ---------------------------------------------------------------------------------------------- commands


def test_render_writes_an_image_folder_and_its_config(run_cli, tmp_path):
    code, out, _ = run_cli("toyworld", "render", "--n", 12, "--objects", "1", "--seed", 3, tmp_path / "out")
    assert code == 0 and "wrote 12 images" in out
    entries = read_metadata(tmp_path / "out")
    assert [entry["file_name"] for entry in entries] == [f"{index:05d}.png" for index in range(12)]
    assert all(" and " not in entry["text"] for entry in entries)
    saved = json.loads((tmp_path / "out" / config.CONFIG_FILE_NAME).read_text())
    assert saved == {"out": str(tmp_path / "out"), "n": 12, "seed": 3, "objects": "1"}


def test_concept_writes_its_views(run_cli, tmp_path):
    code, out, _ = run_cli("toyworld", "concept", "donut", tmp_path, "--n", 4, "--token", "<pet>")
    assert code == 0 and "donut" in out
    assert [entry["text"].split()[:3] for entry in read_metadata(tmp_path)] == [["a", "<pet>", "ring"]] * 4


def test_concepts_lists_name_shape_description(run_cli):
    code, out, _ = run_cli("toyworld", "concepts")
    assert code == 0
    assert out.splitlines()[0].split(maxsplit=2) == ["starfish", "star", "pink star with a teal core"]
    assert len(out.splitlines()) == 5


def test_judge_reads_and_scores(run_cli, tmp_path):
    pytest.importorskip("customdiff.toyjudge")
    run_cli("toyworld", "concept", "starfish", tmp_path / "starfish")
    image = tmp_path / "starfish" / "00000.png"
    caption = read_metadata(tmp_path / "starfish")[0]["text"]

    code, out, _ = run_cli(
        "judge", image, "--prompt", caption, "--concept", f"<new1>={tmp_path / 'starfish'}"
    )
    assert code == 0
    assert out.startswith(f"{image}: ") and "✗" not in out and "100% right" in out
    code, out, _ = run_cli("judge", image, "--prompt", caption, "--concept", "<new1>=starfish")
    assert code == 0 and "100% right" in out


@pytest.mark.slow
def test_demo_writes_grids_and_folders(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "DEMO_STEPS", 250)  # what it writes, not how well it learns (README: timing)
    code, out, _ = run_cli("demo", "-o", tmp_path)
    assert code == 0 and demo.NEXT_STEP in out
    for name, who in (("starfish", "tuned"), ("donut", "tuned"), ("merged", "merged")):  # the judge's count
        assert re.search(rf"{name}\.png: .*; base \d/8, {who} \d/8 judged right", out), out
    for name in (
        "scenes.png",
        "concepts.png",
        "base_model.png",
        "starfish.png",
        "donut.png",
        "merged.png",
        "starfish/concept.safetensors",
        "donut/concept.safetensors",
        "merged/concept.safetensors",
        config.CONFIG_FILE_NAME,
        "scenes/metadata.jsonl",
    ):
        assert (tmp_path / name).is_file()
    assert len(files.read_image_folder(tmp_path / "concepts" / "kite")) == 6


def test_version(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["--version"])
    assert caught.value.code == 0 and capsys.readouterr().out.strip() == f"customdiff {__version__}"


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_prompt_word_is_named(run_cli, tmp_path):
    code, _, err = run_cli("judge", tmp_path / "x.png", "--prompt", "a small red dog on a gray background")
    assert_one_line_error(code, err, '"dog"', "circle, square, triangle, star, ring, cross")


def test_concept_scale_0_draws_as_the_base_model_where_no_token_is_named(
    run_cli, tiny_pipeline_dir, make_concept, tmp_path
):
    from customdiff import models
    from customdiff.concept import save_concept

    save_concept(tmp_path / "concept", make_concept(models.load_pipeline(tiny_pipeline_dir), scale=1.0))
    args = ("a red star on a gray background", "--n", 1, "--steps", 2, "--model", tiny_pipeline_dir)
    runs = {"base": (), "applied": ("--concept", tmp_path / "concept")}
    runs["off"] = (*runs["applied"], "--concept-scale", "0")
    for name, extra in runs.items():
        code, _, err = run_cli("generate", *args, *extra, "--no-regions", "-o", tmp_path / name)
        assert code == 0, err
    base, applied, off = (np.asarray(Image.open(tmp_path / name / "00000.png")) for name in runs)
    assert np.array_equal(off, base) and not np.array_equal(applied, base)
    assert json.loads((tmp_path / "off" / config.CONFIG_FILE_NAME).read_text())["concept_scale"] == 0


def test_concept_scale_needs_a_concept_and_a_number(run_cli, tmp_path):
    prompt = "a red star on a gray background"
    for args, part in (
        (("--concept-scale", "0.5"), "pass it with --concept"),
        (("--concept", tmp_path, "--concept-scale", "nan"), "--concept-scale nan"),
    ):
        code, _, err = run_cli("generate", prompt, *args, "-o", tmp_path / "out")
        assert_one_line_error(code, err, part)


def test_a_refused_command_leaves_no_new_empty_output_folder(run_cli, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    for out in (tmp_path / "new", mine):
        code, _, err = run_cli("generate", "a red stra on a gray background", "--steps", "1", "-o", out)
        assert_one_line_error(code, err, '"stra"')
    assert not (tmp_path / "new").exists() and mine.is_dir()  # the user's own folder stays
    code, _, err = run_cli("eval", tmp_path / "runs" / "typo", "--n", 2)  # default out: runs/typo/eval
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "runs").exists()  # nor the folders above it that it made


def test_unknown_concept_is_named(run_cli, tmp_path):
    code, _, err = run_cli("toyworld", "concept", "seastar", tmp_path)
    assert_one_line_error(code, err, '"seastar"', "starfish, donut, tile, beachball, kite")


def test_unknown_judge_concept_is_named(run_cli, scene_folder):
    pytest.importorskip("customdiff.toyjudge")
    prompt = "a <new1> star on a gray background"
    code, _, err = run_cli(
        "judge", scene_folder / "00000.png", "--prompt", prompt, "--concept", "<new1>=seastar"
    )
    assert_one_line_error(code, err, '"seastar"', "starfish, donut, tile, beachball, kite")


@pytest.mark.parametrize(
    ("argv", "parts"),
    [
        (["toyworld", "concept", "starfish", "OUT", "--n", "3"], ["--n 3", "between 4 and 8"]),
        (["toyworld", "concept", "starfish", "OUT", "--token", "new1"], ['"new1"', "<new1>"]),
        (["toyworld", "render", "OUT", "--n", "0"], ["--n 0"]),
        (["judge", "x.png", "--prompt", "a <new1> star on a gray background"], ["--concept <new1>="]),
        (["judge", "x.png", "--concept", "starfish"], ['"starfish"', "TOKEN=NAME_OR_DIR"]),
        (["judge", "missing.png"], ["missing.png does not exist"]),
        (["merge", "a", "b", "--context-share", "1"], ["--context-share 1", "below 1"]),
    ],
)
def test_bad_flags_give_one_line(run_cli, tmp_path, monkeypatch, argv, parts):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(*argv)
    assert_one_line_error(code, err, *parts)


def test_unwritable_out_gives_one_line(run_cli, tmp_path):
    (tmp_path / "file").write_text("")
    code, _, err = run_cli("toyworld", "render", "--n", 2, tmp_path / "file" / "out")
    assert_one_line_error(code, err, f"cannot write to {tmp_path / 'file' / 'out'}", "-o/OUT")


def test_usage_errors_keep_argparse_behaviour(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["toyworld", "render", "--objects", "3", "out"])
    assert caught.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_ctrl_c_exits_130_quietly(run_cli, monkeypatch):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "toyworld_concepts", interrupted)
    assert run_cli("toyworld", "concepts") == (130, "", "")


def test_bugs_keep_their_traceback(monkeypatch):
    def broken(config):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "toyworld_concepts", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["toyworld", "concepts"])


# ---------------------------------------------------------------------------------------------- --config


def test_config_file_sets_fields_and_flags_win(run_cli, tmp_path):
    settings = tmp_path / "render.toml"
    settings.write_text('n = 3\nseed = 7\nobjects = "2"\n')
    code, _, _ = run_cli("toyworld", "render", tmp_path / "out", "--config", settings, "--seed", 9)
    assert code == 0
    saved = json.loads((tmp_path / "out" / config.CONFIG_FILE_NAME).read_text())
    assert (saved["n"], saved["seed"], saved["objects"]) == (3, 9, "2")


@pytest.mark.parametrize(
    ("toml", "parts"),
    [
        ("steps = 3\n", ['key "steps" is unknown', "n, seed, objects"]),
        ('out = "elsewhere"\n', ['key "out" is a positional argument']),
        ('n = "3"\n', ["key \"n\" is '3'; expected int"]),
        ("objects = 2\n", ["expected one of '1', '2', 'mixed'"]),
        ("n = \n", ["not valid TOML"]),
    ],
)
def test_bad_config_file_is_named(run_cli, tmp_path, toml, parts):
    settings = tmp_path / "render.toml"
    settings.write_text(toml)
    code, _, err = run_cli("toyworld", "render", tmp_path / "out", "--config", settings)
    assert_one_line_error(code, err, str(settings), *parts)


@dataclass(frozen=True)
class EveryKindConfig:
    """A config with one field of each kind a command may use."""

    folder: Path = config.positional("input")
    rate: float = config.option(0.5, "a float")
    steps: int | None = config.option(None, "an optional int")
    fast: bool = config.option(False, "a switch")
    mode: Literal["a", "b"] = config.option("a", "a choice")
    words: tuple[str, ...] = config.option((), "several strings")
    out: Path = config.option(Path("out"), "a path", short="-o")


def parse(argv: list[str]) -> EveryKindConfig:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, EveryKindConfig)
    return config.config_from_args(EveryKindConfig, parser.parse_args(argv))


def test_every_field_kind_becomes_a_flag(tmp_path):
    assert parse(["in"]) == EveryKindConfig(folder=Path("in"))
    argv = ["in", "--rate", "2", "--steps", "5", "--fast", "--mode", "b", "--words", "x", "y", "--words", "z"]
    parsed = parse([*argv, "-o", "there"])
    assert parsed == EveryKindConfig(Path("in"), 2.0, 5, True, "b", ("x", "y", "z"), Path("there"))

    settings = tmp_path / "every.toml"
    settings.write_text('rate = 1\nsteps = 4\nfast = true\nmode = "b"\nwords = ["p"]\nout = "o"\n')
    from_file = parse(["in", "--config", str(settings), "--no-fast"])
    assert from_file == EveryKindConfig(Path("in"), 1.0, 4, False, "b", ("p",), Path("o"))


def test_config_checks_run_on_construction():
    with pytest.raises(CustomDiffError, match="between 4 and 8"):
        config.ToyConceptConfig(name="starfish", out=Path("x"), n=9)
    with pytest.raises(CustomDiffError, match="--composed-views 1.5: pass a share from 0 to 1"):
        config.FinetuneConfig(Path("x"), "star", composed_views=1.5)
    with pytest.raises(CustomDiffError, match="drop --reg none"):
        config.FinetuneConfig(Path("x"), "star", composed_views=0.5, reg="none")
    ratios = {"regions": False, "region_ratios": "2,1"}
    with pytest.raises(CustomDiffError, match="--region-ratios divides regional prompts: pass --regions"):
        config.GenerateConfig(prompt=("a star",), **ratios)
    with pytest.raises(CustomDiffError, match="pass --regions too, or drop it"):
        config.EvalConfig(Path("x"), **ratios)
    assert config.GenerateConfig(prompt=("a star",), region_ratios="2,1").regions  # the toy model's
    assert config.FinetuneConfig(Path("x"), "star").composed_views == 0.5  # the toy model's
    assert config.FinetuneConfig(Path("x"), "star", reg="none").composed_views == 0  # none to pair with


def test_outputs_default_to_a_folder_of_each_concept_so_two_never_collide(tmp_path):
    starfish, donut = tmp_path / "runs" / "starfish", tmp_path / "runs" / "donut"
    starfish.mkdir(parents=True)
    assert config.EvalConfig(starfish).out == starfish / "eval"
    assert config.EvalConfig(donut / "concept.safetensors").out == donut / "eval"  # a file: its folder
    assert config.EvalConfig(starfish, out=Path("mine")).out == Path("mine")
    assert config.CompressConfig(starfish, energy=0.6).out == tmp_path / "runs" / "starfish-energy0.6"
    assert config.CompressConfig(starfish, rank=4).out == tmp_path / "runs" / "starfish-rank4"
    assert config.ExportConfig(starfish, format="diffusers").out == starfish / "diffusers"
    assert config.MergeConfig((starfish, donut)).out == tmp_path / "runs" / "starfish+donut"


def test_learning_rate_defaults_by_mode_resolved_on_construction(tmp_path):
    paper = {"model": tmp_path}  # a folder without customdiff_defaults.toml: the paper's settings
    assert config.FinetuneConfig(Path("x"), "star", **paper).lr == 1e-5  # the paper's, for the weights
    assert config.FinetuneConfig(Path("x"), "star", mode="token", **paper).lr == 5e-4  # Textual Inversion's
    assert config.FinetuneConfig(Path("x"), "star", mode="token", lr=1e-3, **paper).lr == 1e-3
    default = config.FinetuneConfig(Path("x"), "star", **paper)
    assert (default.steps, default.augment) == (400, True)


def test_a_model_folder_sets_its_own_defaults_and_flags_win(tmp_path):
    (tmp_path / config.MODEL_DEFAULTS_FILE).write_text(
        "[train]\nsteps = 50\naugment = false\n[train.lr]\ncrossattn_kv = 2e-4\n[generate]\nguidance = 2.5\n"
    )
    kv = config.FinetuneConfig(Path("x"), "star", model=tmp_path)
    assert (kv.steps, kv.lr, kv.augment) == (50, 2e-4, False)
    assert (
        config.FinetuneConfig(Path("x"), "star", model=tmp_path, mode="token").lr == 5e-4
    )  # no entry: its own
    assert config.FinetuneConfig(Path("x"), "star", model=tmp_path, steps=7, augment=True).steps == 7
    assert config.GenerateConfig("a red star", model=tmp_path).guidance == 2.5
    assert config.EvalConfig(Path("c"), model=tmp_path).guidance == 2.5  # eval samples as generate does
    toy = config.FinetuneConfig(Path("x"), "star")  # the shipped toy model's own (README, "Model defaults")
    assert (toy.steps, toy.lr, toy.augment, config.GenerateConfig("a red star").guidance) == (
        6000,
        1e-4,
        False,
        3.0,
    )


@pytest.mark.parametrize(
    "table, part",
    [
        ("[train]\nnum_reg = 5\n", "may set only steps, lr, token_lr, augment"),
        ("[train]\nsteps = 'many'\n", "key \"steps\" is 'many'; expected int"),
        ("[train.lr]\nwide = 1e-4\n", "names no mode ['wide']"),
        ("[train\n", "is not valid TOML"),
    ],
)
def test_a_bad_model_defaults_file_is_named(run_cli, tmp_path, table, part):
    (tmp_path / config.MODEL_DEFAULTS_FILE).write_text(table)
    code, _, err = run_cli("train", "--images", tmp_path, "--class-word", "star", "--model", tmp_path)
    assert (
        code == 2 and config.MODEL_DEFAULTS_FILE in err and part in err and len(err.strip().splitlines()) == 1
    )


# ------------------------------------------------------------------------------------------ installed script


def test_console_script(tmp_path):
    script = Path(sys.executable).with_name("customdiff")
    listed = subprocess.run([script, "toyworld", "concepts"], capture_output=True, text=True, check=True)
    assert "starfish" in listed.stdout

    rendered = subprocess.run(
        [script, "toyworld", "render", "--n", "20", tmp_path / "out"], capture_output=True, text=True
    )
    assert rendered.returncode == 0, rendered.stderr
    entries = read_metadata(tmp_path / "out")
    assert len(entries) == 20 and all(entry["text"].endswith(" background") for entry in entries)
    assert sorted(path.name for path in (tmp_path / "out").glob("*.png")) == [
        entry["file_name"] for entry in entries
    ]

    (tmp_path / "out" / "notes.md").write_text("not an image")  # skipped, with a warning
    judged = subprocess.run(
        [script, "judge", tmp_path / "out" / "00000.png", "--concept", f"<new1>={tmp_path / 'out'}"],
        capture_output=True,
        text=True,
    )
    assert judged.returncode == 0, judged.stderr
    warning = [line for line in judged.stderr.splitlines() if "notes.md" in line]
    assert warning == [
        f"customdiff: warning: {tmp_path / 'out'}: skipped files that are not images: notes.md"
    ]
    assert "warnings.warn" not in judged.stderr


def test_a_reader_that_stops_early_gets_no_traceback():
    """``customdiff judge … | head -1``: the pipe closes before the command writes, as ``head`` closes it."""
    script = Path(sys.executable).with_name("customdiff")
    process = subprocess.Popen(
        [script, "toyworld", "concepts"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    process.stdout.close()  # long before the command has imported torch and written a line
    assert process.wait(timeout=120) == 141
    assert process.stderr.read() == ""


def test_train_and_generate_take_a_checkpoint_file(
    run_cli, tiny_pipeline_dir, tiny_checkpoint_file, tmp_path
):
    images = tmp_path / "images"
    files.write_image_folder(images, toyworld.concept_scenes(toyworld.get_concept("starfish"), 4))
    single = ("--model", tiny_checkpoint_file, "--model-config", tiny_pipeline_dir)
    train = ("train", "--images", images, "--class-word", "star", "--reg", "none", "--steps", 2, "--lr", 1e-2)
    code, out, err = run_cli(*train, *single, "-o", tmp_path / "run")
    assert code == 0, err
    hint = f"--concept {tmp_path / 'run'} --model {tiny_checkpoint_file} --model-config {tiny_pipeline_dir}"
    assert "next: customdiff generate 'a <new1> star on a " in out and out.rstrip().endswith(hint)
    prompt = ("generate", "a <new1> star on a gray background", "--concept", tmp_path / "run", "--n", 1)
    for name, model in (("file", single), ("folder", ("--model", tiny_pipeline_dir))):
        code, _, err = run_cli(*prompt, "--steps", 2, *model, "-o", tmp_path / name)
        assert code == 0, err
    from_file, from_folder = (
        np.asarray(Image.open(tmp_path / name / "00000.png")) for name in ("file", "folder")
    )
    assert np.array_equal(from_file, from_folder)  # one base model, whichever way it is stored


def test_an_sdxl_model_trains_generates_and_exports_from_the_command_line(run_cli, tiny_sdxl_dir, tmp_path):
    images = tmp_path / "images"
    files.write_image_folder(images, toyworld.concept_scenes(toyworld.get_concept("starfish"), 4))
    model = ("--model", tiny_sdxl_dir)
    train = ("train", "--images", images, "--class-word", "star", "--num-reg", 2, "--steps", 2)
    code, _, err = run_cli(*train, *model, "--cache-dir", tmp_path / "cache", "-o", tmp_path / "run")
    assert code == 0, err
    assert len(list((tmp_path / "cache").rglob("*.png"))) == 2  # regularization sampled by the SDXL pipeline
    prompt = ("generate", "a <new1> star on a gray background", "--concept", tmp_path / "run", "--n", 1)
    code, _, err = run_cli(*prompt, "--steps", 2, *model, "-o", tmp_path / "samples")
    assert code == 0, err
    assert np.asarray(Image.open(tmp_path / "samples" / "00000.png")).shape == (32, 32, 3)
    code, _, err = run_cli("export", tmp_path / "run", "--trigger", "mystar", "-o", tmp_path / "webui")
    assert code == 0, err
    assert load_file(tmp_path / "webui" / "embeddings" / "mystar.safetensors").keys() == {"clip_l", "clip_g"}
