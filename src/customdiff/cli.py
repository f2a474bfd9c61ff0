"""The ``customdiff`` command: argparse over the dataclasses of ``config.py``, one small handler each.

The only place that catches CustomDiffError: it prints one line and exits 2. Any other exception is a
bug and keeps its traceback.
"""

import argparse
import contextlib
import dataclasses
import os
import shlex
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from customdiff import __version__, files, toyworld
from customdiff.config import (
    CompressConfig,
    DemoConfig,
    EvalConfig,
    ExportConfig,
    FinetuneConfig,
    GenerateConfig,
    ImportConfig,
    InfoConfig,
    JudgeConfig,
    MergeConfig,
    PretrainConfig,
    ToyConceptConfig,
    ToyConceptsConfig,
    ToyRenderConfig,
    add_arguments,
    config_from_args,
    save_config,
)
from customdiff.demo import NEXT_STEP, run_demo
from customdiff.errors import CustomDiffError


def toyworld_render(config: ToyRenderConfig) -> None:
    files.prepare_output_dir(config.out)  # fail before the progress bar starts
    scenes = toyworld.sample_scenes(config.n, config.seed, config.n_objects)
    progress = tqdm(scenes, total=config.n, desc="render", unit="img", disable=None)
    count = files.write_image_folder(config.out, progress)
    save_config(config, config.out)
    print(f"wrote {count} images and {files.METADATA_FILE_NAME} to {config.out}")


def toyworld_concept(config: ToyConceptConfig) -> None:
    concept = toyworld.get_concept(config.name)
    views = toyworld.concept_scenes(concept, config.n, config.token, config.seed)
    count = files.write_image_folder(config.out, views)
    save_config(config, config.out)
    print(f"wrote {count} images of {concept.name} ({config.token} {concept.shape}) to {config.out}")


def toyworld_concepts(config: ToyConceptsConfig) -> None:
    width = max(map(len, toyworld.CONCEPTS))
    for concept in toyworld.CONCEPTS.values():
        print(f"{concept.name:<{width}}  {concept.shape:<8}  {concept.description}")


def judge(config: JudgeConfig) -> None:
    images = [files.open_image(path) for path in config.images]  # a bad path fails before any work
    from customdiff import toyjudge

    signatures = {}
    for token, value in config.concepts.items():
        if value in toyworld.CONCEPTS:
            signatures[token] = toyjudge.builtin_signature(value)
        elif Path(value).is_dir():
            signatures[token] = toyjudge.concept_signature(
                [image for _, image, _ in files.read_image_folder(value)]
            )
        else:
            raise CustomDiffError(
                f'--concept {token}={value}: "{value}" is neither a folder nor a built-in concept; '
                f"built-in concepts: {', '.join(toyworld.CONCEPTS)}"
            )
    for path, image in zip(config.images, images, strict=True):
        reading = toyjudge.read_image(image)
        print(f"{path}: {toyjudge.describe(reading)}")
        if config.prompt is not None:
            score = toyjudge.score(reading, config.prompt, signatures or None)
            checks = "  ".join(f"{'✓' if right else '✗'} {check}" for check, right in score.checks.items())
            print(f"  {checks}  → {score.fraction:.0%} right")


def pretrain(config: PretrainConfig) -> None:
    from customdiff.pretrain import pretrain as run_pretrain

    files.prepare_output_dir(config.out)
    model = run_pretrain(config)
    log = config.out / "log.jsonl"
    if config.stage in ("vae", "clip"):
        print(f"{config.stage} in {config.out / 'stages' / config.stage}; log in {log}")
    else:
        print(f"toy base model in {model}; previews in {config.out / 'previews'}; log in {log}")


def generate(config: GenerateConfig) -> None:
    from customdiff import generate as sampling
    from customdiff import models, regions

    prompts = list(config.prompt) if config.prompt else sampling.read_prompts(config.prompts)
    layout = regions.parse_layout(config.region_ratios)
    files.prepare_output_dir(config.out)
    pipe = models.load_pipeline(config.model, model_config=config.model_config)
    config = dataclasses.replace(config, sampler=models.use_sampler(pipe, config.sampler))  # recorded
    applied = None
    if config.concept:
        from customdiff.concept import apply_concept

        applied = apply_concept(pipe, _concept_to_apply(pipe, config), config.concept_scale)
    images = sampling.sample(
        pipe, prompts, config.n, config.steps, config.guidance, config.seed, config.batch_size,
        negative_prompts=[config.negative_prompt] * len(prompts), regions=config.regions, concept=applied,
        layout=layout,
    )  # fmt: skip
    sampling.write_samples(config.out, prompts, images, config.n)
    save_config(config, config.out)
    count = f"{len(images)} image" + ("s" if len(images) != 1 else "")
    print(f"wrote {count}, grid.png and metadata.jsonl to {config.out}")


def _concept_to_apply(pipe, config: GenerateConfig):
    """``generate``'s one concept, or its several merged in memory as ``customdiff merge`` would."""
    if len(config.concept) == 1:
        return config.concept[0]
    from customdiff import merge as merging

    merge_config = MergeConfig(config.concept, rename_tokens=config.rename_tokens)
    merged, _, renamed = merging.merge_files(pipe, merge_config)
    for line in renamed:
        print(line)
    saved = " ".join(shlex.quote(str(path)) for path in config.concept)
    print(
        f"merged {len(config.concept)} concepts in memory (tokens {' '.join(merged.tokens)}); "
        f"customdiff merge {saved}{' --rename-tokens' * config.rename_tokens} saves it in {merge_config.out}"
    )
    return merged


def train(config: FinetuneConfig) -> None:
    from customdiff import finetune
    from customdiff.concept import load_concept

    path = finetune.train(config)
    if config.trains_apart_first:
        print(f"trained each concept alone first, in {config.out / 'apart'}, then all from their merge")
    print(f"wrote {path}, its diffusers files and run_config.json to {path.parent}")
    if config.save_every:
        print(f"kept the concept every {config.save_every} steps on the way in {path.parent}/step-N")
    print(next_generate(load_concept(path).captions[0], path, config))


def next_generate(caption: str, path: Path, config: FinetuneConfig | ImportConfig) -> str:
    """The command that draws a concept just written to ``path``, on the model ``config`` names."""
    model = (("--model", config.model), ("--model-config", config.model_config))
    base = "".join(f" {flag} {shlex.quote(str(value))}" for flag, value in model if value is not None)
    return f"next: customdiff generate {shlex.quote(caption)} --concept {shlex.quote(str(path.parent))}{base}"


def evaluate(config: EvalConfig) -> None:
    from customdiff import evaluate as evaluation

    metrics = evaluation.run_eval(config)
    print(evaluation.markdown_table(evaluation.report_rows(config.concept.name, metrics)), end="")
    print(f"wrote eval.json, eval.md and the samples to {config.out}")


def compress(config: CompressConfig) -> None:
    from customdiff import compress as compression
    from customdiff import concept

    original = concept.load_concept(config.concept)
    cut_folder, refine = config.out, None
    if config.refine_steps:  # a run that cannot start fails before the cut
        from customdiff import finetune

        cut_folder = config.out / "cut"
        refine = compression.refine_config(config, original, cut_folder)
        finetune.read_checkpoint(config.out / finetune.CHECKPOINT_FILE, refine)
    weighting = None  # the plain cut, or a concept with no K/V delta: no model to load
    if not config.plain and any(concept.reads_text(name) for name in original.deltas):
        weighting = compression.load_fit_weighting(original, config.model, config.model_config)
    compressed = compression.compress_concept(original, config.rank, config.energy, weighting)
    path = concept.save_concept(cut_folder, compressed)
    save_config(config, cut_folder)
    before = concept.concept_file(config.concept).stat().st_size / 2**20
    after = path.stat().st_size / 2**20
    line = f"wrote {path}: {after:.2f} MB (from {before:.2f} MB)"
    ranks = sorted(up.shape[1] for up, _ in compressed.factors.values())
    if ranks:  # a token concept has no delta to cut
        line += f", ranks {ranks[0]}–{ranks[-1]}"
    if ranks and weighting is not None:
        plain = compression.compress_concept(original, config.rank, config.energy)
        miss, plain_miss = (compression.output_error(original, cut, weighting) for cut in (compressed, plain))
        line += f"; the K/V outputs miss the full delta's change by {miss:.1%} (--plain: {plain_miss:.1%})"
        if miss > compression.LARGE_MISS:
            line += "\n  misses this large cost concepts half their samples (README): try --energy 0.9"
    print(line)
    if refine is not None:
        path = finetune.train(refine)
        size = path.stat().st_size / 2**20
        print(f"refined the cut {config.refine_steps} steps at its ranks: wrote {path}, {size:.2f} MB")


def merge(config: MergeConfig) -> None:
    from customdiff import merge as merging

    path, merged, report, renamed = merging.run_merge(config)
    for line in renamed:
        print(line)
    residual = {
        "constrained": "largest constraint residual",
        "weighted": "output error on the concepts' captions and contexts",
    }
    print(
        f"wrote {path}: tokens {' '.join(merged.tokens)}; {residual[config.method]} {report.residual:.2e} "
        f"(naive addition {report.naive_residual:.2e}); change on the regularization captions "
        f"{report.objective:.4g} (naive addition {report.naive_objective:.4g})"
    )


def info(config: InfoConfig) -> None:
    from customdiff import concept, models

    concepts = {concept.concept_file(path): concept.load_concept(path) for path in config.concepts}
    model_hash = models.model_hash(models.load_pipeline(config.model, model_config=config.model_config))
    for path, loaded in concepts.items():
        print(f"{path} ({path.stat().st_size / 2**20:.2f} MB)")
        for line in concept.describe(loaded, model_hash, str(config.model or "the toy model")):
            print(f"  {line}")


def export(config: ExportConfig) -> None:
    from customdiff.export import run_export

    for path in run_export(config):
        print(f"wrote {path}")


def import_concept(config: ImportConfig) -> None:
    from customdiff.importing import run_import

    path, imported = run_import(config)
    named = zip(imported.tokens, imported.class_words, strict=True)
    words = ", ".join(f"{token} {word}" for token, word in named)
    print(f"wrote {path}: a {imported.mode} concept of {words}, {len(imported.deltas)} UNet deltas")
    print(next_generate(imported.captions[0], path, config))


def demo(config: DemoConfig) -> None:
    for path, what in run_demo(config):
        print(f"wrote {path}: {what}")
    print(NEXT_STEP)


def _add_command(commands, name: str, config_class: type, handler: Callable) -> None:
    summary = config_class.__doc__.splitlines()[0]
    parser = commands.add_parser(name, help=summary, description=summary)
    add_arguments(parser, config_class)
    parser.set_defaults(command=(config_class, handler))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="customdiff",
        description="Custom Diffusion (Kumari et al., CVPR 2023): teach a diffusion model new concepts.",
    )
    parser.add_argument("--version", action="version", version=f"customdiff {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    toyworld_help = "Make toy-world images; list the built-in concepts."
    toyworld_parser = commands.add_parser("toyworld", help=toyworld_help, description=toyworld_help)
    toyworld_commands = toyworld_parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_command(toyworld_commands, "render", ToyRenderConfig, toyworld_render)
    _add_command(toyworld_commands, "concept", ToyConceptConfig, toyworld_concept)
    _add_command(toyworld_commands, "concepts", ToyConceptsConfig, toyworld_concepts)
    _add_command(commands, "judge", JudgeConfig, judge)
    _add_command(commands, "pretrain", PretrainConfig, pretrain)
    _add_command(commands, "generate", GenerateConfig, generate)
    _add_command(commands, "train", FinetuneConfig, train)
    _add_command(commands, "eval", EvalConfig, evaluate)
    _add_command(commands, "merge", MergeConfig, merge)
    _add_command(commands, "compress", CompressConfig, compress)
    _add_command(commands, "export", ExportConfig, export)
    _add_command(commands, "import", ImportConfig, import_concept)
    _add_command(commands, "info", InfoConfig, info)
    _add_command(commands, "demo", DemoConfig, demo)
    return parser


PACKAGE_DIR = Path(__file__).parent
python_warning_format = warnings.formatwarning


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """customdiff's own warnings as one line, as its errors are (not Python's two, with a source line)."""
    if Path(filename).is_relative_to(PACKAGE_DIR):
        return f"customdiff: warning: {' '.join(str(message).splitlines())}\n"
    return python_warning_format(message, category, filename, lineno, line)


def launch_processes(count: int, argv: list[str]) -> int:
    """Run this command in ``count`` processes of one torch.distributed group, as torchrun would; returns
    the failed process's exit status (the others are stopped: they would wait for it), else 0.

    Not ``accelerate launch``: without mpirun its ``--cpu`` starts one process, and its multi-GPU path puts
    CPU processes in no group. Only the first process writes to the terminal (progress, errors); the others'
    output is shown only when one of them alone fails.
    """
    import signal
    import socket
    import subprocess
    import tempfile
    import time

    import torch

    with socket.socket() as probe:  # a free port for the group's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    group = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(count)}
    group |= {"LOCAL_WORLD_SIZE": str(count), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // count))}
    if not torch.cuda.is_available():
        group["ACCELERATE_USE_CPU"] = "true"  # accelerate's gloo group of CPU processes
    elif count > torch.cuda.device_count():
        gpus = torch.cuda.device_count()
        raise CustomDiffError(f"--num-processes {count}: this machine has {gpus} GPUs; pass at most {gpus}")
    command = [sys.executable, "-m", "customdiff", *argv]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # stop the processes too
    with contextlib.ExitStack() as stack:
        logs = [None] + [stack.enter_context(tempfile.TemporaryFile()) for _ in range(count - 1)]
        processes = [
            subprocess.Popen(
                command,
                env={**os.environ, **group, "RANK": str(i), "LOCAL_RANK": str(i)},
                stdout=subprocess.DEVNULL if i else None,  # what it would say, the first says
                stderr=logs[i],
            )
            for i in range(count)
        ]
        try:
            while (codes := [process.poll() for process in processes]).count(None) and not any(codes):
                time.sleep(0.2)  # until all have ended or one has failed
            with contextlib.suppress(subprocess.TimeoutExpired):  # the first may be failing at the same time
                processes[0].wait(timeout=2)
            codes = [process.poll() for process in processes]  # None: waits for the failed one
        finally:
            for process in processes:
                if process.poll() is None:
                    process.terminate()
                process.wait()
        first = next((rank for rank, code in enumerate(codes) if code), None)  # rank 0's if it failed
        if first is None:
            return 0
        if first > 0:
            logs[first].seek(0)
            sys.stderr.write(logs[first].read().decode(errors="replace"))
        return codes[first] if codes[first] > 0 else 1  # negative: killed by a signal


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0, 2 for a problem the user can fix, 130 on Ctrl-C, 141 when
    the reader of the output has gone, as with ``| head``)."""
    # transformers warns on import that torchvision is missing, which customdiff never needs
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.formatwarning = one_line_warning
    new_out: list[Path] = []
    try:
        args = build_parser().parse_args(argv)
        config_class, handler = args.command
        config = config_from_args(config_class, args)
        if getattr(config, "num_processes", 1) > 1 and "WORLD_SIZE" not in os.environ:
            return launch_processes(config.num_processes, sys.argv[1:] if argv is None else argv)
        out = getattr(config, "out", None)
        if out is not None:  # the folders running it may make, the output's first
            new_out = [path for path in (Path(out), *Path(out).parents) if not path.exists()]
        handler(config)
    except CustomDiffError as error:
        print(f"customdiff: error: {' '.join(str(error).splitlines())}", file=sys.stderr)
        for folder in new_out:  # a refused command leaves no empty folder it made behind
            if not folder.is_dir() or any(folder.iterdir()):
                break
            with contextlib.suppress(OSError):  # another process of a launch may have removed it
                folder.rmdir()
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stop quietly, as other tools do; what is left to flush goes nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0
