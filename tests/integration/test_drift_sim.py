"""A short drifting federation end to end: drift events and weights are recorded."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli

SCENARIO = """
name = "short-abrupt"
rounds = 3
records_per_round = 96
[heldout]
banking = "builtin:banking"
clinical = "builtin:clinical"
[[hosts]]
phases = [{from_round = 1, source = "builtin:banking"},
          {from_round = 3, source = "builtin:clinical"}]
[[hosts]]
phases = [{from_round = 1, source = "builtin:banking"},
          {from_round = 3, source = "builtin:clinical"}]
[[hosts]]
phases = [{from_round = 1, source = "builtin:banking"}]
[[hosts]]
phases = [{from_round = 1, source = "builtin:banking"}]
"""


def test_scenario_run_records_drift_events_and_weights(tmp_path: Path) -> None:
    (tmp_path / "short.toml").write_text(SCENARIO)
    out = tmp_path / "run"
    proc = run_cli(
        "--scenario",
        str(tmp_path / "short.toml"),
        "--model",
        "tiny-llama",
        "--policy",
        "drift",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]["heldout"]) == {"banking", "clinical"}
    for r in rows[1:]:
        assert r["policy"] == "drift"
        assert set(r["drift"]) == set(r["weights"]) == {f"host-{i}" for i in range(4)}
        assert abs(sum(r["weights"].values()) - 1.0) < 1e-3
    # The two hosts whose stream changed at round 3 report it, the others do not,
    # and the server gives them more weight.
    assert rows[1]["drift_events"] == rows[2]["drift_events"] == []
    assert rows[3]["drift_events"] == ["host-0", "host-1"]
    w = rows[3]["weights"]
    assert min(w["host-0"], w["host-1"]) > max(w["host-2"], w["host-3"])
    assert "drift events host-0,host-1" in proc.stdout
    assert (out / "report.png").stat().st_size > 0
