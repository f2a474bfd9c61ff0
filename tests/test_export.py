"""Export: the kohya LoRA and embeddings load in diffusers and give our outputs; key names; bad input."""

import dataclasses

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from customdiff import compress, concept, export, models
from customdiff.errors import CustomDiffError

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
