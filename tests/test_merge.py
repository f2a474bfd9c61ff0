"""Closed-form merges (§3.2): constraints met, objective minimal, the weighted fit, CLI and errors."""

import dataclasses

import pytest
import torch

from customdiff import concept, merge, models, text

CAPTIONS = {
    "<new1>": ("a <new1> star on a gray background", "a <new1> star on a sand background"),
    "<new2>": ("a <new2> ring on a white background", "a <new2> ring on a sky background"),
}


def objective(W, W0, C_reg):
    return float(((C_reg @ (W - W0).T) ** 2).sum())


def solve_one(W0, C_reg, C, V):
    """merge_deltas for one matrix whose targets are V: the merged W and the report."""
    concept_delta = torch.linalg.lstsq(C, V - C @ W0.T).solution.T  # some ΔW with C (W0 + ΔW)ᵀ = V
    deltas, report = merge.merge_deltas({"w": W0}, C_reg.T @ C_reg, [C], [{"w": concept_delta}])
    return W0 + deltas["w"].double(), report


@pytest.mark.parametrize("width", [24, 40])
def test_the_merge_meets_the_constraints_and_minimises_the_change(width):
    generator = torch.Generator().manual_seed(width)
    W0 = torch.randn(6, width, generator=generator, dtype=torch.float64)
    C_reg = torch.randn(300, width, generator=generator, dtype=torch.float64)
    C = torch.randn(5, width, generator=generator, dtype=torch.float64)
    V = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    W, report = solve_one(W0, C_reg, C, V)
    assert (C @ W.T - V).abs().max() < 1e-5  # the delta is stored in float32
    assert report.residual < 1e-12
    assert report.objective == pytest.approx(objective(W, W0, C_reg), rel=1e-5)
    # any other weight meeting the constraints differs by N with C Nᵀ = 0, and changes C_reg's outputs more
    null_space = torch.linalg.svd(C, full_matrices=True).Vh[5:]  # (width - 5, width)
    for _ in range(5):
        N = torch.randn(6, width - 5, generator=generator, dtype=torch.float64) @ null_space * 0.1
        assert (C @ N.T).abs().max() < 1e-9
        assert objective(W + N, W0, C_reg) > objective(W, W0, C_reg)


def test_the_merge_copes_with_duplicate_constraint_rows():
    generator = torch.Generator().manual_seed(0)
    W0 = torch.randn(4, 16, generator=generator, dtype=torch.float64)
    C_reg = torch.randn(100, 16, generator=generator, dtype=torch.float64)
    row = torch.randn(1, 16, generator=generator, dtype=torch.float64)
    C = torch.cat([row, row, row * (1 + 1e-14), torch.randn(2, 16, generator=generator, dtype=torch.float64)])
    V = C @ torch.randn(4, 16, generator=generator, dtype=torch.float64).T  # consistent targets
    W, report = solve_one(W0, C_reg, C, V)
    assert torch.isfinite(W).all() and report.residual < 1e-9
    assert (C @ W.T - V).abs().max() < 1e-5


@pytest.fixture
def random_concept(make_concept):
    """``random_concept(pipe, token, seed)``: a K/V concept, small random deltas, its captions above."""
    return lambda pipe, token, seed: make_concept(pipe, token, seed, scale=0.1, captions=CAPTIONS[token])


@torch.no_grad()
def key_outputs(
    pipe, concept_: concept.Concept | None, caption: str, padded: bool = False
) -> dict[str, torch.Tensor]:
    """Each attn2.to_k's output for the caption's positions from the modifier token on or, ``padded``, for
    every position of the caption padded as the UNet reads it; with the concept (None: the base model)."""
    applied = concept.apply_concept(pipe, concept_) if concept_ is not None else None
    if padded:
        features = pipe.text_encoder(text.tokenize(pipe.tokenizer, [caption]))[0][0]
    else:
        ids = pipe.tokenizer(caption, return_tensors="pt").input_ids
        start = int((ids[0] >= pipe.tokenizer.convert_tokens_to_ids(concept_.tokens[0])).nonzero()[0])
        features = pipe.text_encoder(ids)[0][0, start:]
    outputs = {
        name: module(features) for name, module in pipe.unet.named_modules() if name.endswith("attn2.to_k")
    }
    if applied is not None:
        concept.remove_concept(pipe, applied)
    return outputs


def test_the_weighted_merge_is_the_least_squares_fit():
    """argmin Σ_n ‖F_n (ΔW − ΔW_n)ᵀ‖² + λ‖C_reg ΔWᵀ‖², λ = weight · tr(Σ G_n) / tr(M): stacked lstsq."""
    generator = torch.Generator().manual_seed(0)
    W0 = torch.randn(6, 20, generator=generator, dtype=torch.float64)
    C_reg = torch.randn(300, 20, generator=generator, dtype=torch.float64)
    F = [torch.randn(40, 20, generator=generator, dtype=torch.float64) for _ in range(2)]
    deltas = [{"w": torch.randn(6, 20, generator=generator)}, {}]  # the second: a token concept
    merged, report = merge.weighted_deltas({"w": W0}, C_reg.T @ C_reg, F, deltas, reg_weight=0.5)
    scale = (0.5 * sum(float((f**2).sum()) for f in F) / float((C_reg**2).sum())) ** 0.5
    stacked = torch.cat([F[0], F[1], scale * C_reg])
    targets = torch.cat([F[0] @ deltas[0]["w"].double().T, torch.zeros(340, 6, dtype=torch.float64)])
    expected = torch.linalg.lstsq(stacked, targets).solution.T
    torch.testing.assert_close(merged["w"].double(), expected, rtol=1e-4, atol=1e-5)
    assert report.objective == pytest.approx(objective(W0 + expected, W0, C_reg), rel=1e-4)
    assert report.naive_objective == pytest.approx(
        objective(W0 + deltas[0]["w"].double(), W0, C_reg), rel=1e-4
    )
    assert 0 < report.residual < report.naive_residual


@torch.no_grad()
def test_the_weighted_merge_keeps_each_concepts_outputs_better_than_addition(
    tiny_pipeline_dir, random_concept
):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    first, second = random_concept(pipe, "<new1>", 1), random_concept(pipe, "<new2>", 2)
    captions = merge.regularization_captions(pipe.tokenizer, 200)
    merged, report = merge.merge_concepts(pipe, [first, second], captions)
    added = concept.Concept(
        **{**merged.__dict__, "deltas": {k: first.deltas[k] + second.deltas[k] for k in first.deltas}}
    )
    base = key_outputs(pipe, None, captions[0], padded=True)
    for own, caption in ((first, CAPTIONS["<new1>"][0]), (second, CAPTIONS["<new2>"][1])):
        expected = key_outputs(pipe, own, caption, padded=True)
        error = {
            name: sum(float((outputs[k] - expected[k]).norm()) for k in expected)
            for name, outputs in (
                ("merged", key_outputs(pipe, merged, caption, padded=True)),
                ("added", key_outputs(pipe, added, caption, padded=True)),
            )
        }
        assert error["merged"] < 0.5 * error["added"]
    ordinary = {
        "merged": key_outputs(pipe, merged, captions[0], padded=True),
        "added": key_outputs(pipe, added, captions[0], padded=True),
    }
    change = {
        name: sum(float((outputs[k] - base[k]).norm()) for k in base) for name, outputs in ordinary.items()
    }
    assert change["merged"] < change["added"] and report.objective < report.naive_objective


def test_context_captions_put_the_token_where_the_class_word_is():
    ordinary = [
        "a small red star on a gray background",
        "a red ring and a blue star on a sky background",
        "a <new2> star on a sand background",  # a concept already there stays itself
        "a green circle on a gray background",
        "a photo of a star at night",
        "a photo of a starfish",  # not the word
        "a small red star on a gray background",
    ]
    assert merge.context_captions(ordinary, "<new1>", "star") == [
        "a small <new1> star on a gray background",
        "a red ring and a <new1> star on a sky background",
        "a photo of a <new1> star at night",
    ]
    assert merge.context_captions(ordinary, "<new1>", "cross") == []


@torch.no_grad()
def test_context_rows_keep_a_concepts_outputs_in_unseen_contexts(tiny_pipeline_dir, random_concept):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    first = random_concept(pipe, "<new1>", 1)
    second = dataclasses.replace(random_concept(pipe, "<new2>", 2), class_words=("ring",))
    captions = merge.regularization_captions(pipe.tokenizer, 200)
    unseen = [f"a <new1> star on a {background} background" for background in ("black", "grass", "white")]
    unseen += [
        "a small <new1> star on a gray background",
        "a <new1> star and a red ring on a sand background",
    ]
    expected = [key_outputs(pipe, first, caption, padded=True) for caption in unseen]
    error = {}
    for share in (0.0, merge.CONTEXT_SHARE):
        merged, _ = merge.merge_concepts(pipe, [first, second], captions, context_share=share)
        error[share] = sum(
            float((key_outputs(pipe, merged, caption, padded=True)[k] - own[k]).norm())
            for caption, own in zip(unseen, expected, strict=True)
            for k in own
        )
    # 32-wide features leave little room (0.95 here; 0.85-0.99 with the token ids of the tokenizer trainer,
    # which changed from run to run); the toy model's 128: 0.33 against 0.42 of the change
    assert error[merge.CONTEXT_SHARE] < 0.97 * error[0.0]


def test_merged_concept_keeps_each_concepts_outputs_on_its_captions(tiny_pipeline_dir, random_concept):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    first, second = random_concept(pipe, "<new1>", 1), random_concept(pipe, "<new2>", 2)
    captions = merge.regularization_captions(pipe.tokenizer, 200)
    merged, report = merge.merge_concepts(pipe, [first, second], captions, method="constrained")
    assert merged.tokens == ("<new1>", "<new2>") and merged.base_hash == first.base_hash
    assert report.residual < 1e-6 < report.naive_residual
    for own, caption in ((first, CAPTIONS["<new1>"][0]), (second, CAPTIONS["<new2>"][1])):
        expected, actual = key_outputs(pipe, own, caption), key_outputs(pipe, merged, caption)
        assert all(torch.allclose(actual[name], expected[name], atol=1e-4) for name in expected)
    assert "<new1>" not in pipe.tokenizer.get_vocab()  # the base pipeline is left as it was


def test_merging_one_concept_returns_it(tiny_pipeline_dir, random_concept):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    only = random_concept(pipe, "<new1>", 1)
    assert merge.merge_concepts(pipe, [only], ["a red star on a gray background"])[0] is only


def test_merging_a_merged_concept_keeps_every_part(tiny_pipeline_dir, random_concept, make_concept):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    star, ring = random_concept(pipe, "<new1>", 1), random_concept(pipe, "<new2>", 2)
    kite = make_concept(pipe, "<new3>", 3, scale=0.1, captions=("a <new3> triangle on a sky background",))
    captions = merge.regularization_captions(pipe.tokenizer, 50)
    pair, _ = merge.merge_concepts(pipe, [star, ring], captions)
    star_part, ring_part = pair.parts
    assert merge.rename_tokens(pair, {"<new2>": "<new9>"}).parts[1].tokens == ("<new9>",)
    trio, _ = merge.merge_concepts(pipe, [pair, kite], captions)
    assert [part.tokens for part in trio.parts] == [("<new1>",), ("<new2>",), ("<new3>",)]
    assert trio.parts[0] is star_part and trio.parts[1] is ring_part
    stored = sum(delta.numel() for part in trio.parts for delta in part.deltas.values())
    line = f"keeps the deltas of its 3 parts ({stored:,} values stored), for prompts naming one of them"
    assert line in concept.describe(trio, trio.base_hash, "x")


def test_clashing_tokens_get_the_first_newn_no_concept_uses(tiny_pipeline_dir, random_concept):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    star, ring = random_concept(pipe, "<new1>", 1), random_concept(pipe, "<new2>", 2)
    joint = dataclasses.replace(star, tokens=("<new1>", "<new2>"))  # two tokens, as a joint run writes
    concepts, renames = merge.free_clashing_tokens([joint, star, ring, joint])
    assert renames == [
        {},
        {"<new1>": "<new3>"},
        {"<new2>": "<new4>"},
        {"<new1>": "<new5>", "<new2>": "<new6>"},
    ]
    tokens = [c.tokens for c in concepts]
    assert tokens == [("<new1>", "<new2>"), ("<new3>",), ("<new4>",), ("<new5>", "<new6>")]
    assert concepts[1].captions == tuple(caption.replace("<new1>", "<new3>") for caption in star.captions)
    assert concepts[1].token_embeddings is star.token_embeddings and concepts[1].deltas is star.deltas
    merge.check_mergeable(concepts, ["a", "b", "c", "d"])  # no clash left


def test_merge_cli_writes_a_usable_concept_and_names_bad_input(
    run_cli, tiny_pipeline_dir, tmp_path, random_concept
):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    for token, seed in (("<new1>", 1), ("<new2>", 2)):
        concept.save_concept(tmp_path / token.strip("<>"), random_concept(pipe, token, seed))
    code, out, err = run_cli(
        "merge", tmp_path / "new1", tmp_path / "new2", "--model", tiny_pipeline_dir, "-o", tmp_path / "merged"
    )
    assert code == 0, err
    assert "output error on the concepts' captions and contexts" in out
    merged = concept.load_concept(tmp_path / "merged")
    assert merged.tokens == ("<new1>", "<new2>")
    concept.apply_concept(models.load_pipeline(tiny_pipeline_dir), merged)  # usable like any concept
    (tmp_path / "captions.txt").write_text("a red star on a gray background\n")
    code, out, err = run_cli(
        "merge", tmp_path / "new1", tmp_path / "new2", "--model", tiny_pipeline_dir,
        "--reg-captions", tmp_path / "captions.txt", "--method", "constrained", "-o", tmp_path / "merged2",
    )  # fmt: skip
    assert code == 0, err
    assert "largest constraint residual" in out

    clash = tmp_path / "clash"
    concept.save_concept(clash, random_concept(pipe, "<new1>", 3))
    code, _, err = run_cli(
        "merge", tmp_path / "new1", clash, "--model", tiny_pipeline_dir, "-o", tmp_path / "x"
    )
    assert code == 2 and "both use the token <new1>" in err and len(err.splitlines()) == 1
    # the ring concept trained as <new1> too: --rename-tokens merges it as if it had been trained as <new2>
    ring_as_new1 = merge.rename_tokens(concept.load_concept(tmp_path / "new2"), {"<new2>": "<new1>"})
    ring_captions = tuple(caption.replace("<new2>", "<new1>") for caption in CAPTIONS["<new2>"])
    assert ring_as_new1.captions == ring_captions
    concept.save_concept(tmp_path / "ring1", ring_as_new1)
    code, out, err = run_cli(
        "merge", tmp_path / "new1", tmp_path / "ring1", "--rename-tokens", "--model", tiny_pipeline_dir,
        "-o", tmp_path / "renamed",
    )  # fmt: skip
    assert code == 0, err
    assert f"{tmp_path / 'ring1' / 'concept.safetensors'}: <new1> is <new2> in the merged concept" in out
    renamed, expected = concept.load_concept(tmp_path / "renamed"), concept.load_concept(tmp_path / "merged")
    assert renamed.tokens == expected.tokens and renamed.captions == expected.captions
    assert [part.tokens for part in renamed.parts] == [("<new1>",), ("<new2>",)]
    ring = concept.load_concept(tmp_path / "new2").deltas  # each part keeps its own run's deltas
    assert all(torch.equal(renamed.parts[1].deltas[name], delta) for name, delta in ring.items())
    for name, delta in expected.deltas.items():
        assert torch.allclose(renamed.deltas[name], delta, atol=1e-6)
    other_base = tmp_path / "other"
    foreign = random_concept(pipe, "<new2>", 4)
    concept.save_concept(other_base, concept.Concept(**{**foreign.__dict__, "base_hash": "000000000000"}))
    code, _, err = run_cli("merge", tmp_path / "new1", other_base, "-o", tmp_path / "x")
    assert code == 2 and "merge concepts of one base model" in err
    full = tmp_path / "full"
    concept.save_concept(full, concept.Concept(**{**foreign.__dict__, "mode": "full"}))
    code, _, err = run_cli("merge", tmp_path / "new1", full, "-o", tmp_path / "x")
    assert code == 2 and "--mode full" in err
    assert not (tmp_path / "x").exists()


def test_generate_merges_several_concepts_in_memory_as_merge_does(
    run_cli, tiny_pipeline_dir, tmp_path, random_concept
):
    pipe = models.load_pipeline(tiny_pipeline_dir)
    concept.save_concept(tmp_path / "star", random_concept(pipe, "<new1>", 1))
    ring = random_concept(pipe, "<new2>", 2)  # trained as <new1> too, as runs are by default
    concept.save_concept(tmp_path / "ring", merge.rename_tokens(ring, {"<new2>": "<new1>"}))
    pair = (tmp_path / "star", tmp_path / "ring")
    merged = tmp_path / "merged"
    code, _, err = run_cli("merge", *pair, "--rename-tokens", "--model", tiny_pipeline_dir, "-o", merged)
    assert code == 0, err
    prompt = "a <new1> star and a <new2> ring BREAK a <new1> star BREAK a <new2> ring"
    common = ("--model", tiny_pipeline_dir, "--n", 1, "--steps", 2, "--regions")
    code, _, err = run_cli("generate", prompt, *common, "--concept", merged, "-o", tmp_path / "saved")
    assert code == 0, err
    code, out, err = run_cli(
        "generate", prompt, *common, "--concept", *pair, "--rename-tokens", "-o", tmp_path / "memory"
    )
    assert code == 0, err
    assert "<new1> is <new2>" in out and "merged 2 concepts in memory (tokens <new1> <new2>)" in out
    assert f"--rename-tokens saves it in {tmp_path / 'star+ring'}" in out  # merge's own default folder
    for name in ("00000.png", "grid.png"):
        assert (tmp_path / "memory" / name).read_bytes() == (tmp_path / "saved" / name).read_bytes()
    code, _, err = run_cli("generate", prompt, *common, "--concept", *pair, "-o", tmp_path / "clash")
    assert code == 2 and "both use the token <new1>; pass --rename-tokens" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "clash" / "00000.png").exists()


def test_nearly_identical_rows_with_different_targets_do_not_blow_the_weights_up():
    """Two tokens still near their shared initializer: exact constraints would need an unbounded change."""
    generator = torch.Generator().manual_seed(0)
    W0 = torch.randn(8, 16, generator=generator, dtype=torch.float64)
    C_reg = torch.randn(200, 16, generator=generator, dtype=torch.float64)
    C1 = torch.randn(3, 16, generator=generator, dtype=torch.float64)
    C2 = C1 + 1e-7 * torch.randn(3, 16, generator=generator, dtype=torch.float64)
    deltas = [{"w": 0.1 * torch.randn(8, 16, generator=generator)} for _ in range(2)]
    merged, report = merge.merge_deltas({"w": W0}, C_reg.T @ C_reg, [C1, C2], deltas)
    assert torch.isfinite(merged["w"]).all()
    assert report.objective < 10 * report.naive_objective
