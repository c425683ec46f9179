"""Declarative export specs: one :class:`ExportSpec` per exported graph, built from the configs.

A spec says everything about a graph except its weights: tensor names, dtypes and shapes (with
symbolic axis names such as ``"batch"``), the opset, how to make example inputs, the validation
tolerance, the TensorRT optimisation profile and the file name. Exporters (ONNX, AOTInductor,
TensorRT) and runtimes read the same spec, so a name or an axis is declared once.

The three graphs (spec sections 1.5, 4.7):

- ``decoder``: ``holistic_ids [B, Nh]``, ``patch_ids [B, Np]`` int64 -> ``image [B, 3, H, W]`` float32.
- ``prefill``: ``class_ids [B]`` int64 -> ``logits [B, V]`` + ``present.{i}.key/value [B, H, S, hd]``.
- ``decode_step``: ``token [B]``, ``position [1]`` int64 (or ``[B]``, one per row, with
  ``row_positions``: in-flight batching), ``past_key_values.{i}.key/value`` -> ``logits [B, V]`` +
  ``present.{i}.key/value``.

The KV cache is static (``S = cfg.cache_len``): a step writes one slot and the cache never grows, so
past and present have the same shape and a runtime can bind one buffer as both. Only the batch axis
is dynamic; classifier-free guidance doubles it (n conditional + n null-class rows).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from hita.config import GPTConfig, TokenizerConfig

from .errors import SignatureError

__all__ = [
    "DTYPES",
    "TOLERANCES",
    "DECODER",
    "PREFILL",
    "DECODE_STEP",
    "GRAPH_NAMES",
    "DynamicDim",
    "TensorSpec",
    "GraphSignature",
    "ExportSpec",
    "kv_names",
    "decoder_spec",
    "prefill_spec",
    "decode_spec",
    "graph_specs",
    "has_row_positions",
    "dtype_name",
]

DECODER, PREFILL, DECODE_STEP = "decoder", "prefill", "decode_step"
GRAPH_NAMES = (DECODER, PREFILL, DECODE_STEP)

# Dtype names as they appear in specs and manifests (backend-neutral strings, JSON-friendly).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}

# Validation tolerances (atol, rtol) per hidden dtype; a value passes when
# |candidate - eager| <= atol + rtol * |eager|. fp32: ONNX Runtime's kernels reorder float32
# reductions (matmul blocking, fused softmax), ~1e-7 relative per op; on the tiny preset logits
# differ by ~1e-6 and through the released sizes by ~1e-5, so 1e-4 keeps a 10x margin while any wrong
# op (swapped embedding table, missed RoPE row, wrong head) moves logits by >= 1e-2. Half precisions
# round every activation to 8 (bf16) or 11 (fp16) mantissa bits, hence the looser limits.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}

_AXIS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def dtype_name(dtype: torch.dtype | str) -> str:
    """Spec dtype name of a torch dtype (``torch.float32`` -> ``"float32"``); names pass through.

    Raises:
        ValueError: a dtype no spec uses.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return dtype
    for name, t in DTYPES.items():
        if t == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")


@dataclass(frozen=True)
class DynamicDim:
    """One symbolic axis: its sizes for examples, validation and the TensorRT profile.

    Fields:
        name: the symbolic name used in every shape that has this axis (``"batch"``).
        min, opt, max: TensorRT optimisation-profile sizes (also the range given to torch.export).
        example: size used to trace the export. At least 2: torch.export specialises an axis whose
            example size is 0 or 1 and the graph silently loses the dynamic axis.
        check: size used to validate the export; differs from ``example`` so that a size baked in
            during tracing shows up as an error instead of passing by coincidence.
    """

    name: str
    min: int
    opt: int
    max: int
    example: int = 2
    check: int = 3

    def __post_init__(self) -> None:
        if not _AXIS_NAME.match(self.name):
            raise ValueError(f"dynamic axis name {self.name!r} must be an identifier")
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"axis {self.name!r}: need 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")
        if self.example < 2:
            raise ValueError(f"axis {self.name!r}: example size must be >= 2 (torch.export specialises 0 and 1)")
        if self.check == self.example:
            raise ValueError(f"axis {self.name!r}: the validation size must differ from the example size")
        if not self.min <= self.example <= self.max or not self.min <= self.check <= self.max:
            raise ValueError(f"axis {self.name!r}: example/check sizes must lie in [{self.min}, {self.max}]")


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one graph input or output.

    Fields:
        name: tensor name in the graph (``"past_key_values.0.key"``).
        dtype: a key of :data:`DTYPES`.
        shape: ints for static sizes, identifiers for symbolic axes (``("batch", 4, 88, 32)``).
        low, high: value range ``[low, high)`` of integer inputs, used for example inputs (ids must
            index real table rows); ``None`` for float tensors (standard normal examples). Not part
            of the signature: equality compares name, dtype and shape only.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    low: int | None = field(default=None, compare=False)
    high: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Lenient on purpose: a TensorSpec also describes what a file *declares* (an unknown dtype,
        # an unnamed dynamic dim "?"), which is exactly what a signature check must be able to report.
        # ExportSpec applies the strict rules to the specs hita itself declares.
        if not isinstance(self.dtype, str):
            raise TypeError(f"{self.name}: dtype must be a name like 'float32', got {self.dtype!r}")
        for d in self.shape:
            if isinstance(d, bool) or not (isinstance(d, str) and d or isinstance(d, int) and d >= 0):
                raise ValueError(f"{self.name}: shape entries must be sizes or axis names, got {self.shape}")

    def check_declared(self) -> None:
        """Strict rules for specs hita declares: a known dtype, positive sizes, identifier axis names."""
        dtype_name(self.dtype)
        for d in self.shape:
            if not (isinstance(d, str) and _AXIS_NAME.match(d) or isinstance(d, int) and d > 0):
                raise ValueError(f"{self.name}: shape entries must be positive ints or axis names, got {self.shape}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """``{axis index: symbolic name}`` for the symbolic entries of ``shape``."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def concrete_shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """The shape with every symbolic axis replaced by ``sizes[name]``."""
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)

    def describe(self) -> str:
        """``name: dtype [d0, d1, ...]``, as used in error messages."""
        return f"{self.name}: {self.dtype} [{', '.join(map(str, self.shape))}]"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able signature entry (value ranges are an export detail and are left out)."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))


@dataclass(frozen=True)
class GraphSignature:
    """The I/O contract of a graph: names, dtypes and (symbolic) shapes, inputs and outputs in order.

    Stored in manifests and compared against what an ONNX file or engine actually declares.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GraphSignature":
        return cls(
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
        )

    def check(self, actual: "GraphSignature", where: str, what: str, fix: str) -> None:
        """Raise :class:`SignatureError` unless ``actual`` has this signature.

        Names are compared first (a different name list usually means a different graph), then each
        tensor's dtype and shape. A symbolic axis must stay symbolic with the same name; a runtime
        that reports an unnamed dynamic axis passes ``"?"`` for it, which matches any name.

        Args:
            actual: what the file declares.
            where: file name for the message (``"decode_step.onnx"``).
            what: what the file should be (``"hita decode-step graph"``).
            fix: how to repair it (``"re-run `hita export --engine onnx`"``).
        """
        for kind, exp, act in (("inputs", self.inputs, actual.inputs), ("outputs", self.outputs, actual.outputs)):
            exp_names, act_names = [t.name for t in exp], [t.name for t in act]
            if exp_names != act_names:
                raise SignatureError(
                    f"{where}: has {kind} {_short(act_names)}; expected {_short(exp_names)}; "
                    f"the file is not a {what}"
                )
            for e, a in zip(exp, act):
                if e.dtype != a.dtype or not _same_shape(e.shape, a.shape):
                    raise SignatureError(
                        f"{where}: {kind[:-1]} {a.describe()}; expected {e.describe()}; "
                        f"the file does not match this {what}; {fix}"
                    )


def _same_shape(expected: tuple, actual: tuple) -> bool:
    if len(expected) != len(actual):
        return False
    for e, a in zip(expected, actual):
        if isinstance(e, str):
            if not (isinstance(a, str) and (a == e or a == "?")):
                return False
        elif e != a:
            return False
    return True


def _short(names: list[str], keep: int = 6) -> str:
    """A name list for messages; 2 x n_layer cache names would drown the point."""
    if len(names) <= keep:
        return "[" + ", ".join(names) + "]"
    return "[" + ", ".join(names[: keep - 1]) + f", ... ({len(names)} in all), {names[-1]}]"


@dataclass(frozen=True)
class ExportSpec:
    """Everything about one exported graph except its weights.

    Fields:
        name: graph name (:data:`DECODER`, :data:`PREFILL`, :data:`DECODE_STEP`).
        file_name: artifact file name for the ONNX engine (``"decode_step.onnx"``); other engines
            swap the suffix.
        inputs, outputs: tensor specs, in graph order.
        dims: the dynamic axes used by the shapes.
        opset: ONNX opset (default 18: the oldest one the dynamo exporter handles, and what
            TensorRT 10's parser covers fully).
        atol, rtol: validation tolerance against eager PyTorch (see :data:`TOLERANCES`).
        description: what the graph is, for messages (``"hita decode-step graph"``).
    """

    name: str
    file_name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: tuple[DynamicDim, ...]
    opset: int = 18
    atol: float = 1e-4
    rtol: float = 1e-4
    description: str = ""

    def __post_init__(self) -> None:
        for t in self.inputs + self.outputs:
            t.check_declared()
        declared = {d.name for d in self.dims}
        used = {a for t in self.inputs + self.outputs for a in t.dynamic_axes.values()}
        if used != declared:
            raise ValueError(f"{self.name}: shapes use axes {sorted(used)} but dims declare {sorted(declared)}")
        names = [t.name for t in self.inputs + self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate tensor names")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def signature(self) -> GraphSignature:
        return GraphSignature(self.inputs, self.outputs)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{tensor name: {axis: symbolic name}}`` for every tensor with a dynamic axis."""
        return {t.name: t.dynamic_axes for t in self.inputs + self.outputs if t.dynamic_axes}

    def dim(self, name: str) -> DynamicDim:
        for d in self.dims:
            if d.name == name:
                return d
        raise KeyError(f"{self.name}: no dynamic axis {name!r}")

    def sizes(self, which: str = "example", **override: int) -> dict[str, int]:
        """Concrete size of every dynamic axis: ``which`` is a :class:`DynamicDim` field name
        (``"example"``, ``"check"``, ``"min"``, ``"opt"``, ``"max"``); keyword overrides win."""
        out = {d.name: getattr(d, which) for d in self.dims}
        unknown = set(override) - set(out)
        if unknown:
            raise ValueError(f"{self.name}: unknown axes {sorted(unknown)}; axes are {sorted(out)}")
        out.update(override)
        return out

    def example_inputs(
        self, sizes: Mapping[str, int] | None = None, *, seed: int = 0, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Random inputs with the spec's names, dtypes and shapes (inputs order).

        Integer inputs are uniform in ``[low, high)``; float inputs are standard normal (for KV
        caches this exercises every cache slot, including the masked ones).

        Args:
            sizes: sizes of the dynamic axes; default :meth:`sizes` ``("example")`` (all >= 2).
            seed: seed of a private generator (the global RNG is untouched).
            device: where to put the tensors.
        Returns:
            ``{input name: tensor}``.
        """
        sizes = dict(sizes or self.sizes("example"))
        g = torch.Generator().manual_seed(seed)
        out = {}
        for t in self.inputs:
            shape = t.concrete_shape(sizes)
            if t.torch_dtype.is_floating_point:
                x = torch.randn(shape, generator=g).to(t.torch_dtype)
            else:
                x = torch.randint(t.low or 0, t.high or 2, shape, generator=g, dtype=t.torch_dtype)
            out[t.name] = x.to(device)
        return out

    def trt_profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimisation profile: ``{input name: (min shape, opt shape, max shape)}``."""
        lo, opt, hi = self.sizes("min"), self.sizes("opt"), self.sizes("max")
        return {t.name: (t.concrete_shape(lo), t.concrete_shape(opt), t.concrete_shape(hi)) for t in self.inputs}


# ----------------------------------------------------------------------------------------------
# The three hita graphs
# ----------------------------------------------------------------------------------------------


def kv_names(prefix: str, n_layer: int) -> list[str]:
    """Cache tensor names in graph order, key then value per layer:
    ``[f"{prefix}.0.key", f"{prefix}.0.value", f"{prefix}.1.key", ...]``."""
    return [f"{prefix}.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def _batch(max_batch: int, opt_batch: int | None) -> DynamicDim:
    if max_batch < 3:
        raise ValueError(f"max_batch must be >= 3 (export traces batch 2 and validates batch 3), got {max_batch}")
    return DynamicDim("batch", min=1, opt=opt_batch or max_batch, max=max_batch)


def _tolerance(dtype: str) -> tuple[float, float]:
    if dtype not in TOLERANCES:
        raise ValueError(f"unsupported hidden dtype {dtype!r}; use one of {', '.join(TOLERANCES)}")
    return TOLERANCES[dtype]


def decoder_spec(
    tok_cfg: TokenizerConfig, *, opset: int = 18, max_batch: int = 8, opt_batch: int | None = None
) -> ExportSpec:
    """Tokenizer decoder: tokens -> pixels (spec 1.5). Always float32, as in the reference.

    Args:
        tok_cfg: tokenizer config (``n_holistic``, ``n_patch``, ``image_size``, ``codebook_size``).
        opset: ONNX opset.
        max_batch: largest number of images per call in the TensorRT profile (no CFG rows here).
        opt_batch: TensorRT opt size; default ``max_batch``.
    """
    v, s = tok_cfg.codebook_size, tok_cfg.image_size
    atol, rtol = _tolerance("float32")
    return ExportSpec(
        name=DECODER,
        file_name=f"{DECODER}.onnx",
        inputs=(
            TensorSpec("holistic_ids", "int64", ("batch", tok_cfg.n_holistic), 0, v),
            TensorSpec("patch_ids", "int64", ("batch", tok_cfg.n_patch), 0, v),
        ),
        outputs=(TensorSpec("image", "float32", ("batch", 3, s, s)),),
        dims=(_batch(max_batch, opt_batch),),
        opset=opset,
        atol=atol,
        rtol=rtol,
        description="hita tokenizer-decoder graph",
    )


def _kv_specs(gpt_cfg: GPTConfig, prefix: str, dtype: str) -> tuple[TensorSpec, ...]:
    shape = ("batch", gpt_cfg.n_head, gpt_cfg.cache_len, gpt_cfg.head_dim)
    return tuple(TensorSpec(n, dtype, shape) for n in kv_names(prefix, gpt_cfg.n_layer))


def _gpt_spec(
    name: str,
    gpt_cfg: GPTConfig,
    dtype: str | torch.dtype,
    inputs: Callable[[str], tuple[TensorSpec, ...]],
    *,
    opset: int,
    max_batch: int,
    opt_batch: int | None,
    description: str,
) -> ExportSpec:
    """A GPT graph's spec: ``inputs(dtype name)`` -> ``logits [batch, vocab]`` and the
    ``present.*`` cache, at the hidden dtype's tolerance."""
    dt = dtype_name(dtype)
    atol, rtol = _tolerance(dt)
    return ExportSpec(
        name=name,
        file_name=f"{name}.onnx",
        inputs=inputs(dt),
        outputs=(TensorSpec("logits", dt, ("batch", gpt_cfg.vocab_size)),) + _kv_specs(gpt_cfg, "present", dt),
        dims=(_batch(max_batch, opt_batch),),
        opset=opset,
        atol=atol,
        rtol=rtol,
        description=description,
    )


def prefill_spec(
    gpt_cfg: GPTConfig,
    *,
    dtype: str | torch.dtype = "float32",
    opset: int = 18,
    max_batch: int = 16,
    opt_batch: int | None = None,
) -> ExportSpec:
    """GPT prefill: class token at position 0 -> holistic-head logits and a fresh cache.

    The graph allocates the zero cache itself (only ``class_ids`` go in), so a runtime needs no
    separate reset step: ``present`` is the whole cache with slot 0 written.

    Args:
        gpt_cfg: GPT config.
        dtype: hidden / KV-cache / logits dtype (the logits are cast back to it, spec 4.5).
        opset: ONNX opset.
        max_batch: largest batch in the TensorRT profile, CFG rows included (16 = 8 images + CFG).
        opt_batch: TensorRT opt size; default ``max_batch``.
    """
    return _gpt_spec(
        PREFILL, gpt_cfg, dtype,
        # class ids include the CFG null class (= num_classes).
        lambda dt: (TensorSpec("class_ids", "int64", ("batch",), 0, gpt_cfg.num_classes + 1),),
        opset=opset, max_batch=max_batch, opt_batch=opt_batch, description="hita prefill graph",
    )


def decode_spec(
    gpt_cfg: GPTConfig,
    *,
    dtype: str | torch.dtype = "float32",
    opset: int = 18,
    max_batch: int = 16,
    opt_batch: int | None = None,
    row_positions: bool = False,
) -> ExportSpec:
    """GPT decode step: one token per row at a tensor position -> logits and the updated cache.

    ``token`` is ``[B]`` (one token per row, as ``HitaGPT.decode`` takes it); ``position`` is ``[1]``
    int64, a graph input so one graph serves every position. ``present.{i}`` has the same static
    shape as ``past_key_values.{i}``.

    Args: as :func:`prefill_spec`, and
        row_positions: ``position`` is ``[B]``, one position per row (rows of sequences that started
            at different steps share a batch: in-flight batching in ``hita serve``). Off by default:
            the C++ host and older artifacts feed ``[1]``.
    """
    rows: tuple[int | str, ...] = ("batch",) if row_positions else (1,)
    return _gpt_spec(
        DECODE_STEP, gpt_cfg, dtype,
        lambda dt: (
            TensorSpec("token", "int64", ("batch",), 0, gpt_cfg.vocab_size),
            TensorSpec("position", "int64", rows, 1, gpt_cfg.seq_len),
        )
        + _kv_specs(gpt_cfg, "past_key_values", dt),
        opset=opset, max_batch=max_batch, opt_batch=opt_batch, description="hita decode-step graph",
    )


def graph_specs(
    tok_cfg: TokenizerConfig,
    gpt_cfg: GPTConfig,
    *,
    dtype: str | torch.dtype = "float32",
    opset: int = 18,
    max_batch: int = 16,
    row_positions: bool = False,
) -> dict[str, ExportSpec]:
    """The three specs of a hita artifacts folder, keyed by graph name.

    The decoder's TensorRT profile gets ``max(3, max_batch // 2)`` images: CFG doubles only the GPT
    batch, never the number of images decoded. ``row_positions``: see :func:`decode_spec`.
    """
    return {
        DECODER: decoder_spec(tok_cfg, opset=opset, max_batch=max(3, max_batch // 2)),
        PREFILL: prefill_spec(gpt_cfg, dtype=dtype, opset=opset, max_batch=max_batch),
        DECODE_STEP: decode_spec(gpt_cfg, dtype=dtype, opset=opset, max_batch=max_batch,
                                 row_positions=row_positions),
    }


def has_row_positions(signature: GraphSignature) -> bool:
    """Whether a recorded decode-step signature takes one position per row (``position [batch]``)."""
    pos = next((t for t in signature.inputs if t.name == "position"), None)
    return pos is not None and pos.shape == ("batch",)
