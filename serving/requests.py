"""One request's tensors -> a checked :class:`GenerationRequest`, or an error that names the field.

Triton already refuses a tensor of the wrong type or rank before the model sees it (its message
names the input). What Triton cannot know is checked here, before the request takes a place in the
queue: class ids in range, how many images one request may ask for, and the sampling values (the
loop's own :class:`~hita.runtimes.sampling.SamplingOptions` rules). A bad request costs its sender
one error line and nobody else anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from hita.runtimes.sampling import SamplingOptions

from .protocol import INPUTS, SAMPLING_FIELDS

__all__ = ["GenerationRequest", "RequestError", "parse_request"]


class RequestError(ValueError):
    """A request the server refuses; the message starts with the offending field's name."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class GenerationRequest:
    """What one client asked for.

    Fields:
        class_ids: int64 CPU ``[n]``, one class per image, each in ``[0, num_classes)``.
        opts: the sampling options of every image of the request.
        return_tokens: send the tokens back with the images.
        row_offset: noise row of the first image (image ``r`` draws row ``row_offset + r``), as
            ``generate_tokens(row_offset=...)`` offline.
    """

    class_ids: torch.Tensor
    opts: SamplingOptions
    return_tokens: bool = False
    row_offset: int = 0

    @property
    def images(self) -> int:
        return int(self.class_ids.shape[0])

    @property
    def rows(self) -> int:
        """Rows the request occupies in a step: one per image, two with guidance (cond + null)."""
        return self.images * (2 if self.opts.use_cfg else 1)


def _scalar(name: str, value: np.ndarray):
    if value.size != 1:
        raise RequestError(name, f"expected one value, got shape {list(value.shape)}")
    return value.reshape(-1)[0].item()


def parse_request(
    tensors: Mapping[str, np.ndarray | None], num_classes: int, max_images: int
) -> GenerationRequest:
    """Check one request and build a :class:`GenerationRequest`.

    Args:
        tensors: input name -> numpy array, ``None`` (or missing) for an absent optional input.
        num_classes: classes of the served GPT (ids ``0 .. num_classes - 1``).
        max_images: the most images one request may ask for.
    Raises:
        RequestError: the first bad field, named.
    """
    known = {t.name for t in INPUTS}
    unknown = sorted(set(k for k, v in tensors.items() if v is not None) - known)
    if unknown:
        raise RequestError(unknown[0], f"not an input of this model; inputs are {', '.join(sorted(known))}")
    ids = tensors.get("class_ids")
    if ids is None:
        raise RequestError("class_ids", "missing; send one class id per image, e.g. [0, 3, 3]")
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise RequestError("class_ids", f"must be integers, got {ids.dtype}")
    if ids.ndim != 1 or ids.size == 0:
        raise RequestError("class_ids", f"must be a non-empty 1-D list, got shape {list(ids.shape)}")
    if ids.size > max_images:
        raise RequestError("class_ids", f"{ids.size} images requested; this server takes at most {max_images} "
                                        "per request (split it, or start the server with a larger --max-images)")
    bad = ids[(ids < 0) | (ids >= num_classes)]
    if bad.size:
        raise RequestError("class_ids", f"class id {int(bad[0])} out of range [0, {num_classes})")
    values = {}
    for t in INPUTS:
        if t.name in SAMPLING_FIELDS:
            v = tensors.get(t.name)
            values[t.name] = t.default if v is None else _scalar(t.name, np.asarray(v))
    try:
        opts = SamplingOptions(**values)
    except ValueError as e:
        field = next((f for f in SAMPLING_FIELDS if str(e).startswith(f)), "sampling options")
        raise RequestError(field, str(e)[len(field):].lstrip(" :") if field != "sampling options" else str(e)) from None
    flag = tensors.get("return_tokens")
    return_tokens = False if flag is None else bool(_scalar("return_tokens", np.asarray(flag)))
    offset = tensors.get("row_offset")
    row_offset = 0 if offset is None else int(_scalar("row_offset", np.asarray(offset)))
    if not 0 <= row_offset <= 2**63:
        raise RequestError("row_offset", f"must be in [0, 2**63], got {row_offset}")
    return GenerationRequest(torch.from_numpy(ids.astype(np.int64)), opts, return_tokens, row_offset)
