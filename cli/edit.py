"""`hita style-transfer` and `hita inpaint`: zero-shot edits through any runtime (thin commands over hita.jobs.edit)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from hita.cli.common import SEED_OPT, TEMPERATURE_OPT, TOP_K_OPT, user_errors
from hita.cli.generate import ART_OPT, GPT_OPT, PIN_OPT, TOK_OPT
from hita.runtimes.factory import Runtime

RUNTIME_OPT = Annotated[Runtime, typer.Option(help="Step executor (encoding always runs the PyTorch tokenizer).")]
DEVICE_OPT = Annotated[str, typer.Option(help="cpu or cuda.")]


class Holistic(str, Enum):
    encode = "encode"
    sample = "sample"


def _slots(spec: Optional[str]) -> Optional[list[int]]:
    if spec is None:
        return None
    try:
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"cannot read --slots {spec!r}; pass holistic slot numbers such as 0,1,2") from None


@user_errors
def style_transfer_cmd(
    content: Annotated[Path, typer.Option("--content", help="PNG whose layout (patch tokens) is kept.")],
    style: Annotated[Path, typer.Option("--style", help="PNG whose holistic tokens (global appearance) are taken.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: stylized.png, grid.png.")] = Path("out/style-transfer"),
    slots: Annotated[Optional[str], typer.Option(help="Only these holistic slots from the style, e.g. 0,1,2 (default all).")] = None,
    runtime: RUNTIME_OPT = Runtime.torch,
    gpt: GPT_OPT = None,
    tokenizer: TOK_OPT = None,
    artifacts: ART_OPT = None,
    expect_manifest_sha256: PIN_OPT = None,
    device: DEVICE_OPT = "cpu",
) -> None:
    """Zero-shot style transfer: the content's patch tokens with the style's holistic tokens."""
    from hita.jobs.edit import load_edit_models, style_transfer_job
    from hita.jobs.generate import check_output_dir

    picked = _slots(slots)
    check_output_dir(out, kind="style-transfer")
    models = load_edit_models(runtime, gpt=gpt, tokenizer=tokenizer, artifacts=artifacts, device=device,
                              expect_manifest_sha256=expect_manifest_sha256)
    paths, notes = style_transfer_job(models, content, style, out, picked)
    for n in notes:
        typer.echo(f"note: {n}", err=True)
    typer.echo(f"wrote {paths[0]} and {paths[-1]}")


@user_errors
def inpaint_cmd(
    image: Annotated[Path, typer.Option("--image", help="PNG to complete.")],
    mask: Annotated[Path, typer.Option("--mask", help="PNG of the image's size; white = region to fill.")],
    class_id: Annotated[Optional[int], typer.Option("--class", help="Class to condition on (default: unconditional).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder: inpainted_K.png, grid.png.")] = Path("out/inpaint"),
    samples: Annotated[int, typer.Option(min=1, max=64, help="How many different fills.")] = 4,
    holistic: Annotated[Holistic, typer.Option(
        help="sample (default): the GPT draws the holistic tokens too, so global appearance fits the fill; encode: "
             "keep those of the visible part (its hole filled grey, so fills come out grey where holistic tokens "
             "carry appearance).")] = Holistic.sample,
    cfg_scale: Annotated[float, typer.Option(help="Guidance scale (needs --class; 1 = off).")] = 1.0,
    temperature: TEMPERATURE_OPT = 1.0,
    top_k: TOP_K_OPT = 0,
    seed: SEED_OPT = 0,
    runtime: RUNTIME_OPT = Runtime.torch,
    gpt: GPT_OPT = None,
    tokenizer: TOK_OPT = None,
    artifacts: ART_OPT = None,
    expect_manifest_sha256: PIN_OPT = None,
    device: DEVICE_OPT = "cpu",
) -> None:
    """Zero-shot in-painting: keep the visible tokens, let the GPT draw the masked ones."""
    from hita.jobs.edit import inpaint_job, load_edit_models
    from hita.jobs.generate import check_output_dir
    from hita.runtimes.sampling import SamplingOptions

    opts = SamplingOptions(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, seed=seed)
    if class_id is None and opts.use_cfg:
        raise ValueError("guidance (--cfg-scale > 1) needs --class; pass a class or --cfg-scale 1")
    check_output_dir(out, kind="inpaint")
    models = load_edit_models(runtime, gpt=gpt, tokenizer=tokenizer, artifacts=artifacts, device=device,
                              expect_manifest_sha256=expect_manifest_sha256)
    paths, notes = inpaint_job(models, image, mask, out, class_id, opts, samples, holistic.value)
    for n in notes:
        typer.echo(f"note: {n}", err=True)
    typer.echo(f"wrote {samples} fills and {paths[-1]}")


def register(app: typer.Typer) -> None:
    app.command("style-transfer")(style_transfer_cmd)
    app.command("inpaint")(inpaint_cmd)
