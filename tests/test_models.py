"""Loading base pipelines: any diffusers SD folder takes the toy model's path; bad ones fail in one line."""

import json
import types

import numpy as np
import pytest
import torch

from customdiff import config, generate, models
from customdiff.errors import CustomDiffError


def test_toy_tokenizer_spells_every_word_as_one_token_and_takes_new_tokens():
    tokenizer = models.build_toy_tokenizer()
    for word in models.toy_words():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    assert tokenizer.add_tokens("<new1>") == 1
    ids = tokenizer("a <new1> star on a gray background").input_ids
    assert tokenizer.convert_tokens_to_ids("<new1>") in ids
    captions = " ".join(text for _, text in __import__("customdiff.toyworld").toyworld.sample_scenes(200))
    assert not set(models.RARE_TOKENS) & set(captions.split())  # free to initialise modifier tokens


def test_default_initializers_differ_per_token_and_are_one_token_each():
    tokenizer = models.build_toy_tokenizer()
    words = [models.default_initializer(tokenizer, f"<new{n}>") for n in range(1, 4)]
    assert words == ["ktn", "sks", "zwx"]  # the paper's pll, ucd are no toy words: skipped
    assert models.default_initializer(tokenizer, "<mymug>") == "ktn"


def test_toy_unet_keeps_about_three_percent_in_cross_attention_kv():
    unet = models.toy_unet(cross_attention_dim=128)
    total = sum(p.numel() for p in unet.parameters())
    kv = sum(p.numel() for name, p in unet.named_parameters() if "attn2.to_k" in name or "attn2.to_v" in name)
    assert 0.02 < kv / total < 0.04


def test_check_prompt_names_an_unknown_word():
    tokenizer = models.build_toy_tokenizer()
    models.check_prompt(tokenizer, "a small red star on a grass background")
    with pytest.raises(CustomDiffError, match='"pink"'):
        models.check_prompt(tokenizer, "a pink star on a grass background")


def test_check_prompt_names_a_modifier_token_no_concept_brought():
    tokenizer = models.build_toy_tokenizer()
    models.check_prompt(tokenizer, "a <new1> star on a gray background", new_tokens=["<new1>"])
    with pytest.raises(CustomDiffError, match="names <new1>, which no concept here holds; pass --concept"):
        models.check_prompt(tokenizer, "a <new1> star on a gray background")


def test_load_pipeline_runs_a_tiny_sd_folder(tiny_pipeline_dir, tmp_path):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    images = generate.sample(pipe, ["a red star on a gray background"], n=2, steps=2, progress=False)
    assert len(images) == 2 and images[0].dtype == np.uint8 and images[0].shape[2] == 3
    again = generate.sample(pipe, ["a red star on a gray background"], n=1, steps=2, progress=False)
    # image i depends on seed + i only; batched matmuls may round one grey level apart across CPUs
    difference = np.abs(images[0].astype(int) - again[0].astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    generate.write_samples(tmp_path / "out", ["a red star on a gray background"], images, n=2)
    lines = (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == ["a red star on a gray background"] * 2
    assert (tmp_path / "out" / "grid.png").is_file()


def test_load_pipeline_rejects_a_folder_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(CustomDiffError, match="not a diffusers pipeline"):
        models.load_pipeline(tmp_path)


def test_load_pipeline_names_a_corrupt_weights_file(tiny_pipeline_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(CustomDiffError, match="cannot load"):
        models.load_pipeline(broken)


def test_load_pipeline_takes_sd_and_sdxl_folders_and_names_another_kind(
    tiny_pipeline_dir, tiny_sdxl_dir, tmp_path
):
    assert type(models.load_pipeline(tiny_pipeline_dir)).__name__ == "StableDiffusionPipeline"
    assert type(models.load_pipeline(tiny_sdxl_dir)).__name__ == "StableDiffusionXLPipeline"
    other = tmp_path / "flux"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(
        CustomDiffError, match="names a FluxPipeline pipeline; pass --model a Stable Diffusion"
    ):
        models.load_pipeline(other)


def assert_same_weights(loaded, expected) -> None:
    """Every tensor of the UNet, VAE and text encoder(s) equal, under the same names."""
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(expected, part, None) is not None:
            want, got = getattr(expected, part).state_dict(), getattr(loaded, part).state_dict()
            assert want.keys() == got.keys(), part
            assert all(torch.equal(want[name], got[name]) for name in want), part


def test_a_checkpoint_file_loads_as_its_diffusers_folder(tiny_pipeline_dir, tiny_checkpoint_file, tmp_path):
    folder = models.load_pipeline(tiny_pipeline_dir)
    single = models.load_pipeline(tiny_checkpoint_file, model_config=tiny_pipeline_dir)
    assert_same_weights(single, folder)
    assert models.model_hash(single) == models.model_hash(folder)  # a concept fits either
    assert models.model_folder(single) == tiny_pipeline_dir  # where its clip/ and defaults are found
    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny-sd.ckpt"  # the pickled kind, read as weights only
    torch.save({"state_dict": load_file(tiny_checkpoint_file)}, ckpt)
    pickled = models.load_pipeline(ckpt, model_config=tiny_pipeline_dir)
    assert models.model_hash(pickled) == models.model_hash(folder)


@pytest.mark.parametrize("model, open_clip", [("tiny_pipeline_dir", True), ("tiny_sdxl_dir", False)])
def test_sd2_and_sdxl_checkpoint_files_load_as_their_folders(model, open_clip, request, tmp_path):
    """An SD 2.x file keeps its text encoder in OpenCLIP naming; an SDXL file (SGM naming) holds two text
    encoders and is told apart by its second one's keys."""
    from safetensors.torch import load_file, save_file

    from ldm_layout import ldm_state_dict

    folder = request.getfixturevalue(model)
    pipe = models.load_pipeline(folder)
    path = tmp_path / "model.safetensors"
    save_file(ldm_state_dict(pipe, open_clip=open_clip), path)
    single = models.load_pipeline(path, model_config=folder)
    assert type(single) is type(pipe) is models.checkpoint_pipeline_class(path, None)
    assert_same_weights(single, pipe)
    assert models.model_hash(single) == models.model_hash(pipe)
    pickled = tmp_path / "model.ckpt"  # told apart too, its tensors memory-mapped, not read
    torch.save({"state_dict": load_file(path), "global_step": 1}, pickled)
    assert models.checkpoint_pipeline_class(pickled, None) is type(pipe)


def test_load_pipeline_names_a_bad_checkpoint_file(tiny_pipeline_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    with pytest.raises(CustomDiffError, match=r"notes.txt is no checkpoint file \(.safetensors or .ckpt\)"):
        models.load_pipeline(notes, model_config=tiny_pipeline_dir)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(CustomDiffError, match="checkpoint .*broken.safetensors.*--model-config"):
        models.load_pipeline(broken, model_config=tiny_pipeline_dir)


def test_model_hash_tells_models_apart(tiny_pipeline_dir):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    before, threads = models.model_hash(pipe), torch.get_num_threads()
    assert before == models.model_hash(models.load_pipeline(tiny_pipeline_dir))
    torch.set_num_threads(1)  # a float sum's rounding would differ here
    try:
        assert models.model_hash(pipe) == before
    finally:
        torch.set_num_threads(threads)
    assert models.model_hash(pipe.to(torch.float16)) == before  # a base loaded in half precision fits
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(1e-2)
    assert models.model_hash(pipe) != before


def test_shipped_toy_model_loads_with_diffusers_alone_and_fits_its_budget():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(models.TOY_MODEL_DIR)  # no customdiff code involved
    shipped = sum(path.stat().st_size for path in models.TOY_MODEL_DIR.rglob("*") if path.is_file())
    assert shipped <= 40 * 2**20 and (models.TOY_MODEL_DIR / "clip" / "config.json").is_file()
    kv = sum(p.numel() for n, p in pipe.unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n)
    assert 0.02 < kv / pipe.unet.num_parameters() < 0.04
    generator = torch.Generator().manual_seed(0)
    image = pipe("a small red star on a grass background", num_inference_steps=2, generator=generator).images[
        0
    ]
    assert image.size == (64, 64)


def test_recommended_guidance_reads_the_model_folder_else_the_papers(tmp_path):
    pipe = types.SimpleNamespace(name_or_path=str(tmp_path))
    assert models.recommended_guidance(pipe) == config.PAPER_GUIDANCE == 6.0
    assert models.recommended_guidance(types.SimpleNamespace(name_or_path=None)) == 6.0  # built in code
    (tmp_path / config.MODEL_DEFAULTS_FILE).write_text("[generate]\nguidance = 2.5\n")
    assert models.recommended_guidance(pipe) == 2.5
    (tmp_path / config.MODEL_DEFAULTS_FILE).write_text("[generate]\nguidance = 'high'\n")
    with pytest.raises(CustomDiffError, match=config.MODEL_DEFAULTS_FILE):
        models.recommended_guidance(pipe)
    toy = types.SimpleNamespace(name_or_path=str(models.TOY_MODEL_DIR))
    assert models.recommended_guidance(toy) == 3.0  # its UNet overshoots off-palette colours at 6
    assert models.recommended_regions(toy)  # its concepts bleed into each other in two-object scenes
    assert not models.recommended_regions(types.SimpleNamespace(name_or_path=None))


def test_a_checkpoint_file_takes_the_defaults_of_its_config_folder(tmp_path):
    checkpoint = tmp_path / "toy.safetensors"
    checkpoint.write_bytes(b"")  # the defaults are read before any weight
    beside = config.GenerateConfig("a red star", model=checkpoint, model_config=models.TOY_MODEL_DIR)
    assert beside.guidance == 3.0
    assert config.GenerateConfig("a red star", model=checkpoint).guidance == config.PAPER_GUIDANCE
    train = config.FinetuneConfig(tmp_path, "star", model=checkpoint, model_config=models.TOY_MODEL_DIR)
    assert (train.steps, train.augment) == (6000, False)
    assert config.FinetuneConfig(tmp_path, "star", model=checkpoint).steps == 400
