"""Write a standard Triton model repository for the ``hita`` generation model.

Layout (what ``tritonserver --model-repository DIR`` expects)::

    DIR/hita/config.pbtxt        # inputs/outputs from hita.serving.protocol, the settings as parameters
    DIR/hita/1/model.py          # two lines: the Python-backend model lives in hita.serving.triton_model
    DIR/hita/1/artifacts/...     # standalone repositories only: the exported folder, copied
    DIR/hita/1/checkpoints/...   #   or the checkpoints (torch runtime)

``hita serve`` writes one into its work folder with absolute paths to the artifacts (nothing is
copied); ``hita export --engine triton --out DIR`` (and ``hita serve --export-repository DIR``) writes
a standalone one, model files inside, that can be moved to a GPU fleet, where the Python that runs Triton's Python backend must have hita installed. The server runs
exactly one model instance per device on purpose: in-flight batching needs one scheduler owning
one executor; several instances would split the rows instead of sharing steps.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

from .protocol import INPUTS, MODEL_NAME, OUTPUTS

__all__ = [
    "ServingSettings", "write_repository", "export_repository", "check_repository_target", "model_config_text",
    "ENGINE_OF_RUNTIME",
]

RUNTIMES = ("onnxruntime", "torch", "aoti", "tensorrt")
# The artifacts folder kind (manifest ``engine``) each artifact runtime serves.
ENGINE_OF_RUNTIME = {"onnxruntime": "onnx", "aoti": "aoti", "tensorrt": "tensorrt"}


@dataclass(frozen=True)
class ServingSettings:
    """What the model in the server runs, stored as ``config.pbtxt`` parameters (all strings there).

    Fields:
        runtime: ``onnxruntime``, ``torch``, ``aoti`` or ``tensorrt``.
        artifacts: exported folder (artifact runtimes); relative paths are relative to the model's
            version folder (``hita/1``).
        gpt, tokenizer: checkpoints (torch runtime), same path rule.
        device: ``cpu`` or ``cuda`` (a GPU instance uses its own GPU, ``cuda:<instance device>``).
        precision: torch runtime GPT dtype, ``fp32`` or ``bf16``.
        pos128: torch runtime position-128 rule.
        max_rows: rows one step holds (CFG rows count).
        queue_limit: requests that may wait; more are refused as overload.
        max_images: images one request may ask for.
        threads: intra-op threads of the executor (0 = the runtime's default).
        expect_manifest_sha256: pin the reviewed export (artifact runtimes).
        in_flight: ``auto`` (when the executor has per-row positions), ``off``.
        drain_timeout: seconds the model's ``finalize`` may spend finishing accepted requests.
    """

    runtime: str = "onnxruntime"
    artifacts: str = ""
    gpt: str = ""
    tokenizer: str = ""
    device: str = "cpu"
    precision: str = "fp32"
    pos128: str = "reference"
    max_rows: int = 16
    queue_limit: int = 64
    max_images: int = 8
    threads: int = 0
    expect_manifest_sha256: str = ""
    in_flight: str = "auto"
    drain_timeout: int = 60

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        for name, low in (("max_rows", 1), ("queue_limit", 0), ("max_images", 1), ("threads", 0),
                          ("drain_timeout", 1)):
            if int(getattr(self, name)) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.in_flight not in ("auto", "off"):
            raise ValueError(f"in_flight must be 'auto' or 'off', got {self.in_flight!r}")

    def require_files(self) -> "ServingSettings":
        """Refuse settings that name no model files for their runtime; returns ``self``."""
        if self.runtime == "torch" and not (self.gpt and self.tokenizer):
            raise ValueError("the torch runtime needs gpt and tokenizer checkpoints")
        if self.runtime != "torch" and not self.artifacts:
            raise ValueError(f"the {self.runtime} runtime needs an artifacts folder")
        return self

    def to_params(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "ServingSettings":
        """From ``config.pbtxt`` parameters; unknown keys are refused (a typo must not be ignored)."""
        names = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise ValueError(f"config.pbtxt: unknown parameter {unknown[0]!r}; parameters are {', '.join(names)}")
        kw = {k: (int(v) if names[k] in (int, "int") else v) for k, v in params.items()}
        return cls(**kw)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def model_config_text(settings: ServingSettings) -> str:
    """``config.pbtxt`` for :data:`~hita.serving.protocol.MODEL_NAME` with these settings."""
    def tensor(t, is_input: bool) -> str:
        dims = ", ".join(str(d) for d in t.dims)
        opt = " optional: true" if is_input and t.optional else ""
        return f"  {{ name: {_quote(t.name)} data_type: TYPE_{t.triton} dims: [ {dims} ]{opt} }}"

    kind = "KIND_GPU" if settings.device.startswith("cuda") else "KIND_CPU"
    params = ",\n".join(f"  {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}"
                        for k, v in settings.to_params().items())
    return "\n".join([
        "# Written by hita (hita.serving.repository). One instance: one scheduler owns one executor.",
        f"name: {_quote(MODEL_NAME)}",
        'backend: "python"',
        "max_batch_size: 0",
        "input [", ",\n".join(tensor(t, True) for t in INPUTS), "]",
        "output [", ",\n".join(tensor(t, False) for t in OUTPUTS), "]",
        f"instance_group [ {{ count: 1 kind: {kind} }} ]",
        "parameters [", params, "]",
        "",
    ])


MODEL_PY = '''"""Triton Python-backend entry point of the hita generation model (written by hita).

The model, its scheduler and its checks live in the hita package: hita.serving.triton_model.
"""
from hita.serving.triton_model import TritonPythonModel  # noqa: F401
'''


def check_repository_target(out_dir: str | Path) -> None:
    """A standalone repository goes into a new or empty folder only (never over someone's files)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; choose a new folder for the repository")


def write_repository(out_dir: str | Path, settings: ServingSettings, *, standalone: bool = False) -> Path:
    """Write the repository; returns ``out_dir``.

    Args:
        out_dir: the repository folder. Standalone: must not exist or be empty; the repository is
            built in a staging folder beside it and renamed into place, so a failure leaves nothing
            half-written. Otherwise (``hita serve``'s work folder) the ``hita`` model folder inside
            is rewritten.
        settings: what to serve. Paths are used as given (``hita serve``), or, standalone, the
            artifacts / checkpoints are copied into ``hita/1`` and referenced relatively.
        standalone: copy the model files in, so the folder can be moved to another machine.
    Raises:
        ValueError: a standalone ``out_dir`` that already holds files, or missing model files.
    """
    settings.require_files()
    out = Path(out_dir)
    if not standalone:
        _write_model(out, settings)
        return out
    from hita.export.manifest import staging_dir
    from hita.util.files import fsync_tree

    check_repository_target(out)
    with staging_dir(out) as work:
        version = work / MODEL_NAME / "1"
        version.mkdir(parents=True)
        changes = {}
        if settings.runtime == "torch":
            (version / "checkpoints").mkdir()
            for key in ("gpt", "tokenizer"):
                src = Path(getattr(settings, key))
                shutil.copy2(src, version / "checkpoints" / src.name)
                changes[key] = f"checkpoints/{src.name}"
        else:
            shutil.copytree(settings.artifacts, version / "artifacts")
            changes["artifacts"] = "artifacts"
        _write_model(work, ServingSettings(**{**asdict(settings), **changes}))
        fsync_tree(work)
        check_repository_target(out)  # still new or empty: os.replace swaps an empty folder only
        os.replace(work, out)
    return out


def _write_model(repo: Path, settings: ServingSettings) -> None:
    """``config.pbtxt`` and ``1/model.py`` of the ``hita`` model in ``repo``."""
    version = repo / MODEL_NAME / "1"
    version.mkdir(parents=True, exist_ok=True)
    (repo / MODEL_NAME / "config.pbtxt").write_text(model_config_text(settings))
    (version / "model.py").write_text(MODEL_PY)


def export_repository(
    out_dir: str | Path,
    *,
    artifacts: str | Path | None = None,
    gpt: str | Path | None = None,
    tokenizer: str | Path | None = None,
    device: str = "cpu",
    max_rows: int = 16,
    log: Callable[[str], None] = print,
) -> ServingSettings:
    """``hita export --engine triton``: a standalone repository that a stock ``tritonserver
    --model-repository OUT`` serves, with the model files inside.

    Args:
        artifacts: an exported folder (ONNX, AOTInductor or TensorRT; the runtime follows its
            manifest, which is verified first). ``None``: export ``gpt`` + ``tokenizer`` (default
            the embedded model) to ONNX with per-row positions now, so requests batch in flight.
        device: where the server runs the model (``cuda``: one GPU instance).
        max_rows: rows one decode step holds (CFG rows count).
    Returns:
        the settings written into ``config.pbtxt``.
    Raises:
        ValueError, ArtifactError: refused before anything is written.
    """
    from hita.export.manifest import load_manifest, staging_dir

    out = Path(out_dir)
    check_repository_target(out)
    base = ServingSettings(device=device, max_rows=max_rows)
    if artifacts is not None:
        if gpt is not None or tokenizer is not None:
            raise ValueError("--from-artifacts serves that exported folder; drop --gpt/--tokenizer")
        m = load_manifest(artifacts)
        runtime = {v: k for k, v in ENGINE_OF_RUNTIME.items()}.get(m.engine)
        if runtime is None:
            raise ValueError(f"{artifacts}: a {m.engine} folder cannot be served; export onnx, aoti or tensorrt")
        settings = replace(base, runtime=runtime, artifacts=str(Path(artifacts).resolve()))
        write_repository(out, settings, standalone=True)
        return settings
    from hita.jobs.sources import resolve_checkpoints

    from .artifacts import serving_onnx

    gpt_path, tok_path, _ = resolve_checkpoints(gpt, tokenizer)
    with staging_dir(out) as work:
        art = serving_onnx(work / "artifacts", gpt_path, tok_path, max_batch=max(16, max_rows),
                           attention="plain" if device.startswith("cuda") else "gqa", log=log)
        settings = replace(base, runtime="onnxruntime", artifacts=str(art))
        write_repository(out, settings, standalone=True)
    return replace(settings, artifacts="artifacts")
