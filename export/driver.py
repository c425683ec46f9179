"""One export driver for every engine kind; engines plug in as small :class:`Backend` objects.

The driver does everything that does not depend on the engine: argument checks, refusing an output
folder it may not replace (before any work), casting and moving the models, one
:class:`~hita.export.spec.ExportSpec` per graph, validation of every graph against eager PyTorch at
the spec's check batch and at the decode positions around every branch point, a chain of
consecutive decode steps (the way a runtime drives the cache), tool versions, progress lines, and
the atomic artifacts folder with its manifest (:mod:`~hita.export.manifest`).

A backend only knows its engine: how to write one graph's files (and check what it wrote against the
spec), how to load them back as a :data:`Runner` for validation, its engine-specific checks, versions
and manifest options. ONNX (:mod:`~hita.export.onnx`) and AOTInductor (:mod:`~hita.export.aoti`) are
backends; TensorRT and the quantized exports plug in the same way.

Validation compares every output of the *spec* graph (the out-of-place eager wrapper of
:mod:`~hita.export.graphs`): a runner returns the spec's outputs in order, whatever its engine does
inside (an in-place decode step returns the caches it updated as ``present.*``).
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hita.config import check_pair
from hita.util.files import file_sha256
from hita.util.log import Log, logger
from hita.util.metrics import psnr

from .errors import ParityError
from .graphs import SpecGraph, build_graph
from .manifest import Manifest, check_output_folder, staging_dir, write_artifacts
from .spec import DECODE_STEP, DECODER, DTYPES, GRAPH_NAMES, PREFILL, ExportSpec, dtype_name, graph_specs, has_row_positions

if TYPE_CHECKING:
    from hita.models.gpt import HitaGPT
    from hita.models.tokenizer import HitaTokenizer

__all__ = ["Backend", "Runner", "export_artifacts", "validate_graph", "decode_positions", "check_pos128"]

# A loaded graph for validation: spec input feed -> the spec graph's outputs, in spec order.
Runner = Callable[[Mapping[str, Tensor]], Sequence[Tensor]]


class Backend(ABC):
    """What one engine kind must provide to the driver.

    Attributes:
        engine: manifest engine kind (``"onnx"``, ``"aoti"``, ``"tensorrt"``).
        verb: what writing a graph is called in progress lines (``"exported"``, ``"compiled"``).
        devices: device kinds the engine builds for.
    """

    engine: str
    verb: str = "exported"
    devices: tuple[str, ...] = ("cpu",)

    def spec(self, spec: ExportSpec) -> ExportSpec:
        """The engine's variant of a spec graph (file name, outputs of an in-place step)."""
        return spec

    def graph(self, name: str, gpt: HitaGPT, tokenizer: HitaTokenizer, pos128: str) -> SpecGraph:
        """The module to export for graph ``name`` (default: the spec's own wrapper)."""
        return build_graph(name, gpt, tokenizer, pos128)

    @abstractmethod
    def write(self, graph: SpecGraph, spec: ExportSpec, folder: Path, device: torch.device) -> dict[str, Any]:
        """Write the graph's files into the empty ``folder`` (``spec.file_name`` plus any side
        files), check what was written against ``spec`` (:class:`SignatureError`) and return extra
        fields for the manifest's graph entry."""

    @abstractmethod
    def load(self, path: Path, spec: ExportSpec, device: torch.device) -> Runner:
        """Load a written graph for validation."""

    def extra_checks(self, path: Path, spec: ExportSpec, feed: dict[str, Tensor], gpt_cfg) -> dict[str, Any]:
        """Engine-specific checks after validation (recorded in the report); default none."""
        return {}

    def versions(self) -> dict[str, str]:
        """Engine tool versions for the manifest (torch and hita are added by the driver)."""
        return {}

    def options(self, report: Mapping[str, Any]) -> dict[str, Any]:
        """Engine facts for the manifest's ``options`` (the driver adds ``validated``,
        ``max_batch`` and ``validation``)."""
        return {}


# ----------------------------------------------------------------------------------------------
# Validation against eager
# ----------------------------------------------------------------------------------------------


def check_pos128(pos128: str) -> None:
    """:class:`ValueError` unless ``pos128`` is one of ``hita.models.gpt.POS128_MODES``."""
    from hita.models.gpt import POS128_MODES

    if pos128 not in POS128_MODES:
        raise ValueError(f"pos128 must be one of {POS128_MODES}, got {pos128!r} (see spec section 8.1)")


def decode_positions(gpt_cfg) -> list[int]:
    """Positions around each branch of the decode graph: slot rows, the Nh quirk, RoPE rows."""
    nh, last = gpt_cfg.n_holistic, gpt_cfg.seq_len - 1
    return sorted({1, nh - 1, nh, nh + 1, last})


def _max_diff(file_name: str, spec: ExportSpec, name: str, got: Tensor, ref: Tensor, where: str) -> float:
    """Max abs diff of one output; :class:`ParityError` outside ``atol + rtol * |ref|``."""
    got, want = torch.as_tensor(got).detach().float().cpu(), ref.detach().float().cpu()
    if got.shape != want.shape:
        raise ParityError(
            f"{file_name}: output {name} has shape {list(got.shape)}{where}; eager gives {list(want.shape)}"
        )
    diff = (got - want).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    if not bool((diff <= spec.atol + spec.rtol * want.abs()).all()):
        raise ParityError(
            f"{file_name}: output {name} differs from eager PyTorch{where}: max |diff| {worst:.3g} > "
            f"tolerance atol {spec.atol:g} + rtol {spec.rtol:g} x |eager|; the export is wrong "
            "(report it with the model preset, the tool versions and this message)"
        )
    return worst


def _clone(feed: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in feed.items()}


def validate_graph(
    runner: Runner, file_name: str, eager: SpecGraph, spec: ExportSpec, gpt_cfg, device: torch.device
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Compare a loaded graph with its eager spec wrapper at the spec's check sizes.

    Inputs are seeded random (ids in range, caches standard normal); the prefill batch ends with
    the CFG null class; the decode step runs at every position of :func:`decode_positions`, then
    three consecutive steps across the position-128 rule feeding each step's caches to the next.

    Returns:
        ``(report, feed)``: ``batch``, ``max_abs_diff`` (over all outputs and positions), ``psnr_db``
        for the decoder, ``positions`` for the decode step; and the feed used (for engine checks).
    Raises:
        ParityError: an output differs beyond ``spec.atol + spec.rtol * |eager|``.
    """
    sizes = spec.sizes("check")
    b = sizes["batch"]
    feed = spec.example_inputs(sizes, seed=1, device=device)
    report: dict[str, Any] = {"batch": b}
    names = spec.output_names

    def compare(got: Sequence[Tensor], ref: Sequence[Tensor], where: str) -> float:
        return max(_max_diff(file_name, spec, n, g, r, where) for n, g, r in zip(names, got, ref))

    with torch.no_grad():
        if spec.name == PREFILL:
            feed["class_ids"][-1] = gpt_cfg.null_class  # the CFG null row must work too
        if spec.name != DECODE_STEP:
            ref = eager(*eager.args(feed, spec))
            ref = ref if isinstance(ref, tuple) else (ref,)
            got = runner(_clone(feed))
            report["max_abs_diff"] = compare(got, ref, f" at batch {b}")
            if spec.name == DECODER:
                report["psnr_db"] = round(psnr(torch.as_tensor(got[0]), ref[0]), 2)
            return report, feed
        worst = 0.0
        positions = decode_positions(gpt_cfg)
        per_row = has_row_positions(spec.signature)

        def at(rows: Sequence[int]) -> Tensor:  # [1] (one position for all rows) or [B] (one per row)
            return torch.tensor(rows if per_row else rows[:1], dtype=torch.int64, device=device)

        for p in positions:
            feed["position"] = at([p] * b)
            ref = eager(*eager.args(feed, spec))
            worst = max(worst, compare(runner(_clone(feed)), ref, f" at batch {b}, position {p}"))
        if per_row:
            # In-flight batching: rows at different positions in one call, every position in every
            # row once over the rotations, so each row's branch (slot / Nh quirk / RoPE, holistic or
            # patch head) is taken independently of its neighbours'.
            n = len(positions)
            for shift in range(n):
                rows = [positions[(r + shift) % n] for r in range(b)]
                feed["position"] = at(rows)
                ref = eager(*eager.args(feed, spec))
                worst = max(worst, compare(runner(_clone(feed)), ref, f" at batch {b}, row positions {rows}"))
        # Consecutive steps, each fed the caches the previous one returned, as a runtime drives it
        # (per-row graphs: the rows a step apart, so they cross the position-128 rule at different steps).
        nh, last = gpt_cfg.n_holistic, gpt_cfg.seq_len - 1
        chain, ref_chain = _clone(feed), _clone(feed)
        past = spec.input_names[2:]
        for p in (nh - 1, nh, nh + 1):
            rows = [min(p + (r % 3 if per_row else 0), last) for r in range(b)]
            chain["position"] = ref_chain["position"] = at(rows)
            ref = eager(*eager.args(ref_chain, spec))
            got = runner(chain)
            worst = max(worst, compare(got, ref, f" at batch {b}, step {p} of a chain"))
            chain.update(zip(past, (torch.as_tensor(t) for t in got[1:])))
            ref_chain.update(zip(past, ref[1:]))
        report.update(max_abs_diff=worst, positions=positions)
        return report, feed


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------


def _versions(backend: Backend) -> dict[str, str]:
    out = {"torch": torch.__version__}
    try:
        out["hita"] = metadata.version("hita")
    except metadata.PackageNotFoundError:
        pass
    if torch.version.cuda:
        out["cuda"] = str(torch.version.cuda)
    out.update(backend.versions())
    return out


def _device(device: str | torch.device, backend: Backend) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}") from None
    if dev.type not in backend.devices:
        raise ValueError(
            f"{backend.engine} export builds for {', '.join(backend.devices)}, got device {str(device)!r}"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but this torch has no usable CUDA GPU; export with --device cpu")
    return dev


def export_artifacts(
    backend: Backend,
    gpt: HitaGPT,
    tokenizer: HitaTokenizer,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    pos128: str = "reference",
    dtype: torch.dtype | str = torch.float32,
    validate: bool = True,
    progress: bool | Log = True,
    max_batch: int = 16,
    checkpoints: Mapping[str, str | Path | None] | None = None,
    spec_options: Mapping[str, Any] | None = None,
) -> Path:
    """Export decoder, prefill and decode step with ``backend`` into the artifacts folder ``out_dir``.

    The GPT is cast to ``dtype``, both models are moved to ``device`` and put in eval mode **in
    place** (as :class:`~hita.runtimes.torch_eager.TorchExecutor` does); the tokenizer stays float32.

    Args:
        backend: the engine (:class:`Backend`).
        gpt, tokenizer: the models; they must fit together (``check_pair``).
        out_dir: artifacts folder; must be new, empty or an earlier hita export (replaced atomically).
        device: device to build and validate on (one of ``backend.devices``).
        pos128: ``"reference"`` or ``"consistent"``, baked into the decode step (spec 8.1).
        dtype: GPT hidden / KV-cache / logits dtype.
        validate: check every graph against eager PyTorch before writing.
        progress: print one line per graph to stderr, or a callable that takes each line.
        max_batch: largest batch (CFG rows included) of the specs' profiles.
        checkpoints: ``{"gpt": path, "tokenizer": path}`` of the sources, hashed into the manifest.
        spec_options: extra keyword arguments for :func:`~hita.export.spec.graph_specs` (``opset``).
    Returns:
        ``out_dir`` as a ``Path``.
    Raises:
        ArtifactError: ``out_dir`` may not be replaced (checked before any work).
        SignatureError, ParityError, ExportError: a graph is not what its spec says.
        ValueError: bad arguments.
    """
    check_pos128(pos128)
    dev = _device(device, backend)
    dt = dtype_name(dtype)
    check_pair(tokenizer.cfg, gpt.cfg)
    if not 1 <= max_batch <= 4096:
        raise ValueError(f"max_batch must be in 1..4096, got {max_batch}")
    out = Path(out_dir)
    check_output_folder(out)
    log = logger(progress)
    gpt = gpt.to(device=dev, dtype=DTYPES[dt]).eval()
    tokenizer = tokenizer.to(dev, torch.float32).eval()
    base = graph_specs(tokenizer.cfg, gpt.cfg, dtype=dt, max_batch=max_batch, **dict(spec_options or {}))
    report: dict[str, Any] = {}
    graphs: dict[str, dict[str, Any]] = {}
    with staging_dir(out) as work:
        for i, name in enumerate(GRAPH_NAMES, 1):
            spec = backend.spec(base[name])
            folder = work / name
            folder.mkdir()
            path = folder / spec.file_name
            t0 = time.perf_counter()
            extras = backend.write(backend.graph(name, gpt, tokenizer, pos128), spec, folder, dev)
            seconds = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in folder.iterdir())
            entry: dict[str, Any] = {"write_seconds": round(seconds, 2), "bytes": size}
            line = f"[{i}/{len(GRAPH_NAMES)}] {spec.file_name}: {backend.verb} in {seconds:.1f} s ({size / 2**20:.1f} MiB)"
            if validate:
                t1 = time.perf_counter()
                runner = backend.load(path, spec, dev)
                eager = build_graph(name, gpt, tokenizer, pos128)
                checked, feed = validate_graph(runner, spec.file_name, eager, base[name], gpt.cfg, dev)
                entry.update(checked)
                entry.update(backend.extra_checks(path, base[name], feed, gpt.cfg))
                entry["validate_seconds"] = round(time.perf_counter() - t1, 2)
                line += (f"; matches eager at batch {entry['batch']}: max |diff| {entry['max_abs_diff']:.2e} "
                         f"(tol {spec.atol:g})")
                if "psnr_db" in entry:
                    line += f", PSNR {entry['psnr_db']:.1f} dB"
            log(line)
            report[name] = entry
            graphs[name] = {"file": spec.file_name, **spec.signature.to_dict(), **extras}
        files = {f.name: f for name in GRAPH_NAMES for f in sorted((work / name).iterdir())}
        manifest = Manifest(
            engine=backend.engine,
            tokenizer_preset=tokenizer.cfg.name,
            tokenizer_config=tokenizer.cfg.to_dict(),
            gpt_preset=gpt.cfg.name,
            gpt_config=gpt.cfg.to_dict(),
            checkpoints={k: (file_sha256(p) if p else None) for k, p in (checkpoints or {}).items()},
            pos128=pos128,
            precision=dt,
            device=dev.type,
            versions=_versions(backend),
            graphs=graphs,
            options={**backend.options(report), "validated": validate, "max_batch": max_batch,
                     "validation": report},
        )
        write_artifacts(out, files, manifest)
    log(f"wrote {out} ({len(files)} files + manifest)")
    return out
