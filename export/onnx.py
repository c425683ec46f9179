"""Export the three hita graphs to ONNX, check them against their specs and against eager PyTorch.

``export_onnx(gpt, tokenizer, out_dir)`` writes ``decoder.onnx``, ``prefill.onnx``,
``decode_step.onnx`` and ``manifest.json`` into ``out_dir`` (atomically, see
:mod:`~hita.export.manifest`). For each graph it:

1. traces the :mod:`~hita.export.graphs` wrapper with ``torch.onnx.export(dynamo=True)`` at the
   spec's example batch (2: torch.export specialises size-1 axes);
2. reads the file back and checks input/output names, dtypes and symbolic axes against the spec
   (:class:`SignatureError`);
3. runs it in ONNX Runtime (CPU) at another batch (3) and compares every output with eager PyTorch
   (:class:`ParityError` with the max abs diff and the tolerance). The decode step is checked at
   positions on both sides of every branch point (``1, Nh-1, Nh, Nh+1, seq_len-1``), and binding one
   buffer as both past and present cache is checked to give bit-identical results.

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
"""
from __future__ import annotations

import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from hita.config import check_pair

from .common import Log, check_pos128, decode_positions, first_line, logger, manifest_for, psnr, quiet, validation_line
from .errors import ExportError, ParityError, SignatureError
from .graphs import SpecGraph, build_graph
from .manifest import staging_dir, write_artifacts
from .spec import (
    DECODE_STEP,
    DECODER,
    DTYPES,
    GRAPH_NAMES,
    PREFILL,
    ExportSpec,
    GraphSignature,
    TensorSpec,
    dtype_name,
    graph_specs,
)

if TYPE_CHECKING:
    from hita.models.gpt import HitaGPT
    from hita.models.tokenizer import HitaTokenizer

__all__ = [
    "export_onnx",
    "validate_graph",
    "onnx_signature",
    "ONNX_DTYPES",
    "EXTERNAL_DATA_BYTES",
    "SignatureError",
    "ParityError",
]

# ONNX TensorProto element types -> spec dtype names.
ONNX_DTYPES: dict[int, str] = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool"}

# Protobuf refuses messages of 2 GiB or more; keep a margin for the graph itself.
EXTERNAL_DATA_BYTES = 2**31 - 2**26


# ----------------------------------------------------------------------------------------------
# Signature of an ONNX file
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Export one graph
# ----------------------------------------------------------------------------------------------


def _export_graph(graph: SpecGraph, spec: ExportSpec, path: Path, *, external_data: bool, verbose: bool) -> None:
    """Trace ``graph`` at the spec's example sizes and write ``path`` (plus external data)."""
    feed = spec.example_inputs(spec.sizes("example"), device=_device_of(graph))
    args = graph.args(feed, spec)
    # No upper bound: ONNX Runtime has none; the TensorRT profile range lives in the spec.
    dims = {d.name: torch.export.Dim(d.name, min=1) for d in spec.dims}
    with quiet(verbose, "torch.onnx") as captured, torch.no_grad():
        try:
            torch.onnx.export(
                graph, args, str(path), input_names=spec.input_names, output_names=spec.output_names,
                dynamic_shapes=graph.dynamic_shapes(spec, dims), opset_version=spec.opset,
                dynamo=True, external_data=external_data,
            )
        except Exception as e:
            raise ExportError(
                f"{spec.file_name}: torch.onnx.export(dynamo=True) failed: {type(e).__name__}: {first_line(e)}\n"
                + captured.getvalue()[-4000:]
            ) from e


def _device_of(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# Validation against eager
# ----------------------------------------------------------------------------------------------


def _compare(spec: ExportSpec, name: str, got: np.ndarray, ref: torch.Tensor, where: str) -> float:
    """Max abs diff of one output; :class:`ParityError` when outside ``atol + rtol * |ref|``."""
    want = ref.detach().float().cpu().numpy()
    got = np.asarray(got, dtype=np.float32)
    if got.shape != want.shape:
        raise ParityError(
            f"{spec.file_name}: output {name} has shape {list(got.shape)}{where}; eager gives {list(want.shape)}"
        )
    diff = np.abs(got - want)
    worst = float(diff.max()) if diff.size else 0.0
    if not np.all(diff <= spec.atol + spec.rtol * np.abs(want)):
        raise ParityError(
            f"{spec.file_name}: output {name} differs from eager PyTorch{where}: max |diff| {worst:.3g} > "
            f"tolerance atol {spec.atol:g} + rtol {spec.rtol:g} x |eager|; the export is wrong "
            "(report it with the model preset and this message)"
        )
    return worst


def _run_and_compare(
    sess, graph: SpecGraph, spec: ExportSpec, feed: dict[str, torch.Tensor], where: str
) -> tuple[float, list]:
    """One ORT run vs one eager run on ``feed``; returns (max diff over outputs, ORT outputs)."""
    with torch.no_grad():
        ref = graph(*graph.args(feed, spec))
    ref = ref if isinstance(ref, tuple) else (ref,)
    outs = sess.run(None, {k: v.cpu().numpy() for k, v in feed.items()})
    worst = max(_compare(spec, n, o, r, where) for n, o, r in zip(spec.output_names, outs, ref))
    return worst, outs


def _check_inplace_kv(sess, spec: ExportSpec, feed: dict[str, torch.Tensor], positions: list[int]) -> bool:
    """True when binding one OrtValue as both ``past_key_values.i`` and ``present.i`` gives the
    same logits and caches, bit for bit, as separate buffers, over consecutive steps.

    ONNX Runtime does not document whether a bound input may alias a bound output; for this graph
    the only write is a ScatterElements into the cache and every other read of the cache sees
    either the old or the new slot, which hold equal values after the write. This checks the kernels
    do what that argument assumes.
    """
    import onnxruntime as ort

    past, present = spec.input_names[2:], spec.output_names[1:]
    np_feed = {k: v.cpu().numpy() for k, v in feed.items()}
    ref_feed, ref_steps = dict(np_feed), []
    for p in positions:
        ref_feed["position"] = np.array([p], dtype=np.int64)
        outs = sess.run(None, ref_feed)
        ref_steps.append(outs)
        ref_feed.update(zip(past, outs[1:]))
    binding = sess.io_binding()
    caches = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(np_feed[n]).copy()) for n in past]
    token = ort.OrtValue.ortvalue_from_numpy(np_feed["token"])
    position = ort.OrtValue.ortvalue_from_numpy(np.array([positions[0]], dtype=np.int64))
    logits = ort.OrtValue.ortvalue_from_numpy(np.zeros_like(ref_steps[0][0]))
    binding.bind_ortvalue_input("token", token)
    binding.bind_ortvalue_input("position", position)
    binding.bind_ortvalue_output(spec.output_names[0], logits)
    for i, o, c in zip(past, present, caches):
        binding.bind_ortvalue_input(i, c)
        binding.bind_ortvalue_output(o, c)
    for p, ref in zip(positions, ref_steps):
        position.update_inplace(np.array([p], dtype=np.int64))
        sess.run_with_iobinding(binding)
        if not np.array_equal(logits.numpy(), ref[0]):
            return False
        if not all(np.array_equal(c.numpy(), r) for c, r in zip(caches, ref[1:])):
            return False
    return True


def validate_graph(path: str | Path, graph: SpecGraph, spec: ExportSpec, gpt_cfg) -> dict[str, Any]:
    """Run an exported graph in ONNX Runtime (CPU) against its eager wrapper at the spec's check sizes.

    Inputs are seeded random (ids in range, caches standard normal); the prefill batch ends with
    the CFG null class; the decode step runs at every position of :func:`~hita.export.common.decode_positions` and
    then checks in-place KV binding.

    Args:
        path: the ``.onnx`` file.
        graph: the eager wrapper it was exported from (:func:`~hita.export.graphs.build_graph`).
        spec: its spec.
        gpt_cfg: the GPT config (positions, null class).
    Returns:
        A report: ``batch``, ``max_abs_diff`` (over all outputs and positions), ``psnr_db`` for the
        decoder, ``positions`` and ``kv_inplace_verified`` for the decode step.
    Raises:
        ParityError: an output differs beyond ``spec.atol + spec.rtol * |eager|``.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # e.g. NOT_IMPLEMENTED: no bfloat16 kernel for some op on CPU
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        dtype = spec.outputs[0].dtype
        raise ExportError(
            f"{spec.file_name}: ONNX Runtime's CPU provider cannot run this {dtype} graph ({first}); "
            "export with validate=False (`--skip-validation`) and check it with a provider that has "
            f"{dtype} kernels (`hita parity` on a GPU)"
        ) from None
    sizes = spec.sizes("check")
    feed = spec.example_inputs(sizes, seed=1, device=_device_of(graph))
    report: dict[str, Any] = {"batch": sizes["batch"]}
    if spec.name == PREFILL:
        feed["class_ids"][-1] = gpt_cfg.null_class  # the CFG null row must work too
    if spec.name != DECODE_STEP:
        report["max_abs_diff"], outs = _run_and_compare(sess, graph, spec, feed, f" at batch {sizes['batch']}")
        if spec.name == DECODER:
            report["psnr_db"] = psnr(torch.from_numpy(outs[0]), graph(*graph.args(feed, spec)))
        return report
    positions = decode_positions(gpt_cfg)
    worst = 0.0
    for p in positions:
        feed["position"] = torch.tensor([p], dtype=torch.int64, device=feed["position"].device)
        diff, _ = _run_and_compare(sess, graph, spec, feed, f" at batch {sizes['batch']}, position {p}")
        worst = max(worst, diff)
    report.update(max_abs_diff=worst, positions=positions)
    nh = gpt_cfg.n_holistic
    report["kv_inplace_verified"] = _check_inplace_kv(sess, spec, feed, [nh - 1, nh, nh + 1])
    return report


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def _versions(opset: int) -> dict[str, str]:
    out = {"torch": torch.__version__, "opset": str(opset)}
    for dist in ("hita", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


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
) -> Path:
    """Export decoder, prefill and decode-step graphs plus a manifest into ``out_dir``.

    The GPT is cast to ``dtype`` and both models are put in eval mode **in place** (as
    :class:`~hita.runtimes.torch_eager.TorchExecutor` does); the tokenizer stays float32.

    Args:
        gpt: the GPT (``HitaGPT``).
        tokenizer: the tokenizer (``HitaTokenizer``); must fit the GPT (``check_pair``).
        out_dir: artifacts folder; replaced atomically if it already holds an artifacts folder.
        opset: ONNX opset, 18..23 (17 yields an invalid model with the dynamo exporter).
        pos128: ``"reference"`` or ``"consistent"``, the embedding rule at position n_holistic
            baked into ``decode_step.onnx`` (spec 8.1).
        dtype: GPT hidden / KV-cache / logits dtype (``torch.float32``, ``float16``, ``bfloat16``).
            ONNX Runtime's CPU provider lacks half-precision kernels for parts of the graph, so
            validate half-precision exports on a GPU provider or pass ``validate=False``.
        validate: check every graph against eager PyTorch (ONNX Runtime CPU) before writing.
        progress: print one line per graph to stderr, or a callable that takes each line.
        max_batch: largest batch (CFG rows included) recorded for engines that need a profile.
        external_data: force (True) or forbid (False) ONNX external data; ``None`` decides by size
            (external when the weights reach :data:`EXTERNAL_DATA_BYTES`).
        checkpoints: ``{"gpt": path, "tokenizer": path}`` of the source checkpoints, hashed into the
            manifest.
        verbose: let the exporter print its own progress, warnings and logs.
    Returns:
        ``out_dir`` as a ``Path``.
    Raises:
        SignatureError: a written graph's I/O differs from its spec.
        ParityError: a graph's outputs differ from eager beyond the spec's tolerance.
        ExportError: the exporter failed.
        ValueError: bad arguments (unknown pos128 or dtype, opset out of range, models that do
            not fit together).
    """
    check_pos128(pos128)
    if not 18 <= opset <= 23:
        raise ValueError(f"opset must be in 18..23 (the dynamo exporter emits an invalid model at 17), got {opset}")
    dt = dtype_name(dtype)
    check_pair(tokenizer.cfg, gpt.cfg)
    log = logger(progress)
    gpt = gpt.to(dtype=DTYPES[dt]).eval()
    tokenizer = tokenizer.float().eval()
    specs = graph_specs(tokenizer.cfg, gpt.cfg, dtype=dt, opset=opset, max_batch=max_batch)
    out = Path(out_dir)
    report: dict[str, Any] = {}
    graphs: dict[str, dict[str, Any]] = {}
    with staging_dir(out) as work:
        for i, name in enumerate(GRAPH_NAMES, 1):
            spec = specs[name]
            graph = build_graph(name, gpt, tokenizer, pos128)
            use_ext = external_data if external_data is not None else _param_bytes(graph) >= EXTERNAL_DATA_BYTES
            gdir = work / name
            gdir.mkdir()
            path = gdir / spec.file_name
            t0 = time.perf_counter()
            _export_graph(graph, spec, path, external_data=use_ext, verbose=verbose)
            seconds = time.perf_counter() - t0
            spec.signature.check(
                onnx_signature(path), spec.file_name, spec.description,
                "the exporter renamed or re-typed a tensor; report it",
            )
            size = sum(f.stat().st_size for f in gdir.iterdir())
            entry: dict[str, Any] = {"export_seconds": round(seconds, 2), "bytes": size}
            line = f"[{i}/3] {spec.file_name}: exported in {seconds:.1f} s ({size / 2**20:.1f} MiB)"
            if validate:
                t1 = time.perf_counter()
                entry.update(validate_graph(path, graph, spec, gpt.cfg))
                entry["validate_seconds"] = round(time.perf_counter() - t1, 2)
                line += validation_line(entry, spec)
            log(line)
            report[name] = entry
            graphs[name] = {"file": spec.file_name, "opset": opset, **spec.signature.to_dict()}
        files = {f.name: f for name in GRAPH_NAMES for f in sorted((work / name).iterdir())}
        manifest = manifest_for(
            "onnx", gpt, tokenizer, checkpoints,
            pos128=pos128,
            precision=dt,
            device="cpu",
            versions=_versions(opset),
            graphs=graphs,
            options={
                "exporter": "torch.onnx.export(dynamo=True)",
                "external_data": any(f.endswith(".data") for f in files),
                "validated": validate,
                "kv_inplace_verified": bool(report.get(DECODE_STEP, {}).get("kv_inplace_verified", False)),
                "max_batch": max_batch,
                "validation": report,
            },
        )
        write_artifacts(out, files, manifest)
    log(f"wrote {out} ({len(files)} files + manifest.json)")
    return out
