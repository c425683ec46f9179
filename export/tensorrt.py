"""TensorRT engines: one strongly typed engine per graph, built from ONNX that passed the static check.

Two ways in, one builder:

- :class:`TensorRTBackend` plugs into the export driver (:func:`export_tensorrt`): each graph is
  exported to ONNX (the decode step with ``TensorScatter`` cache writes by default, TensorRT's
  in-place KV-cache update), checked against TensorRT's ONNX support matrix
  (:mod:`~hita.export.trt_support`), built, and validated against eager PyTorch on the GPU like
  every other engine.
- :func:`build_from_onnx` turns a verified ONNX artifacts folder into engines on the target GPU
  without the checkpoints (the usual deployment step: export once, build per GPU kind).

Networks are strongly typed (TensorRT 11 has nothing else): precision comes from the ONNX's own
dtypes (fp32 / fp16 / bf16 exports, Q/DQ graphs for int8 / fp8), never from builder flags. Batch
axes get several optimisation profiles (:func:`batch_profiles`), the timing cache persists across
builds, and the manifest records what an engine is tied to (TensorRT version, GPU, compute
capability, compatibility modes) so that a runtime refuses a foreign engine in one line.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hita.util.files import atomic_write, file_sha256
from hita.util.gpu import gpu_facts, import_tensorrt
from hita.util.log import Log, logger

from .driver import Backend, Runner, export_artifacts
from .errors import ArtifactError, ExportError
from .graphs import SpecGraph
from .manifest import Manifest, check_output_folder, load_manifest, staging_dir, write_artifacts
from .onnx import OnnxBackend
from .spec import DECODE_STEP, GRAPH_NAMES, DynamicDim, ExportSpec, graph_specs, has_row_positions
from .trt_support import check_onnx_for_tensorrt

if TYPE_CHECKING:
    from hita.models.gpt import HitaGPT
    from hita.models.tokenizer import HitaTokenizer

__all__ = ["TensorRTOptions", "TensorRTBackend", "batch_profiles", "build_engine", "build_from_onnx",
           "export_tensorrt", "engine_spec", "HARDWARE_COMPAT", "ENGINE_SUFFIX", "rebuild_command"]

ENGINE_SUFFIX = ".engine"
# CLI name -> TensorRT HardwareCompatibilityLevel member.
HARDWARE_COMPAT = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}


def _default_timing_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hita" / "tensorrt-timing.cache"


@dataclass(frozen=True)
class TensorRTOptions:
    """How engines are built.

    Fields:
        workspace_mib: builder scratch memory limit (``MemoryPoolType.WORKSPACE``).
        optimization_level: builder optimisation level 0..5 (3 is TensorRT's default; 5 searches
            longest and can find faster kernels).
        timing_cache: file of measured kernel timings, read before and written after every build so
            that rebuilds and other graphs skip re-timing (``None``: ``~/.cache/hita/``; ``""``: off).
        hardware_compat: ``"none"`` (this GPU's compute capability only), ``"ampere+"`` (any Ampere or
            newer GPU) or ``"same-cc"`` (any GPU with this compute capability).
        version_compatible: engines that later TensorRT versions can run (lean runtime inside).
        row_buckets: upper edges of the GPT graphs' batch profiles (rows, CFG included); one profile
            per bucket keeps kernels tuned for both 1-image and large batches.
        kv_write: decode-step cache write: ``"tensorscatter"`` (in place, TensorRT 10.15+) or
            ``"scatter"`` (copies the cache; the ping-pong path for older TensorRT).
    """

    workspace_mib: int = 4096
    optimization_level: int = 3
    timing_cache: str | None = None
    hardware_compat: str = "none"
    version_compatible: bool = False
    row_buckets: tuple[int, ...] = (2, 8)
    kv_write: str = "tensorscatter"

    def __post_init__(self) -> None:
        if not 16 <= self.workspace_mib <= 1 << 20:
            raise ValueError(f"workspace must be 16 MiB .. 1 TiB, got {self.workspace_mib} MiB")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization level must be in 0..5, got {self.optimization_level}")
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise ValueError(f"hardware compatibility must be one of {', '.join(HARDWARE_COMPAT)}, "
                             f"got {self.hardware_compat!r}")
        if any(b < 1 for b in self.row_buckets):
            raise ValueError(f"row buckets must be positive, got {self.row_buckets}")
        if self.kv_write not in ("tensorscatter", "scatter"):
            raise ValueError(f"kv_write must be 'tensorscatter' or 'scatter', got {self.kv_write!r}")
        cache = self.timing_cache_path()
        if cache is not None and (cache.is_symlink() or (cache.exists() and not cache.is_file())):
            raise ValueError(f"--timing-cache {cache}: exists and is not a regular file; give a new file's path")

    def timing_cache_path(self) -> Path | None:
        if self.timing_cache == "":
            return None
        return Path(self.timing_cache) if self.timing_cache else _default_timing_cache()


def batch_profiles(dim: DynamicDim, buckets: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """``(min, opt, max)`` batch sizes per profile: buckets split ``dim.min..dim.max``, each tuned
    (``opt``) for its largest size, the size a chunked request mostly runs at."""
    edges = sorted({b for b in buckets if dim.min <= b < dim.max} | {dim.max})
    out, lo = [], dim.min
    for hi in edges:
        out.append((lo, hi, hi))
        lo = hi + 1
    return out


def engine_spec(spec: ExportSpec) -> ExportSpec:
    """The ``.engine`` variant of an ONNX spec (same tensors; only the file differs)."""
    return replace(spec, file_name=Path(spec.file_name).stem + ENGINE_SUFFIX)


def rebuild_command(out: str | Path = "DIR") -> str:
    return f"hita export --engine tensorrt --from-onnx ONNX_DIR --out {out}"


# ----------------------------------------------------------------------------------------------
# The builder
# ----------------------------------------------------------------------------------------------


def _progress_monitor(log: Log) -> Any:
    """A TensorRT progress monitor that prints each top-level build phase once (builds take minutes)."""
    import tensorrt as trt

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.t0 = time.perf_counter()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                log(f"    {phase_name} ({num_steps} steps) at {time.perf_counter() - self.t0:.0f} s")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            pass

    return Monitor()


def build_engine(onnx_path: Path, spec: ExportSpec, options: TensorRTOptions, log: Log = print) -> bytes:
    """Build one strongly typed engine from ``onnx_path`` with ``spec``'s batch profiles.

    Raises:
        ExportError: a node TensorRT does not support (static check first, then the parser's own
            verdict naming the node), or the build failed.
        Unavailable: TensorRT or a GPU is missing.
    """
    check_onnx_for_tensorrt(onnx_path)
    import_tensorrt()  # one line naming what is missing
    import tensorrt as trt
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    # Strongly typed: precision comes from the ONNX (TensorRT 11 removed the alternative).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        err = parser.get_error(0)
        raise ExportError(
            f"{onnx_path.name}: TensorRT's ONNX parser refused node {err.node_name() or err.node()} "
            f"({err.node_operator()}): {err.desc()}; export a variant without it or upgrade TensorRT")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    config.builder_optimization_level = options.optimization_level
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel,
                                                  HARDWARE_COMPAT[options.hardware_compat])
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    config.progress_monitor = _progress_monitor(log)
    cache_path = options.timing_cache_path()
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    if timing_cache is None or not config.set_timing_cache(timing_cache, False):
        raise ExportError(f"--timing-cache {cache_path}: not a TensorRT timing cache (or from another TensorRT); "
                          "give a new file's path or delete it")
    batch = spec.dims[0]
    for lo, opt, hi in batch_profiles(batch, options.row_buckets if spec.name != "decoder" else ()):
        profile = builder.create_optimization_profile()
        for t in spec.inputs:
            lo_s, opt_s, hi_s = (trt.Dims(list(t.concrete_shape(spec.sizes("opt", **{batch.name: b}))))
                                 for b in (lo, opt, hi))
            profile.set_shape(t.name, lo_s, opt_s, hi_s)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"{onnx_path.name}: TensorRT could not build an engine (see its log above); "
                          "raise --workspace-mib or lower --max-batch")
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache = bytes(config.get_timing_cache().serialize())
        atomic_write(cache_path, lambda tmp: Path(tmp).write_bytes(cache))
    return bytes(plan)


def _engine_facts(plan: bytes, file_name: str, device: torch.device) -> dict[str, Any]:
    """What the built engine really is: profiles and which outputs alias an input (in-place cache)."""
    from .trt_engine import TrtEngine

    eng = TrtEngine(plan, file_name, device)
    aliases = {o: a for o in eng.outputs if (a := eng.aliased_input(o)) is not None}
    rows = [[p[eng.inputs[0]][0][0], p[eng.inputs[0]][2][0]] for p in eng.profiles]
    return {"profiles_rows": rows, "aliased_outputs": aliases}


def _trt_versions() -> dict[str, str]:
    version = str(import_tensorrt().__version__)
    facts = gpu_facts()
    return {"tensorrt": version, "gpu": facts.name, "compute_capability": facts.sm}


def _trt_options(options: TensorRTOptions) -> dict[str, Any]:
    return {"builder": {k: v for k, v in dataclasses.asdict(options).items() if k != "timing_cache"},
            "kv_cache": "inplace" if options.kv_write == "tensorscatter" else "pingpong"}


class TensorRTBackend(Backend):
    """The export driver's TensorRT backend: ONNX per graph, static check, build, validate on the GPU."""

    engine = "tensorrt"
    verb = "built"
    devices = ("cuda",)

    def __init__(self, options: TensorRTOptions | None = None, log: Log = print):
        self.build_options, self.log = options or TensorRTOptions(), log

    def spec(self, spec: ExportSpec) -> ExportSpec:
        return engine_spec(spec)

    def write(self, graph: SpecGraph, spec: ExportSpec, folder: Path, device: torch.device) -> dict[str, Any]:
        onnx_spec = replace(spec, file_name=Path(spec.file_name).stem + ".onnx")
        with tempfile.TemporaryDirectory(prefix="hita-trt-onnx-") as tmp:
            extras = OnnxBackend(kv_write=self.build_options.kv_write).write(graph, onnx_spec, Path(tmp), device)
            plan = build_engine(Path(tmp) / onnx_spec.file_name, onnx_spec, self.build_options, self.log)
        atomic_write(folder / spec.file_name, lambda tmp: Path(tmp).write_bytes(plan))
        return {**extras, **_engine_facts(plan, spec.file_name, device)}

    def load(self, path: Path, spec: ExportSpec, device: torch.device) -> Runner:
        from .trt_engine import TrtEngine

        eng = TrtEngine(path.read_bytes(), spec.file_name, device)
        order = spec.output_names

        def run(feed: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
            outs = dict(zip(eng.outputs, eng.run(feed, spec.input_names[0])))
            return [outs[n] for n in order]

        return run

    def versions(self) -> dict[str, str]:
        return _trt_versions()

    def options(self, report: Mapping[str, Any]) -> dict[str, Any]:
        return _trt_options(self.build_options)


def export_tensorrt(
    gpt: "HitaGPT", tokenizer: "HitaTokenizer", out_dir: str | Path, *, options: TensorRTOptions | None = None,
    device: str = "cuda", progress: bool | Log = True, **driver_kwargs: Any,
) -> Path:
    """Export and build engines for decoder, prefill and decode step, validated against eager on the GPU.
    ``driver_kwargs`` go to :func:`~hita.export.driver.export_artifacts` (``pos128``, ``dtype``, ...)."""
    log = logger(progress)
    return export_artifacts(TensorRTBackend(options, log), gpt, tokenizer, out_dir, device=device,
                            progress=log, **driver_kwargs)


def build_from_onnx(onnx_dir: str | Path, out_dir: str | Path, *, options: TensorRTOptions | None = None,
                    progress: bool | Log = True, expect_manifest_sha256: str | None = None) -> Path:
    """Build engines on this GPU from a verified ONNX artifacts folder (no checkpoints needed).

    The ONNX folder's manifest and files are verified first, every graph passes the static support
    check, and the new folder's manifest carries the ONNX manifest's configs plus its sha256 (the
    provenance of the engines). Graphs are not re-validated against eager here (no models): run
    ``hita parity --artifacts OUT`` with the checkpoints for that.
    """
    options = options or TensorRTOptions()
    out, src = Path(out_dir), Path(onnx_dir)
    check_output_folder(out)
    log = logger(progress)
    onnx_manifest = load_manifest(src, expect_engine="onnx", expect_sha256=expect_manifest_sha256)
    from hita.calibration.recipes import check_engine

    # A quantized folder TensorRT cannot run (weight-only: no parser support; FP8 below SM 8.9) is
    # refused here, before any build; the GPU is asked only when the recipe has a requirement on it.
    check_engine(onnx_manifest.options, "tensorrt", folder=src,
                 compute_capability=lambda: gpu_facts().compute_capability)
    if onnx_manifest.options.get("attention") == "gqa":  # a contrib op: refused before any engine is built
        from .trt_support import refuse_contrib_attention

        refuse_contrib_attention(src, expect_manifest_sha256)
    if options.kv_write == "tensorscatter" and onnx_manifest.options.get("kv_write") != "tensorscatter":
        log("note: this ONNX decode step copies its cache (ScatterElements); export with --kv-write tensorscatter "
            "for TensorRT's in-place cache")
        options = replace(options, kv_write="scatter")
    specs = graph_specs(onnx_manifest.tokenizer_cfg, onnx_manifest.gpt_cfg, dtype=onnx_manifest.precision,
                        max_batch=int(onnx_manifest.options.get("max_batch", 16)),
                        row_positions=has_row_positions(onnx_manifest.signature(DECODE_STEP)))
    device = torch.device("cuda")
    graphs: dict[str, dict[str, Any]] = {}
    with staging_dir(out) as work:
        for i, name in enumerate(GRAPH_NAMES, 1):
            t0 = time.perf_counter()
            spec = engine_spec(specs[name])
            onnx_path = src / onnx_manifest.graph_file(name)
            log(f"[{i}/{len(GRAPH_NAMES)}] {spec.file_name}: building from {onnx_path.name}")
            plan = build_engine(onnx_path, specs[name], options, log)
            atomic_write(work / spec.file_name, lambda tmp: Path(tmp).write_bytes(plan))
            graphs[name] = {"file": spec.file_name, **spec.signature.to_dict(),
                            "onnx_sha256": onnx_manifest.files[onnx_path.name]["sha256"],
                            **_engine_facts(plan, spec.file_name, device)}
            log(f"    built in {time.perf_counter() - t0:.0f} s ({len(plan) / 2**20:.1f} MiB)")
        manifest = Manifest(
            engine="tensorrt", tokenizer_preset=onnx_manifest.tokenizer_preset,
            tokenizer_config=onnx_manifest.tokenizer_config, gpt_preset=onnx_manifest.gpt_preset,
            gpt_config=onnx_manifest.gpt_config, pos128=onnx_manifest.pos128, precision=onnx_manifest.precision,
            device="cuda", versions={**onnx_manifest.versions, **_trt_versions()}, graphs=graphs,
            checkpoints=onnx_manifest.checkpoints,
            options={**_trt_options(options), "validated": False, "max_batch": onnx_manifest.options.get("max_batch", 16),
                     "source_onnx_manifest_sha256": file_sha256(src / "manifest.json")},
        )
        write_artifacts(out, {g["file"]: work / g["file"] for g in graphs.values()}, manifest)
    log(f"wrote {out} (3 engines + manifest)")
    return out


def check_engine_host(manifest: Manifest, root: Path) -> None:
    """Refuse an engine folder built for another TensorRT version or GPU, with the rebuild command.

    Raises:
        ArtifactError: one line: what differs, and ``hita export --engine tensorrt --from-onnx ...``.
    """
    built, here = manifest.versions.get("tensorrt"), str(import_tensorrt().__version__)
    compat = manifest.options.get("builder", {})
    fix = f"rebuild it here: {rebuild_command(root)}"
    if built != here and not compat.get("version_compatible"):
        raise ArtifactError(f"{root}: engines built with TensorRT {built}, this machine has {here}; {fix}")
    facts = gpu_facts()
    level = compat.get("hardware_compat", "none")
    cc = manifest.versions.get("compute_capability")
    if level == "ampere+":
        if facts.compute_capability < (8, 0):
            raise ArtifactError(f"{root}: engines need an Ampere or newer GPU, this is {facts.name} "
                                f"(compute {facts.sm}); {fix}")
    elif cc != facts.sm:
        raise ArtifactError(f"{root}: engines built for compute capability {cc} "
                            f"({manifest.versions.get('gpu')}), this GPU is {facts.name} (compute {facts.sm}); {fix}")
