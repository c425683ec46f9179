"""Export the three hita graphs as AOTInductor packages (``.pt2``), check them, write a manifest.

``export_aoti(gpt, tokenizer, out_dir)`` writes ``decoder.pt2``, ``prefill.pt2``,
``decode_step.pt2`` and the manifest into ``out_dir`` through the shared driver
(:mod:`~hita.export.driver`: validation, versions, atomic folder). Each package is compiled C++ for one device kind and one torch
version: Python loads it with ``torch._inductor.aoti_load_package`` (:mod:`~hita.runtimes.aoti`),
C++ with ``torch::inductor::AOTIModelPackageLoader`` (``runtimes/cpp``). For each graph it:

1. traces the graph with ``torch.export.export`` at the spec's example batch (2) with a symbolic
   ``batch`` axis, and checks the traced inputs/outputs (dtypes, ranks, static sizes, batch still
   symbolic) against the spec (:class:`SignatureError`);
2. compiles and packages it with ``torch._inductor.aoti_compile_and_package``;
3. loads the package for the driver's comparison with eager PyTorch; the in-place decode step
   hands back the caches it updated as the spec's ``present.*``, so consecutive steps prove the
   in-place cache update.

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

**The CPU decode step** (``attention="prefix"``, the default on the CPU) is
:class:`PrefixDecodeStepGraph`: the same in-place cache write, but each layer attends only over the
filled cache prefix (slots ``0..max(position)``; the plain step reads all ``cache_len`` slots under a
mask), and the output head computes only the half the step needs (``torch.cond`` over the holistic
and patch halves; the plain step computes both, 2V columns, and keeps one). Measured on GPT-B fp32,
2 cores (``benchmarks/RESULTS.md``): the prefix and the head half together took the package from
25 to 18 ms per step at 2 rows and from 87 to 49 ms at 16 rows, where the 576-slot K/V (679 MB per
step at 16 rows) outweighs the weights (440 MB). The prefix length is data-dependent: ``max(position)
+ 1`` is read with ``.item()`` inside the graph, which ``torch.export`` keeps as an unbacked size
bounded by ``cache_len``; the package checks that bound at run time. On CUDA that read and the
``cond`` predicate would force a host sync every step, so CUDA exports keep ``"plain"``.

**Inductor settings** (:data:`CPU_INDUCTOR_CONFIGS`, the CPU default, merged under any
``inductor_configs`` given, recorded in the manifest's ``options``): ``freezing`` turns the weights
into constants Inductor may fold and prepack, and with ``cpp.weight_prepack`` (Inductor's default)
every fp32 ``linear`` becomes a oneDNN ``_linear_pointwise`` over a weight packed at compile time,
with the residual add fused. Measured on GPT-B (A/B of the decode step alone, ``benchmarks/RESULTS.md``):
16-20 % faster at 16 rows, about 5 % slower at 2 rows (oneDNN's packed two-row GEMV against MKL's),
so the larger gain wins. ``max_autotune`` (Inductor's CPU GEMM templates) was no better and would
make a package depend on timings taken during the export. Compilation runs under
``torch.no_grad()``: Inductor applies ``freezing`` only to inference graphs (with grad mode on it
was silently ignored).

The manifest's ``device`` is the device kind the packages were compiled for (``"cpu"`` or
``"cuda"``) and ``versions["torch"]`` the exact torch version; runtimes refuse anything else.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hita.models.gpt import write_cache
from hita.util.log import Log, first_line, quiet

from .driver import Backend, Runner, export_artifacts
from .errors import ExportError, ParityError, SignatureError
from .gqa import LayerwiseDecodeStepGraph
from .graphs import DecodeStepGraph, SpecGraph, build_graph
from .spec import DECODE_STEP, ExportSpec, GraphSignature, TensorSpec, dtype_name

if TYPE_CHECKING:
    from hita.models.gpt import HitaGPT
    from hita.models.tokenizer import HitaTokenizer

__all__ = [
    "ATTENTIONS",
    "CPU_INDUCTOR_CONFIGS",
    "DEVICE_KINDS",
    "SUFFIX",
    "AotiBackend",
    "InplaceDecodeStepGraph",
    "PrefixDecodeStepGraph",
    "default_attention",
    "effective_inductor_configs",
    "aoti_file_name",
    "aoti_spec",
    "export_aoti",
]

SUFFIX = ".pt2"
DEVICE_KINDS = ("cpu", "cuda")
# "plain": HitaGPT.decode in place (every cache slot under a mask, the whole 2V head);
# "prefix": PrefixDecodeStepGraph (the filled prefix only, one head half).
ATTENTIONS = ("plain", "prefix")
CPU_INDUCTOR_CONFIGS: dict[str, Any] = {"freezing": True}  # see the module docstring


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


class PrefixDecodeStepGraph(LayerwiseDecodeStepGraph):
    """The CPU decode step: in-place cache write, attention over the filled prefix only, and only
    the head half each row needs; same inputs as :class:`InplaceDecodeStepGraph`, output ``logits``.

    The layer loop and the head half are :class:`~hita.export.gqa.LayerwiseDecodeStepGraph`'s (the
    ONNX Runtime GQA step shares them); only the attention differs: the new k/v are written at
    slot ``position`` with the model's own ``write_cache`` (``index_copy_`` / ``scatter_`` in place),
    then SDPA runs over cache slots ``0..n-1`` with ``n = max(position) + 1``. With one position for
    all rows every one of those slots is ``<= position``, so no mask is needed (the plain step's mask
    hides exactly the slots cut off here); with one position per row the model's mask
    ``arange(n) <= position[b]`` is kept. Slots beyond ``n`` are never read, which the export
    checks (:meth:`AotiBackend.extra_checks`).
    """

    def _attention_context(self, position: Tensor, batch: int, slots: int) -> tuple[Any, Tensor | None]:
        n = position.max().item() + 1  # unbacked size under torch.export: the filled prefix
        torch._check(n >= 1)
        torch._check(n <= slots)  # the package raises at run time beyond the static cache
        if isinstance(position.shape[0], int) and position.shape[0] == 1:
            return n, None
        mask = (torch.arange(n, device=position.device) <= position[:, None]).view(-1, 1, 1, n)  # (B, 1, 1, n)
        return n, mask

    def _attend(self, q, k, v, k_cache, v_cache, position, ctx):
        n, mask = ctx
        k_cache = write_cache(k_cache, k, position, inplace=True)  # (B, H, S, hd), written in place
        v_cache = write_cache(v_cache, v, position, inplace=True)
        y = F.scaled_dot_product_attention(q, k_cache[:, :, :n], v_cache[:, :, :n], attn_mask=mask)  # (B, H, 1, hd)
        return y.transpose(1, 2).flatten(2), k_cache, v_cache  # (B, 1, H*hd)

    def forward(self, token: Tensor, position: Tensor, past_key_values: tuple[Tensor, ...]) -> Tensor:
        return super().forward(token, position, past_key_values)[0]  # (B, V); caches updated in place


def default_attention(device: str | torch.device) -> str:
    """``"prefix"`` on the CPU, ``"plain"`` on CUDA (see the module docstring)."""
    return "prefix" if torch.device(device).type == "cpu" else "plain"


def effective_inductor_configs(device: str | torch.device, inductor_configs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The Inductor options a package is compiled with: :data:`CPU_INDUCTOR_CONFIGS` on the CPU
    (none on CUDA), overridden key by key by ``inductor_configs`` (``{"freezing": False}`` turns
    freezing off)."""
    base = dict(CPU_INDUCTOR_CONFIGS) if torch.device(device).type == "cpu" else {}
    return {**base, **dict(inductor_configs or {})}


def aoti_file_name(spec: ExportSpec) -> str:
    """``decode_step.onnx`` -> ``decode_step.pt2``."""
    return Path(spec.file_name).stem + SUFFIX


def aoti_spec(spec: ExportSpec) -> ExportSpec:
    """The spec of the AOTI graph: the decode step's outputs shrink to ``logits`` (in-place cache);
    prefill and decoder are unchanged. File names end in ``.pt2``."""
    from dataclasses import replace

    outputs = spec.outputs[:1] if spec.name == DECODE_STEP else spec.outputs
    return replace(spec, file_name=aoti_file_name(spec), outputs=outputs)


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


def _compile(ep, path: Path, inductor_configs: Mapping[str, Any] | None) -> None:
    """Compile and package ``ep``. Under ``no_grad``: Inductor applies ``freezing`` only to
    inference graphs, and exported graphs are inference graphs."""
    try:
        with torch.no_grad():
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


class AotiBackend(Backend):
    """AOTInductor packages: ``torch.export`` with a symbolic batch, then
    ``aoti_compile_and_package``; the decode step updates its cache inputs in place.

    Args:
        inductor_configs: ``torch._inductor`` options for every package, over the device's defaults
            (:func:`effective_inductor_configs`; e.g. ``{"freezing": False}``, or
            ``{"aot_inductor.compile_wrapper_opt_level": "O0"}`` to compile faster).
        attention: decode-step variant, one of :data:`ATTENTIONS`; ``None``: :func:`default_attention`
            of the device the graphs are built on.
    Raises:
        ValueError: an unknown ``attention``.
    """

    engine = "aoti"
    verb = "compiled"
    devices = DEVICE_KINDS

    def __init__(self, inductor_configs: Mapping[str, Any] | None = None, attention: str | None = None):
        if attention is not None and attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS} for AOTInductor, got {attention!r}")
        self._requested = (dict(inductor_configs or {}), attention)
        self.inductor_configs: dict[str, Any] = dict(inductor_configs or {})  # resolved per device in graph()
        self.attention = attention or "plain"
        self._loaded: dict[Path, Any] = {}  # packages loaded for validation, reused by extra_checks

    def _resolve(self, device: torch.device) -> None:
        configs, attention = self._requested
        self.inductor_configs = effective_inductor_configs(device, configs)
        self.attention = attention or default_attention(device)

    def spec(self, spec: ExportSpec) -> ExportSpec:
        return aoti_spec(spec)

    def graph(self, name: str, gpt: HitaGPT, tokenizer: HitaTokenizer, pos128: str) -> SpecGraph:
        self._resolve(gpt.output.weight.device)  # the driver has moved the models to the export device
        if name == DECODE_STEP:
            cls = PrefixDecodeStepGraph if self.attention == "prefix" else InplaceDecodeStepGraph
            return cls(gpt, pos128).eval()
        return build_graph(name, gpt, tokenizer, pos128)

    def write(self, graph: SpecGraph, spec: ExportSpec, folder: Path, device: torch.device) -> dict[str, Any]:
        with quiet():
            ep = _trace(graph, spec, device)
        spec.signature.check(
            _traced_signature(ep, spec), spec.file_name, spec.description,
            "the graph wrapper and the export spec disagree; report it",
        )
        mutates = _mutated_inputs(ep, spec)
        expected = spec.input_names[2:] if spec.name == DECODE_STEP else []
        if mutates != expected:
            raise SignatureError(
                f"{spec.file_name}: the traced graph writes to inputs {mutates}, expected {expected or 'none'}; "
                "the in-place cache contract is broken; report it"
            )
        with quiet():
            _compile(ep, folder / spec.file_name, self.inductor_configs)
        return {"mutates": mutates}

    def load(self, path: Path, spec: ExportSpec, device: torch.device) -> Runner:
        model = _load(path, device)
        self._loaded = {path: model}  # one package at a time: GPT-B's are hundreds of MB each
        names = spec.input_names

        def run(feed: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
            if spec.name != DECODE_STEP:
                out = model(*(feed[n] for n in names))
                return tuple(out) if isinstance(out, (tuple, list)) else (out,)
            caches = tuple(feed[n] for n in names[2:])         # updated in place by the package
            logits = model(feed[names[0]], feed[names[1]], caches)
            return (logits, *caches)

        return run

    def extra_checks(self, path: Path, spec: ExportSpec, feed: dict[str, Tensor], gpt_cfg) -> dict[str, Any]:
        """The prefix decode step reads no slot beyond the position: NaN in every later slot leaves
        the logits bit-identical and stays where it was (``prefix_only_verified``). The plain step
        would turn them into NaN logits (its masked scores are NaN + -inf)."""
        if spec.name != DECODE_STEP or self.attention != "prefix":
            return {}
        model = self._loaded.get(path) or _load(path, feed["token"].device)
        names = spec.input_names
        p = gpt_cfg.n_holistic  # mid-cache: slots on both sides
        position = torch.full_like(feed["position"], p)
        clean = tuple(feed[n].clone() for n in names[2:])
        dirty = tuple(c.clone() for c in clean)
        for c in dirty:
            c[:, :, p + 1:] = float("nan")
        with torch.no_grad():
            want = model(feed["token"], position, clean)
            got = model(feed["token"], position, dirty)
        untouched = all(bool(c[:, :, p + 1:].isnan().all()) for c in dirty)
        if not (torch.equal(got, want) and untouched):
            raise ParityError(
                f"{spec.file_name}: the prefix decode step read or wrote cache slots beyond the position "
                f"(NaN after slot {p} changed the logits or was overwritten); the export is wrong; report it"
            )
        return {"prefix_only_verified": True}

    def options(self, report: Mapping[str, Any]) -> dict[str, Any]:
        return {"kv_cache": "inplace", "attention": self.attention, "inductor_configs": dict(self.inductor_configs)}


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
    row_positions: bool = False,
    attention: str | None = None,
) -> Path:
    """Compile decoder, prefill and decode-step packages plus a manifest into ``out_dir``.

    ``device`` is ``"cpu"`` or ``"cuda[:i]"``: the packages run only on that device kind. See
    :func:`~hita.export.driver.export_artifacts` for the arguments shared by every engine and
    :class:`AotiBackend` for ``inductor_configs`` and ``attention`` (default: ``"prefix"`` with
    ``freezing`` on the CPU, ``"plain"`` on CUDA; both recorded in the manifest's ``options``);
    ``row_positions`` gives the decode step one position per row (see
    :func:`~hita.export.spec.decode_spec`).

    Raises:
        SignatureError, ParityError, ExportError, ArtifactError, ValueError: as the driver.
    """
    return export_artifacts(
        AotiBackend(inductor_configs, attention), gpt, tokenizer, out_dir, device=device, pos128=pos128, dtype=dtype,
        validate=validate, progress=progress, max_batch=max_batch, checkpoints=checkpoints,
        spec_options={"row_positions": row_positions},
    )
