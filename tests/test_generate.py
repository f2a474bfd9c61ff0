"""``customdiff generate``: images, grid and metadata from a prompt or a prompts file; bad input."""

import json

import numpy as np
from PIL import Image


def test_generate_one_prompt(run_cli, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        "generate",
        "a red star on a gray background",
        "--n",
        2,
        "--steps",
        2,
        "--model",
        tiny_pipeline_dir,
        "-o",
        out,
    )
    assert code == 0, stdout
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "grid.png"]
    config = json.loads((out / "run_config.json").read_text())
    assert config["guidance"] == 6.0  # resolved: a folder without customdiff_defaults.toml gets the paper's
    assert config["regions"] is False
    steered = tmp_path / "steered"
    code, stdout, _ = run_cli(
        "generate", "a red star on a gray background", "--n", 1, "--steps", 2, "--model", tiny_pipeline_dir,
        "--negative-prompt", "a red star", "-o", steered,
    )  # fmt: skip
    assert code == 0, stdout
    first, other = (np.asarray(Image.open(folder / "00000.png")) for folder in (out, steered))
    assert not np.array_equal(first, other)


def test_generate_prompts_file_writes_metadata(run_cli, tiny_pipeline_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red star on a gray background\n\n# a comment\na blue ring on a sand background\n")
    out = tmp_path / "out"
    code, _, _ = run_cli(
        "generate", "--prompts", prompts, "--n", 1, "--steps", 2, "--model", tiny_pipeline_dir, "-o", out
    )
    assert code == 0
    texts = [json.loads(line)["text"] for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert texts == ["a red star on a gray background", "a blue ring on a sand background"]
    several = tmp_path / "several"
    code, _, _ = run_cli(
        "generate", *texts, "--n", 1, "--steps", 2, "--model", tiny_pipeline_dir, "-o", several
    )  # fmt: skip
    assert code == 0
    assert (several / "metadata.jsonl").read_text() == (out / "metadata.jsonl").read_text()
    for image in ("00000.png", "00001.png"):  # the same seeds: the same images as from the file
        assert np.array_equal(*(np.asarray(Image.open(folder / image)) for folder in (out, several)))


def test_generate_bad_input_is_one_line(run_cli, tiny_pipeline_dir, tmp_path):
    code, _, err = run_cli("generate", "a pink star", "--model", tiny_pipeline_dir, "-o", tmp_path / "o")
    assert code == 2 and '"pink"' in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("generate", "a red star", "--model", tmp_path, "-o", tmp_path / "o")
    assert code == 2 and "not a diffusers pipeline" in err
    code, _, err = run_cli("generate", "-o", tmp_path / "o")
    assert code == 2 and "--prompts" in err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red star on a gray background\n")
    code, _, err = run_cli("generate", "a red star", "--prompts", prompts, "-o", tmp_path / "o")
    assert code == 2 and "one of them" in err


def test_train_then_generate_with_the_concept(run_cli, tiny_pipeline_dir, tmp_path):
    from customdiff import files, toyworld

    images = tmp_path / "starfish"
    files.write_image_folder(images, toyworld.concept_scenes(toyworld.get_concept("starfish"), 4))
    model = ("--model", tiny_pipeline_dir)
    code, stdout, err = run_cli(
        "train", "--images", images, "--class-word", "star", *model, "--reg", "none", "--steps", 2,
        "--batch-size", 2, "-o", tmp_path / "concept",
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "concept" / "concept.safetensors").is_file() and "concept.safetensors" in stdout
    prompt = "a <new1> star on a gray background"
    runs = {}
    for name, extra in (("with", ("--concept", tmp_path / "concept")), ("without", ())):
        out = tmp_path / name
        code, _, err = run_cli("generate", prompt, "--n", 1, "--steps", 2, *model, *extra, "-o", out)
        runs[name] = (code, err, out)
    assert runs["with"][0] == 0
    assert runs["without"][0] == 2 and "names <new1>, which no concept" in runs["without"][1]


def test_negative_prompts_steer_and_the_empty_one_is_the_default(tiny_pipeline_dir):
    from customdiff import generate, models

    pipe = models.load_pipeline(tiny_pipeline_dir)
    prompt = ["a red star on a gray background"]
    plain = generate.sample(pipe, prompt, n=1, steps=2, progress=False)
    empty = generate.sample(pipe, prompt, n=1, steps=2, progress=False, negative_prompts=[""])
    steered = generate.sample(pipe, prompt, n=1, steps=2, progress=False, negative_prompts=["a red star"])
    assert np.array_equal(plain[0], empty[0]) and not np.array_equal(plain[0], steered[0])


def test_train_needs_images_and_class_word(run_cli, tmp_path):
    code, _, err = run_cli("train", "--class-word", "star", "-o", tmp_path / "o")
    assert code == 2 and "--images DIR --class-word" in err


def test_every_sampler_keeps_the_models_noise_schedule_and_an_ancestral_one_its_seeds(
    run_cli, tiny_pipeline_dir, tmp_path
):
    from typing import get_args

    from customdiff import models
    from customdiff.config import Sampler

    assert set(get_args(Sampler)) == set(models.SAMPLERS)
    pipe = models.load_pipeline(tiny_pipeline_dir)
    shipped = dict(pipe.scheduler.config)
    for name in get_args(Sampler):
        models.use_sampler(pipe, name)
        assert isinstance(pipe.scheduler, models.SAMPLERS[name])
        for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type"):
            assert pipe.scheduler.config[key] == shipped[key], (name, key)
    prompt = "a red star on a gray background"
    runs = {}
    for sampler, batch in [("ddim", 2), ("euler_ancestral", 2), ("euler_ancestral", 1), (None, 1)]:
        out = tmp_path / f"{sampler}{batch}"
        code, stdout, _ = run_cli(
            "generate", prompt, "--n", 2, "--steps", 3, "--model", tiny_pipeline_dir, "--batch-size", batch,
            "-o", out, *(["--sampler", sampler] if sampler else []),
        )  # fmt: skip
        assert code == 0, stdout
        recorded = json.loads((out / "run_config.json").read_text())["sampler"]
        assert recorded == (sampler or "euler_ancestral")  # the model's own, named, when none was given
        runs[sampler, batch] = [np.asarray(Image.open(out / f"0000{i}.png")) for i in range(2)]
    assert not np.array_equal(runs["ddim", 2][1], runs["euler_ancestral", 2][1])
    for run in [runs["euler_ancestral", 2], runs[None, 1]]:
        for one, two in zip(runs["euler_ancestral", 1], run, strict=True):
            # the noise each step adds comes from the image's own seed: the same image in a batch of one
            # or two, but for a rare last-bit rounding of kernels that sum in batch-dependent order
            differs = one.astype(int) - two.astype(int)
            assert np.abs(differs).max() <= 1 and np.count_nonzero(differs) <= one.size // 1000
