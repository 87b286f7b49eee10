"""Every decoder under a memory and a time limit, fuzzed (tests/fuzz_decoders.py), in a
process of its own: an allocation past the limit or a loop cannot take pytest with it (#32)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from verdict_cells import verdict

FUZZ = Path(__file__).parent / "fuzz_decoders.py"


@verdict("decode", "resource bound exceeded")
@verdict("decode", "bad record")
@pytest.mark.slow
def test_damaged_inputs_end_as_records_or_decode_errors_within_memory_and_time():
    proc = subprocess.run([sys.executable, str(FUZZ), "150"], capture_output=True, text=True,
                          timeout=600, cwd=FUZZ.parent)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), \
        proc.stdout[-2000:] + proc.stderr[-4000:]
