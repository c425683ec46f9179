"""The wire protocol of the ``hita`` Triton model: one table of tensors for everyone who speaks it.

The model config (``config.pbtxt``), the model's request parser and the clients all read
:data:`INPUTS` and :data:`OUTPUTS`, so a name, a type or a default is written once. Floats travel as
FP64 on purpose: a guidance scale of 1.1 sent as FP32 would arrive as 1.100000023841858 and draw
other tokens than the same request run offline with ``1.1``.

Inputs (one request = ``n`` images of the listed classes, one sampling setting):

==============  ======  =======  ==============================================================
name            type    shape    meaning (default: the offline loop's ``SamplingOptions``)
==============  ======  =======  ==============================================================
class_ids       INT64   [n]      class per image (required)
cfg_scale       FP64    [1]      classifier-free guidance scale, 1 = off (1.5)
cfg_interval    INT64   [1]      guidance only up to this decode step, -1 = always (-1)
temperature     FP64    [1]      0 = greedy (1.0)
top_k           INT64   [1]      0 = off (0)
top_p           FP64    [1]      1 = off (1.0)
seed            UINT64  [1]      key of the noise stream (0)
row_offset      UINT64  [1]      noise row of the first image (0): image r draws row row_offset + r,
                                 so a job split over requests gets the images of one offline run
return_tokens   BOOL    [1]      also return the tokens (false)
==============  ======  =======  ==============================================================

Outputs: ``images`` UINT8 ``[n, H, W, 3]`` (what ``to_uint8`` makes offline) and, on request,
``tokens`` INT64 ``[n, n_holistic + n_patch]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hita.runtimes.sampling import SamplingOptions

__all__ = ["Tensor", "INPUTS", "OUTPUTS", "SAMPLING_FIELDS", "MODEL_NAME", "DRAIN_FILE", "DRAINED_FILE", "input_named"]

MODEL_NAME = "hita"
# Stopping without losing answers: whoever stops the server creates DRAIN_FILE in the model's folder;
# the model refuses new requests, finishes the accepted ones, then creates DRAINED_FILE.
DRAIN_FILE, DRAINED_FILE = "drain", "drained"


@dataclass(frozen=True)
class Tensor:
    """One model input or output.

    Fields:
        name: tensor name on the wire.
        triton: Triton data type without the ``TYPE_`` prefix (``"INT64"``).
        numpy: the matching numpy dtype.
        dims: shape in the model config (``-1`` = any size).
        optional: inputs only; absent inputs take ``default``.
        default: value of an absent optional input.
    """

    name: str
    triton: str
    numpy: type
    dims: tuple[int, ...]
    optional: bool = False
    default: object = None


_D = SamplingOptions()
SAMPLING_FIELDS = ("cfg_scale", "cfg_interval", "temperature", "top_k", "top_p", "seed")

INPUTS: tuple[Tensor, ...] = (
    Tensor("class_ids", "INT64", np.int64, (-1,)),
    Tensor("cfg_scale", "FP64", np.float64, (1,), True, _D.cfg_scale),
    Tensor("cfg_interval", "INT64", np.int64, (1,), True, _D.cfg_interval),
    Tensor("temperature", "FP64", np.float64, (1,), True, _D.temperature),
    Tensor("top_k", "INT64", np.int64, (1,), True, _D.top_k),
    Tensor("top_p", "FP64", np.float64, (1,), True, _D.top_p),
    Tensor("seed", "UINT64", np.uint64, (1,), True, _D.seed),
    Tensor("row_offset", "UINT64", np.uint64, (1,), True, 0),
    Tensor("return_tokens", "BOOL", np.bool_, (1,), True, False),
)

OUTPUTS: tuple[Tensor, ...] = (
    Tensor("images", "UINT8", np.uint8, (-1, -1, -1, 3)),
    Tensor("tokens", "INT64", np.int64, (-1, -1)),
)


def input_named(name: str) -> Tensor:
    """The :data:`INPUTS` entry called ``name`` (``KeyError`` for an unknown name)."""
    for t in INPUTS:
        if t.name == name:
            return t
    raise KeyError(name)
