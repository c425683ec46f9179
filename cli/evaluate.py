"""`hita evaluate tokenizer|generation|train-classifier`: measure image quality (thin commands over hita.jobs.evaluate)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from hita.cli.common import (
    CFG_SCALE_OPT, SEED_OPT, TEMPERATURE_OPT, TOP_K_OPT, TOP_P_OPT, progress_enabled, user_errors,
)
from hita.cli.generate import ART_OPT, GPT_OPT, PIN_OPT, TOK_OPT
from hita.runtimes.factory import ARTIFACT_RUNTIMES, Runtime

evaluate_app = typer.Typer(no_args_is_help=True, help="Measure tokenizers and generated images (codebooks, PSNR/SSIM, FID, IS, precision/recall).")

DATA_OPT = Annotated[str, typer.Option("--data", help="'fashion-mnist' (Debian's dataset-fashion-mnist) or a folder of its IDX files.")]


class FeatureSpace(str, Enum):
    classifier = "classifier"
    inception = "inception"


class Split(str, Enum):
    train = "train"
    test = "test"


@user_errors
def tokenizer_cmd(
    tokenizer: TOK_OPT = None,
    data: DATA_OPT = "fashion-mnist",
    split: Annotated[Split, typer.Option(help="Data split to encode.")] = Split.test,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N images.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 250,
    backbone: Annotated[Optional[Path], typer.Option(help="Local DINOv2 weights (presets with a backbone).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON (and .md).")] = None,
) -> None:
    """Codebook usage and perplexity (holistic and patch), reconstruction PSNR/SSIM, holistic influence."""
    from hita.jobs.evaluate import evaluate_tokenizer_job, write_report

    if tokenizer is None:
        from hita.assets import default_model

        tokenizer = default_model().tokenizer
    report = evaluate_tokenizer_job(tokenizer, data, split.value, limit, batch_size, backbone, progress_enabled())
    md = report.markdown(f"{Path(tokenizer).name} on {data} {split.value}")
    if json_out is not None:
        write_report({"tokenizer": str(tokenizer), "data": data, "split": split.value, **report.to_dict()}, json_out, md)
    typer.echo(md)


@user_errors
def generation_cmd(
    out: Annotated[Path, typer.Option("--out", help="Run folder: shards/, report.json, report.md, grid.png. Re-run to resume.")] = Path("out/eval-generation"),
    runtime: Annotated[Runtime, typer.Option(help="Step executor.")] = Runtime.torch,
    gpt: GPT_OPT = None,
    tokenizer: TOK_OPT = None,
    artifacts: ART_OPT = None,
    expect_manifest_sha256: PIN_OPT = None,
    per_class: Annotated[int, typer.Option(min=1, max=1_000_000, help="Images per class (classes 0..K-1, interleaved).")] = 100,
    features: Annotated[FeatureSpace, typer.Option(help="Feature space of FID/IS/precision/recall.")] = FeatureSpace.classifier,
    classifier: Annotated[Optional[Path], typer.Option(help="Classifier weights (default: the shipped one).")] = None,
    inception_weights: Annotated[Optional[Path], typer.Option(help="pt_inception-2015-12-05-6726825d.pth (for --features inception).")] = None,
    reference: Annotated[str, typer.Option(help="'fashion-mnist' (its test split) or an ADM-style .npz reference batch.")] = "fashion-mnist",
    floor: Annotated[bool, typer.Option(help="Also score real training images against the reference (the floor).")] = True,
    cfg_scale: CFG_SCALE_OPT = 1.5,
    temperature: TEMPERATURE_OPT = 1.0,
    top_k: TOP_K_OPT = 0,
    top_p: TOP_P_OPT = 1.0,
    seed: SEED_OPT = 0,
    resize: Annotated[Optional[int], typer.Option(min=8, max=4096, help="Resize generated images (e.g. 256 for ADM batches).")] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="Images per shard file (the unit of resuming).")] = 500,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per generation batch.")] = 100,
    restart: Annotated[bool, typer.Option("--restart", help="Discard the shards already in --out.")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Generate per-class images through any runtime and score them: FID, IS, precision/recall, class accuracy."""
    from hita.jobs.evaluate import build_extractor, evaluate_generation_job
    from hita.jobs.generate import check_output_dir
    from hita.jobs.sources import resolve_checkpoints
    from hita.runtimes.factory import check_device, make_executor
    from hita.runtimes.sampling import SamplingOptions
    from hita.util.files import file_sha256

    opts = SamplingOptions(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    check_device(device)
    check_output_dir(out, kind="evaluate-generation")
    if features is FeatureSpace.inception and classifier is not None:
        raise ValueError("--classifier applies to --features classifier; drop it or pick the classifier space")
    extractor = build_extractor(features.value, classifier, inception_weights)   # missing weights fail here, first
    names = None
    if runtime in ARTIFACT_RUNTIMES:
        if gpt is not None or tokenizer is not None:
            raise ValueError(f"--runtime {runtime.value} runs --artifacts; --gpt/--tokenizer are for the torch runtime")
        if artifacts is None:
            raise ValueError(f"the {runtime.value} runtime needs --artifacts DIR (made by `hita export`)")
        ex = make_executor(runtime, artifacts=artifacts, device=device, expect_manifest_sha256=expect_manifest_sha256)
        model_id = {"manifest_sha256": file_sha256(Path(artifacts) / "manifest.json")}
    else:
        if artifacts is not None:
            raise ValueError("--artifacts runs with an artifact runtime (--runtime onnxruntime, aoti or tensorrt)")
        gpt, tokenizer, names = resolve_checkpoints(gpt, tokenizer)
        ex = make_executor(runtime, gpt=gpt, tokenizer=tokenizer, device=device)
        model_id = {"gpt_sha256": file_sha256(gpt), "tokenizer_sha256": file_sha256(tokenizer)}
    if names is None and ex.gpt_config.num_classes == 10:
        from hita.data.fashion_mnist import CLASSES

        names = CLASSES
    report = evaluate_generation_job(ex, extractor, opts, out, per_class=per_class, reference=reference, floor=floor,
                                     shard_size=shard_size, batch_size=batch_size, resize=resize, restart=restart,
                                     model_id=model_id, class_names=names, progress=progress_enabled())
    from hita.jobs.evaluate import generation_markdown

    typer.echo(generation_markdown(report, names))
    typer.echo(f"report: {out / 'report.json'} ({report['seconds']:.0f}s)")


@user_errors
def train_classifier_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output .safetensors file.")],
    data: DATA_OPT = "fashion-mnist",
    epochs: Annotated[float, typer.Option(min=0.001, help="Passes over the training split.")] = 3.0,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N training images.")] = None,
    test_limit: Annotated[Optional[int], typer.Option(min=1, help="Measure on the first N test images only.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of weights, order and flips.")] = 0,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch CPU threads.")] = None,
) -> None:
    """Train the Fashion-MNIST classifier (the recipe of the shipped one) and report its test accuracy."""
    import torch

    from hita.eval.train_classifier import ClassifierRecipe
    from hita.jobs.evaluate import train_classifier_job

    if out.exists() and out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a file such as {out / 'classifier.safetensors'}")
    if threads is not None:
        torch.set_num_threads(threads)
    res = train_classifier_job(data, out, ClassifierRecipe(epochs=epochs, limit=limit, seed=seed),
                               log=lambda s: typer.echo(s, err=True), test_limit=test_limit)
    typer.echo(f"test accuracy {100 * res['test_accuracy']:.2f} % -> {res['path']}")


def register(app: typer.Typer) -> None:
    evaluate_app.command("tokenizer")(tokenizer_cmd)
    evaluate_app.command("generation")(generation_cmd)
    evaluate_app.command("train-classifier")(train_classifier_cmd)
    app.add_typer(evaluate_app, name="evaluate")
