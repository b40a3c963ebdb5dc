"""RSS stays flat with stream length once window, replay and dedup horizon fill."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("workers", "records"), [(0, 2000), (1, 1500)])
def test_rss_is_flat_from_1x_to_10x_the_stream(workers, records):
    """One batch at a time (gRPC pushes), and streamed through an ingest worker (the
    file tail and Kafka, as the agent runs them): the worker's RSS stays flat too."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "memory.py"),
            "--records",
            str(records),
            "--factor",
            "10",
            "--horizon",
            str(records * 3 // 4),
            "--round-every",
            str(records),
            "--workers",
            str(workers),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["stored"] > 9.5 * records  # the stream really grew tenfold
    assert result["growth"] <= 0.10, result
    if workers:
        assert result["worker_growth"] <= 0.10, result
