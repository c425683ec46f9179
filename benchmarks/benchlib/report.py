"""The markdown table, the notes under it, and the JSON file of a run."""
from __future__ import annotations

import json
import os
from pathlib import Path

from hita.util.files import atomic_write

from .results import BenchResult
from .runtimes import QUANTIZED

HEADER = ("runtime", "batch (rows)", "ms/step", "spread", "fwd ms", "× eager", "floor ms", "× floor", "decoder ms",
          "images/s", "top-1 = eager", "KL vs eager")


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _pct(x: float | None, spec: str = ".0f") -> str:
    return "–" if x is None else f"{format(100 * x, spec)}%"


def table_rows(result: BenchResult) -> list[tuple[str, ...]]:
    """The table as strings, one tuple per row (:data:`HEADER` order)."""
    out = []
    for r in result.rows:
        batch = f"{r.batch_label} ({r.rows})"
        if r.error is not None:
            out.append((r.runtime, batch, f"unavailable: {r.error}", *[""] * (len(HEADER) - 3)))
            continue
        out.append((
            r.runtime, batch, _fmt(r.step_ms, ".2f"), _pct(r.spread), _fmt(r.forward_ms, ".2f"),
            _fmt(r.x_eager, ".2f"), _fmt(r.floor_ms, ".2f"), _fmt(r.x_floor, ".2f"), _fmt(r.decode_image_ms, ".0f"),
            _fmt(r.images_per_s, ".3g"), _pct(r.top1_vs_eager, ".1f"), _fmt(r.kl_vs_eager, ".1e"),
        ))
    return out


def _other_load_line(result: BenchResult) -> str | None:
    """Per batch, the CPU share other processes took while it was timed: a reader's first check
    before trusting a row on a shared machine."""
    loads: dict[str, list[str]] = {}
    for r in result.rows:
        if r.other_load is not None:
            part = f"{100 * r.other_load:.0f}%" + (f" ({r.runtime} run)" if r.note else "")
            batch = loads.setdefault(r.batch_label, [])
            if part not in batch:
                batch.append(part)
    if not loads:
        return None
    return ("CPU used by other processes while timing (share of all cores; noise indicator): "
            + ", ".join(f"batch {b}: {', '.join(v)}" for b, v in loads.items()) + ".")


def _agreement_line(result: BenchResult) -> str | None:
    """Largest |logits - eager| per runtime and batch, and whether the same tokens were drawn: the
    proof that a fast row comes from a graph that computes the right thing."""
    parts = []
    for r in result.rows:
        if r.max_abs_diff_vs_eager is not None:
            same = "" if r.tokens_equal_eager is None else (
                ", same tokens" if r.tokens_equal_eager
                else ", some tokens differ (quantized: see top-1 / KL)" if r.runtime in QUANTIZED
                else ", OTHER TOKENS drawn")
            parts.append(f"{r.runtime} {r.batch_label}: {r.max_abs_diff_vs_eager:.1e}{same}")
    return ("Max |logits - eager| over the timed steps: " + ", ".join(parts) + ".") if parts else None


def format_table(result: BenchResult) -> str:
    """Markdown table plus the machine line and the notes a reader needs to trust the numbers."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    lines += [
        "",
        (
            f"GPT {result.preset} + tokenizer {result.tokenizer} (random weights, fp32), seq_len {result.seq_len}; "
            f"{len(result.positions)} timed positions {result.positions[0]}..{result.positions[-1]}, "
            f"{result.repeats} repeat(s) each. "
            "ms/step: median loop step (decode_one_token + CFG mix + sample); fwd ms: the executor's decode "
            "call alone inside it; spread: median over positions of (slowest - fastest) / median of the repeats."
        ),
        f"Machine: {result.machine.line()}.",
        "images/s = images / (prefill + (seq_len - 1) x ms/step + tokenizer decoder on the batch).",
        ("top-1 = eager, KL vs eager: at the timed steps, fed the same tokens as eager (teacher-forced), the share "
         "of rows whose most likely token is eager's and the mean KL(eager || runtime) of the guided "
         "distributions (random weights: near-flat distributions, the hardest case for top-1)."),
    ]
    notes = dict.fromkeys(f"{r.runtime}: {r.note}" for r in result.rows if r.note)
    for line in (_other_load_line(result), "Measured differently: " + "; ".join(notes) + "." if notes else None,
                 _agreement_line(result)):
        if line:
            lines.append(line)
    return "\n".join(lines)


def write_json(result: BenchResult, path: str | os.PathLike) -> Path:
    """Every number of the run (per-position times, bandwidth per method, ...) as JSON, written
    atomically: a reader never sees half a file, and a failed run leaves the old one."""
    text = json.dumps(result.to_dict(), indent=2) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
