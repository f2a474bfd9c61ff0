"""Import: diffusers' example folder, the paper's delta.bin / delta.ckpt and a webui folder read back to the
original's outputs; LDM key names; bad input."""

import dataclasses
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from customdiff import compress, concept, export, importing, models
from ldm_layout import unet_name
from test_export import ours


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
    # our own webui export names its base: large deltas (a closed-form refit's) are no sign of another one
    export.write_webui(tmp_path / "webui", foreign)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run_cli(
            "import", tmp_path / "webui", "--class-word", "star", "--model", tiny_pipeline_dir
        )
    assert code == 0 and not err, err
    assert not [warning for warning in caught if "deltas are" in str(warning.message)]


@pytest.mark.parametrize("layout", ["diffusers", "webui"])
def test_import_reads_back_our_own_export_of_an_sdxl_concept(
    layout, tiny_sdxl_dir, make_concept, tmp_path, unet_output, run_cli
):
    original = make_concept(models.load_pipeline(tiny_sdxl_dir), scale=0.01)  # clip_l + clip_g rows
    if layout == "diffusers":
        export.write_diffusers(tmp_path / "d", original, ours_unet(tiny_sdxl_dir, original))
    else:
        export.write_webui(tmp_path / "d", original)
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


def test_import_reads_a_webui_folder_back_to_the_exported_concept(
    tiny_pipeline_dir, make_concept, tmp_path, run_cli
):
    original = make_concept(models.load_pipeline(tiny_pipeline_dir), scale=0.01)
    small = compress.compress_concept(original, rank=2)
    export.write_webui(tmp_path / "exact", original)  # diff keys, embeddings/new1.safetensors
    export.write_webui(tmp_path / "small", small, ("mystar",))  # lora_up / lora_down / alpha
    # kohya's LoRAs scale the product by alpha / rank (here 4 / 2); an A1111 .pt embedding holds
    # string_to_param
    lora = tmp_path / "small" / "lora" / "mystar.safetensors"
    save_file({k: v.fill_(4.0) if k.endswith("alpha") else v for k, v in load_file(lora).items()}, lora)
    doubled = dataclasses.replace(
        small,
        factors={name: (2 * up, down) for name, (up, down) in small.factors.items()},
        deltas={name: 2 * delta for name, delta in small.deltas.items()},
    )
    embedding = tmp_path / "small" / "embeddings" / "mystar.safetensors"
    row = load_file(embedding)["emb_params"]
    a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": row}, "name": "mystar", "step": 500}
    torch.save(a1111, embedding.with_suffix(".pt"))
    embedding.unlink()
    # the LDM naming of kohya's SDXL LoRAs (lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k)
    export.write_webui(tmp_path / "ldm", original)
    unet = models.load_pipeline(tiny_pipeline_dir).unet
    layers, up = unet.config.layers_per_block, [hasattr(block, "attentions") for block in unet.up_blocks]
    modules = [name.removeprefix("unet.").removesuffix(".weight") for name in original.deltas]
    in_ldm = {"lora_unet_" + m.replace(".", "_"): "lora_unet_" + unet_name(m, layers, up).replace(".", "_")
              for m in modules}  # fmt: skip
    lora = tmp_path / "ldm" / "lora" / "new1.safetensors"
    state = {}
    for key, value in load_file(lora).items():
        module, part = key.split(".", 1)
        state[f"{in_ldm[module]}.{part}"] = value
    assert {key.split("_")[2] for key in state} == {"input", "middle", "output"}
    save_file(state, lora)
    model = ("--model", tiny_pipeline_dir)
    for folder, token, wanted in (
        ("exact", "<new1>", original), ("small", "<mystar>", doubled), ("ldm", "<new1>", original)
    ):  # fmt: skip
        code, _, err = run_cli("import", tmp_path / folder, "--class-word", "star", *model)
        assert code == 0 and not err, err
        imported = concept.load_concept(tmp_path / folder / "customdiff")
        assert imported.tokens == (token,) and imported.mode == "crossattn_kv"
        assert imported.factors.keys() == wanted.factors.keys()  # a LoRA stays low-rank
        assert torch.equal(imported.token_embeddings, wanted.token_embeddings)
        for name, delta in wanted.deltas.items():
            torch.testing.assert_close(imported.deltas[name], delta, rtol=1e-5, atol=1e-6)


def test_import_of_a_webui_folder_names_bad_input_in_one_line_and_writes_nothing(
    tiny_pipeline_dir, tiny_sdxl_dir, make_concept, tmp_path, run_cli
):
    original = make_concept(models.load_pipeline(tiny_pipeline_dir), scale=0.01)
    out = tmp_path / "out"

    def refused(folder, *argv, model=tiny_pipeline_dir) -> str:
        code, _, err = run_cli(
            "import", folder, *(argv or ("--class-word", "star")), "--model", model, "-o", out
        )
        assert code == 2 and len(err.splitlines()) == 1, err
        assert not out.exists()
        return err

    def with_lora_keys(folder, **added):
        """An export whose LoRA also holds ``added`` (``__`` for ``.`` in the keys)."""
        export.write_webui(folder, original)
        lora = folder / "lora" / "new1.safetensors"
        save_file({**load_file(lora), **{key.replace("__", "."): v for key, v in added.items()}}, lora)
        return folder

    k = export.kohya_name(next(iter(original.deltas)))
    te = "lora_te_text_model_encoder_layers_0_self_attn_k_proj__lora_up__weight"
    assert "trains the text encoder" in refused(with_lora_keys(tmp_path / "a", **{te: torch.zeros(1, 1)}))
    assert "only one of lora_up and lora_down" in refused(
        with_lora_keys(tmp_path / "u", **{f"{k}__lora_up__weight": torch.zeros(4, 1)})
    )
    lycoris = with_lora_keys(tmp_path / "b", **{f"{k}__hada_w1_a": torch.zeros(1, 1)})
    assert "no LoRA or diff weight" in refused(lycoris)
    elsewhere = with_lora_keys(tmp_path / "c", lora_unet_nowhere__diff=torch.zeros(1, 1))
    assert "no LoRA or diff weight" in refused(elsewhere)
    resnet = with_lora_keys(
        tmp_path / "d", lora_unet_down_blocks_0_resnets_0_conv1__diff=torch.zeros(1, 1, 3, 3)
    )
    assert "outside cross-attention" in refused(resnet)
    folder = tmp_path / "e"
    export.write_webui(folder, original)
    assert "was exported from base model" in refused(folder, model=tiny_sdxl_dir)
    save_file({"emb_params": torch.zeros(2, 32)}, folder / "embeddings" / "new1.safetensors")
    assert "several vectors" in refused(folder)
    save_file({"vec": torch.zeros(1, 32)}, folder / "embeddings" / "new1.safetensors")
    assert "no embedding file" in refused(folder)
    (folder / "embeddings" / "new1.safetensors").rename(folder / "embeddings" / "new 1.safetensors")
    assert "is not a modifier token" in refused(folder)
    (folder / "embeddings" / "new 1.safetensors").unlink()
    assert "holds no token embedding" in refused(folder)
    export.write_webui(folder, original, ("other",))
    assert "holds 2 LoRA files" in refused(folder, "--class-word", "star", "star")


def test_ldm_attention_keys_of_sd15s_layout_map_to_diffusers_names():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # SD 1.5's UNet shape, no weights
        unet = UNet2DConditionModel(cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280))
    layers, up = unet.config.layers_per_block, [hasattr(block, "attentions") for block in unet.up_blocks]
    names = [name for name, _ in unet.named_parameters() if ".attn2." in name]
    assert len([name for name in names if name.endswith(("to_k.weight", "to_v.weight"))]) == 32
    for name in names:
        assert (
            importing.diffusers_attention_name(f"model.diffusion_model.{unet_name(name, layers, up)}", layers)
            == name
        )
    # the paper's converter's rule for two of them
    assert importing.diffusers_attention_name("input_blocks.8.1.x", layers) == "down_blocks.2.attentions.1.x"
    assert importing.diffusers_attention_name("output_blocks.11.1.x", layers) == "up_blocks.3.attentions.2.x"
