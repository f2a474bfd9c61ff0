"""Fine-tuning: exactly the mode's parameters train, every new token's row trains, runs resume exactly."""

import dataclasses
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from PIL import Image

from customdiff import cli, concept, data, export, files, finetune, merge, models, regions, text, toyworld
from customdiff.config import FinetuneConfig, MergeConfig
from customdiff.errors import CustomDiffError


@pytest.fixture(scope="module")
def concept_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("starfish")
    files.write_image_folder(folder, toyworld.concept_scenes(toyworld.get_concept("starfish"), 4))
    return folder


# composed_views: the tiny model's 32² images hold no toy scenes to compose
TINY_RUN = dict(reg="none", steps=2, lr=1e-2, batch_size=2, checkpoint_every=100, composed_views=0.0)


def config_for(concept_dir, out, **changes) -> FinetuneConfig:
    return FinetuneConfig(concept_dir, "star", out=out, **{**TINY_RUN, **changes})


def snapshot(pipe) -> dict[str, torch.Tensor]:
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "vae": pipe.vae}
    return {
        f"{prefix}.{name}": p.detach().clone()
        for prefix, m in modules.items()
        for name, p in m.named_parameters()
    }


EMBEDDING = "text_encoder.embeddings.token_embedding.weight"


def word_id(tokenizer, word: str) -> int:
    (token_id,) = tokenizer(word, add_special_tokens=False).input_ids
    return token_id


@pytest.mark.parametrize("mode", ["crossattn_kv", "crossattn", "full", "token"])
def test_training_changes_exactly_the_parameters_of_the_mode(mode, tiny_pipeline_dir, concept_dir, tmp_path):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    before = snapshot(pipe)
    path = finetune.train(config_for(concept_dir, tmp_path, mode=mode), pipe)
    after = snapshot(pipe)
    selects = finetune.MODE_PREDICATES[mode]
    changed = {name for name in before if name != EMBEDDING and not torch.equal(before[name], after[name])}
    frozen = {name for name in before if name != EMBEDDING and not selects(name)}
    assert not changed & frozen  # everything outside the mode stays bit-identical
    assert changed == {name for name in before if selects(name)} or mode == "full"
    assert changed or mode == "token"
    rows = len(before[EMBEDDING])
    torch.testing.assert_close(after[EMBEDDING][:rows], before[EMBEDDING], rtol=0, atol=0)
    assert not torch.equal(after[EMBEDDING][rows], after[EMBEDDING][word_id(pipe.tokenizer, "ktn")])
    assert set(concept.load_concept(path).deltas) == {name for name in before if selects(name)}


def test_modes_select_cross_attention_by_name(tiny_pipeline_dir):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    finetune.add_modifier_tokens(pipe.tokenizer, pipe.text_encoder, ["<new1>"], ["ktn"])
    with finetune.new_token_rows(pipe.text_encoder, 1):
        encoders = text.text_encoders(pipe)
        kv = finetune.trainable_parameters(pipe.unet, encoders, "crossattn_kv")
        attention = finetune.trainable_parameters(pipe.unet, encoders, "crossattn")
        token = finetune.trainable_parameters(pipe.unet, encoders, "token")
    token_row = "text_encoder.embeddings.token_embedding.new_token_rows"
    assert list(token) == [token_row]
    assert {name.split("attn2.")[1] for name in kv if name != token_row} == {"to_k.weight", "to_v.weight"}
    assert {name.split("attn2.")[1] for name in attention if name != token_row} == {
        "to_q.weight",
        "to_k.weight",
        "to_v.weight",
        "to_out.0.weight",
        "to_out.0.bias",
    }


def test_add_modifier_tokens_starts_each_row_from_its_initializer_and_rejects_bad_words(tiny_pipeline_dir):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    with pytest.raises(CustomDiffError, match="already in the tokenizer"):
        finetune.add_modifier_tokens(tokenizer, text_encoder, ["star"], ["ktn"])
    with pytest.raises(CustomDiffError, match='--initializer "starfish" is'):
        finetune.add_modifier_tokens(tokenizer, text_encoder, ["<new1>"], ["starfish"])
    ids = finetune.add_modifier_tokens(tokenizer, text_encoder, ["<new1>", "<new2>"], ["ktn", "sks"])
    weight = text_encoder.get_input_embeddings().weight
    assert ids == [len(weight) - 2, len(weight) - 1] == [len(tokenizer) - 2, len(tokenizer) - 1]
    for token_id, word in zip(ids, ["ktn", "sks"], strict=True):
        assert torch.equal(weight[token_id], weight[word_id(tokenizer, word)])
    assert len(tokenizer("a <new1> <new2> star", add_special_tokens=False).input_ids) == 4


def test_token_lr_sets_the_token_rows_apart_from_the_weights(tiny_pipeline_dir, concept_dir, tmp_path):
    moved = {}
    for token_lr in (1e-9, 1e-1):
        pipe = models.load_pipeline(tiny_pipeline_dir)
        start = pipe.text_encoder.get_input_embeddings().weight[word_id(pipe.tokenizer, "ktn")].clone()
        config = config_for(concept_dir, tmp_path / str(token_lr), token_lr=token_lr)
        trained = concept.load_concept(finetune.train(config, pipe))
        moved[token_lr] = (trained.token_embeddings[0] - start).abs().max().item()
        assert all(delta.abs().max() > 1e-4 for delta in trained.deltas.values())  # K/V train at --lr
    assert moved[1e-9] < 1e-6 < 1e-2 < moved[1e-1]
    with pytest.raises(CustomDiffError, match="--token-lr"):
        FinetuneConfig(concept_dir, "star", token_lr=0)


def test_every_new_token_row_trains_and_no_other_row_moves(tiny_pipeline_dir, concept_dir):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    ids = finetune.add_modifier_tokens(tokenizer, text_encoder, ["<new1>", "<new2>"], ["ktn", "sks"])
    before = text_encoder.get_input_embeddings().weight.detach().clone()
    pipe.unet.requires_grad_(False), text_encoder.requires_grad_(False)
    with finetune.new_token_rows(text_encoder, 2) as embedding:
        rows = finetune.trainable_parameters(pipe.unet, text.text_encoders(pipe), "token")
        optimizer = torch.optim.AdamW([p.requires_grad_() for p in rows.values()], lr=1e-2, weight_decay=0.1)
        examples = data.load_examples(concept_dir, data.resolution(pipe), "<new1>", "star")
        pool = data.target_pool(pipe.vae, examples, pipe.vae_scale_factor, seed=0)
        latents, masks, _ = pool.take(torch.arange(4))
        captions = [caption.replace("<new1>", "<new1> <new2>") for caption in pool.captions[:4]]
        states, _ = data.encode_captions(text.text_encoders(pipe), captions, [embedding.first], {})
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        loss = finetune.diffusion_loss(pipe.unet, scheduler, latents, masks, states, None, torch.Generator())
        loss.backward()
        optimizer.step()
    after = text_encoder.get_input_embeddings().weight
    assert torch.equal(after[: ids[0]], before[: ids[0]])  # weight decay never touches the old rows
    assert all(not torch.equal(after[i], before[i]) for i in ids)  # the last token trains too


def test_start_detached_processor_equals_sdpa_and_cuts_the_start_token_gradient():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    hidden, text = torch.randn(2, 5, 16), torch.randn(2, 4, 8)
    expected = AttnProcessor2_0()(attn, hidden, text)
    output = finetune.StartDetachedAttnProcessor()(attn, hidden, text)
    torch.testing.assert_close(output, expected)
    only_start = torch.zeros_like(text)
    only_start[:, 0] = text[:, 0]  # K/V of the other tokens are zero: no gradient from them either way
    for processor, start_trains in (
        (AttnProcessor2_0(), True),
        (finetune.StartDetachedAttnProcessor(), False),
    ):
        attn.zero_grad()
        processor(attn, hidden, only_start).square().sum().backward()
        assert (attn.to_k.weight.grad.abs().sum() > 0) == start_trains
        assert (attn.to_v.weight.grad.abs().sum() > 0) == start_trains


def test_regional_views_read_each_column_as_regional_sampling_does():
    """Past the switch a split view's columns read their own blocks, one naming no token with the base
    weights and no gradient to them; other views read the whole block, as without regions."""
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    base = {name: torch.randn_like(attn.get_parameter(name)) for name in ("to_k.weight", "to_v.weight")}
    hidden, (whole, left, right) = torch.randn(3, 4 * 4, 16), (torch.randn(3, 5, 8) for _ in range(3))
    reads = finetune.RegionalReads()
    processor = finetune.StartDetachedAttnProcessor(reads, base)
    batch = finetune.RegionalBatch(torch.tensor([2, 2, 0]), torch.tensor([[False, True]] * 2 + [[False] * 2]))
    reads.batch = dataclasses.replace(batch, by_region=torch.tensor([True, False, False]))
    out = processor(attn, hidden, torch.cat([whole, left, right], dim=1)).view(3, 4, 4, 16)
    plain = AttnProcessor2_0()
    torch.testing.assert_close(out[1:], plain(attn, hidden[1:], whole[1:]).view(2, 4, 4, 16))
    torch.testing.assert_close(out[0, :, :2], plain(attn, hidden[:1], left[:1]).view(4, 4, 16)[:, :2])
    with regions._weights(attn, base):
        on_base = plain(attn, hidden[:1], right[:1]).view(4, 4, 16)[:, 2:]
    torch.testing.assert_close(out[0, :, 2:], on_base)
    attn.zero_grad()
    out[0, :, 2:].sum().backward()  # the column read with the base weights alone
    assert attn.to_k.weight.grad is None or not attn.to_k.weight.grad.any()
    assert attn.to_q.weight.grad.any()  # its queries still train the layers below


def test_regional_states_add_a_block_per_column_and_say_which_reads_the_base(tiny_pipeline_dir):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    finetune.add_modifier_tokens(pipe.tokenizer, pipe.text_encoder, ["<new1>"], ["ktn"])
    encoders, first_new = text.text_encoders(pipe), [pipe.tokenizer.convert_tokens_to_ids("<new1>")]
    captions = ["a <new1> star and a blue ring on a gray background", "a red star on a gray background"]
    states, _ = data.encode_captions(encoders, captions, first_new, {})
    joined, batch = finetune.regional_states(encoders, captions, states, first_new, {}, ["<new1>"])
    assert joined.shape == (2, 3 * states.shape[1], states.shape[2])
    assert batch.counts.tolist() == [2, 0] and batch.base.tolist() == [[False, True], [False, False]]
    columns = ["a <new1> star on a gray background", "a blue ring on a gray background"]
    expected = data.encode_captions(encoders, columns, first_new, {})[0]
    blocks = joined.chunk(3, dim=1)
    torch.testing.assert_close(blocks[1][0], expected[0])
    torch.testing.assert_close(blocks[2][0], expected[1])
    assert all(torch.equal(block[1], states[1]) for block in blocks)  # a caption read whole fills them
    assert finetune.regional_states(encoders, captions[1:], states[1:], first_new, {}, ["<new1>"])[1] is None


def test_regional_views_train_two_object_captions_by_column(tiny_pipeline_dir, tmp_path):
    scenes = list(toyworld.concept_scenes(toyworld.get_concept("starfish"), 4))
    folder = tmp_path / "pairs"
    files.write_image_folder(
        folder, [(image, "a <new1> star and a blue ring on a gray background") for image, _ in scenes]
    )
    settings = {"model": tiny_pipeline_dir, "steps": 4}
    deltas = {}
    for regional in (True, False):
        config = config_for(folder, tmp_path / str(regional), regional_views=regional, **settings)
        deltas[regional] = concept.load_concept(finetune.train(config)).deltas
    assert FinetuneConfig(folder, "star").regional_views is True  # the toy model's default
    assert FinetuneConfig(folder, "star", model=tiny_pipeline_dir).regional_views is False
    assert any(not torch.allclose(deltas[True][name], deltas[False][name]) for name in deltas[True])


def test_masked_mse_averages_only_where_the_mask_is_on():
    prediction, target = torch.zeros(2, 4, 3, 3), torch.ones(2, 4, 3, 3)
    target[0, :, 0, 0] = 5.0  # outside sample 0's mask
    mask = torch.ones(2, 1, 3, 3)
    mask[0, :, 0, 0] = 0
    assert finetune.masked_mse(prediction, target, mask).item() == pytest.approx(1.0)
    mask[1] = 0.25  # a regularization image at --prior-loss-weight 0.25
    assert finetune.masked_mse(prediction, target, mask).item() == pytest.approx((1 + 0.25) / 2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_each_sample_by_its_capped_snr(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    seen = {}

    def unet(noisy, timesteps, states, added_cond_kwargs=None):  # predicts 0: the loss is the target's
        seen.update(noisy=noisy, timesteps=timesteps)
        return type("Output", (), {"sample": torch.zeros_like(noisy)})

    latents, masks = torch.zeros(64, 4, 2, 2), torch.ones(64, 1, 2, 2)
    plain = finetune.diffusion_loss(unet, scheduler, latents, masks, None, None, torch.Generator())
    gamma = 5.0
    weighted = finetune.diffusion_loss(
        unet, scheduler, latents, masks, None, None, torch.Generator(), None, gamma
    )
    alpha_bar = scheduler.alphas_cumprod[seen["timesteps"]]
    noise = seen["noisy"] / (1 - alpha_bar).sqrt()[:, None, None, None]  # the latents are 0
    target = noise if prediction_type == "epsilon" else -alpha_bar.sqrt()[:, None, None, None] * noise
    snr = alpha_bar / (1 - alpha_bar)
    weights = snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    expected = (weights * target.square().mean((1, 2, 3))).mean()
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-4)
    assert 0.2 * plain < weighted < plain  # low-noise steps weigh less; 64 draws hold some


def fixed_batch_loss(pipe, concept_dir) -> float:
    """The loss on 4 unaugmented views × 4 noise draws, the same draws every call."""
    examples = data.load_examples(concept_dir, data.resolution(pipe), "<new1>", "star")
    pool = data.target_pool(pipe.vae, examples, pipe.vae_scale_factor, seed=0, augment=False, flip=False)
    first_new = pipe.tokenizer.convert_tokens_to_ids("<new1>")
    encoders = text.text_encoders(pipe)
    states, _ = data.encode_captions(encoders, list(pool.captions) * 4, [first_new], {})
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        latents, masks = pool.latents.repeat(4, 1, 1, 1), pool.masks.repeat(4, 1, 1, 1)
        return finetune.diffusion_loss(
            pipe.unet, scheduler, latents, masks, states, None, torch.Generator().manual_seed(1)
        )


def test_a_seeded_short_run_lowers_the_loss_on_a_fixed_batch(tiny_pipeline_dir, concept_dir, tmp_path):
    base = models.load_pipeline(tiny_pipeline_dir)
    finetune.add_modifier_tokens(base.tokenizer, base.text_encoder, ["<new1>"], ["ktn"])
    trained = models.load_pipeline(tiny_pipeline_dir)
    config = config_for(concept_dir, tmp_path, steps=40, lr=1e-2, augment=False)
    finetune.train(config, trained)
    assert fixed_batch_loss(trained, concept_dir) < 0.9 * fixed_batch_loss(base, concept_dir)


def test_a_resumed_run_ends_where_a_straight_run_ends(tiny_pipeline_dir, concept_dir, tmp_path):
    settings = dict(
        steps=6, checkpoint_every=3, reg="generate", num_reg=2, cache_dir=tmp_path / "cache", lr=1e-3
    )
    straight = finetune.train(
        config_for(concept_dir, tmp_path / "straight", **settings), models.load_pipeline(tiny_pipeline_dir)
    )
    resumed_dir = tmp_path / "resumed"
    finetune.train(
        config_for(concept_dir, resumed_dir, **{**settings, "steps": 3}),
        models.load_pipeline(tiny_pipeline_dir),
    )
    assert torch.load(resumed_dir / finetune.CHECKPOINT_FILE, weights_only=True)["step"] == 3  # "killed" here
    resumed = finetune.train(
        config_for(concept_dir, resumed_dir, **settings), models.load_pipeline(tiny_pipeline_dir)
    )
    a, b = concept.load_concept(straight), concept.load_concept(resumed)
    assert torch.equal(a.token_embeddings, b.token_embeddings)
    assert a.deltas.keys() == b.deltas.keys() and all(torch.equal(a.deltas[k], b.deltas[k]) for k in a.deltas)
    with pytest.raises(CustomDiffError, match="checkpoint of another run"):
        finetune.train(
            config_for(concept_dir, resumed_dir, **{**settings, "lr": 1e-2}),
            models.load_pipeline(tiny_pipeline_dir),
        )
    with pytest.raises(CustomDiffError, match="checkpoint at step 6, past --steps 3; pass --steps 6 or more"):
        finetune.train(config_for(concept_dir, resumed_dir, **{**settings, "steps": 3}))
    (resumed_dir / finetune.CHECKPOINT_FILE).unlink()  # a finished run is never trained over silently
    with pytest.raises(CustomDiffError, match="already holds a trained concept and no checkpoint.pt"):
        finetune.train(config_for(concept_dir, resumed_dir, **settings))
    assert torch.equal(concept.load_concept(resumed).token_embeddings, b.token_embeddings)


def test_init_from_starts_a_run_at_a_concept_checked_before_any_work(
    tiny_pipeline_dir, concept_dir, tmp_path
):
    first = concept.load_concept(
        finetune.train(config_for(concept_dir, tmp_path / "first"), models.load_pipeline(tiny_pipeline_dir))
    )
    start = tmp_path / "first" / concept.CONCEPT_FILE
    still = concept.load_concept(  # at a negligible learning rate a run ends where it started
        finetune.train(
            config_for(concept_dir, tmp_path / "still", init_from=(start,), lr=1e-12, token_lr=1e-12),
            models.load_pipeline(tiny_pipeline_dir),
        )
    )
    torch.testing.assert_close(still.token_embeddings, first.token_embeddings, rtol=0, atol=1e-9)
    for name, delta in first.deltas.items():
        torch.testing.assert_close(still.deltas[name], delta, rtol=0, atol=1e-9)
    further = concept.load_concept(
        finetune.train(
            config_for(concept_dir, tmp_path / "further", init_from=(start,)),
            models.load_pipeline(tiny_pipeline_dir),
        )
    )
    moved = [name for name, delta in first.deltas.items() if not torch.equal(further.deltas[name], delta)]
    assert moved and not torch.equal(further.token_embeddings, first.token_embeddings)
    foreign = tmp_path / "foreign"
    concept.save_concept(foreign, dataclasses.replace(first, base_hash="0" * 16))
    wrong = [
        (dict(token="<new2>"), start, "holds <new1>, this run trains <new2>; train the same tokens"),
        (dict(mode="token"), start, "is a crossattn_kv concept, with tensors --mode token does not train"),
        ({}, foreign, "was trained on base 0000000000000000, not on this model"),
    ]
    for changes, path, message in wrong:
        with pytest.raises(CustomDiffError, match=message):
            finetune.train(
                config_for(concept_dir, tmp_path / "wrong", init_from=(path,), **changes),
                models.load_pipeline(tiny_pipeline_dir),
            )
        assert not (tmp_path / "wrong" / concept.CONCEPT_FILE).exists()


def test_init_from_several_concepts_starts_a_joint_run_at_their_merge(
    tiny_pipeline_dir, concept_dir, tmp_path
):
    ring_dir = tmp_path / "donut"
    files.write_image_folder(
        ring_dir, toyworld.concept_scenes(toyworld.get_concept("donut"), 4, token="<new2>")
    )
    apart = [
        finetune.train(config, models.load_pipeline(tiny_pipeline_dir))
        for config in (
            config_for(concept_dir, tmp_path / "star"),
            FinetuneConfig(ring_dir, "ring", token="<new2>", out=tmp_path / "ring", **TINY_RUN),
        )
    ]
    pipe = models.load_pipeline(tiny_pipeline_dir)
    merged, _, _ = merge.merge_files(pipe, MergeConfig(tuple(apart)))
    joint = FinetuneConfig(
        concept=(f"{concept_dir}:star", f"{ring_dir}:ring"), out=tmp_path / "joint", init_from=tuple(apart),
        **{**TINY_RUN, "lr": 1e-12, "token_lr": 1e-12},
    )  # fmt: skip
    still = concept.load_concept(finetune.train(joint, pipe))
    torch.testing.assert_close(still.token_embeddings, merged.token_embeddings, rtol=0, atol=1e-9)
    for name, delta in merged.deltas.items():  # float32 rounding of (base + delta) − base
        torch.testing.assert_close(still.deltas[name], delta, rtol=0, atol=1e-6)
    assert not still.parts  # a trained concept, no longer the merge's parts
    swapped = dataclasses.replace(joint, init_from=tuple(reversed(apart)), out=tmp_path / "swapped")
    with pytest.raises(CustomDiffError, match="holds <new2> <new1>, this run trains <new1> <new2>"):
        finetune.train(swapped, models.load_pipeline(tiny_pipeline_dir))


def test_a_joint_run_trains_each_concept_alone_then_all_from_their_merge(
    tiny_pipeline_dir, concept_dir, tmp_path
):
    ring_dir = tmp_path / "donut"
    files.write_image_folder(
        ring_dir, toyworld.concept_scenes(toyworld.get_concept("donut"), 4, token="<new2>")
    )
    both = (f"{concept_dir}:star", f"{ring_dir}:ring")
    joint = FinetuneConfig(concept=both, out=tmp_path / "joint", **{**TINY_RUN, "steps": 4})
    result = concept.load_concept(finetune.train(joint, models.load_pipeline(tiny_pipeline_dir)))
    apart = [tmp_path / "joint" / "apart" / name for name in ("new1", "new2")]
    for folder, token in zip(apart, ("<new1>", "<new2>"), strict=True):
        alone = concept.load_concept(folder)
        assert alone.tokens == (token,) and alone.config["steps"] == 4
    assert result.tokens == ("<new1>", "<new2>") and result.config["steps"] == 2  # half, from the merge
    assert result.config["init_from"] == [str(folder) for folder in apart]
    by_hand = concept.load_concept(
        finetune.train(
            dataclasses.replace(joint, init_from=tuple(apart), steps=2, out=tmp_path / "by_hand"),
            models.load_pipeline(tiny_pipeline_dir),
        )
    )
    alone_written = [(folder / concept.CONCEPT_FILE).stat().st_mtime_ns for folder in apart]
    again = concept.load_concept(finetune.train(joint, models.load_pipeline(tiny_pipeline_dir)))  # resumed
    assert [(folder / concept.CONCEPT_FILE).stat().st_mtime_ns for folder in apart] == alone_written
    from_base = concept.load_concept(
        finetune.train(
            dataclasses.replace(joint, joint_start="base", out=tmp_path / "base"),
            models.load_pipeline(tiny_pipeline_dir),
        )
    )
    for other in (by_hand, again):
        assert torch.equal(other.token_embeddings, result.token_embeddings)
        assert all(torch.equal(other.deltas[name], delta) for name, delta in result.deltas.items())
    assert from_base.config["steps"] == 4 and not (tmp_path / "base" / "apart").exists()
    assert not torch.equal(from_base.token_embeddings, result.token_embeddings)


def test_save_every_keeps_each_steps_concept_as_a_run_that_long_ends(
    tiny_pipeline_dir, concept_dir, tmp_path
):
    long = finetune.train(
        config_for(concept_dir, tmp_path / "long", steps=4, save_every=2),
        models.load_pipeline(tiny_pipeline_dir),
    )
    short = finetune.train(
        config_for(concept_dir, tmp_path / "short"), models.load_pipeline(tiny_pipeline_dir)
    )
    saved = tmp_path / "long" / "step-2"
    assert sorted(p.name for p in long.parent.glob("step-*")) == ["step-2"]  # step 4 is the run's own
    assert {p.name for p in saved.iterdir()} == {p.name for p in short.parent.iterdir()} - {
        "run_config.json",
        finetune.CHECKPOINT_FILE,
    }
    a, b, last = concept.load_concept(saved), concept.load_concept(short), concept.load_concept(long)
    assert a.config["steps"] == 2 and last.config["steps"] == 4
    assert torch.equal(a.token_embeddings, b.token_embeddings)
    assert all(torch.equal(a.deltas[k], b.deltas[k]) for k in b.deltas)
    assert not torch.equal(a.token_embeddings, last.token_embeddings)
    for name in ("<new1>.safetensors", export.DIFFUSERS_ATTN_FILE):
        assert (saved / name).read_bytes() == (short.parent / name).read_bytes()
    with pytest.raises(CustomDiffError, match="--save-every -1"):
        config_for(concept_dir, tmp_path / "bad", save_every=-1)


def test_gradient_checkpointing_gives_the_same_concept_and_previews_are_called(
    tiny_pipeline_dir, concept_dir, tmp_path
):
    plain = finetune.train(
        config_for(concept_dir, tmp_path / "plain"), models.load_pipeline(tiny_pipeline_dir)
    )
    calls = []
    checkpointed = finetune.train(
        config_for(concept_dir, tmp_path / "checkpointed", gradient_checkpointing=True, preview_every=1),
        models.load_pipeline(tiny_pipeline_dir),
        preview=lambda step, pipe: calls.append(step),
    )
    a, b = concept.load_concept(plain), concept.load_concept(checkpointed)
    torch.testing.assert_close(a.token_embeddings, b.token_embeddings)
    for name in a.deltas:
        torch.testing.assert_close(a.deltas[name], b.deltas[name])
    assert calls == [1, 2]


def test_config_rejects_inconsistent_flags(concept_dir):
    with pytest.raises(CustomDiffError, match="--reg-dir"):
        FinetuneConfig(concept_dir, "star", reg="retrieve")
    with pytest.raises(CustomDiffError, match="even"):
        FinetuneConfig(concept_dir, "star", batch_size=3)
    with pytest.raises(CustomDiffError, match="modifier token"):
        FinetuneConfig(concept_dir, "star", token="new1")
    with pytest.raises(CustomDiffError, match="--prior-loss-weight weighs"):
        FinetuneConfig(concept_dir, "star", reg="none", prior_loss_weight=0.5)
    with pytest.raises(CustomDiffError, match="--prior-loss-weight -1"):
        FinetuneConfig(concept_dir, "star", prior_loss_weight=-1)
    with pytest.raises(CustomDiffError, match="--snr-gamma -5"):
        FinetuneConfig(concept_dir, "star", snr_gamma=-5)
    assert FinetuneConfig(concept_dir, "star").snr_gamma == 20  # the toy model's default
    assert FinetuneConfig(concept_dir, "star", snr_gamma=0).snr_gamma == 0  # off, as the paper
    with pytest.raises(CustomDiffError, match="--mode crossattn_kv"):
        FinetuneConfig(concept_dir, "star", mode="full", refit_weight=1.0)
    assert FinetuneConfig(concept_dir, "star", mode="full").refit_weight == 0  # the toy default is K/V's
    assert FinetuneConfig(concept_dir, "star", batch_size=3, reg="none").batch_size == 3


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, mode",
    [
        ("tiny_pipeline_dir", "crossattn_kv"),
        ("tiny_pipeline_dir", "token"),
        ("tiny_sdxl_dir", "crossattn_kv"),
    ],
)
def test_two_cpu_processes_train_one_concept(model, mode, request, concept_dir, tmp_path):
    settings = ["--reg", "none", "--steps", "3", "--batch-size", "2", "--no-scale-lr", "--lr", "1e-2"]
    settings += ["--mode", mode]
    train = [sys.executable, "-m", "customdiff", "train", "--images", concept_dir, "--class-word", "star"]
    train += ["--model", request.getfixturevalue(model), *settings]
    result = subprocess.run(
        [*map(str, train), "--num-processes", "2", "-o", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1  # the first process reports
    assert cli.main([*map(str, train[3:]), "-o", str(tmp_path / "one")]) == 0
    two, one = concept.load_concept(tmp_path / "two"), concept.load_concept(tmp_path / "one")
    assert two.config["num_processes"] == 2 and one.config["num_processes"] == 1
    # the first process draws the batches of a one-process run: only the other's gradients tell them apart
    assert not torch.allclose(two.token_embeddings, one.token_embeddings)
    assert all(not torch.allclose(two.deltas[name], one.deltas[name]) for name in one.deltas)


def test_stopping_a_launch_stops_its_processes(tiny_pipeline_dir, concept_dir, tmp_path):
    train = ["train", "--images", concept_dir, "--class-word", "star", "--model", tiny_pipeline_dir, "--reg"]
    train += ["none", "--steps", "100000", "--num-processes", "2", "-o", tmp_path / "out"]
    launch = subprocess.Popen(
        [sys.executable, "-m", "customdiff", *map(str, train)], stderr=subprocess.DEVNULL
    )
    log = tmp_path / "out" / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and log.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.5)
    launch.terminate()
    assert launch.wait(timeout=30) == 128 + signal.SIGTERM
    size = log.stat().st_size
    time.sleep(3)
    assert log.stat().st_size == size  # no process left training


def test_more_processes_than_gpus_is_one_line(concept_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    train = ["train", "--images", str(concept_dir), "--class-word", "star", "--num-processes", "2"]
    assert cli.main([*train, "-o", str(tmp_path / "out")]) == 2
    assert (
        capsys.readouterr().err
        == "customdiff: error: --num-processes 2: this machine has 1 GPUs; pass at most 1\n"
    )
    assert not (tmp_path / "out").exists()


def test_a_launch_of_two_processes_fails_with_one_line_and_no_hang(tiny_pipeline_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    train = ["train", "--images", tmp_path / "empty", "--class-word", "star", "--model", tiny_pipeline_dir]
    train += ["--num-processes", "2", "-o", tmp_path / "out"]
    result = subprocess.run(
        [sys.executable, "-m", "customdiff", *map(str, train)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"customdiff: error: no readable image in {tmp_path / 'empty'}; pass a folder of PNG or JPEG images"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("captioned", [False, True])
def test_a_class_word_the_tokenizer_lacks_is_named(tiny_pipeline_dir, tmp_path, captioned):
    scenes = list(toyworld.concept_scenes(toyworld.get_concept("starfish"), 4))
    if captioned:  # the captions say star, but eval and merge would prompt with the class word
        files.write_image_folder(tmp_path / "images", scenes)
    else:  # no captions: the template names the class
        (tmp_path / "images").mkdir()
        for index, (image, _) in enumerate(scenes):
            files.save_png(tmp_path / "images" / f"{index}.png", image)
    config = FinetuneConfig(tmp_path / "images", "dog", out=tmp_path / "out", reg="none", steps=1)
    with pytest.raises(CustomDiffError, match='class word of .*images: .*"dog"'):
        finetune.train(config, models.load_pipeline(tiny_pipeline_dir))


def test_sample_batch_gives_every_concept_a_batch_with_its_own_regularization():
    def pool(name: str, n: int) -> data.LatentPool:
        return data.LatentPool(torch.zeros(n, 4, 2, 2), torch.ones(n, 1, 2, 2), tuple([name] * n))

    targets, regs = [pool("star", 3), pool("ring", 5)], [pool("reg star", 7), pool("reg ring", 2)]
    latents, masks, captions = finetune.sample_batch(targets, regs, 4, torch.Generator().manual_seed(0))
    assert latents.shape == (8, 4, 2, 2) and masks.shape == (8, 1, 2, 2)  # 4 images a concept
    assert captions == ["star", "star", "ring", "ring", "reg star", "reg star", "reg ring", "reg ring"]
    assert masks.unique().tolist() == [1.0]
    _, masks, _ = finetune.sample_batch(targets, regs, 4, torch.Generator(), prior_loss_weight=0.25)
    assert masks[:, 0, 0, 0].tolist() == [1.0] * 4 + [0.25] * 4  # the pools keep theirs
    assert regs[0].masks.unique().tolist() == [1.0]
    latents, _, captions = finetune.sample_batch(targets, [None, None], 4, torch.Generator())
    assert latents.shape == (8, 4, 2, 2) and captions == ["star"] * 4 + ["ring"] * 4  # no regularization


def test_joint_training_learns_every_concept_from_flags_or_a_concepts_list(
    tiny_pipeline_dir, concept_dir, tmp_path, run_cli
):
    ring_dir = tmp_path / "donut"
    files.write_image_folder(
        ring_dir, toyworld.concept_scenes(toyworld.get_concept("donut"), 4, token="<new2>")
    )
    common = ["--model", tiny_pipeline_dir, "--steps", "2", "--batch-size", "4", "--lr", "1e-2"]
    common += ["--reg", "generate", "--num-reg", "2", "--cache-dir", tmp_path / "cache"]
    code, _, err = run_cli(
        "train", "--concept", f"{concept_dir}:star", "--concept", f"{ring_dir}:ring", *common,
        "--refit-weight", "1", "--joint-start", "base", "-o", tmp_path / "joint",
    )  # fmt: skip
    assert code == 0, err
    joint = concept.load_concept(tmp_path / "joint")
    assert joint.tokens == ("<new1>", "<new2>") and joint.class_words == ("star", "ring")
    refit = json.loads((tmp_path / "joint" / "log.jsonl").read_text().splitlines()[-1])  # both fitted at once
    assert refit["refit_change_on_captions"] < refit["trained_change_on_captions"]
    assert {caption.split()[1] for caption in joint.captions} == {"<new1>", "<new2>"}
    pipe = models.load_pipeline(tiny_pipeline_dir)
    assert joint.initializers == ("ktn", "sks")  # tokens start apart by default (their merge is sound)
    weight = pipe.text_encoder.get_input_embeddings().weight
    initial = [weight[word_id(pipe.tokenizer, word)] for word in joint.initializers]
    trained = zip(joint.token_embeddings, initial, strict=True)
    assert all(not torch.equal(row, start) for row, start in trained)  # every token's row trains
    assert (tmp_path / "joint" / "<new2>.safetensors").is_file()
    code, out, err = run_cli(
        "eval", tmp_path / "joint", "--model", tiny_pipeline_dir, "--n", 2, "--steps", 2, "-o", tmp_path / "e"
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "e" / "eval.json").read_text())  # each concept's own prompts too
    assert {"<new1>/image_alignment", "<new2>/text_alignment"} <= set(metrics)
    assert "| joint <new2> |" in out and "| joint <new2> |" in (tmp_path / "e" / "eval.md").read_text()

    listing = tmp_path / "concepts.json"
    listing.write_text(
        f'[{{"instance_data_dir": "{concept_dir}", "class_word": "star"}},'
        f' {{"images": "{ring_dir}", "class_word": "ring", "initializer": "sks"}}]'
    )
    code, _, err = run_cli("train", "--concepts-list", listing, *common, "-o", tmp_path / "listed")
    assert code == 0, err
    listed = concept.load_concept(tmp_path / "listed")  # from the merge of each trained alone (the default)
    assert listed.tokens == ("<new1>", "<new2>") and listed.initializers == ("ktn", "sks")
    alone = [concept.load_concept(tmp_path / "listed" / "apart" / name) for name in ("new1", "new2")]
    assert [one.initializers for one in alone] == [("ktn",), ("sks",)]

    both = ["--images", concept_dir, "--concept", f"{ring_dir}:ring"]
    code, _, err = run_cli("train", *both, "-o", tmp_path / "x")
    assert code == 2 and "--concept DIR:CLASS" in err
    code, _, err = run_cli("train", "--concept", str(ring_dir), "-o", tmp_path / "x")
    assert code == 2 and "write DIR:CLASS" in err
    listing.write_text('[{"class_word": "star"}]')
    code, _, err = run_cli("train", "--concepts-list", listing, "-o", tmp_path / "x")
    assert code == 2 and 'entry 1 needs "images"' in err and len(err.splitlines()) == 1


def test_a_diffusers_concepts_list_gives_tokens_captions_and_each_concept_its_class_images(
    tiny_pipeline_dir, concept_dir, tmp_path
):
    uncaptioned = tmp_path / "donut"
    uncaptioned.mkdir()
    for index, (image, _) in enumerate(toyworld.concept_scenes(toyworld.get_concept("donut"), 3)):
        files.save_png(uncaptioned / f"{index}.png", image)
    class_folder = tmp_path / "class_ring"  # a folder of class images, captioned by "class_prompt"
    class_folder.mkdir()
    for index, (image, _) in enumerate(toyworld.sample_scenes(2, seed=1, n_objects=1)):
        files.save_png(class_folder / f"{index}.png", image)
    retrieved = tmp_path / "real_reg" / "samples_star"  # the paper's retrieval script's layout
    (retrieved / "images").mkdir(parents=True)
    scenes = list(toyworld.sample_scenes(4, seed=2, n_objects=1))
    for index, (image, _) in enumerate(scenes):
        files.save_png(retrieved / "images" / f"{index}.png", image)
    listed = [f"elsewhere/samples_star/images/{i}.png" for i in range(4)]  # relative to where it ran
    (retrieved / "images.txt").write_text("".join(f"{line}\n" for line in listed))
    (retrieved / "caption.txt").write_text("".join(f"{caption}\n" for _, caption in scenes))
    listing = tmp_path / "concepts_list.json"
    listing.write_text(
        json.dumps(
            [
                {"instance_prompt": "a <new1> star on a gray background", "class_prompt": "star",
                 "instance_data_dir": str(concept_dir), "class_data_dir": str(retrieved / "images.txt")},
                {"instance_prompt": "a <new2> ring on a sand background", "class_prompt": "ring",
                 "instance_data_dir": str(uncaptioned), "class_data_dir": str(class_folder)},
            ]
        )
    )  # fmt: skip
    config = FinetuneConfig(
        concepts_list=listing,
        out=tmp_path / "out",
        num_reg=3,
        composed_views=0.0,
        cache_dir=tmp_path / "cache",
    )
    specs = config.concept_specs()
    assert [(spec.token, spec.class_word) for spec in specs] == [("<new1>", "star"), ("<new2>", "ring")]
    with pytest.warns(UserWarning, match="2 class images, fewer than --num-reg 3; adding 1 sampled"):
        captions, _, regs = finetune.prepare_data(config, models.load_pipeline(tiny_pipeline_dir))
    own = [caption for _, _, caption in files.read_image_folder(concept_dir)]
    assert captions[0] == own and "<new1>" in own[0]  # its own captions win over the instance prompt
    assert captions[1] == ["a <new2> ring on a sand background"] * 3  # the instance prompt: no own captions
    assert regs[0].captions == tuple(caption for _, caption in scenes[:3])  # caption.txt, --num-reg of them
    assert regs[1].captions == ("ring",) * 3  # topped up, as diffusers does, by one sampled from the model
    assert len(list((tmp_path / "cache" / "regularization").glob("*/*.png"))) == 1  # into the cache
    assert len(list(class_folder.iterdir())) == 2  # never into the user's folder

    listing.write_text(json.dumps([{"instance_data_dir": str(uncaptioned), "class_data_dir": "nowhere"}]))
    with pytest.raises(CustomDiffError, match='entry 1 needs "images"'):
        config.concept_specs()
    listing.write_text(
        json.dumps([{"instance_prompt": "a <new1> ring", "instance_data_dir": str(uncaptioned),
                     "class_data_dir": str(tmp_path / "nowhere")}])
    )  # fmt: skip
    with pytest.warns(UserWarning, match="nowhere: no class images yet for --num-reg 3; adding 3 sampled"):
        _, _, regs = finetune.prepare_data(config, models.load_pipeline(tiny_pipeline_dir))
    assert len(regs[0].captions) == 3 and not (tmp_path / "nowhere").exists()  # a folder still to fill


def test_class_images_regularize_one_concept_as_they_are(tiny_pipeline_dir, concept_dir, tmp_path):
    class_folder = tmp_path / "stars"
    class_folder.mkdir()
    for index, (image, _) in enumerate(toyworld.sample_scenes(3, seed=1, n_objects=1)):
        files.save_png(class_folder / f"{index}.png", image)
    config = config_for(concept_dir, tmp_path / "out", reg="generate", num_reg=3, class_images=class_folder)
    _, _, regs = finetune.prepare_data(config, models.load_pipeline(tiny_pipeline_dir))
    assert regs[0].captions == ("star",) * 3  # uncaptioned: the class word, as diffusers' class prompt
    with pytest.raises(CustomDiffError, match="drop --reg none"):
        config_for(concept_dir, tmp_path / "out", class_images=class_folder)  # config_for: --reg none
    with pytest.raises(CustomDiffError, match="pass --class-images DIR too"):
        config_for(concept_dir, tmp_path / "out", reg="generate", class_prompt="a star")


def test_an_instance_prompt_captions_uncaptioned_images_and_names_the_class(tiny_pipeline_dir, tmp_path):
    uncaptioned = tmp_path / "donut"
    uncaptioned.mkdir()
    for index, (image, _) in enumerate(toyworld.concept_scenes(toyworld.get_concept("donut"), 2)):
        files.save_png(uncaptioned / f"{index}.png", image)
    prompt = "a <new1> ring on a sand background"  # diffusers' --instance_prompt
    config = FinetuneConfig(images=uncaptioned, instance_prompt=prompt, out=tmp_path / "out", reg="none")
    assert config.class_word == "ring"  # the word after the token, unless --class-word says otherwise
    captions, _, _ = finetune.prepare_data(config, models.load_pipeline(tiny_pipeline_dir))
    assert captions == [[prompt, prompt]]
    for bad, error in (
        ({"instance_prompt": "a ring"}, "names no class word after --token <new1>"),
        ({"instance_prompt": "a ring <new1>"}, "names no class word after --token <new1>"),
        ({"images": None}, "pass --images DIR too"),
    ):
        with pytest.raises(CustomDiffError, match=error):
            FinetuneConfig(**{"images": uncaptioned, "instance_prompt": prompt, "reg": "none", **bad})


def test_joint_two_object_views_set_each_concept_beside_its_class_alone(concept_dir, tmp_path):
    ring_dir = tmp_path / "donut"
    files.write_image_folder(
        ring_dir, toyworld.concept_scenes(toyworld.get_concept("donut"), 4, token="<new2>")
    )
    reg_dir = tmp_path / "reg"
    files.write_image_folder(reg_dir, toyworld.sample_scenes(24, seed=2, n_objects=1))
    config = FinetuneConfig(
        concept=(f"{concept_dir}:star", f"{ring_dir}:ring"),
        reg="retrieve",
        reg_dir=reg_dir,
        num_reg=12,
        composed_views=1.0,
        out=tmp_path / "out",
    )
    _, targets, _ = finetune.prepare_data(config, models.load_pipeline())  # the toy model: 64² scenes
    for pool, own, other in zip(targets, ("<new1>", "<new2>"), ("<new2>", "<new1>"), strict=True):
        composed = [caption for caption in pool.captions if " and a " in caption]
        assert composed and all(own in caption for caption in composed)
        assert not any(other in caption for caption in pool.captions)  # pairing the concepts cost them


def test_preview_prompts_are_checked_first_and_drawn_labelled(
    tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch
):
    drawn = []
    real_sample = finetune.generate.sample

    def spy(pipe, prompts, **kwargs):
        drawn.append(prompts)
        return real_sample(pipe, prompts, **kwargs)

    monkeypatch.setattr(finetune.generate, "sample", spy)
    misspelt = config_for(concept_dir, tmp_path / "bad", preview_every=1, preview_prompts=("a <new1> stra",))
    with pytest.raises(CustomDiffError, match='does not know the word "stra" in "a <new1> stra"'):
        finetune.train(misspelt, models.load_pipeline(tiny_pipeline_dir))
    assert not drawn and not (tmp_path / "bad" / "concept.safetensors").exists()  # refused before training
    prompts = ("a <new1> star on a sky background", "a red star on a gray background")
    pipe = models.load_pipeline(tiny_pipeline_dir)
    side = data.resolution(pipe)
    finetune.train(
        config_for(concept_dir, tmp_path / "run", steps=1, preview_every=1, preview_prompts=prompts), pipe
    )
    assert drawn == [list(prompts)]
    grid = Image.open(tmp_path / "run" / "previews" / "step-000001.png")
    tile = np.zeros((side, side, 3), np.uint8)
    labels = [prompt for prompt in prompts for _ in range(2)]
    assert grid.size == files.image_grid([tile] * 4, columns=2, labels=labels).size  # one labelled row each
    with pytest.raises(CustomDiffError, match="--preview-every"):
        config_for(concept_dir, tmp_path, preview_prompts=prompts)


def test_save_every_with_refit_keeps_each_step_refit_and_trains_on_unrefit(
    tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch
):
    """A snapshot of a refit run, and a preview, is refit as a run of that many steps ends, and training
    goes on from the weights as trained: its end equals a refit run without snapshots. A step's refit is
    solved once for all that use it (step 2's snapshot and preview, step 4's preview and the end)."""
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    base, drawn = models.load_pipeline(tiny_pipeline_dir).unet.get_parameter(key).detach(), {}
    solved, refit = [], finetune.refit
    monkeypatch.setattr(
        finetune, "refit", lambda pipe, result, cfg: solved.append(1) or refit(pipe, result, cfg)
    )
    settings = {"kept": {"steps": 4, "save_every": 2, "preview_every": 2}, "short": {}, "long": {"steps": 4}}
    for name, changes in settings.items():
        finetune.train(
            config_for(concept_dir, tmp_path / name, refit_weight=1.0, **changes),
            models.load_pipeline(tiny_pipeline_dir),
            preview=lambda step, pipe: drawn.setdefault(step, pipe.unet.get_parameter(key).detach().clone()),
        )
        if name == "kept":
            assert len(solved) == 2
    pairs = ((tmp_path / "kept" / "step-2", tmp_path / "short"), (tmp_path / "kept", tmp_path / "long"))
    for kept, alone in pairs:
        a, b = concept.load_concept(kept), concept.load_concept(alone)
        assert a.deltas.keys() == b.deltas.keys()
        assert all(torch.equal(a.deltas[k], b.deltas[k]) for k in a.deltas)
        attn = export.DIFFUSERS_ATTN_FILE
        assert (kept / attn).read_bytes() == (alone / attn).read_bytes()
    two, four = (concept.load_concept(folder) for folder, _ in pairs)
    assert not any(torch.equal(two.deltas[k], four.deltas[k]) for k in two.deltas)
    for step, held in ((2, two), (4, four)):
        torch.testing.assert_close(drawn[step], base + held.deltas[f"unet.{key}"])


def test_refit_weight_refits_the_trained_deltas_as_a_merge_of_the_concept_alone(
    tiny_pipeline_dir, concept_dir, tmp_path
):
    """The refit concept is ``merge.refit_deltas`` of the same seeded run without it, the UNet holds it, and
    ordinary captions' K/V outputs move less than the trained deltas move them."""
    plain_pipe = models.load_pipeline(tiny_pipeline_dir)
    plain = concept.load_concept(finetune.train(config_for(concept_dir, tmp_path / "plain"), plain_pipe))
    pipe = models.load_pipeline(tiny_pipeline_dir)
    base = {name: p.detach().clone() for name, p in pipe.unet.named_parameters()}
    refit = concept.load_concept(
        finetune.train(config_for(concept_dir, tmp_path / "refit", refit_weight=1.0), pipe)
    )
    captions = merge.regularization_captions(pipe.tokenizer, merge.NUM_REG_CAPTIONS)
    expected, report = merge.refit_deltas(pipe, plain, captions, 1.0)
    assert report.objective < report.naive_objective
    assert refit.deltas.keys() == plain.deltas.keys()
    for name, delta in refit.deltas.items():
        torch.testing.assert_close(delta, expected[name], rtol=1e-4, atol=1e-6)
        unet_name = name.removeprefix("unet.")
        torch.testing.assert_close(pipe.unet.get_parameter(unet_name), base[unet_name] + delta)
    assert not any(torch.equal(delta, plain.deltas[name]) for name, delta in refit.deltas.items())
    record = json.loads((tmp_path / "refit" / "log.jsonl").read_text().splitlines()[-1])
    assert record["refit_change_on_captions"] == pytest.approx(report.objective, rel=1e-3)
    assert record["refit_change_on_captions"] < record["trained_change_on_captions"]
