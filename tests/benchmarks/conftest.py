"""Put ``benchmarks/`` on ``sys.path``, as running ``python benchmarks/decode.py`` does: the scripts
import their measuring library as ``benchlib``, and the tests import the scripts and the library."""
from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
