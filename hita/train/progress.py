"""Run output: a JSON-lines log file and a tqdm bar with the loss and images/s (main process only)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

LOG_FILE = "log.jsonl"


class RunLog:
    """Appends one JSON object per line to ``<run>/log.jsonl`` and drives the progress bar.

    ``enabled=False`` (non-main ranks) makes every method a no-op; ``bar=False`` keeps the log but
    drops the bar (CI, tests).
    """

    def __init__(self, run_dir: str | os.PathLike, total_steps: int, start_step: int = 0,
                 enabled: bool = True, bar: bool = True, desc: str = "train"):
        self.enabled = enabled
        self._file = None
        self._bar = None
        if not enabled:
            return
        path = Path(run_dir) / LOG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")
        if bar:
            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True,
                             file=sys.stderr, unit="step")

    def event(self, kind: str, **fields: Any) -> None:
        """Write a non-metric line (start, resume, a warning) and echo messages above the bar."""
        if not self.enabled:
            return
        self._write({"event": kind, "time": time.time(), **fields})
        if "message" in fields:
            self.message(str(fields["message"]))

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write({"step": step, "time": time.time(), **values})
        if self._bar is not None:
            shown = {k: values[k] for k in ("loss", "images_per_s") if k in values}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def _write(self, obj: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(obj, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        self._bar = self._file = None


def read_log(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All lines of a run's JSON log (for tests and reports)."""
    path = Path(run_dir) / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
