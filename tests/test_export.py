"""Export: the kohya LoRA and embeddings load in diffusers and give our outputs; key names; bad input."""

import dataclasses

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from customdiff import compress, concept, export, models
from customdiff.errors import CustomDiffError
from ldm_layout import unet_name

PROMPT = "a {} star on a gray background"


@pytest.fixture(scope="module")
def random_concept(tiny_pipeline_dir, make_concept):
    """A crossattn_kv concept of the tiny pipeline with random K/V deltas and token row."""
    return make_concept(models.load_pipeline(tiny_pipeline_dir))


def ours(tiny_pipeline_dir, concept_, unet_output) -> torch.Tensor:
    pipe = models.load_pipeline(tiny_pipeline_dir)
    concept.apply_concept(pipe, concept_)
    return unet_output(pipe, PROMPT.format("<new1>"))


def test_a_compressed_concept_exports_a_lora_that_diffusers_loads_to_our_outputs(
    random_concept, tiny_pipeline_dir, tmp_path, unet_output, run_cli
):
    small = compress.compress_concept(random_concept, rank=2)
    concept.save_concept(tmp_path / "small", small)
    code, out, err = run_cli("export", tmp_path / "small", "--trigger", "mystar", "-o", tmp_path / "webui")
    assert code == 0, err
    lora = tmp_path / "webui" / "lora" / "mystar.safetensors"
    embedding = tmp_path / "webui" / "embeddings" / "mystar.safetensors"
    assert f"wrote {lora}" in out and f"wrote {embedding}" in out
    state = load_file(lora)
    assert all(key.startswith("lora_unet_") for key in state)
    assert {key.split(".", 1)[1] for key in state} == {"lora_up.weight", "lora_down.weight", "alpha"}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha" in state
    assert load_file(embedding).keys() == {"emb_params"}  # the A1111 / ComfyUI embedding layout

    pipe = models.load_pipeline(tiny_pipeline_dir)
    pipe.load_lora_weights(lora)
    pipe.load_textual_inversion(embedding, token="mystar")
    expected = ours(tiny_pipeline_dir, small, unet_output)
    torch.testing.assert_close(unet_output(pipe, PROMPT.format("mystar")), expected, rtol=1e-4, atol=1e-5)
    base = models.load_pipeline(tiny_pipeline_dir)
    base.load_textual_inversion(embedding, token="mystar")
    assert (unet_output(base, PROMPT.format("mystar")) - expected).abs().max() > 1e-3  # the LoRA counts


def test_a_full_delta_exports_exactly_as_diff_keys_named_after_real_modules(
    random_concept, tiny_pipeline_dir, tmp_path
):
    paths = export.write_webui(tmp_path, random_concept)
    assert [path.relative_to(tmp_path).as_posix() for path in paths] == [
        "embeddings/new1.safetensors",
        "lora/new1.safetensors",
    ]
    state = load_file(tmp_path / "lora" / "new1.safetensors")
    unet = models.load_pipeline(tiny_pipeline_dir).unet
    modules = {"lora_unet_" + name.replace(".", "_") for name, _ in unet.named_modules()}
    for name, delta in random_concept.deltas.items():
        key = export.kohya_name(name)
        assert key in modules
        assert torch.equal(state[f"{key}.diff"], delta)
    with safe_open(tmp_path / "lora" / "new1.safetensors", "pt") as handle:
        assert handle.metadata()["customdiff_base_model_hash"] == random_concept.base_hash


def test_diffusers_export_loads_in_diffusers_to_our_outputs(
    random_concept, tiny_pipeline_dir, tmp_path, unet_output, run_cli
):
    concept.save_concept(tmp_path / "c", random_concept)
    code, _, err = run_cli(
        "export", tmp_path / "c", "--format", "diffusers", "--model", tiny_pipeline_dir, "-o", tmp_path / "d"
    )
    assert code == 0, err
    pipe = models.load_pipeline(tiny_pipeline_dir)
    pipe.load_textual_inversion(tmp_path / "d", weight_name="<new1>.safetensors")
    pipe.unet.load_attn_procs(tmp_path / "d", weight_name=export.DIFFUSERS_ATTN_FILE, _pipeline=pipe)
    expected = ours(tiny_pipeline_dir, random_concept, unet_output)
    torch.testing.assert_close(unet_output(pipe, PROMPT.format("<new1>")), expected, rtol=1e-4, atol=1e-5)


def test_export_names_bad_input_in_one_line(random_concept, tmp_path, run_cli):
    concept.save_concept(tmp_path / "c", random_concept)
    code, _, err = run_cli("export", tmp_path / "c", "--trigger", "<new1>", "-o", tmp_path / "x")
    assert code == 2 and '--trigger "<new1>"' in err and len(err.splitlines()) == 1
    code, _, err = run_cli("export", tmp_path / "c", "--trigger", "a", "b", "-o", tmp_path / "x")
    assert code == 2 and "pass one trigger word for each" in err
    concept.save_concept(tmp_path / "full", dataclasses.replace(random_concept, mode="full"))
    code, _, err = run_cli("export", tmp_path / "full", "-o", tmp_path / "x")
    assert code == 2 and "not --mode full" in err
    assert not (tmp_path / "x").exists()
    with pytest.raises(CustomDiffError, match="not --mode full"):
        export.write_webui(tmp_path / "y", dataclasses.replace(random_concept, mode="full"))


# ---------------------------------------------------------------------------------------------- import


def diffusers_example_folder(folder, concept_, tiny_pipeline_dir):
    """What diffusers' train_custom_diffusion.py writes for ``concept_``: its attention file (the fine-tuned
    K/V; a pickle with --no_safe_serialization) and ``<new1>.bin`` (safetensors, despite the name)."""
    export.write_diffusers(folder, concept_, ours_unet(tiny_pipeline_dir, concept_))
    attn = folder / export.DIFFUSERS_ATTN_FILE
    torch.save(load_file(attn), folder / "pytorch_custom_diffusion_weights.bin")
    attn.unlink()
    (folder / "<new1>.safetensors").rename(folder / "<new1>.bin")


def ours_unet(tiny_pipeline_dir, concept_):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    concept.apply_concept(pipe, concept_)
    return pipe.unet


def test_import_reads_diffusers_examples_folder_and_the_papers_delta_bin_to_our_outputs(
    tiny_pipeline_dir, make_concept, tmp_path, unet_output, run_cli, recwarn
):
    original = make_concept(models.load_pipeline(tiny_pipeline_dir), scale=0.01)
    expected = ours(tiny_pipeline_dir, original, unet_output)
    diffusers_example_folder(tmp_path / "example", original, tiny_pipeline_dir)
    code, out, err = run_cli(
        "import",
        tmp_path / "example",
        "--instance-prompt",
        "photo of a <new1> star",
        "--model",
        tiny_pipeline_dir,
    )
    assert code == 0 and not err, err
    path = tmp_path / "example" / "customdiff" / "concept.safetensors"
    assert f"wrote {path}: a crossattn_kv concept of <new1> star" in out
    assert 'next: customdiff generate "photo of a <new1> star"' in out.replace("'", '"')
    imported = concept.load_concept(path)
    assert (imported.mode, imported.tokens, imported.class_words) == ("crossattn_kv", ("<new1>",), ("star",))
    assert imported.captions == ("photo of a <new1> star",)
    assert imported.base_hash == original.base_hash
    assert torch.equal(imported.token_embeddings, original.token_embeddings)
    assert imported.deltas.keys() == original.deltas.keys()
    for name, delta in original.deltas.items():
        torch.testing.assert_close(imported.deltas[name], delta, rtol=0, atol=1e-6)  # (W₀ + Δ) − W₀
    torch.testing.assert_close(ours(tiny_pipeline_dir, imported, unet_output), expected, rtol=1e-4, atol=1e-5)

    # the paper's delta.bin: whole K/V weights, or (compressed) factors u @ v of each delta
    base = dict(models.load_pipeline(tiny_pipeline_dir).unet.named_parameters())
    whole = {name[5:]: base[name[5:]].detach() + delta for name, delta in original.deltas.items()}
    row = {"<new1>": original.token_embeddings[0]}
    torch.save({"unet": whole, "modifier_token": row}, tmp_path / "delta.bin")
    small = compress.compress_concept(original, rank=2)
    factored = {name[5:]: {"u": up, "v": down} for name, (up, down) in small.factors.items()}
    torch.save({"unet": factored, "modifier_token": row}, tmp_path / "compressed_delta.bin")
    # the CompVis scripts' delta.ckpt: LDM keys (as single-file checkpoints name them), the rows as "embed"
    unet = models.load_pipeline(tiny_pipeline_dir).unet
    layers, up = unet.config.layers_per_block, [hasattr(block, "attentions") for block in unet.up_blocks]
    ldm = {f"model.diffusion_model.{unet_name(name, layers, up)}": value for name, value in whole.items()}
    torch.save({"state_dict": {**ldm, "embed": original.token_embeddings}}, tmp_path / "delta.ckpt")
    model = ("--model", tiny_pipeline_dir)
    for file, wanted in (("delta.bin", original), ("compressed_delta.bin", small), ("delta.ckpt", original)):
        out = tmp_path / f"out-{file}"
        code, _, err = run_cli("import", tmp_path / file, "--class-word", "star", *model, "-o", out)
        assert code == 0 and not err, err
        imported = concept.load_concept(out)
        assert imported.captions == ("photo of a <new1> star",)
        assert imported.factors.keys() == wanted.factors.keys()  # a compressed file stays compressed
        torch.testing.assert_close(
            ours(tiny_pipeline_dir, imported, unet_output),
            ours(tiny_pipeline_dir, wanted, unet_output),
            rtol=1e-4,
            atol=1e-5,
        )
    assert not [warning for warning in recwarn if "deltas are" in str(warning.message)]  # its own base


def test_import_names_bad_input_in_one_line_and_writes_nothing(
    tiny_pipeline_dir, tiny_sdxl_dir, make_concept, tmp_path, run_cli
):
    original = make_concept(models.load_pipeline(tiny_pipeline_dir), scale=0.01)
    diffusers_example_folder(tmp_path / "example", original, tiny_pipeline_dir)
    model = ("--model", tiny_pipeline_dir)
    out = tmp_path / "out"

    def refused(*argv) -> str:
        code, _, err = run_cli("import", *argv, "-o", out)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert not out.exists()
        return err

    assert "does not exist" in refused(tmp_path / "missing", "--class-word", "star", *model)
    assert "one of them" in refused(tmp_path / "example", *model)
    assert "one of them" in refused(
        tmp_path / "example", "--class-word", "star", "--instance-prompt", "a", *model
    )
    assert "naming each before its class word" in refused(
        tmp_path / "example", "--instance-prompt", "photo of a star", *model
    )
    assert "naming each before its class word" in refused(
        tmp_path / "example", "--class-word", "a", "b", *model
    )
    assert "pass --model the model it was trained from" in refused(
        tmp_path / "example", "--class-word", "star", "--model", tiny_sdxl_dir
    )
    (tmp_path / "empty").mkdir()
    assert "holds no token embedding" in refused(tmp_path / "empty", "--class-word", "star", *model)
    (tmp_path / "word").mkdir()
    torch.save({"star": original.token_embeddings[0]}, tmp_path / "word" / "star.bin")
    assert "vocabulary already" in refused(tmp_path / "word", "--class-word", "star", *model)
    (tmp_path / "example" / "<new2>.bin").write_bytes(b"not a weights file")
    assert "cannot read" in refused(tmp_path / "example", "--class-word", "star", "star", *model)
    torch.save({"unet": {}, "text_encoder": {}}, tmp_path / "te.bin")
    assert "fine-tuned text encoder" in refused(tmp_path / "te.bin", "--class-word", "star", *model)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    torch.save(
        {"unet": {key: 1}, "modifier_token": {"<new1>": original.token_embeddings[0]}}, tmp_path / "n.bin"
    )
    assert "not tensors" in refused(tmp_path / "n.bin", "--class-word", "star", *model)
    torch.save({"weights": {}}, tmp_path / "other.ckpt")
    assert "not a Custom Diffusion delta" in refused(tmp_path / "other.ckpt", "--class-word", "star", *model)
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(1)}}, tmp_path / "d.ckpt")
    assert "no UNet attention weight" in refused(tmp_path / "d.ckpt", "--class-word", "star", *model)


def test_import_warns_when_the_deltas_are_too_large_for_a_fine_tune_of_the_model(
    tiny_pipeline_dir, make_concept, tmp_path, run_cli
):
    foreign = make_concept(models.load_pipeline(tiny_pipeline_dir), scale=1.0)  # as from another base
    example = tmp_path / "example"
    diffusers_example_folder(example, foreign, tiny_pipeline_dir)
    with pytest.warns(UserWarning, match=r"deltas are \d+% of the weights they change.*pass --model"):
        code, _, _ = run_cli("import", example, "--class-word", "star", "--model", tiny_pipeline_dir)
    assert code == 0
    code, out, _ = run_cli("info", example / "customdiff", "--model", tiny_pipeline_dir)
    assert code == 0 and f"imported from {example}" in out


def test_import_reads_back_our_own_diffusers_export_of_an_sdxl_concept(
    tiny_sdxl_dir, make_concept, tmp_path, unet_output, run_cli
):
    original = make_concept(models.load_pipeline(tiny_sdxl_dir), scale=0.01)
    export.write_diffusers(
        tmp_path / "d", original, ours_unet(tiny_sdxl_dir, original)
    )  # clip_l + clip_g rows
    code, _, err = run_cli("import", tmp_path / "d", "--class-word", "star", "--model", tiny_sdxl_dir)
    assert code == 0 and not err, err
    imported = concept.load_concept(tmp_path / "d" / "customdiff")
    assert imported.embedding_widths == original.embedding_widths
    assert torch.equal(imported.token_embeddings, original.token_embeddings)
    torch.testing.assert_close(
        ours(tiny_sdxl_dir, imported, unet_output),
        ours(tiny_sdxl_dir, original, unet_output),
        rtol=1e-4,
        atol=1e-5,
    )


def test_ldm_attention_keys_of_sd15s_layout_map_to_diffusers_names():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # SD 1.5's UNet shape, no weights
        unet = UNet2DConditionModel(cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280))
    layers, up = unet.config.layers_per_block, [hasattr(block, "attentions") for block in unet.up_blocks]
    names = [name for name, _ in unet.named_parameters() if ".attn2." in name]
    assert len([name for name in names if name.endswith(("to_k.weight", "to_v.weight"))]) == 32
    for name in names:
        assert (
            export.diffusers_attention_name(f"model.diffusion_model.{unet_name(name, layers, up)}", layers)
            == name
        )
    # the paper's converter's rule for two of them
    assert export.diffusers_attention_name("input_blocks.8.1.x", layers) == "down_blocks.2.attentions.1.x"
    assert export.diffusers_attention_name("output_blocks.11.1.x", layers) == "up_blocks.3.attentions.2.x"
