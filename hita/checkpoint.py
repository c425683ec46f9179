"""Checkpoints: released ``.pt`` files and the project's safetensors format.

Released files (spec section 3) are dicts holding ``ema`` / ``model`` / ``state_dict`` / ``module``
state dicts plus optimizer state and a pickled ``argparse.Namespace`` under ``args``. They are read
with ``torch.load(weights_only=True)`` and an allow-list containing only ``argparse.Namespace``:
pickled code is never executed, and anything outside the allow-list is refused with the name of
the offending global.

The project's own format is one safetensors file per model whose string metadata carries the kind
(``hita_kind``: "tokenizer" | "gpt") and the full config JSON (``hita_config``). Released files carry
no usable config, so their preset is inferred from tensor shapes (or given explicitly).

Every load is strict: missing keys, unexpected keys and shape mismatches are reported together.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch import nn

from hita.config import GPTConfig, TokenizerConfig
from hita.util.files import atomic_write, check_output_file, file_sha256

Kind = Literal["tokenizer", "gpt"]
KINDS: tuple[str, ...] = ("tokenizer", "gpt")
FORMAT_VERSION = "1"

# The only pickled globals a released Hita checkpoint needs beyond tensors and plain containers.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]

# Where the reference stores weights, in the order its readers look (spec section 3).
STATE_DICT_ENTRIES: tuple[str, ...] = ("ema", "model", "state_dict", "module")
# Wrappers whose prefixes may appear on keys saved from wrapped modules (DDP, torch.compile).
STRIP_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint cannot be used. ``str(err)``'s first line is the cause and the fix."""


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

# How a refusal to unpickle tells the user what to do: hita never runs pickled code, whatever the
# file's origin, so the only ways forward are a file without code or a conversion done elsewhere.
_CODE_FIX = ("ask its publisher for a .safetensors file, or extract the weights in an isolated sandbox you trust "
             "and save them as safetensors (`hita convert` reads those)")
# The largest pickle stream read when looking for the globals a refused file names.
_MAX_PICKLE_SCAN = 64 << 20
# Globals torch's weights-only unpickler and our allow-list accept: not worth naming in a refusal.
_HARMLESS_MODULES = ("torch", "collections", "argparse", "numpy.core.multiarray", "numpy")


def _pickle_streams(path: Path) -> list[bytes]:
    """The pickle bytes of a torch file (``data.pkl`` of the zip format; the legacy format's head)."""
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            out = []
            for info in z.infolist():
                if info.filename.endswith("data.pkl") and info.file_size <= _MAX_PICKLE_SCAN:
                    out.append(z.read(info))
            return out
    with open(path, "rb") as f:
        return [f.read(_MAX_PICKLE_SCAN)]


def _pickled_globals(path: Path) -> list[str]:
    """``module.name`` of every global a pickle in ``path`` imports, read with ``pickletools`` (which
    only parses opcodes; nothing is imported or run). Best effort: [] when the file cannot be parsed."""
    import io
    import pickletools

    found: list[str] = []
    try:
        streams = _pickle_streams(path)
    except Exception:  # noqa: BLE001 - naming the global is a courtesy; the refusal stands regardless
        return found
    for data in streams:
        buf = io.BytesIO(data)
        for _ in range(8):  # the legacy format is several pickles in a row
            strings: list[str] = []
            try:
                for op, arg, _pos in pickletools.genops(buf):
                    if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                        found.append(arg.replace(" ", ".", 1))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str) and "UNICODE" in op.name:
                        strings.append(arg)
            except Exception:  # noqa: BLE001 - raw tensor bytes follow the pickles; stop there
                break
            if buf.tell() >= len(data):
                break
    return list(dict.fromkeys(found))


def _offending_global(path: Path, torch_message: str) -> str | None:
    """The global a refused file wanted, as ``module.name`` (``None`` when it names none)."""
    import re

    m = re.search(r"GLOBAL ([A-Za-z_][\w.]*)", torch_message)
    named = m.group(1).rstrip(".") if m else None
    scanned = _pickled_globals(path)
    if named is not None and "." not in named:  # torch prints builtins without their module
        named = next((g for g in scanned if g.rsplit(".", 1)[-1] == named), f"builtins.{named}")
    if named is None:
        named = next((g for g in scanned if not g.startswith(_HARMLESS_MODULES)), None)
    if named is not None and named.startswith("__builtin__."):  # protocol 2 spells builtins the Python 2 way
        named = "builtins." + named.split(".", 1)[1]
    if named is not None and named.split(".", 1)[0] in ("posix", "nt"):
        named = f"{named} (os.{named.split('.', 1)[1]})"
    return named


def _torch_detail(message: str) -> str:
    """The specific line of a torch.load error, without its generic advice about ``weights_only``."""
    generic = ("weights only load failed", "weights_only", "check the documentation", "please file an issue")
    for line in message.splitlines():
        line = line.strip()
        if line and not any(g in line.lower() for g in generic):
            return " ".join(line.split())[:120]
    return ""


def _unreadable(path: Path, cause: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: not a readable checkpoint ({cause}); the file is damaged, truncated or of another format: "
        "download or copy it again"
    )


def check_zip_bounds(path: Path) -> None:
    """Refuse a torch zip file whose records could expand beyond the file itself (a zip bomb: a 30 MB
    file that asks torch for 32 GiB). torch writes every record uncompressed, so a genuine file's
    records add up to no more than its own size.

    Raises:
        CheckpointError: a compressed record, or records larger than the file.
    """
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise _unreadable(path, f"bad zip: {e}") from None
    packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise CheckpointError(f"{path}: record {packed[0]!r} is compressed, which torch never writes; the file "
                              "was crafted or re-packed: get the original file")
    if sum(i.file_size for i in infos) > path.stat().st_size:
        raise CheckpointError(f"{path}: its records claim more bytes than the file holds; the file is damaged or "
                              "crafted: get the original file")


def _load_pickle(path: Path) -> Any:
    check_zip_bounds(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        name = _offending_global(path, str(e))
        if name is None:
            detail = _torch_detail(str(e))
            raise _unreadable(path, f"pickle error: {detail}" if detail else "pickle error") from None
        raise CheckpointError(
            f"{path}: refused to unpickle: the file contains code ({name}) that hita will not run; {_CODE_FIX}"
        ) from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - garbage input can fail in any of torch's readers
        detail = _torch_detail(str(e))
        raise _unreadable(path, f"{type(e).__name__}: {detail}" if detail else type(e).__name__) from None


def _select_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for entry in STATE_DICT_ENTRIES:
            if entry in obj and isinstance(obj[entry], Mapping):
                obj = obj[entry]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{path}: no state dict found (looked for entries {', '.join(STATE_DICT_ENTRIES)} or a "
            "plain state dict); is this a Hita checkpoint?"
        )
    if not all(isinstance(k, str) for k in obj):
        bad = [k for k in obj if not isinstance(k, str)][:5]
        raise CheckpointError(f"{path}: state dict has non-string keys {bad}; is this a Hita checkpoint?")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(sd) != len(obj):
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5]
        raise CheckpointError(f"{path}: state dict holds non-tensor entries {bad}; is this a Hita checkpoint?")
    for prefix in STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    # Backbone weights are never part of a Hita checkpoint (spec 2.2); drop them if a user's file has them.
    return {k: v for k, v in sd.items() if "backbone" not in k}


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a state dict and its metadata from a released ``.pt`` or one of our ``.safetensors``.

    Returns:
        (state_dict, metadata): metadata is the safetensors string metadata, empty for ``.pt``.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file; pass the .safetensors or .pt file "
                              "(a training checkpoint folder holds model.safetensors and ema.safetensors)")
    if not path.is_file():
        if os.path.lexists(path):
            raise CheckpointError(f"{path}: is not a regular file (a device, FIFO or broken link); pass the "
                                  "checkpoint file itself")
        raise CheckpointError(f"{path}: no such checkpoint file; check the path")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e}); check its permissions") from None
    if size == 0:
        raise CheckpointError(f"{path}: is empty (0 bytes); the download or copy did not finish: fetch it again")
    if path.suffix == ".safetensors" or (len(head) == 8 and int.from_bytes(head, "little") < (1 << 27)
                                          and not head.startswith(b"PK") and not head.startswith(b"\x80")):
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            sd = load_file(str(path))
        except MemoryError:
            raise
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
            detail = " ".join(str(e).split())[:160]
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({detail}); the file is damaged or truncated: "
                "download or copy it again"
            ) from None
        return sd, meta
    return _select_state_dict(_load_pickle(path), path), {}


# ----------------------------------------------------------------------------------------------
# Model construction, preset inference, strict loading
# ----------------------------------------------------------------------------------------------


def _build(kind: Kind, cfg) -> nn.Module:
    if kind == "tokenizer":
        from hita.models.tokenizer import HitaTokenizer

        return HitaTokenizer(cfg)
    from hita.models.gpt import HitaGPT

    return HitaGPT(cfg)


def _config_cls(kind: Kind):
    return TokenizerConfig if kind == "tokenizer" else GPTConfig


def expected_shapes(kind: Kind, cfg) -> dict[str, tuple[int, ...]]:
    """Key → shape of a model's state dict, built on the meta device (no memory, any size)."""
    with torch.device("meta"):
        model = _build(kind, cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def guess_kind(sd: Mapping[str, torch.Tensor]) -> Kind:
    if "tok_embeddings.weight" in sd or "cls_embedding.embedding_table.weight" in sd:
        return "gpt"
    if any(k.startswith(("decode_transformer.", "decoder.", "quantize.")) for k in sd):
        return "tokenizer"
    raise CheckpointError(
        "checkpoint holds neither a Hita tokenizer nor a Hita GPT state dict (first keys: "
        f"{list(sd)[:4]}); check the file."
    )


def infer_preset(kind: Kind, sd: Mapping[str, torch.Tensor]):
    """The preset whose state dict has exactly these keys and shapes (released files carry no config)."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    for cfg in _config_cls(kind).PRESETS.values():
        if expected_shapes(kind, cfg) == shapes:
            return cfg
    names = ", ".join(_config_cls(kind).PRESETS)
    raise CheckpointError(
        f"the {kind} checkpoint matches none of the presets ({names}) by key set and shapes; pass "
        "--preset NAME to see the key report against a given preset."
    )


def state_dict_report(expected: Mapping[str, tuple[int, ...]], sd: Mapping[str, torch.Tensor]) -> str:
    """Readable list of missing keys, unexpected keys and shape mismatches ('' when they agree)."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k])
    ]
    lines = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
        if items:
            shown = items[:12] + ([f"... and {len(items) - 12} more"] if len(items) > 12 else [])
            lines.append(f"{title} ({len(items)}):\n    " + "\n    ".join(shown))
    return "\n".join(lines)


def _config_from_metadata(kind: Kind, meta: Mapping[str, str], path: Path):
    """The config stored in one of our safetensors files; ``None`` for a file without hita metadata
    (a plain state dict, whose preset is inferred from its shapes like a released ``.pt``)."""
    stored_kind = meta.get("hita_kind")
    if stored_kind is not None and stored_kind not in KINDS:
        raise CheckpointError(f"{path}: unknown hita_kind {stored_kind[:40]!r} in its metadata (expected "
                              f"{' or '.join(KINDS)}); the file is damaged or not a hita model: re-save it")
    if stored_kind is not None and stored_kind != kind:
        raise CheckpointError(f"{path}: holds a hita {stored_kind}, not a {kind}; pass the right file.")
    if "hita_config" not in meta:
        if any(k.startswith("hita_") for k in meta):
            raise CheckpointError(f"{path}: its metadata has no hita_config (the model's config); the file is "
                                  "damaged or was not written by hita: re-save it, or pass --preset NAME")
        return None
    try:
        return _config_cls(kind).from_json(meta["hita_config"])
    except (ValueError, TypeError, RecursionError) as e:
        cause = str(e).split("; ")[0] if isinstance(e, ValueError) else type(e).__name__
        if isinstance(e, json.JSONDecodeError):
            cause = f"not JSON: {e.msg} at character {e.pos}"
        raise CheckpointError(f"{path}: the {kind} config in its metadata is refused ({' '.join(cause.split())[:200]}); "
                              "the file is damaged or forged: re-save it from a trusted source, or pass --preset NAME"
                              ) from None


def load_model(
    path: str | os.PathLike,
    kind: Kind,
    preset: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build the model for ``path`` and load its weights strictly. Returns it in eval mode.

    The config comes from, in order: ``preset`` (checked against the file's shapes), the file's own
    metadata (our safetensors), or inference from tensor shapes (released ``.pt`` files).
    """
    path = Path(path)
    sd, meta = read_checkpoint(path)
    if meta.get("hita_kind") is None and kind != guess_kind(sd):
        raise CheckpointError(f"{path}: holds a Hita {guess_kind(sd)}, not a {kind}; pass the right file.")
    cfg = _config_cls(kind).from_name(preset) if preset else _config_from_metadata(kind, meta, path)
    if cfg is None:
        cfg = infer_preset(kind, sd)
    report = state_dict_report(expected_shapes(kind, cfg), sd)
    if report:
        raise CheckpointError(
            f"{path}: does not fit the {kind} preset {cfg.name!r} (see the key report below); pass the "
            f"matching --preset or the right file.\n{report}"
        )
    # Build without initialising (meta, then uninitialised storage): a GPT-2B would otherwise spend
    # seconds on random init that the checkpoint overwrites. Models rebuild their non-persistent
    # buffers (RoPE tables) in `_apply`, which `to_empty` calls.
    with torch.device("meta"):
        model = _build(kind, cfg)
    model = model.to_empty(device=device)
    model.load_state_dict(sd, strict=True)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()


def load_tokenizer(path, preset: str | None = None, backbone: str | os.PathLike | None = None, device="cpu"):
    """Load a Hita tokenizer (released ``.pt`` or our ``.safetensors``) in fp32 eval mode.

    Args:
        backbone: local DINOv2 ViT-L/14-reg4 weights; needed only to ``encode`` with presets that have
            a backbone. Decoding never needs it.
    """
    model = load_model(path, "tokenizer", preset, device)
    if backbone is not None:
        model.load_backbone(backbone)
    return model


def load_gpt(path, preset: str | None = None, device="cpu", dtype: torch.dtype | None = None):
    """Load a Hita GPT (released ``.pt`` or our ``.safetensors``) in eval mode."""
    return load_model(path, "gpt", preset, device, dtype)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------




def save_model(model: nn.Module, cfg, path: str | os.PathLike, extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Save ``model`` in the project's format: safetensors + kind + config JSON in the metadata."""

    kind = "tokenizer" if isinstance(cfg, TokenizerConfig) else "gpt"
    return save_state_dict(model.state_dict(), kind, cfg, path, extra_metadata)


def save_state_dict(sd, kind: Kind, cfg, path, extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write a state dict (moved to contiguous CPU tensors) with kind + config metadata, atomically."""
    from safetensors.torch import save_file

    meta = {"hita_kind": kind, "hita_config": cfg.to_json(), "hita_format": FORMAT_VERSION}
    meta.update(extra_metadata or {})
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    try:
        return atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    except OSError:
        raise
    except Exception as e:  # safetensors reports a full or read-only disk as its own error type
        detail = " ".join(str(e).split())[:160]
        raise CheckpointError(f"{path}: cannot write it ({detail}); free space or choose a writable location") from None


def is_hita_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file hita wrote (its header carries ``hita_kind``); reads
    only the header, so it is safe on any file."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return "hita_kind" in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def convert(src: str | os.PathLike, dst: str | os.PathLike, preset: str | None = None) -> tuple[Kind, Any]:
    """Convert a released ``.pt`` into our safetensors format, verifying it strictly first.

    Returns:
        (kind, config) of the converted model.
    Raises:
        CheckpointError: ``dst`` is ``src`` (or a link to it), or is a folder.
    """
    dst_p = Path(dst)
    if dst_p.is_dir():
        raise CheckpointError(f"{dst}: is a folder; give an output file such as {dst_p / 'model.safetensors'}")
    if dst_p.exists() and Path(src).exists() and os.path.samefile(src, dst_p):
        raise CheckpointError(f"{dst}: is the source checkpoint; write the converted file under another name")
    check_output_file(dst_p, "output", owned=is_hita_safetensors)
    sd, meta = read_checkpoint(src)
    kind: Kind = meta.get("hita_kind") or guess_kind(sd)  # type: ignore[assignment]
    if kind not in KINDS:
        _config_from_metadata("gpt", meta, Path(src))  # raises: the file names an unknown kind
    model = load_model(src, kind, preset)
    cfg = model.cfg
    save_state_dict(sd, kind, cfg, dst, {"hita_source_sha256": file_sha256(src)})
    return kind, cfg
