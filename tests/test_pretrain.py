"""Pretraining the toy base model: every stage runs, exports a loadable pipeline, and resumes."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers
from diffusers import AutoencoderKL

from customdiff import models, pretrain, toyworld
from customdiff.config import MODEL_DEFAULTS_FILE, PretrainConfig
from customdiff.errors import CustomDiffError

TINY = dict(
    vae_steps=2,
    vae_batch_size=4,
    clip_steps=2,
    clip_batch_size=8,
    unet_steps=2,
    batch_size=4,
    pool_size=256,
    checkpoint_every=1,
    export_every=2,
    threads=2,
    mixed_precision="no",  # accelerate keeps one precision per process; other tests use "no"
)


def test_held_out_captions_never_reach_training():
    config = PretrainConfig()
    captions = pretrain.training_captions(np.random.default_rng(0), 2000, config)
    assert not any(pretrain.is_held_out(caption, config) for caption in captions)
    assert not any(
        f"{thing.color} {thing.shape} {caption.background}" in config.held_out
        for caption in captions
        for thing in caption.things
    )


def test_hard_negative_differs_in_one_binding():
    rng = np.random.default_rng(0)
    for _ in range(200):
        caption = toyworld.sample_caption(rng)
        negative = pretrain.hard_negative(caption, rng)
        assert str(negative) != str(caption)
        assert toyworld.parse_caption(str(negative)) == negative  # still inside the grammar


@pytest.mark.slow
def test_pretrain_exports_a_pipeline_and_resumes(tmp_path):
    coded = {**TINY, "unet_wild_share": 0.5, "unet_wild_codes": 0.5}  # every kind of pool sample
    model_dir = pretrain.pretrain(PretrainConfig(out=tmp_path, **coded))
    pipe = models.load_pipeline(model_dir)
    assert pipe.vae.config.scaling_factor != 1.0  # measured on the data
    assert (model_dir / "clip" / "config.json").is_file()
    assert json.loads((model_dir / pretrain.SPLIT_FILE).read_text())["unseen_every"] == 5
    assert (tmp_path / "previews" / "step-000002.png").is_file()
    step_file = tmp_path / "checkpoints" / "unet" / "step.json"
    assert json.loads(step_file.read_text())["step"] == 2
    pretrain.pretrain(PretrainConfig(out=tmp_path, **{**coded, "unet_steps": 4, "export_every": 4}))
    assert json.loads(step_file.read_text())["step"] == 4
    assert (tmp_path / "previews" / "step-000004.png").is_file()


def test_wild_renders_show_colours_outside_the_palette():
    images, captions, features = pretrain.render_wild_batch(np.random.default_rng(0), 8, PretrainConfig())
    assert images.shape == (8, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    pixels = ((images.permute(0, 2, 3, 1).reshape(-1, 3) + 1) * 127.5).round().numpy()
    known = np.array([*toyworld.COLORS.values(), *toyworld.BACKGROUNDS.values()])
    distance = np.abs(pixels[:, None, :] - known[None]).max(-1).min(-1)
    assert (distance > 2 * toyworld.NOISE).mean() > 0.02  # objects in colours the world has no word for
    for caption in captions:  # named by shape, never by a colour: the class prompts of concepts
        words = object_words(str(caption))
        assert words & set(toyworld.SHAPES) and not words & set(toyworld.COLORS), caption
    assert features.shape == (8, 2, pretrain.CODE_FEATURES)
    for caption, feature in zip(captions, features, strict=True):  # one feature row per object, in order
        assert [bool(row.any()) for row in feature] == [True] * len(caption.things) + [False] * (
            2 - len(caption.things)
        )


def test_wild_partners_set_a_named_world_object_beside_a_wild_one():
    config = PretrainConfig(unet_wild_partners=1.0, held_out=())
    images, captions, features = pretrain.render_wild_batch(np.random.default_rng(1), 24, config)
    pairs = [(index, caption) for index, caption in enumerate(captions) if len(caption.things) == 2]
    assert pairs
    for index, caption in pairs:  # "a star and a blue circle on a white background"
        colours = [thing.color for thing in caption.things]
        assert sorted(bool(colour) for colour in colours) == [False, True], caption
        assert features[index, 0].any() and not features[index, 1].any()  # the wild one's only
        image = ((images[index].permute(1, 2, 0) + 1) * 127.5).round().numpy()
        named = next(thing for thing in caption.things if thing.color)
        half = image[:, :32] if caption.things[0] is named else image[:, 32:]  # its side of the scene
        drawn = np.abs(half - np.array(toyworld.COLORS[named.color])).max(-1) <= toyworld.NOISE
        assert drawn.sum() > 30, caption  # drawn in its palette colour
    coded = pretrain.with_colour(pairs[0][1], "ktn")  # an appearance code fills the wild slot alone
    assert [thing.color for thing in coded.things].count("ktn") == 1
    held = PretrainConfig(unet_wild_partners=1.0, held_out=tuple(
        f"{colour} {shape} {background}" for colour in toyworld.COLORS for shape in toyworld.SHAPES
        for background in toyworld.BACKGROUNDS
    ))  # fmt: skip
    _, captions, _ = pretrain.render_wild_batch(np.random.default_rng(1), 24, held)
    assert all(not thing.color for caption in captions for thing in caption.things)  # never a held-out one


def object_words(caption: str) -> set[str]:
    """The words before "on": the background may be "white" or "black", which are colours too."""
    return set(caption.split(" on ")[0].split())


def test_unet_pool_mixes_in_colourless_and_coded_wild_captions(tmp_path):
    config = PretrainConfig(pool_size=256, unet_wild_share=0.25, unet_wild_codes=0.5)
    vae, tokenizer = models.toy_vae().eval(), models.build_toy_tokenizer()
    (tmp_path / "stages").mkdir()
    pool = pretrain.encode_pool(tmp_path, config, vae, tokenizer)
    texts = tokenizer.batch_decode(pool["input_ids"], skip_special_tokens=True)
    coded = (pool["code_slots"] >= 0).any(dim=1)
    named = set(toyworld.COLORS) | set(pretrain.CODE_WORDS)
    colourless = [text for text in texts if not object_words(text) & named]
    assert len(texts) == 256 and len(colourless) + int(coded.sum()) == 64
    assert 16 <= int(coded.sum()) <= 48  # about half the wild scenes
    code_words = pretrain.code_word_ids(tokenizer)
    for ids, slots, features in zip(pool["input_ids"], pool["code_slots"], pool["features"], strict=True):
        used = slots[slots >= 0]
        assert (
            torch.isin(ids[used], code_words).all()
            and len(used) == int(features.any(dim=1).sum())
            or len(used) == 0
        )
    assert torch.equal(
        pretrain.encode_pool(tmp_path, config, vae, tokenizer)["code_slots"], pool["code_slots"]
    )


def test_appearance_codes_replace_the_colour_slot_and_move_its_shape_word():
    tokenizer = models.build_toy_tokenizer()
    text_encoder = pretrain.text_encoder_from_clip(
        transformers.CLIPModel(models.toy_clip_config(len(tokenizer)))
    )
    ids = tokenizer(
        ["a ktn star on a gray background"] * 2, padding="max_length", return_tensors="pt"
    ).input_ids
    features = torch.zeros(2, 2, pretrain.CODE_FEATURES)
    features[0, 0] = torch.from_numpy(pretrain.appearance_features(((0, 128, 128), (255, 105, 180)), "core"))
    features[1, 0] = torch.from_numpy(pretrain.appearance_features(((0, 128, 120), (255, 105, 180)), "core"))
    codes = pretrain.appearance_codes(features, text_encoder, tokenizer)
    slots = torch.tensor([[2, -1], [-1, -1]])
    plain = text_encoder(ids).last_hidden_state
    coded = pretrain.encode_text(text_encoder, ids, codes, slots)
    assert torch.allclose(coded[1], plain[1]) and torch.allclose(coded[0, 2], codes[0, 0], atol=1e-5)
    moved, shift = coded[0, 3] - plain[0, 3], codes[0, 0] - plain[0, 2]
    assert torch.allclose(moved, shift, atol=1e-5)  # the noun moves with it
    assert torch.allclose(coded[0, :2], plain[0, :2]) and torch.allclose(coded[0, 4:], plain[0, 4:])
    # linear in the features: nearby looks get nearby codes, in the spread of the colour words' features
    colours = [f"a large {c} star on a gray background" for c in toyworld.COLORS]
    words = text_encoder(tokenizer(colours, padding="max_length", return_tensors="pt").input_ids)
    centre = words.last_hidden_state[:, 3].mean(dim=0)
    spread = (words.last_hidden_state[:, 3] - centre).norm(dim=1).mean()
    assert 0.3 < float((codes[0, 0] - centre).norm() / spread) < 3
    assert float((codes[0, 0] - codes[1, 0]).norm() / spread) < 0.1
    assert torch.equal(codes[0, 1], centre)  # no object: the centre


def test_object_weight_counts_object_pixels_more():
    images, _ = pretrain.render_batch(np.random.default_rng(0), 4, PretrainConfig(two_object_share=0.0))
    weight = pretrain.object_weight(images, 5.0)
    assert weight.shape == (4, 1, 64, 64)
    assert set(weight.unique().tolist()) == {1.0, 5.0}
    assert 0.01 < (weight == 5.0).float().mean() < 0.5  # objects, not background noise


def test_warm_started_vae_stage_fine_tunes_the_vae_and_keeps_its_scale(tmp_path):
    model_dir = pretrain.pretrain(PretrainConfig(out=tmp_path / "first", **TINY))
    config = PretrainConfig(out=tmp_path / "vae", init_from=model_dir, stage="vae", **TINY)
    pretrain.pretrain(config)
    start = models.load_pipeline(model_dir).vae
    tuned = AutoencoderKL.from_pretrained(tmp_path / "vae" / "stages" / "vae")
    assert tuned.config.scaling_factor == start.config.scaling_factor  # the UNet's latents keep their scale
    changed = [not torch.equal(a, b) for a, b in zip(start.parameters(), tuned.parameters(), strict=True)]
    assert any(changed)

    config = dataclasses.replace(config, out=tmp_path / "decoder", vae_decoder_only=True)
    pretrain.pretrain(config)
    tuned = AutoencoderKL.from_pretrained(tmp_path / "decoder" / "stages" / "vae")
    for part in ("encoder", "quant_conv", "decoder"):
        pairs = zip(getattr(start, part).parameters(), getattr(tuned, part).parameters(), strict=True)
        same = all(torch.equal(a, b) for a, b in pairs)
        assert same == (part != "decoder"), part  # every latent stays the start's; the decoder learns

    config = dataclasses.replace(config, out=tmp_path / "wide", vae_decoder_only=False, vae_width=48)
    pretrain.pretrain(config)
    wide = AutoencoderKL.from_pretrained(tmp_path / "wide" / "stages" / "vae")
    assert wide.config.block_out_channels == [48, 96, 96]
    assert wide.config.scaling_factor == start.config.scaling_factor  # anchored to the start's latents
    with pytest.raises(
        CustomDiffError, match="drop --vae-width/--vae-latent-channels/--vae-downsample or --vae-decoder-only"
    ):
        pretrain.pretrain(dataclasses.replace(config, out=tmp_path / "both", vae_decoder_only=True))


@pytest.mark.slow
def test_other_latents_train_a_new_vae_and_a_unet_on_the_start_unets_body(tmp_path):
    model_dir = pretrain.pretrain(PretrainConfig(out=tmp_path / "first", **TINY))
    start = models.load_pipeline(model_dir)
    config = PretrainConfig(
        out=tmp_path / "vae",
        init_from=model_dir,
        stage="vae",
        vae_latent_channels=8,
        vae_downsample=2,
        **TINY,
    )
    pretrain.pretrain(config)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae" / "stages" / "vae")
    assert vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape == (1, 8, 32, 32)
    assert vae.config.scaling_factor != start.vae.config.scaling_factor  # measured on its own latents

    unet = pretrain.warm_unet(model_dir / "unet", 8, 32)
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.sample_size) == (8, 8, 32)
    assert unet.conv_in.weight.shape[1] == 8 and unet.conv_out.weight.shape[0] == 8
    body = {k: v for k, v in start.unet.state_dict().items() if not k.startswith(("conv_in.w", "conv_out"))}
    assert all(torch.equal(unet.state_dict()[name], tensor) for name, tensor in body.items())
    same = pretrain.warm_unet(model_dir / "unet", 4, 16)  # the start's latents: every weight as saved
    assert all(torch.equal(same.state_dict()[k], v) for k, v in start.unet.state_dict().items())

    (model_dir / MODEL_DEFAULTS_FILE).write_text("[generate]\nguidance = 4.0\n")  # as the shipped one has
    run = tmp_path / "unet"
    (run / "stages").mkdir(parents=True)
    vae.save_pretrained(run / "stages" / "vae")  # the new autoencoder in place of the start's
    config = dataclasses.replace(config, out=run, stage="unet", unet_plain_top_level=True)
    pipe = models.load_pipeline(pretrain.pretrain(config))
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 8
    assert len(pipe.unet.config.block_out_channels) == len(start.unet.config.block_out_channels) + 1
    assert models.recommended_guidance(pipe) == 4.0  # the start's own defaults came along
    image = pipe("a red star on a gray background", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_a_plain_top_level_keeps_the_start_unet_whole_as_its_body(tmp_path):
    start = models.toy_unet(cross_attention_dim=32)
    start.save_pretrained(tmp_path / "unet")
    unet = pretrain.warm_unet(tmp_path / "unet", 4, 32, plain_top_level=True)
    assert unet.config.down_block_types[0] == "DownBlock2D" and unet.config.up_block_types[-1] == "UpBlock2D"
    assert not hasattr(unet.down_blocks[0], "attentions") and not hasattr(unet.up_blocks[-1], "attentions")
    weights = unet.state_dict()
    for name, tensor in start.state_dict().items():
        if name.startswith("down_blocks."):
            index, rest = name.removeprefix("down_blocks.").split(".", 1)
            name = f"down_blocks.{int(index) + 1}.{rest}"
        assert torch.equal(weights[name], tensor), name

    def kv_names(state: dict) -> list[str]:
        return [name for name in state if ".attn2.to_k." in name or ".attn2.to_v." in name]

    assert len(kv_names(weights)) == len(kv_names(start.state_dict())) == 14  # the new level adds none
    fresh = models.toy_unet(cross_attention_dim=32, sample_size=32, plain_top_level=True)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in weights.items()}
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 32, 32), 10, torch.randn(1, 5, 32)).sample
    assert out.shape == (1, 4, 32, 32)


def test_size_dropout_leaves_the_size_out_of_one_object_captions():
    def one_object(config):
        _, texts = pretrain.render_batch(np.random.default_rng(0), 64, config)
        return [toyworld.parse_caption(text) for text in texts if " and " not in text]

    sized = one_object(PretrainConfig(size_dropout=0.0))
    unsized = one_object(PretrainConfig(size_dropout=1.0))
    assert sized and all(caption.things[0].size for caption in sized)
    assert unsized and not any(caption.things[0].size for caption in unsized)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"unet_wild_share": 1.5}, "--unet-wild-share is a share"),
        ({"unet_wild_partners": -0.1}, "--unet-wild-partners is a share"),
        ({"vae_decoder_only": True}, "add --init-from MODEL --stage vae"),
        ({"vae_width": 40}, "--vae-width: give a positive multiple of 16"),
        ({"vae_latent_channels": 0}, "--vae-latent-channels: give a positive number"),
        ({"vae_downsample": 3}, "--vae-downsample: give 2, 4 or 8"),
    ],
)
def test_bad_pretrain_settings_are_one_line_errors(settings, message):
    with pytest.raises(CustomDiffError, match=message):
        PretrainConfig(**settings)
