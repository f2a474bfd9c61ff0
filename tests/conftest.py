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
    prompt encoded by diffusers (so a loaded textual inversion counts); an SDXL UNet also gets the pooled
    text and the size of an uncropped image, as its pipeline gives them."""

    @torch.no_grad()
    def output(pipe, prompt: str) -> torch.Tensor:
        encoded = pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        side = pipe.unet.config.sample_size
        added = None
        if pipe.unet.config.addition_embed_type == "text_time":
            size = float(side * pipe.vae_scale_factor)
            added = {"text_embeds": encoded[2], "time_ids": torch.tensor([[size, size, 0, 0, size, size]])}
        latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
        return pipe.unet(latents, torch.tensor([500]), encoded[0], added_cond_kwargs=added).sample

    return output


@pytest.fixture(scope="session")
def make_concept():
    """``make_concept(pipe, token, seed, mode, scale, captions)``: a concept of ``pipe`` (SD or SDXL) with
    random token rows and random deltas, ``scale`` · N(0, 1), for every UNet tensor ``mode`` trains."""
    from customdiff import concept, finetune, models, text

    def make(pipe, token="<new1>", seed=0, mode="crossattn_kv", scale=0.2, captions=()) -> concept.Concept:
        generator = torch.Generator().manual_seed(seed)
        widths = text.embedding_widths(text.text_encoders(pipe))
        return concept.Concept(
            base_hash=models.model_hash(pipe),
            mode=mode,
            tokens=(token,),
            class_words=("star",),
            initializers=("ktn",),
            token_embeddings=torch.randn(1, sum(widths), generator=generator),
            deltas={
                name: scale * torch.randn(parameter.shape, generator=generator)
                for name, parameter in finetune.trainable_parameters(pipe.unet, [], mode).items()
            },
            captions=captions,
            embedding_widths=widths if len(widths) > 1 else (),
        )

    return make


@pytest.fixture
def scene_folder(tmp_path):
    """An image folder of 8 toy-world scenes with metadata.jsonl."""
    folder = tmp_path / "scenes"
    files.write_image_folder(folder, toyworld.sample_scenes(8, seed=1))
    return folder


def tiny_text_config(vocab_size: int, width: int):
    """A 2-layer CLIP text encoder of ``width`` for the toy tokenizer."""
    from transformers import CLIPTextConfig

    from customdiff import models

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=models.MAX_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=16,
    )


def tiny_vae():
    """An AutoencoderKL of a few channels: 32² pixels ↔ 16²×4 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """An SD-shaped pipeline with random weights and a few channels, saved as a diffusers folder with a
    CLIP model in ``clip/``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel

    from customdiff import models

    torch.manual_seed(0)
    tokenizer = models.build_toy_tokenizer()
    text_encoder = CLIPTextModel(tiny_text_config(len(tokenizer), 32))
    vae = tiny_vae()
    unet = UNet2DConditionModel(  # ComfyUI's UNet (32 norm groups, SD 1.x's 8 heads) holds it too
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
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


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """An SDXL-shaped pipeline with random weights (two text encoders of widths 16 and 32, a "text_time"
    UNet reading both side by side), saved as a diffusers folder."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from customdiff import models

    torch.manual_seed(0)
    tokenizer = models.build_toy_tokenizer()
    text_encoders = (
        CLIPTextModel(tiny_text_config(len(tokenizer), 16)),
        CLIPTextModelWithProjection(tiny_text_config(len(tokenizer), 32)),
    )
    unet = UNet2DConditionModel(  # ComfyUI's UNet holds it too (32 norm groups)
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16 + 32,
        attention_head_dim=(4, 8),  # heads, as diffusers names them for SDXL: 8 channels each
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,  # pooled text + 6 size numbers
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        tokenizer=tokenizer,
        tokenizer_2=models.build_toy_tokenizer(),
        unet=unet,
        scheduler=models.sampling_scheduler(),
    )
    folder = tmp_path_factory.mktemp("tiny_sdxl")
    pipe.save_pretrained(folder)
    return folder
