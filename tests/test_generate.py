"""``customdiff generate``: images, grid and metadata from a prompt or a prompts file; bad input."""

import json


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
    assert (out / "run_config.json").is_file()


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


def test_generate_bad_input_is_one_line(run_cli, tiny_pipeline_dir, tmp_path):
    code, _, err = run_cli("generate", "a pink star", "--model", tiny_pipeline_dir, "-o", tmp_path / "o")
    assert code == 2 and '"pink"' in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("generate", "a red star", "--model", tmp_path, "-o", tmp_path / "o")
    assert code == 2 and "not a diffusers pipeline" in err
    code, _, err = run_cli("generate", "-o", tmp_path / "o")
    assert code == 2 and "--prompts" in err
