"""The text side, SD and SDXL: features as diffusers encodes prompts; an SDXL model trains, applies, merges
and exports through the same code as SD."""

import pytest
import torch
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
from safetensors.torch import load_file

from customdiff import compress, concept, export, files, finetune, merge, models, text, toyworld
from customdiff.config import FinetuneConfig

PROMPT = "a {} star on a gray background"


@pytest.mark.parametrize("model", ["tiny_pipeline_dir", "tiny_sdxl_dir"])
def test_features_are_those_diffusers_pipelines_sample_with(model, request):
    pipe = models.load_pipeline(request.getfixturevalue(model))
    encoders = text.text_encoders(pipe)
    prompt = PROMPT.format("red")
    states, pooled = text.encode(encoders, [text.tokenize(e.tokenizer, [prompt]) for e in encoders])
    encoded = pipe.encode_prompt(
        prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    torch.testing.assert_close(states, encoded[0])
    if len(encoders) == 2:  # SDXL: both encoders side by side, the second one's pooled output
        assert (
            states.shape[-1] == sum(text.embedding_widths(encoders)) == pipe.unet.config.cross_attention_dim
        )
        torch.testing.assert_close(pooled, encoded[2])


@pytest.fixture(scope="module")
def sdxl_trained(tiny_sdxl_dir, tmp_path_factory):
    """(base pipeline, fine-tuned pipeline, output folder) of a short crossattn_kv run on the tiny SDXL."""
    images = tmp_path_factory.mktemp("starfish")
    files.write_image_folder(images, toyworld.concept_scenes(toyworld.get_concept("starfish"), 4))
    out = tmp_path_factory.mktemp("sdxl_run")
    tuned = models.load_pipeline(tiny_sdxl_dir)
    finetune.train(FinetuneConfig(images, "star", out=out, reg="none", steps=3, lr=1e-2), tuned)
    return models.load_pipeline(tiny_sdxl_dir), tuned, out


def test_an_sdxl_run_trains_only_kv_and_the_token_rows_of_both_encoders(sdxl_trained):
    base, tuned, out = sdxl_trained
    result = concept.load_concept(out)
    assert result.embedding_widths == (16, 32) and result.token_embeddings.shape == (1, 48)
    changed = set()
    for part in ("unet", "text_encoder", "text_encoder_2"):
        before, after = getattr(base, part).state_dict(), getattr(tuned, part).state_dict()
        for name, value in before.items():
            if name.endswith("token_embedding.weight"):  # the old rows stay; one row more
                assert torch.equal(after[name][: len(value)], value) and len(after[name]) == len(value) + 1
            elif not torch.equal(after[name], value):
                changed.add(f"{part}.{name}")
    assert changed == {f"unet.{name}.weight" for name in _kv_layers(base.unet)}
    for rows, encoder in zip(result.token_rows(), text.text_encoders(tuned), strict=True):
        torch.testing.assert_close(rows[0], encoder.model.get_input_embeddings().weight[-1])


def _kv_layers(unet) -> list[str]:
    return [name for name, _ in unet.named_modules() if name.endswith(("attn2.to_k", "attn2.to_v"))]


def test_an_sdxl_concept_applies_to_the_fine_tuned_outputs_and_comes_off(
    sdxl_trained, tiny_sdxl_dir, unet_output
):
    _, tuned, out = sdxl_trained
    pipe = models.load_pipeline(tiny_sdxl_dir)
    before = unet_output(pipe, PROMPT.format("red"))
    applied = concept.apply_concept(pipe, out)
    prompt = PROMPT.format("<new1>")
    # up to float rounding: the concept holds tuned − base, applied as base + (tuned − base)
    torch.testing.assert_close(unet_output(pipe, prompt), unet_output(tuned, prompt), rtol=1e-4, atol=1e-5)
    concept.remove_concept(pipe, applied)
    assert all("<new1>" not in e.tokenizer.get_vocab() for e in text.text_encoders(pipe))
    assert torch.equal(unet_output(pipe, PROMPT.format("red")), before)


def test_sdxl_exports_load_in_diffusers_to_our_outputs(sdxl_trained, tiny_sdxl_dir, tmp_path, unet_output):
    base, tuned, out = sdxl_trained
    trained = concept.load_concept(out)
    prompt = PROMPT.format("<new1>")
    expected = unet_output(tuned, prompt)

    pipe = models.load_pipeline(tiny_sdxl_dir)  # diffusers: one embedding file, a row per encoder
    rows = load_file(out / "<new1>.safetensors")
    assert rows.keys() == set(export.SDXL_EMBEDDING_KEYS)
    pipe.load_textual_inversion(
        rows["clip_l"], token="<new1>", tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder
    )
    pipe.load_textual_inversion(
        rows["clip_g"], token="<new1>", tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2
    )
    pipe.unet.load_attn_procs(out, weight_name=export.DIFFUSERS_ATTN_FILE, _pipeline=pipe)
    assert any(isinstance(p, CustomDiffusionAttnProcessor) for p in pipe.unet.attn_processors.values())
    torch.testing.assert_close(unet_output(pipe, prompt), expected, rtol=1e-4, atol=1e-5)

    small = compress.compress_concept(trained, rank=2)  # webui: a kohya LoRA and clip_l / clip_g
    lora, embedding = export.write_webui(tmp_path, small, ("mystar",))[::-1]
    assert load_file(embedding).keys() == set(export.SDXL_EMBEDDING_KEYS)
    pipe = models.load_pipeline(tiny_sdxl_dir)
    pipe.load_lora_weights(lora)
    rows = load_file(embedding)
    for key, encoder in zip(export.SDXL_EMBEDDING_KEYS, text.text_encoders(pipe), strict=True):
        pipe.load_textual_inversion(
            rows[key], token="mystar", tokenizer=encoder.tokenizer, text_encoder=encoder.model
        )
    ours = models.load_pipeline(tiny_sdxl_dir)
    concept.apply_concept(ours, small)
    torch.testing.assert_close(
        unet_output(pipe, PROMPT.format("mystar")), unet_output(ours, prompt), rtol=1e-4, atol=1e-5
    )


def test_sdxl_concepts_merge_both_ways(sdxl_trained, make_concept):
    base, _, out = sdxl_trained
    first = concept.load_concept(out)
    second = make_concept(base, "<new2>", scale=0.1, captions=("a <new2> ring on a sand background",))
    merged, report = merge.merge_concepts(
        base, [first, second], merge.regularization_captions(base.tokenizer, 200), method="constrained"
    )
    assert merged.tokens == ("<new1>", "<new2>") and merged.embedding_widths == (16, 32)
    assert report.residual < 1e-6 < report.naive_residual and report.objective < report.naive_objective
    weighted, report = merge.merge_concepts(
        base, [first, second], merge.regularization_captions(base.tokenizer, 200)
    )
    assert weighted.embedding_widths == (16, 32) and set(weighted.deltas) == set(merged.deltas)
    assert report.residual < report.naive_residual and report.objective < report.naive_objective
    assert all("<new1>" not in e.tokenizer.get_vocab() for e in text.text_encoders(base))  # left as it was
