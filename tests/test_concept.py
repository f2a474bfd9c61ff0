"""The concept file: exact round trip, applying equals fine-tuning, and diffusers' own loaders agree."""

import dataclasses

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, CustomDiffusionAttnProcessor

from customdiff import concept, export, files, finetune, models, toyworld
from customdiff.config import FinetuneConfig
from customdiff.errors import CustomDiffError

PROMPT = "a <new1> star on a gray background"


@pytest.fixture(scope="module")
def trained(tiny_pipeline_dir, tmp_path_factory):
    """mode → (fine-tuned pipeline, its output folder), from short runs with a large learning rate."""
    images = tmp_path_factory.mktemp("starfish")
    files.write_image_folder(images, toyworld.concept_scenes(toyworld.get_concept("starfish"), 4))
    runs = {}
    for mode in ("crossattn_kv", "crossattn"):
        out = tmp_path_factory.mktemp(mode)
        config = FinetuneConfig(images, "star", out=out, mode=mode, reg="none", steps=3, lr=1e-2)
        pipe = models.load_pipeline(tiny_pipeline_dir)
        finetune.train(config, pipe)
        runs[mode] = pipe, out
    return runs


def test_save_then_load_round_trips_exactly(tmp_path):
    original = concept.Concept(
        base_hash="a1b2c3d4e5f6",
        mode="crossattn_kv",
        tokens=("<new1>", "<new2>"),
        class_words=("star", "ring"),
        initializers=("ktn", "sks"),
        token_embeddings=torch.randn(2, 32),
        deltas={
            "unet.down.attn2.to_k.weight": torch.randn(8, 32),
            "unet.down.attn2.to_v.weight": torch.randn(8, 32),
        },
        captions=("a <new1> star on a gray background", "a <new2> ring on a sand background"),
        config={"steps": 250, "lr": 1e-5},
        parts=tuple(
            concept.Part((token,), {"unet.down.attn2.to_k.weight": torch.randn(8, 32)})
            for token in ("<new1>", "<new2>")
        ),
    )
    path = concept.save_concept(tmp_path, original)
    loaded = concept.load_concept(path)
    assert loaded.deltas.keys() == original.deltas.keys()
    assert all(torch.equal(loaded.deltas[name], original.deltas[name]) for name in original.deltas)
    assert [part.tokens for part in loaded.parts] == [("<new1>",), ("<new2>",)]
    for got, want in zip(loaded.parts, original.parts, strict=True):
        assert got.deltas.keys() == want.deltas.keys()
        assert all(torch.equal(got.deltas[name], want.deltas[name]) for name in want.deltas)
    assert torch.equal(loaded.token_embeddings, original.token_embeddings)
    same = ("base_hash", "mode", "tokens", "class_words", "initializers", "captions", "config")
    assert all(getattr(loaded, field) == getattr(original, field) for field in same)
    assert concept.load_concept(tmp_path).tokens == original.tokens  # a folder holding it works too
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_load_concept_names_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(CustomDiffError, match="does not exist"):
        concept.load_concept(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(CustomDiffError, match="not a customdiff concept"):
        concept.load_concept(tmp_path / "other.safetensors")


@pytest.mark.parametrize("mode", ["crossattn_kv", "crossattn"])
def test_apply_concept_reproduces_the_fine_tuned_model(mode, trained, tiny_pipeline_dir, unet_output):
    tuned, out = trained[mode]
    pipe = models.load_pipeline(tiny_pipeline_dir)
    base_output = unet_output(pipe, "a <new1> star on a gray background")
    applied = concept.apply_concept(pipe, out / concept.CONCEPT_FILE)
    assert applied.concept.tokens == ("<new1>",) and len(pipe.tokenizer) == len(tuned.tokenizer)
    # up to float rounding: the concept holds tuned − base, applied as base + (tuned − base)
    torch.testing.assert_close(unet_output(pipe, PROMPT), unet_output(tuned, PROMPT), rtol=1e-4, atol=1e-5)
    assert (unet_output(pipe, PROMPT) - base_output).abs().max() > 1e-3  # the concept changes the output
    torch.testing.assert_close(
        unet_output(pipe, "a red star on a gray background"),
        unet_output(tuned, "a red star on a gray background"),
        rtol=1e-4,
        atol=1e-5,
    )


def test_remove_concept_restores_the_base(trained, tiny_pipeline_dir, unet_output):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    prompt = "a red star on a gray background"
    before, vocabulary = unet_output(pipe, prompt), len(pipe.tokenizer)
    weights = {name: p.clone() for name, p in pipe.unet.named_parameters()}
    applied = concept.apply_concept(pipe, trained["crossattn_kv"][1])
    concept.remove_concept(pipe, applied)
    assert (
        len(pipe.tokenizer) == vocabulary
        and pipe.text_encoder.get_input_embeddings().num_embeddings == vocabulary
    )
    assert torch.equal(unet_output(pipe, prompt), before)
    assert all(torch.equal(weight, weights[name]) for name, weight in pipe.unet.named_parameters())
    concept.apply_concept(pipe, trained["crossattn_kv"][1])  # the base hash matches again


def test_apply_concept_scales_the_deltas_and_removes_them_exactly(tiny_pipeline_dir, make_concept):
    base = models.load_pipeline(tiny_pipeline_dir)
    originals = {key: p.detach().clone() for key, p in base.unet.named_parameters()}
    made = make_concept(base, scale=1.0)
    halved = dataclasses.replace(made, deltas={name: 0.5 * delta for name, delta in made.deltas.items()})
    pipes = {scale: models.load_pipeline(tiny_pipeline_dir) for scale in (0.5, 0.0, "halved")}
    scaled = concept.apply_concept(pipes[0.5], made, 0.5)
    concept.apply_concept(pipes[0.0], made, 0.0)
    concept.apply_concept(pipes["halved"], halved)
    for key, weight in pipes[0.5].unet.named_parameters():
        assert torch.equal(weight, pipes["halved"].unet.get_parameter(key))
        assert torch.equal(pipes[0.0].unet.get_parameter(key), originals[key])
    assert any(not torch.equal(weight, originals[key]) for key, weight in pipes[0.5].unet.named_parameters())
    concept.remove_concept(pipes[0.5], scaled)
    assert all(torch.equal(weight, originals[key]) for key, weight in pipes[0.5].unet.named_parameters())


def test_apply_concept_refuses_another_base(trained, tiny_pipeline_dir):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    with torch.no_grad():
        pipe.unet.conv_in.weight.add_(1e-3)
    with pytest.raises(
        CustomDiffError, match=r"concept.safetensors was trained on base \w+, not on this model"
    ):
        concept.apply_concept(pipe, trained["crossattn_kv"][1])
    assert "<new1>" not in pipe.tokenizer.get_vocab()  # nothing half-applied


@pytest.mark.parametrize("mode", ["crossattn_kv", "crossattn"])
def test_diffusers_loaders_apply_our_files(mode, trained, tiny_pipeline_dir, unet_output):
    """diffusers 0.42.1: load_textual_inversion works as documented; load_attn_procs only with _pipeline.

    Called as documented, ``unet.load_attn_procs`` builds the processors and then drops them (it sets
    them only when the private ``_pipeline`` argument is given, diffusers issue 9320).
    """
    tuned, out = trained[mode]
    pipe = models.load_pipeline(tiny_pipeline_dir)
    pipe.load_textual_inversion(out, weight_name="<new1>.safetensors")
    pipe.unet.load_attn_procs(out, weight_name=export.DIFFUSERS_ATTN_FILE)  # the documented call
    assert all(
        isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values()
    )  # silently ignored
    pipe.unet.load_attn_procs(out, weight_name=export.DIFFUSERS_ATTN_FILE, _pipeline=pipe)
    processors = pipe.unet.attn_processors
    assert all(isinstance(p, CustomDiffusionAttnProcessor) for p in processors.values())
    assert sum(p.train_kv for p in processors.values()) == sum(
        n.endswith("attn2.processor") for n in processors
    )
    torch.testing.assert_close(unet_output(pipe, PROMPT), unet_output(tuned, PROMPT), rtol=1e-4, atol=1e-5)


def test_info_says_how_to_prompt_a_concept_and_whether_a_model_is_its_base(
    trained, tiny_pipeline_dir, run_cli, tmp_path
):
    from customdiff import compress

    _, out = trained["crossattn_kv"]
    whole = concept.load_concept(out)
    concept.save_concept(tmp_path / "small", compress.compress_concept(whole, rank=2))
    code, printed, err = run_cli("info", out, tmp_path / "small", "--model", tiny_pipeline_dir)
    assert code == 0, err
    values = sum(delta.numel() for delta in whole.deltas.values())
    assert (
        f"{out / concept.CONCEPT_FILE} (" in printed
        and f"{tmp_path / 'small' / concept.CONCEPT_FILE} (" in printed
    )
    assert f"crossattn_kv concept of base {whole.base_hash}, {tiny_pipeline_dir}'s" in printed
    assert f'prompt <new1> star (its row started from {whole.initializers[0]}), e.g. "' in printed
    assert f"{len(whole.deltas)} UNet deltas of {values:,} values\n" in printed
    assert "kept as SVD factors of rank 2–2" in printed and printed.count("trained 3 steps on") == 2
    code, printed, err = run_cli("info", out)  # against the toy model, not its base
    assert code == 0 and "not the toy model's" in printed and "pass --model its base model" in printed
    code, _, err = run_cli("info", tmp_path / "missing")
    assert code == 2 and "does not exist" in err
