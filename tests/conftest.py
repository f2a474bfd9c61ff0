"""Shared fixtures: the CLI run in-process, and a small captioned image folder."""

import pytest
import torch

from customdiff import files, toyworld
from customdiff.cli import main


@pytest.fixture
def run_cli(capsys):
    """Run ``customdiff ARGS…`` in-process; returns (exit code, stdout, stderr)."""

    def run(*argv) -> tuple[int, str, str]:
        code = main([str(arg) for arg in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def unet_output():
    """``unet_output(pipe, prompt)``: the UNet's noise prediction for fixed latents and timestep, with the
    prompt encoded by diffusers (so a loaded textual inversion counts)."""

    @torch.no_grad()
    def output(pipe, prompt: str) -> torch.Tensor:
        text = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        side = pipe.unet.config.sample_size
        latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
        return pipe.unet(latents, torch.tensor([500]), text).sample

    return output


@pytest.fixture
def scene_folder(tmp_path):
    """An image folder of 8 toy-world scenes with metadata.jsonl."""
    folder = tmp_path / "scenes"
    files.write_image_folder(folder, toyworld.sample_scenes(8, seed=1))
    return folder


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """An SD-shaped pipeline with random weights and a few channels, saved as a diffusers folder with a
    CLIP model in ``clip/``."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    from customdiff import models

    torch.manual_seed(0)
    tokenizer = models.build_toy_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=models.MAX_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=models.sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("tiny_sd")
    pipe.save_pretrained(folder)
    clip_config = CLIPConfig(
        text_config=text_encoder.config.to_dict(),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(clip_config).save_pretrained(folder / "clip")  # as the toy model ships CLIP beside it
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint_file(tiny_pipeline_dir, tmp_path_factory):
    """The tiny pipeline's weights as one ``.safetensors`` file in the original (LDM) layout, the kind of
    checkpoint A1111 and ComfyUI keep; its configs and tokenizer are those of ``tiny_pipeline_dir``."""
    from safetensors.torch import save_file

    from customdiff import models
    from ldm_layout import ldm_state_dict

    path = tmp_path_factory.mktemp("checkpoint") / "tiny-sd.safetensors"
    save_file(ldm_state_dict(models.load_pipeline(tiny_pipeline_dir)), path)
    return path
