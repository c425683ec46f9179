"""Export the three hita graphs as AOTInductor packages (``.pt2``), check them, write a manifest.

``export_aoti(gpt, tokenizer, out_dir)`` writes ``decoder.pt2``, ``prefill.pt2``,
``decode_step.pt2`` and ``manifest.json`` into ``out_dir`` (atomically, see
:mod:`~hita.export.manifest`). Each package is compiled C++ for one device kind and one torch
version: Python loads it with ``torch._inductor.aoti_load_package`` (:mod:`~hita.runtimes.aoti`),
C++ with ``torch::inductor::AOTIModelPackageLoader`` (``runtimes/cpp``). For each graph it:

1. traces the graph with ``torch.export.export`` at the spec's example batch (2) with a symbolic
   ``batch`` axis, and checks the traced inputs/outputs (dtypes, ranks, static sizes, batch still
   symbolic) against the spec (:class:`SignatureError`);
2. compiles and packages it with ``torch._inductor.aoti_compile_and_package``;
3. loads the package and compares it with eager PyTorch at another batch (3)
   (:class:`ParityError`), the decode step at positions on both sides of every branch point, then
   over consecutive steps to prove the in-place cache update.

The KV cache of ``decode_step.pt2`` is updated **in place**: the package takes the
``past_key_values.*`` tensors as inputs, writes slot ``position`` of each one, and returns only the
logits (``present.{i}`` *is* ``past_key_values.{i}`` afterwards). Why: the spec's out-of-place
``scatter`` makes Inductor copy every cache tensor on every step (it cannot reuse an input buffer
for an output), ``n_layer * 2 * B*H*S*hd`` floats per token: 6x slower per step than the in-place
write on the tiny preset, and 680 MB of copies per step for GPT-B at batch 16. With the in-place
wrapper (``HitaGPT.decode(inplace=True)``, i.e. ``index_copy_``) Inductor turns the write into an
``index_put_`` on the input buffer and no copy is left. ``prefill.pt2`` keeps the spec's signature
(it allocates the zero cache and returns it as ``present.*``); runtimes adopt those tensors as the
cache that the decode step then updates. The manifest records the decode step's real signature
(outputs: ``logits`` only) and which inputs it mutates (``"mutates"``).

The manifest's ``device`` is the device kind the packages were compiled for (``"cpu"`` or
``"cuda"``) and ``versions["torch"]`` the exact torch version; runtimes refuse anything else.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hita.config import check_pair

from .common import Log, check_pos128, decode_positions, first_line, logger, manifest_for, psnr, quiet, validation_line
from .errors import ExportError, ParityError, SignatureError
from .graphs import DecodeStepGraph, SpecGraph, build_graph
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
    "DEVICE_KINDS",
    "SUFFIX",
    "InplaceDecodeStepGraph",
    "aoti_file_name",
    "aoti_spec",
    "export_aoti",
]

SUFFIX = ".pt2"
DEVICE_KINDS = ("cpu", "cuda")


class InplaceDecodeStepGraph(DecodeStepGraph):
    """The decode step with the cache updated in place: same inputs as :class:`DecodeStepGraph`,
    output ``logits [B, V]`` only; ``past_key_values.{i}`` hold ``present.{i}`` after the call.

    It only switches ``HitaGPT.decode`` to ``inplace=True`` (``index_copy_`` into the given
    tensors); the math is the spec graph's. See the module docstring for why.
    """

    def forward(self, token: Tensor, position: Tensor, past_key_values: tuple[Tensor, ...]) -> Tensor:
        k, v = list(past_key_values[0::2]), list(past_key_values[1::2])
        logits, _, _ = self.gpt.decode(token, position, k, v, pos128=self.pos128, inplace=True)  # (B, V)
        return logits


def aoti_file_name(spec: ExportSpec) -> str:
    """``decode_step.onnx`` -> ``decode_step.pt2``."""
    return Path(spec.file_name).stem + SUFFIX


def aoti_spec(spec: ExportSpec) -> ExportSpec:
    """The spec of the AOTI graph: the decode step's outputs shrink to ``logits`` (in-place cache);
    prefill and decoder are unchanged. File names end in ``.pt2``."""
    from dataclasses import replace

    outputs = spec.outputs[:1] if spec.name == DECODE_STEP else spec.outputs
    return replace(spec, file_name=aoti_file_name(spec), outputs=outputs)


def _graph(name: str, gpt: HitaGPT, tokenizer: HitaTokenizer, pos128: str) -> SpecGraph:
    if name == DECODE_STEP:
        return InplaceDecodeStepGraph(gpt, pos128).eval()
    return build_graph(name, gpt, tokenizer, pos128)


# ----------------------------------------------------------------------------------------------
# Trace and signature
# ----------------------------------------------------------------------------------------------


def _trace(graph: SpecGraph, spec: ExportSpec, device: torch.device) -> torch.export.ExportedProgram:
    feed = spec.example_inputs(spec.sizes("example"), device=device)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        try:
            return torch.export.export(
                graph, graph.args(feed, spec), dynamic_shapes=graph.dynamic_shapes(spec, batch), strict=False
            )
        except Exception as e:
            raise ExportError(
                f"{aoti_file_name(spec)}: torch.export failed: {type(e).__name__}: {first_line(e)}"
            ) from e


def _traced_signature(ep: torch.export.ExportedProgram, spec: ExportSpec) -> GraphSignature:
    """What the exported program declares, named after the spec (torch.export names its
    placeholders after the Python arguments). Symbolic sizes read as ``"?"``."""
    from torch.export.graph_signature import InputKind, OutputKind

    nodes = {n.name: n for n in ep.graph.nodes}

    def tspec(name: str, node_name: str) -> TensorSpec:
        val = nodes[node_name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            return TensorSpec(name, "non-tensor", ())
        shape = tuple(d if isinstance(d, int) else "?" for d in val.shape)  # SymInt -> "?"
        try:
            dt = dtype_name(val.dtype)
        except ValueError:
            dt = str(val.dtype)
        return TensorSpec(name, dt, shape)

    user_in = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    user_out = [s.arg.name for s in ep.graph_signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    ins = tuple(tspec(n, a) for n, a in zip(spec.input_names + [f"extra_input_{i}" for i in range(len(user_in))],
                                            user_in))
    out_names = spec.output_names + [f"extra_output_{i}" for i in range(len(user_out))]
    outs = tuple(tspec(n, a) for n, a in zip(out_names, user_out))
    return GraphSignature(ins, outs)


def _mutated_inputs(ep: torch.export.ExportedProgram, spec: ExportSpec) -> list[str]:
    """Spec names of the user inputs the exported program writes to (in-place cache)."""
    from torch.export.graph_signature import InputKind, OutputKind

    user_in = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    by_arg = dict(zip(user_in, spec.input_names))
    mutated = {s.target for s in ep.graph_signature.output_specs if s.kind == OutputKind.USER_INPUT_MUTATION}
    # Newer torch keeps in-place ops in the training IR instead of listing them as mutation outputs.
    for n in ep.graph.nodes:
        if n.op == "call_function" and getattr(n.target, "_schema", None) is not None:
            schema = n.target._schema
            for arg, a in zip(schema.arguments, n.args):
                if arg.alias_info is not None and arg.alias_info.is_write and getattr(a, "name", None) in by_arg:
                    mutated.add(a.name)
    return [by_arg[a] for a in user_in if a in mutated]


# ----------------------------------------------------------------------------------------------
# Compile and validate
# ----------------------------------------------------------------------------------------------


def _compile(ep, path: Path, inductor_configs: Mapping[str, Any] | None) -> None:
    try:
        torch._inductor.aoti_compile_and_package(
            ep, package_path=str(path), inductor_configs=dict(inductor_configs or {})
        )
    except Exception as e:
        raise ExportError(
            f"{path.name}: AOTInductor compile failed: {type(e).__name__}: {first_line(e)}; a C++ compiler "
            "(g++ or clang++) must be on PATH"
        ) from e


def _load(path: Path, device: torch.device):
    index = device.index if device.index is not None else (0 if device.type == "cuda" else -1)
    return torch._inductor.aoti_load_package(str(path), device_index=index)


def _max_diff(spec: ExportSpec, name: str, got: Tensor, ref: Tensor, where: str) -> float:
    """Max abs diff of one output; :class:`ParityError` outside ``atol + rtol * |ref|``."""
    got, want = got.detach().float().cpu(), ref.detach().float().cpu()
    if got.shape != want.shape:
        raise ParityError(
            f"{aoti_file_name(spec)}: output {name} has shape {list(got.shape)}{where}; eager gives "
            f"{list(want.shape)}"
        )
    diff = (got - want).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    if not bool((diff <= spec.atol + spec.rtol * want.abs()).all()):
        raise ParityError(
            f"{aoti_file_name(spec)}: output {name} differs from eager PyTorch{where}: max |diff| "
            f"{worst:.3g} > tolerance atol {spec.atol:g} + rtol {spec.rtol:g} x |eager|; the "
            "compiled package is wrong (report it with the torch version)"
        )
    return worst


def _validate(path: Path, graph: SpecGraph, spec: ExportSpec, gpt: HitaGPT, device: torch.device,
              pos128: str) -> dict[str, Any]:
    """Run the package against eager at the spec's check batch; returns a JSON-able report."""
    model = _load(path, device)
    sizes = spec.sizes("check")
    b = sizes["batch"]
    feed = spec.example_inputs(sizes, seed=1, device=device)
    report: dict[str, Any] = {"batch": b}
    with torch.no_grad():
        if spec.name == DECODER:
            ref = graph(*graph.args(feed, spec))
            got = model(*graph.args(feed, spec))
            report["max_abs_diff"] = _max_diff(spec, "image", got, ref, f" at batch {b}")
            report["psnr_db"] = round(psnr(got, ref), 2)
            return report
        if spec.name == PREFILL:
            feed["class_ids"][-1] = gpt.cfg.null_class  # the CFG null row must work too
            ref = graph(*graph.args(feed, spec))
            got = model(*graph.args(feed, spec))
            report["max_abs_diff"] = max(
                _max_diff(spec, n, g, r, f" at batch {b}") for n, g, r in zip(spec.output_names, got, ref)
            )
            return report
        # Decode step: the eager reference is the spec's out-of-place graph; the package must
        # return the same logits and leave the same values in the (mutated) input caches.
        eager = DecodeStepGraph(gpt, pos128).eval()
        names = spec.output_names
        present_names = [n.replace("past_key_values", "present") for n in spec.input_names[2:]]
        positions = decode_positions(gpt.cfg)
        worst = 0.0
        for p in positions:
            feed["position"] = torch.tensor([p], dtype=torch.int64, device=device)
            where = f" at batch {b}, position {p}"
            ref = eager(*eager.args(feed, spec))
            caches = tuple(t.clone() for t in _feed_caches(feed, spec))
            logits = model(feed["token"], feed["position"], caches)
            worst = max(worst, _max_diff(spec, names[0], logits, ref[0], where))
            for n, c, r in zip(present_names, caches, ref[1:]):
                worst = max(worst, _max_diff(spec, n, c, r, where + " (in-place cache)"))
        # Consecutive steps on one set of buffers, as a runtime drives it.
        nh = gpt.cfg.n_holistic
        caches = tuple(t.clone() for t in _feed_caches(feed, spec))
        ref_caches = tuple(t.clone() for t in caches)
        for p in (nh - 1, nh, nh + 1):
            pos = torch.tensor([p], dtype=torch.int64, device=device)
            ref = eager(feed["token"], pos, ref_caches)
            ref_caches = tuple(ref[1:])
            logits = model(feed["token"], pos, caches)
            worst = max(worst, _max_diff(spec, names[0], logits, ref[0], f" at batch {b}, step {p} of a chain"))
        for n, c, r in zip(present_names, caches, ref_caches):
            worst = max(worst, _max_diff(spec, n, c, r, f" at batch {b} after a chain of steps"))
        report.update(max_abs_diff=worst, positions=positions)
        return report


def _feed_caches(feed: Mapping[str, Tensor], spec: ExportSpec) -> tuple[Tensor, ...]:
    """The ``past_key_values.*`` tensors of a decode-step feed, in spec order."""
    return tuple(feed[n] for n in spec.input_names[2:])


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    try:
        out["hita"] = metadata.version("hita")
    except metadata.PackageNotFoundError:
        pass
    if torch.version.cuda:
        out["cuda"] = str(torch.version.cuda)
    return out


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}") from None
    if dev.type not in DEVICE_KINDS:
        raise ValueError(f"AOTInductor export supports devices {', '.join(DEVICE_KINDS)}, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but this torch has no usable CUDA GPU; export with --device cpu")
    return dev


def export_aoti(
    gpt: HitaGPT,
    tokenizer: HitaTokenizer,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    pos128: str = "reference",
    validate: bool = True,
    progress: bool | Log = True,
    dtype: torch.dtype | str = torch.float32,
    max_batch: int = 16,
    checkpoints: Mapping[str, str | Path | None] | None = None,
    inductor_configs: Mapping[str, Any] | None = None,
) -> Path:
    """Compile decoder, prefill and decode-step packages plus a manifest into ``out_dir``.

    The GPT is cast to ``dtype``, both models are moved to ``device`` and put in eval mode **in
    place** (as the ONNX exporter and ``TorchExecutor`` do); the tokenizer stays float32.

    Args:
        gpt: the GPT (``HitaGPT``).
        tokenizer: the tokenizer (``HitaTokenizer``); must fit the GPT (``check_pair``).
        out_dir: artifacts folder; replaced atomically if it already holds an artifacts folder.
        device: ``"cpu"`` or ``"cuda[:i]"``: the packages run only on this device kind.
        pos128: ``"reference"`` or ``"consistent"``, baked into ``decode_step.pt2`` (spec 8.1).
        validate: check every package against eager PyTorch before writing.
        progress: print one line per graph to stderr, or a callable that takes each line.
        dtype: GPT hidden / KV-cache / logits dtype.
        max_batch: recorded in the specs and manifest (the AOTI batch axis itself is unbounded).
        checkpoints: ``{"gpt": path, "tokenizer": path}`` of the source checkpoints, hashed into the
            manifest.
        inductor_configs: extra ``torch._inductor`` options for every package (e.g.
            ``{"aot_inductor.compile_wrapper_opt_level": "O0"}`` to compile faster).
    Returns:
        ``out_dir`` as a ``Path``.
    Raises:
        SignatureError: a traced graph's I/O differs from its spec.
        ParityError: a package's outputs differ from eager beyond the spec's tolerance.
        ExportError: torch.export or the AOTInductor compile failed.
        ValueError: bad arguments (pos128, dtype, device, models that do not fit together).
    """
    check_pos128(pos128)
    dev = _device(device)
    dt = dtype_name(dtype)
    check_pair(tokenizer.cfg, gpt.cfg)
    log = logger(progress)
    gpt = gpt.to(device=dev, dtype=DTYPES[dt]).eval()
    tokenizer = tokenizer.to(dev, torch.float32).eval()
    specs = {n: aoti_spec(s) for n, s in graph_specs(tokenizer.cfg, gpt.cfg, dtype=dt, max_batch=max_batch).items()}
    out = Path(out_dir)
    report: dict[str, Any] = {}
    graphs: dict[str, dict[str, Any]] = {}
    with staging_dir(out) as work:
        files: dict[str, Path] = {}
        for i, name in enumerate(GRAPH_NAMES, 1):
            spec = specs[name]
            graph = _graph(name, gpt, tokenizer, pos128)
            path = work / spec.file_name
            t0 = time.perf_counter()
            with quiet():
                ep = _trace(graph, spec, dev)
            spec.signature.check(
                _traced_signature(ep, spec), spec.file_name, spec.description,
                "the graph wrapper and the export spec disagree; report it",
            )
            mutates = _mutated_inputs(ep, spec)
            expected = spec.input_names[2:] if name == DECODE_STEP else []
            if mutates != expected:
                raise SignatureError(
                    f"{spec.file_name}: the traced graph writes to inputs {mutates}, expected {expected or 'none'}; "
                    "the in-place cache contract is broken; report it"
                )
            with quiet():
                _compile(ep, path, inductor_configs)
            seconds = time.perf_counter() - t0
            entry: dict[str, Any] = {"compile_seconds": round(seconds, 2), "bytes": path.stat().st_size}
            line = f"[{i}/3] {spec.file_name}: compiled in {seconds:.1f} s ({path.stat().st_size / 2**20:.1f} MiB)"
            if validate:
                t1 = time.perf_counter()
                with quiet():
                    entry.update(_validate(path, graph, spec, gpt, dev, pos128))
                entry["validate_seconds"] = round(time.perf_counter() - t1, 2)
                line += validation_line(entry, spec)
            log(line)
            report[name] = entry
            graphs[name] = {"file": spec.file_name, **spec.signature.to_dict(), "mutates": mutates}
            files[spec.file_name] = path
        manifest = manifest_for(
            "aoti", gpt, tokenizer, checkpoints,
            pos128=pos128,
            precision=dt,
            device=dev.type,
            versions=_versions(),
            graphs=graphs,
            options={
                "kv_cache": "inplace",
                "validated": validate,
                "max_batch": max_batch,
                "inductor_configs": {k: v for k, v in (inductor_configs or {}).items()},
                "validation": report,
            },
        )
        write_artifacts(out, files, manifest)
    log(f"wrote {out} ({len(files)} files + manifest.json)")
    return out
