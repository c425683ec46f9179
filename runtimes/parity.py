"""Parity of a runtime against eager PyTorch, through the one decode loop.

Three checks, each with a metric suited to its output type (style rule 9):

1. **Teacher-forced logits.** Both executors are fed the same token sequence (the reference's own
   tokens from a seeded run) and every step's raw logits are compared: max abs diff over all
   ``n_holistic + n_patch`` steps (569 for the released layout).
2. **Free-running tokens.** Both executors generate with the same options and the same shared noise
   stream; report the fraction of tokens that agree and the first step where they part. With equal
   logits the draws are equal, so anything below 1.0 in fp32 is a bug (a near-tie can flip one token
   only when logits differ by more than rounding).
3. **Decoded pixels.** Both decoders turn the *same* tokens into images; report PSNR (dB, on the
   [-1, 1] range, peak-to-peak 2) and the max abs pixel diff.

For quantized graphs a max logit difference says little (every logit moves a bit), so the
teacher-forced comparison also reports the distributions' agreement: the mean and worst per-step
KL(fp32 || candidate) of the softmax and the top-1 agreement; and the free-running images (each
runtime decoding its own tokens) get their own PSNR. Quantized recipes judge by those
(:class:`ParityThresholds` ``max_mean_kl`` / ``min_top1_agreement``; ``max_logit_diff=None``).

Results are a frozen dataclass that serialises to JSON, so runs can be saved and compared offline.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from hita.util.metrics import psnr
from hita.export.errors import ParityError
from hita.runtimes.executor import StepExecutor
from hita.runtimes.loop import generate_tokens, teacher_forced
from hita.runtimes.sampling import SamplingOptions


@dataclass(frozen=True)
class ParityThresholds:
    """Pass/fail limits.

    fp32 defaults: ONNX Runtime / AOTInductor reorder float32 reductions (matmul blocking, fused
    softmax), which moves logits by ~1e-6 relative per op; through a few dozen layers and a 16k-way
    head that compounds to ~1e-5 absolute, so 1e-4 leaves a 10x margin while a wrong op (a swapped
    table, a missed RoPE row) shows up as >= 1e-2. bf16 engines need ~5e-2.

    ``None`` turns a check off. Quantized recipes (``hita.calibration.recipes``) set
    ``max_logit_diff=None`` and judge by ``max_mean_kl`` (mean over steps of the per-step
    KL(fp32 || candidate), nats) and ``min_top1_agreement`` instead.
    """

    max_logit_diff: float | None = 1e-4
    min_token_agreement: float = 1.0
    min_psnr_db: float = 60.0
    max_mean_kl: float | None = None
    min_top1_agreement: float | None = None

    def __post_init__(self) -> None:
        # Checked up front: a NaN limit would run the whole comparison and then fail every check.
        import math

        for name, lo, hi in (("max_logit_diff", 0.0, math.inf), ("min_token_agreement", 0.0, 1.0),
                             ("min_psnr_db", 0.0, 1000.0), ("max_mean_kl", 0.0, math.inf),
                             ("min_top1_agreement", 0.0, 1.0)):
            value = getattr(self, name)
            if value is None and name in ("max_logit_diff", "max_mean_kl", "min_top1_agreement"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not lo <= value <= hi:
                flag = {"min_psnr_db": "--min-psnr", "min_top1_agreement": "--min-top1"}.get(
                    name, "--" + name.replace("_", "-"))
                raise ValueError(f"{flag} must be a finite number in [{lo:g}, {hi:g}], got {value!r}")


@dataclass(frozen=True)
class ParityReport:
    reference: str
    candidate: str
    steps: int
    max_logit_diff: float
    mean_logit_diff: float
    worst_step: int
    token_agreement: float
    first_token_mismatch: int | None
    psnr_db: float
    max_pixel_diff: float
    thresholds: ParityThresholds = field(default_factory=ParityThresholds)
    mean_kl: float = 0.0
    max_step_kl: float = 0.0
    top1_agreement: float = 1.0
    free_run_psnr_db: float = math.inf

    @property
    def failures(self) -> list[str]:
        t, out = self.thresholds, []
        if t.max_logit_diff is not None and not self.max_logit_diff <= t.max_logit_diff:
            out.append(f"teacher-forced logits differ by {self.max_logit_diff:.3g} (step {self.worst_step}) > {t.max_logit_diff:g}")
        if t.max_mean_kl is not None and not self.mean_kl <= t.max_mean_kl:
            out.append(f"teacher-forced mean per-step KL {self.mean_kl:.3g} > {t.max_mean_kl:g}")
        if t.min_top1_agreement is not None and not self.top1_agreement >= t.min_top1_agreement:
            out.append(f"teacher-forced top-1 agreement {self.top1_agreement:.4f} < {t.min_top1_agreement:g}")
        if self.token_agreement < t.min_token_agreement:
            out.append(f"free-running tokens agree {self.token_agreement:.4f} < {t.min_token_agreement:g} (first mismatch at step {self.first_token_mismatch})")
        if not self.psnr_db >= t.min_psnr_db:
            out.append(f"decoded-image PSNR {self.psnr_db:.1f} dB < {t.min_psnr_db:g} dB")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok, "failures": self.failures}, indent=2)

    def summary(self) -> str:
        psnr = "inf" if math.isinf(self.psnr_db) else f"{self.psnr_db:.1f}"
        dist = ""
        if self.thresholds.max_mean_kl is not None or self.thresholds.min_top1_agreement is not None:
            dist = f", mean KL {self.mean_kl:.2e}, top-1 agree {100 * self.top1_agreement:.2f}%"
        return (
            f"{self.candidate} vs {self.reference}: teacher-forced max |dlogit| {self.max_logit_diff:.2e} "
            f"over {self.steps} steps (mean {self.mean_logit_diff:.1e}{dist}); free-running tokens agree "
            f"{100 * self.token_agreement:.2f}%; decoded PSNR {psnr} dB (max |dpixel| {self.max_pixel_diff:.1e}) "
            f"-> {'PASS' if self.ok else 'FAIL'}"
        )


class RuntimeParityError(ParityError):
    """A runtime's generation differs from eager; the message lists each failed check with its
    figure and threshold. The CLI exits 3 (not 2: the input was fine, the runtime is not)."""

    exit_code = 3


def check_parity(
    reference: StepExecutor,
    candidate: StepExecutor,
    class_ids: Sequence[int],
    opts: SamplingOptions,
    thresholds: ParityThresholds | None = None,
    progress: bool = False,
) -> ParityReport:
    """Compare ``candidate`` with ``reference`` (eager) on logits, tokens and pixels.

    Args:
        class_ids: the images to run (n rows; CFG doubles them inside the loop).
        opts: sampling options for the free-running comparison (seed included).
    Returns:
        A :class:`ParityReport`; call ``.failures`` / ``.ok`` or :func:`assert_parity`.
    """
    return compare_runs(reference, candidate, class_ids, opts, thresholds, progress)[0]


def step_kl(ref_logits: torch.Tensor, cand_logits: torch.Tensor) -> torch.Tensor:
    """Per-step KL(softmax(ref) || softmax(cand)) in nats, averaged over rows: ``[n, T, V]`` -> ``[T]``.

    Computed in float64 from log-softmax, so a near-zero KL is not rounding noise.
    """
    ref = torch.log_softmax(ref_logits.double(), dim=-1)
    cand = torch.log_softmax(cand_logits.double(), dim=-1)
    return (ref.exp() * (ref - cand)).sum(-1).clamp_min(0).mean(0)       # [T]


def compare_runs(
    reference: StepExecutor,
    candidate: StepExecutor,
    class_ids: Sequence[int],
    opts: SamplingOptions,
    thresholds: ParityThresholds | None = None,
    progress: bool = False,
) -> tuple[ParityReport, torch.Tensor, torch.Tensor]:
    """:func:`check_parity`, also returning the free-running images of both runtimes (each decoding
    its own tokens), float32 CPU ``[n, 3, H, W]``: what a side-by-side grid shows."""
    ids = torch.as_tensor(list(class_ids), dtype=torch.long)
    ref_run = generate_tokens(reference, ids, opts, progress=progress)
    cand_run = generate_tokens(candidate, ids, opts, progress=progress)
    # 1. teacher-forced on the reference's own tokens.
    ref_logits = teacher_forced(reference, ids, ref_run.holistic_ids, ref_run.patch_ids).float()
    cand_logits = teacher_forced(candidate, ids, ref_run.holistic_ids, ref_run.patch_ids).float()
    diff = (ref_logits - cand_logits).abs()                      # [n, T, V]
    per_step = diff.amax(dim=(0, 2))                             # [T]
    kl = step_kl(ref_logits, cand_logits)                        # [T]
    top1 = (ref_logits.argmax(-1) == cand_logits.argmax(-1)).float().mean()
    # 2. free-running agreement.
    same = ref_run.tokens == cand_run.tokens                     # [n, T]
    mism = (~same).any(dim=0).nonzero()
    # 3. pixels from the same tokens, and each runtime's own free-running images.
    ref_img = reference.decode_image(ref_run.holistic_ids, ref_run.patch_ids).float().cpu()
    cand_img = candidate.decode_image(ref_run.holistic_ids, ref_run.patch_ids).float().cpu()
    cand_free = cand_img if bool(same.all()) else \
        candidate.decode_image(cand_run.holistic_ids, cand_run.patch_ids).float().cpu()
    report = ParityReport(
        reference=reference.name,
        candidate=candidate.name,
        steps=int(per_step.numel()),
        max_logit_diff=float(per_step.max()),
        mean_logit_diff=float(diff.mean()),
        worst_step=int(per_step.argmax()),
        token_agreement=float(same.float().mean()),
        first_token_mismatch=int(mism[0]) if mism.numel() else None,
        psnr_db=psnr(ref_img, cand_img),
        max_pixel_diff=float((ref_img - cand_img).abs().max()),
        thresholds=thresholds or ParityThresholds(),
        mean_kl=float(kl.mean()),
        max_step_kl=float(kl.max()),
        top1_agreement=float(top1),
        free_run_psnr_db=psnr(ref_img, cand_free),
    )
    return report, ref_img, cand_free


def assert_parity(report: ParityReport) -> None:
    if not report.ok:
        raise RuntimeParityError(f"{report.candidate} does not match {report.reference}: " + "; ".join(report.failures))
