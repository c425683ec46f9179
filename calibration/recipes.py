"""Quantization recipes: what each ``--precision`` does to the graphs, and what accuracy it owes.

One frozen :class:`Recipe` per precision, in :data:`RECIPES` keyed by the CLI's name. A recipe is
the single source for how graphs are quantized (:mod:`~hita.calibration.quantize`), whether the
result is for TensorRT, how many images its calibrator needs, and the parity thresholds that
``hita parity`` and ``hita calibrate --report`` apply to it.

Which tool: ONNX Runtime's quantizers (``onnxruntime.quantization``) for every recipe. They ship
inside the ``onnxruntime`` wheel the ONNX path already depends on, so CI (``.[test]``) runs every
recipe with no new dependency; they emit plain ONNX ``QuantizeLinear``/``DequantizeLinear`` with
symmetric scales (zero points 0, which TensorRT's parser requires and
:mod:`hita.export.trt_support` checks) and, for weight-only, the ``MatMulNBits`` kernels that make
ONNX Runtime fast on CPUs. nvidia-modelopt's ONNX PTQ would place Q/DQ the way TensorRT fuses best
and adds SmoothQuant/AWQ, but it is a ~1.4 GB install whose ``[onnx]`` extra replaces the CPU
onnxruntime, and nothing here can build a TensorRT engine to show the difference. A recipe that
needs it can be added beside these without changing the artifacts format.

What is quantized: the linear layers (``MatMul`` with a constant weight, the output head included)
of the prefill and decode step; for static recipes also the decoder's linear layers, and for
``int8`` its convolutions. Attention over the KV cache, norms, RoPE and the cache itself stay
float32 (:mod:`~hita.calibration.graph_passes` says why), so the cache binding and the manifest's
I/O signatures do not change and the runtimes load the folders unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hita.runtimes.parity import ParityThresholds

__all__ = ["Recipe", "RECIPES", "recipe", "MIN_IMAGES"]

# Images a calibration set must hold per calibrator. MinMax keeps the extreme value of each tensor,
# which a few sequences already pin (every decode position of every row is a sample). Histogram
# calibrators (entropy, percentile, distribution) fit a 2048-bin histogram per tensor and choose a
# clipping point in its tail; below ~4 sequences the tail is a handful of values and the choice is
# noise.
MIN_IMAGES = {"minmax": 2, "max": 2, "entropy": 4, "percentile": 4, "distribution": 4}


@dataclass(frozen=True)
class Recipe:
    """How one quantized precision is made and judged.

    Fields:
        name: CLI name (``--precision``).
        method: ``"weight-only"`` (``MatMulNBits``) or ``"qdq"`` (static Q/DQ, calibrated).
        dtype: stored weight type (``"int8"``, ``"int4"``, ``"float8e4m3fn"``).
        bits: weight bits.
        graphs: graphs the recipe quantizes (the others are copied unchanged).
        calibrator: default activation calibrator (static recipes); ``calibrators`` the allowed ones.
        per_channel: per-output-channel weight scales (int8) or one per tensor (fp8).
        quantize_convs: also quantize the decoder's convolutions.
        block_size, accuracy_level: ``MatMulNBits`` blocking and compute mode (weight-only). Level 4
            quantizes each activation block to int8 on the fly and uses integer dot products: on an
            AVX2 CPU (GPT-B, 2 rows) the default level (dequantize to fp32) made the 8-bit graph
            6x *slower* than fp32, level 4 made it ~1.55x faster at the same block size.
        min_opset: the opset the quantized graph needs (float8 Q/DQ: 19).
        tensorrt: whether the result is meant for TensorRT (checked against its ONNX support matrix).
        runtime_note: what runs the folder, recorded in the manifest.
        thresholds: parity thresholds against fp32 eager (see :data:`RECIPES` for the figures).
    """

    name: str
    method: str
    dtype: str
    bits: int
    graphs: tuple[str, ...]
    calibrator: str | None = None
    calibrators: tuple[str, ...] = ()
    per_channel: bool = True
    quantize_convs: bool = False
    block_size: int = 32
    accuracy_level: int | None = None
    min_opset: int = 18
    tensorrt: bool = True
    runtime_note: str = ""
    thresholds: ParityThresholds = field(default_factory=ParityThresholds)

    @property
    def needs_calibration(self) -> bool:
        return self.method == "qdq"

    def check_calibrator(self, calibrator: str | None) -> str | None:
        """The calibrator to use; ``ValueError`` for one the recipe does not allow."""
        if calibrator is None:
            return self.calibrator
        if not self.needs_calibration:
            raise ValueError(f"--calibrator applies to calibrated recipes (int8, fp8); {self.name} quantizes "
                             "weights only; drop it")
        if calibrator not in self.calibrators:
            raise ValueError(f"the {self.name} recipe calibrates with {', '.join(self.calibrators)}, not "
                             f"{calibrator!r}")
        return calibrator

    def min_images(self, calibrator: str | None) -> int:
        return MIN_IMAGES.get(calibrator or "", 0) if self.needs_calibration else 0


# Thresholds (teacher-forced over every step, against fp32 eager) were set from what the recipes
# measure on the embedded model (trained) and on the tiny random model (a stress case: structureless
# weights, flat distributions), with room for other seeds, and so that the next coarser recipe fails
# them; the figures are in the README section "Quantized exports".
#   int8-weight  KL 1.1e-4 / 7.4e-4, top-1 99.3% / 94-98% -> KL <= 2e-3, top-1 >= 90%  (int4 weights: 1e-2 / 0.11)
#   int4-weight  KL 9.9e-3 / 0.11,   top-1 93.8% / 67.3%  -> KL <= 3e-2, top-1 >= 88%  (trained weights only)
#   int8 minmax  KL 1.0e-2 / 3.1e-3, top-1 93.3% / 93.8%  -> KL <= 3e-2, top-1 >= 88%
#                decoder PSNR on the same tokens 42.5 / 35.3 dB -> >= 30 dB
#   fp8 max      KL 5.5e-2 / 3.9e-2, top-1 81.3% / 74.0%  -> KL <= 0.1,  top-1 >= 70%
#                decoder PSNR on the same tokens 44.6 / 34.7 dB -> >= 30 dB
# Free-running token agreement is not judged (threshold 0): sequences part at the first flipped
# near-tie and then differ everywhere, so agreement measures where the first flip lands, not error.
# Weight-only recipes leave the decoder in fp32, so its PSNR keeps the fp32 bound (60 dB).
_GPT = ("prefill", "decode_step")
_ALL = ("decoder", "prefill", "decode_step")

RECIPES: dict[str, Recipe] = {
    "int8-weight": Recipe(
        name="int8-weight", method="weight-only", dtype="int8", bits=8, graphs=_GPT, block_size=32,
        accuracy_level=4, tensorrt=False,
        runtime_note="ONNX Runtime only: MatMulNBits is an ONNX Runtime contrib op (com.microsoft) that "
                     "TensorRT cannot parse; export --precision int8 for TensorRT",
        thresholds=ParityThresholds(max_logit_diff=None, min_token_agreement=0.0, min_psnr_db=60.0,
                                    max_mean_kl=2e-3, min_top1_agreement=0.90),
    ),
    "int4-weight": Recipe(
        name="int4-weight", method="weight-only", dtype="int4", bits=4, graphs=_GPT, block_size=32,
        accuracy_level=4, tensorrt=False,
        runtime_note="ONNX Runtime only: MatMulNBits is an ONNX Runtime contrib op (com.microsoft) that "
                     "TensorRT cannot parse",
        thresholds=ParityThresholds(max_logit_diff=None, min_token_agreement=0.0, min_psnr_db=60.0,
                                    max_mean_kl=3e-2, min_top1_agreement=0.88),
    ),
    "int8": Recipe(
        name="int8", method="qdq", dtype="int8", bits=8, graphs=_ALL, calibrator="minmax",
        calibrators=("minmax", "entropy", "percentile"), per_channel=True, quantize_convs=True,
        runtime_note="TensorRT (explicit quantization, zero points 0); ONNX Runtime runs it correctly but on "
                     "x86 CPUs fuses only part of the signed-int8 Q/DQ matmuls and dequantizes the other "
                     "weights every step (slower than fp32; use int8-weight for CPU speed)",
        thresholds=ParityThresholds(max_logit_diff=None, min_token_agreement=0.0, min_psnr_db=30.0,
                                    max_mean_kl=3e-2, min_top1_agreement=0.88),
    ),
    "fp8": Recipe(
        name="fp8", method="qdq", dtype="float8e4m3fn", bits=8, graphs=_ALL, calibrator="max",
        calibrators=("max", "distribution"), per_channel=False, quantize_convs=False, min_opset=19,
        runtime_note="TensorRT on GPUs with FP8 (compute capability 8.9+); ONNX Runtime CPU runs it as a "
                     "simulation (Q/DQ in float, no FP8 matmul), slower than fp32",
        thresholds=ParityThresholds(max_logit_diff=None, min_token_agreement=0.0, min_psnr_db=30.0,
                                    max_mean_kl=1e-1, min_top1_agreement=0.70),
    ),
}


def recipe(name: str) -> Recipe:
    """A recipe by exact name.

    Raises:
        ValueError: unknown name (the message lists the recipes).
    """
    if name not in RECIPES:
        raise ValueError(f"unknown quantization recipe {name!r}; use one of {', '.join(RECIPES)}")
    return RECIPES[name]

