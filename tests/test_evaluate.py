"""Evaluation: KID behaves as a distance, the toy prompts stay in the grammar, a run writes its report."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from customdiff import concept, evaluate, files, finetune, models, toyjudge, toyworld
from customdiff.config import EvalConfig, FinetuneConfig
from customdiff.errors import CustomDiffError


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 16, generator=generator), torch.randn(200, 16, generator=generator)
    same = evaluate.kernel_inception_distance(a, b)
    shifted = evaluate.kernel_inception_distance(a, b + 1.0)
    assert abs(same) < 0.02 and shifted > 10 * max(abs(same), 1e-3)


def test_toy_prompts_are_captions_of_the_grammar():
    prompts = evaluate.toy_prompts(("<new1>",), ("star",))
    for prompt in prompts.concept:
        caption = toyworld.parse_caption(prompt)
        assert caption.things[0].color == "<new1>" and caption.things[0].shape == "star"
    assert any(len(toyworld.parse_caption(p).things) == 2 for p in prompts.concept)
    for prompt in prompts.classes:
        assert "<new1>" not in prompt and toyworld.parse_caption(prompt).things[0].shape == "star"


@pytest.fixture(scope="module")
def concept_run(tiny_pipeline_dir, tmp_path_factory):
    images = tmp_path_factory.mktemp("starfish")
    files.write_image_folder(images, toyworld.concept_scenes(toyworld.get_concept("starfish"), 4))
    out = tmp_path_factory.mktemp("concept")
    config = FinetuneConfig(images, "star", out=out, model=tiny_pipeline_dir, reg="none", steps=2, lr=1e-2)
    finetune.train(config, models.load_pipeline(tiny_pipeline_dir))
    return out


def test_eval_writes_the_papers_metrics_and_the_judges(run_cli, tiny_pipeline_dir, concept_run, tmp_path):
    code, out, err = run_cli(
        "eval", concept_run, "--model", tiny_pipeline_dir, "--n", 2, "--steps", 2, "-o", tmp_path / "eval"
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(metrics) == {"text_alignment", "image_alignment", "kid_x1000"}  # 32×32: no judge
    assert -1 <= metrics["text_alignment"] <= 1 and -1 <= metrics["image_alignment"] <= 1
    assert "| text_alignment |" in (tmp_path / "eval" / "eval.md").read_text() or "text_alignment" in out
    n_samples = 2 * (len(evaluate.toy_prompts(("<new1>",), ("star",)).concept) + 4)
    assert len(files.read_image_folder(tmp_path / "eval" / "samples" / "finetuned")) == n_samples
    recorded = json.loads((tmp_path / "eval" / "run_config.json").read_text())
    assert recorded["regions"] is False and recorded["sampler"] == "euler_ancestral"  # the model's own
    assert EvalConfig(concept_run).regions is True  # the toy model draws a column a concept


def test_eval_draws_two_object_prompts_in_the_regions_ratios_ask(
    run_cli, tiny_pipeline_dir, concept_run, tmp_path
):
    args = ("--model", tiny_pipeline_dir, "--n", 2, "--steps", 2, "--regions")
    samples = {}
    for ratios in ((), ("--region-ratios", "1,1"), ("--region-ratios", "3,1")):
        out = tmp_path / "-".join(ratios)
        code, _, err = run_cli("eval", concept_run, *args, *ratios, "-o", out)
        assert code == 0, err
        samples[ratios[1:]] = files.read_image_folder(out / "samples" / "finetuned")
    default, equal, wide = samples[()], samples[("1,1",)], samples[("3,1",)]
    for (_, image, caption), (_, same, _), (_, other, _) in zip(default, equal, wide, strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(same))
        split = " and a " in caption and "<new1>" in caption  # drawn by region
        assert np.array_equal(np.asarray(image), np.asarray(other)) != split, caption
    code, _, err = run_cli("eval", concept_run, *args, "--region-ratios", "1,1,1", "-o", tmp_path / "x")
    assert code == 2 and "gives 3 regions" in err and len(err.strip().splitlines()) == 1


def test_eval_concept_scale_0_draws_class_prompts_as_the_base_model(
    run_cli, tiny_pipeline_dir, concept_run, tmp_path
):
    args = ("--model", tiny_pipeline_dir, "--n", 2, "--steps", 2, "--concept-scale", "0")
    code, _, err = run_cli("eval", concept_run, *args, "-o", tmp_path)
    assert code == 0, err
    base = files.read_image_folder(tmp_path / "samples" / "base")
    tuned_class = files.read_image_folder(tmp_path / "samples" / "finetuned")[-len(base) :]  # after concept's
    assert len(base) == 8 and [caption for *_, caption in tuned_class] == [caption for *_, caption in base]
    assert all(
        np.array_equal(np.asarray(a[1]), np.asarray(b[1])) for a, b in zip(base, tuned_class, strict=True)
    )
    with pytest.raises(CustomDiffError, match="--concept-scale inf"):
        EvalConfig(concept_run, concept_scale=float("inf"))


def test_eval_bad_input_is_one_line(run_cli, tiny_pipeline_dir, concept_run, tmp_path):
    code, _, err = run_cli("eval", tmp_path / "nothing.safetensors", "--model", tiny_pipeline_dir)
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("eval", concept_run, "--images", tmp_path / "none", "--model", tiny_pipeline_dir)
    assert code == 2 and "--images DIR" in err
    with pytest.raises(Exception, match="--n"):
        EvalConfig(concept_run, n=1)


def test_judge_scores_read_the_concept_and_its_context():
    starfish = toyworld.get_concept("starfish")
    rng = np.random.default_rng(0)
    prompts = list(evaluate.toy_prompts(("<new1>",), ("star",)).concept)
    renders = [toyworld.render(toyworld.parse_caption(p), rng, {"<new1>": starfish}) for p in prompts]
    signatures = {"<new1>": toyjudge.builtin_signature("starfish")}
    scores = evaluate.judge_concept_prompts(renders, prompts, signatures)
    assert set(scores.values()) == {100} and len(scores) == 6  # 3 shares × (new context, composed)
    plain = [toyworld.render(toyworld.parse_caption(p.replace("<new1>", "red")), rng) for p in prompts[:6]]
    plain_scores = evaluate.judge_concept_prompts(plain, prompts[:6], signatures)
    assert plain_scores["judge_new_context_concept_present"] == 0
    assert plain_scores["judge_new_context_context_right"] == 100


def test_two_concept_prompts_are_judged_as_their_own_kind():
    concepts = {"<new1>": toyworld.get_concept("starfish"), "<new2>": toyworld.get_concept("donut")}
    prompts = evaluate.toy_prompts(("<new1>", "<new2>"), ("star", "ring"))
    two = [p for p in prompts.concept if "<new1>" in p and "<new2>" in p]
    assert len(two) == len(toyworld.BACKGROUNDS) and all(evaluate.is_toy_caption(p) for p in prompts.concept)
    assert "a red ring on a gray background" in prompts.classes
    rng = np.random.default_rng(0)
    renders = [toyworld.render(toyworld.parse_caption(p), rng, concepts) for p in two]
    signatures = {token: toyjudge.builtin_signature(c.name) for token, c in concepts.items()}
    scores = evaluate.judge_concept_prompts(renders, two, signatures)
    assert scores == {
        f"judge_two_concepts_{name}": 100 for name in ("concept_present", "context_right", "all_right")
    }
    swapped = [
        toyworld.render(
            toyworld.parse_caption(p),
            rng,
            {"<new1>": concepts["<new1>"], "<new2>": toyworld.get_concept("tile")},
        )
        for p in two[:2]
    ]
    assert (
        evaluate.judge_concept_prompts(swapped, two[:2], signatures)["judge_two_concepts_concept_present"]
        == 0
    )


def test_a_joint_concepts_prompts_are_judged_per_concept_too():
    concepts = {"<new1>": toyworld.get_concept("starfish"), "<new2>": toyworld.get_concept("donut")}
    prompts = list(evaluate.toy_prompts(("<new1>", "<new2>"), ("star", "ring")).concept)
    rng = np.random.default_rng(0)
    renders = [  # the donut drawn as a plain ring: only the starfish present
        toyworld.render(toyworld.parse_caption(p.replace("<new2>", "red")), rng, concepts) for p in prompts
    ]
    signatures = {token: toyjudge.builtin_signature(c.name) for token, c in concepts.items()}
    scores = evaluate.judge_concept_prompts(renders, prompts, signatures)
    assert scores["<new1>/judge_new_context_concept_present"] == 100
    assert scores["<new2>/judge_new_context_concept_present"] == 0
    assert scores["judge_new_context_concept_present"] == 50  # as many prompts each
    assert scores["<new2>/judge_composed_context_right"] == 100
    assert not any(key.startswith("<new") and "two_concepts" in key for key in scores)
    one = [p for p in prompts if "<new2>" not in p]
    assert evaluate.named_alone(one, ("<new1>", "<new2>")) == {}  # one concept's prompts: no split
    rows = evaluate.report_rows("run", scores)
    assert list(rows) == ["run", "run <new1>", "run <new2>"]
    assert rows["run <new2>"]["judge_new_context_concept_present"] == 0
    assert "judge_two_concepts_concept_present" in rows["run"]
    table = evaluate.markdown_table(rows)
    assert "| run <new2> |" in table and "/" not in table.splitlines()[0]


def test_training_folders_are_read_from_single_joint_and_merged_concepts(tmp_path):
    def made(config: dict, tokens: tuple[str, ...]) -> concept.Concept:
        return concept.Concept("abc", "crossattn_kv", tokens, ("star",) * len(tokens), ("ktn",) * len(tokens),
                               torch.zeros(len(tokens), 4), {}, config=config)  # fmt: skip

    single = made({"images": "a", "class_word": "star"}, ("<new1>",))
    joint = made({"concept": ["b:star", "c:ring"]}, ("<new1>", "<new2>"))
    merged = made({"merged_from": [single.config, {"images": "d", "class_word": "ring", "token": "<new2>"}]},
                  ("<new1>", "<new2>"))  # fmt: skip
    assert evaluate.training_folders(single) == [Path("a")]
    assert evaluate.training_folders(joint) == [Path("b"), Path("c")]
    assert evaluate.training_folders(merged) == [Path("a"), Path("d")]
    assert evaluate.training_folders(made({}, ("<new1>",))) == []
