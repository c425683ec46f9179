"""Export the three hita graphs to ONNX, check them against their specs and against eager PyTorch.

``export_onnx(gpt, tokenizer, out_dir)`` writes ``decoder.onnx``, ``prefill.onnx``,
``decode_step.onnx`` and the manifest into ``out_dir`` through the shared driver
(:mod:`~hita.export.driver`: validation, versions, atomic folder). The ONNX backend:

1. traces the :mod:`~hita.export.graphs` wrapper with ``torch.onnx.export(dynamo=True)`` at the
   spec's example batch (2: torch.export specialises size-1 axes);
2. reads the file back and checks input/output names, dtypes and symbolic axes against the spec
   (:class:`SignatureError`);
3. loads it in ONNX Runtime (CPU) for the driver's comparison with eager PyTorch, and checks that
   binding one buffer as both past and present cache gives bit-identical results.

Why the dynamo exporter (measured on the tiny preset, torch 2.13, onnxruntime 1.32 CPU): the
TorchScript ("legacy") exporter is deprecated (a warning on every call) and its ``prefill.onnx``
declares the static cache dims of ``present.*`` as unnamed symbols (``ScatterElements..._dim_1``), so it
fails the signature check; its decode graph is correct but has 2.2x the nodes (827 vs 376) and runs
no faster (1.65 vs 1.38 ms per step, batch 3, 1 thread). Dynamo keeps the axis name ``batch`` and
every static size. Its cost is export time (~10-25 s per tiny graph on 2 busy cores vs ~2 s), which
is paid once per export. There is no silent fallback: an export that fails says so.

Weights are stored inside each ``.onnx`` file when the model is below 2 GB (protobuf's hard limit
for one message); larger models (GPT-XL and up in fp32) get ONNX external data, one
``<graph>.onnx.data`` file next to each graph, listed and hashed in the manifest like the graphs.
``prefill.onnx`` and ``decode_step.onnx`` each hold their own copy of the GPT weights.

``attention="gqa"`` exports the decode step for ONNX Runtime with its contrib
``GroupQueryAttention`` (in-place, prefix-only attention) and only the output-head half a step needs
(:mod:`~hita.export.gqa`); the default ``"plain"`` graph uses standard ONNX ops only, for every runtime.
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from hita.util.log import Log, first_line, quiet

from .driver import Backend, Runner, export_artifacts, validate_graph
from .errors import ExportError, ParityError, SignatureError
from .gqa import ATTENTIONS, GqaDecodeStepGraph, check_gqa_export, check_gqa_step, inplace_runner, translation_table
from .graphs import SpecGraph
from .kv_write import TENSORSCATTER_OPSET, to_tensorscatter
from .ort_binding import bind_inplace
from .spec import DECODE_STEP, ExportSpec, GraphSignature, TensorSpec, dtype_name

if TYPE_CHECKING:
    from hita.models.gpt import HitaGPT
    from hita.models.tokenizer import HitaTokenizer

__all__ = [
    "OnnxBackend",
    "export_onnx",
    "validate_onnx",
    "verify_inplace_kv",
    "onnx_signature",
    "ONNX_DTYPES",
    "KV_WRITES",
    "ATTENTIONS",
    "EXTERNAL_DATA_BYTES",
    "SignatureError",
    "ParityError",
]

KV_WRITES = ("scatter", "tensorscatter")

# ONNX TensorProto element types -> spec dtype names.
ONNX_DTYPES: dict[int, str] = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool"}

# Protobuf refuses messages of 2 GiB or more; keep a margin for the graph itself.
EXTERNAL_DATA_BYTES = 2**31 - 2**26


def onnx_signature(path: str | Path) -> GraphSignature:
    """Read the declared inputs/outputs of an ONNX file (weights are not loaded).

    Unnamed dynamic dims read as ``"?"``; unknown element types read as ``"onnx:<int>"`` so that a
    comparison fails with a readable message.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(v: Any) -> TensorSpec:
        tt = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim)
        return TensorSpec(v.name, ONNX_DTYPES.get(tt.elem_type, f"onnx:{tt.elem_type}"), dims)

    return GraphSignature(tuple(spec(v) for v in model.graph.input), tuple(spec(v) for v in model.graph.output))


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _session(path: Path, spec: ExportSpec):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # e.g. NOT_IMPLEMENTED: no bfloat16 kernel for some op on CPU
        dtype = spec.outputs[0].dtype
        raise ExportError(
            f"{spec.file_name}: ONNX Runtime's CPU provider cannot run this {dtype} graph "
            f"({first_line(e)[:300] or type(e).__name__}); export with validate=False (`--skip-validation`) "
            f"and check it with a provider that has {dtype} kernels (`hita parity` on a GPU)"
        ) from None


def _check_inplace_kv(sess, spec: ExportSpec, feed: dict[str, torch.Tensor], positions: list[int]) -> bool:
    """True when binding one OrtValue as both ``past_key_values.i`` and ``present.i`` gives the
    same logits and caches, bit for bit, as separate buffers, over consecutive steps.

    ONNX Runtime does not document whether a bound input may alias a bound output; for this graph
    the only write is a ScatterElements into the cache and every other read of the cache sees
    either the old or the new slot, which hold equal values after the write. This checks the kernels
    do what that argument assumes.
    """
    past = spec.input_names[2:]
    np_feed = {k: v.cpu().numpy() for k, v in feed.items()}
    ref_feed, ref_steps = dict(np_feed), []
    for p in positions:
        ref_feed["position"] = np.array([p], dtype=np.int64)
        outs = sess.run(None, ref_feed)
        ref_steps.append(outs)
        ref_feed.update(zip(past, outs[1:]))
    binding, position, logits, caches = bind_inplace(
        sess, spec, dict(np_feed, position=np.array([positions[0]], dtype=np.int64)), ref_steps[0][0].dtype)
    for p, ref in zip(positions, ref_steps):
        position.update_inplace(np.array([p], dtype=np.int64))
        sess.run_with_iobinding(binding)
        if not np.array_equal(logits.numpy(), ref[0]):
            return False
        if not all(np.array_equal(c.numpy(), r) for c, r in zip(caches, ref[1:])):
            return False
    return True


class OnnxBackend(Backend):
    """ONNX through ``torch.onnx.export(dynamo=True)``, validated in ONNX Runtime (CPU).

    Args:
        opset: ONNX opset, 18..23 (17 yields an invalid model with the dynamo exporter).
        external_data: force (True) or forbid (False) ONNX external data; ``None`` decides by size.
        verbose: let the exporter print its own progress, warnings and logs.
        kv_write: how the decode step writes its cache: ``"scatter"`` (``ScatterElements``, any
            opset, what ONNX Runtime runs fastest) or ``"tensorscatter"`` (ONNX ``TensorScatter``,
            opset 24: TensorRT's in-place KV-cache update; see :mod:`~hita.export.kv_write`).
        attention: the decode step's attention: ``"plain"`` (standard ONNX, any runtime) or ``"gqa"``
            (ONNX Runtime's ``GroupQueryAttention`` writing the cache itself, plus the needed head
            half; see :mod:`~hita.export.gqa`). ``"gqa"`` replaces ``kv_write``, which must stay
            ``"scatter"``.
    """

    engine = "onnx"

    def __init__(self, opset: int = 18, external_data: bool | None = None, verbose: bool = False,
                 kv_write: str = "scatter", attention: str = "plain"):
        if not 18 <= opset <= 23:
            raise ValueError(f"opset must be in 18..23 (the dynamo exporter emits an invalid model at 17), got {opset}")
        if kv_write not in KV_WRITES:
            raise ValueError(f"kv_write must be one of {KV_WRITES}, got {kv_write!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if attention == "gqa" and kv_write != "scatter":
            raise ValueError(f"--attention gqa writes the cache inside GroupQueryAttention; drop --kv-write {kv_write} "
                             "(TensorScatter is for TensorRT, which needs --attention plain)")
        self.opset, self.external_data, self.verbose, self.kv_write = opset, external_data, verbose, kv_write
        self.attention = attention
        self._wrote_external = False

    def _gqa(self, spec: ExportSpec) -> bool:
        return self.attention == "gqa" and spec.name == DECODE_STEP

    def graph(self, name: str, gpt: "HitaGPT", tokenizer: "HitaTokenizer", pos128: str) -> SpecGraph:
        if self.attention == "gqa" and name == DECODE_STEP:
            return GqaDecodeStepGraph(gpt, pos128).eval()
        return super().graph(name, gpt, tokenizer, pos128)

    def write(self, graph: SpecGraph, spec: ExportSpec, folder: Path, device: torch.device) -> dict[str, Any]:
        path = folder / spec.file_name
        use_ext = self.external_data if self.external_data is not None else _param_bytes(graph) >= EXTERNAL_DATA_BYTES
        feed = spec.example_inputs(spec.sizes("example"), device=device)
        # No upper bound: ONNX Runtime has none; the TensorRT profile range lives in the spec.
        dims = {d.name: torch.export.Dim(d.name, min=1) for d in spec.dims}
        with quiet(self.verbose, "torch.onnx") as captured, torch.no_grad():
            try:
                torch.onnx.export(
                    graph, graph.args(feed, spec), str(path), input_names=spec.input_names,
                    output_names=spec.output_names, dynamic_shapes=graph.dynamic_shapes(spec, dims),
                    opset_version=spec.opset, dynamo=True, external_data=use_ext,
                    custom_translation_table=translation_table() if self._gqa(spec) else None,
                )
            except Exception as e:
                raise ExportError(
                    f"{spec.file_name}: torch.onnx.export(dynamo=True) failed: {type(e).__name__}: {first_line(e)}\n"
                    + captured.getvalue()[-4000:]
                ) from e
        spec.signature.check(
            onnx_signature(path), spec.file_name, spec.description,
            "the exporter renamed or re-typed a tensor; report it",
        )
        self._wrote_external |= use_ext
        if self._gqa(spec):
            return {"opset": spec.opset, "kv_write": "gqa", "attention": "gqa"}
        if spec.name == "decode_step" and self.kv_write == "tensorscatter":
            to_tensorscatter(path, (len(spec.inputs) - 2) // 2)
            return {"opset": TENSORSCATTER_OPSET, "kv_write": "tensorscatter"}
        return {"opset": spec.opset, "kv_write": "scatter" if spec.name == "decode_step" else None}

    def load(self, path: Path, spec: ExportSpec, device: torch.device) -> Runner:
        sess = _session(path, spec)
        if self._gqa(spec):
            return inplace_runner(sess, spec)

        def run(feed: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
            outs = sess.run(None, {k: v.cpu().numpy() for k, v in feed.items()})
            return [torch.from_numpy(np.asarray(o)) for o in outs]

        return run

    def extra_checks(self, path: Path, spec: ExportSpec, feed: dict[str, torch.Tensor], gpt_cfg) -> dict[str, Any]:
        if spec.name != "decode_step":
            return {}
        nh = gpt_cfg.n_holistic
        if self._gqa(spec):
            return check_gqa_step(_session(path, spec), spec, feed, [nh - 1, nh, nh + 1])
        return {"kv_inplace_verified": _check_inplace_kv(_session(path, spec), spec, feed, [nh - 1, nh, nh + 1])}

    def versions(self) -> dict[str, str]:
        out = {"opset": str(self.opset)}
        for dist in ("onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu"):
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
        return out

    def options(self, report: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "exporter": "torch.onnx.export(dynamo=True)",
            "external_data": self._wrote_external,
            "kv_write": "gqa" if self.attention == "gqa" else self.kv_write,
            "attention": self.attention,
            "kv_inplace_verified": bool(report.get("decode_step", {}).get("kv_inplace_verified", False)),
        }


def verify_inplace_kv(path: str | Path, spec: ExportSpec, gpt_cfg) -> bool:
    """Whether one buffer bound as both past and present cache gives bit-identical results for the
    decode-step graph at ``path`` (as the exporter checks its own graphs), at the spec's check batch
    over the steps around the position-128 rule. For graphs rewritten after export (quantized
    ones), whose runtimes bind the cache the same way."""
    feed = spec.example_inputs(spec.sizes("check"), seed=1, device=torch.device("cpu"))
    nh = gpt_cfg.n_holistic
    return _check_inplace_kv(_session(Path(path), spec), spec, feed, [nh - 1, nh, nh + 1])


def validate_onnx(path: str | Path, graph: SpecGraph, spec: ExportSpec, gpt_cfg) -> dict[str, Any]:
    """Check one ``.onnx`` file against its eager wrapper as the exporter does (ONNX Runtime CPU).

    Raises:
        ParityError: an output differs beyond the spec's tolerance.
    """
    runner = OnnxBackend(opset=spec.opset).load(Path(path), spec, torch.device("cpu"))
    return validate_graph(runner, spec.file_name, graph, spec, gpt_cfg, torch.device("cpu"))[0]


def export_onnx(
    gpt: "HitaGPT",
    tokenizer: "HitaTokenizer",
    out_dir: str | Path,
    *,
    opset: int = 18,
    pos128: str = "reference",
    dtype: torch.dtype | str = torch.float32,
    validate: bool = True,
    progress: bool | Log = True,
    max_batch: int = 16,
    external_data: bool | None = None,
    verbose: bool = False,
    checkpoints: Mapping[str, str | Path | None] | None = None,
    kv_write: str = "scatter",
    row_positions: bool = False,
    attention: str = "plain",
) -> Path:
    """Export decoder, prefill and decode-step ONNX graphs plus a manifest into ``out_dir``.

    The GPT is cast to ``dtype`` and both models are put in eval mode **in place**; the tokenizer
    stays float32. ONNX Runtime's CPU provider lacks half-precision kernels for parts of the graph,
    so validate half-precision exports on a GPU provider or pass ``validate=False``. See
    :func:`~hita.export.driver.export_artifacts` for the arguments shared by every engine;
    ``opset``, ``external_data``, ``verbose``, ``kv_write`` and ``attention`` are :class:`OnnxBackend`'s;
    ``row_positions`` gives the decode step one position per row (see :func:`~hita.export.spec.decode_spec`).

    Raises:
        SignatureError, ParityError, ExportError, ArtifactError, ValueError: as the driver.
    """
    backend = OnnxBackend(opset=opset, external_data=external_data, verbose=verbose, kv_write=kv_write,
                          attention=attention)
    if attention == "gqa":
        check_gqa_export(gpt.cfg, dtype_name(dtype))
    return export_artifacts(
        backend, gpt, tokenizer, out_dir, device="cpu", pos128=pos128, dtype=dtype, validate=validate,
        progress=progress, max_batch=max_batch, checkpoints=checkpoints,
        spec_options={"opset": opset, "row_positions": row_positions},
    )
