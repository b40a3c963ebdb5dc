"""fedstream-sim end to end on Flower's Simulation Engine (Ray), tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from safetensors.numpy import load_file

from common.config import RunConfig
from common.privacy import planned_noise_multiplier
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

CONFIG = """
seed = 3
[model]
name = "tiny-llama"
max_length = 48
[training]
local_steps = 4
sample_rate = 0.1
learning_rate = 0.01
[federation]
hosts = 2
rounds = 2
[data]
records_per_host = 96
heldout_per_domain = 16
"""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "run.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, config_file) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    proc = run_cli("--config", str(config_file), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_run_folder_is_usable(full_run, config_file):
    from peft import PeftModel

    from common.models import load_base_model
    from server.evaluation import HeldOut

    cfg = RunConfig.from_toml(config_file)
    lines = _metrics(full_run)
    assert [ln["round"] for ln in lines] == [0, 1, 2]
    for ln in lines[1:]:
        assert sorted(ln["hosts"]) == ["host-0", "host-1"]
        assert set(ln["heldout"]) == {"clinical", "banking", "devops", "recipes"}
        assert all({"loss", "ppl"} <= set(v) for v in ln["heldout"].values())
        assert set(ln["epsilon"]) == set(ln["bytes"]) == set(ln["train_loss"])
        assert ln["wall_s"] > 0 and not ln["rejected"] and not ln["failed"]
        # The round's parts the server times: waiting for replies, evaluation.
        assert 0 < ln["wait_s"] < ln["wall_s"] and 0 < ln["eval_s"] < ln["wall_s"]
        assert ln["wait_s"] + ln["eval_s"] <= ln["wall_s"] + 0.02  # 2 decimals each

    # Held-out loss goes down versus the base model (round 0).
    def mean_loss(ln):
        return np.mean([v["loss"] for v in ln["heldout"].values()])

    assert mean_loss(lines[2]) < mean_loss(lines[0])

    # Reported epsilon equals Opacus's accountant for the same events: every record
    # (96 a host, under the window caps) was eligible and counted in every round, and
    # in round 1 (all fresh, under the drift sample cap) measured by the drift
    # release: one Gaussian with noise count_noise / sqrt(query_weight).
    k = cfg.drift.query_weight
    sigma = planned_noise_multiplier(
        cfg.privacy, cfg.training, rounds=2, extra_queries=k
    )
    for ln in lines[1:]:
        acc = RDPAccountant()
        acc.history = [
            (sigma, cfg.training.sample_rate, ln["round"] * cfg.training.local_steps),
            (cfg.privacy.count_noise, 1.0, ln["round"]),
            (cfg.privacy.count_noise / k**0.5, 1.0, 1),
        ]
        expected = acc.get_epsilon(cfg.privacy.delta)
        assert all(
            e == pytest.approx(expected, rel=1e-9) for e in ln["epsilon"].values()
        )
    assert lines[1]["epsilon"]["host-0"] < lines[2]["epsilon"]["host-0"] <= 8.0

    # Every round's adapter loads with PEFT and reproduces the recorded held-out loss.
    for name in ("round-1", "round-2", "latest"):
        path = full_run / "global" / name
        meta = json.loads((path / "fedstream.json").read_text())
        assert meta["config_hash"] == cfg.fingerprint()
        assert meta["base_model"]["name"] == "tiny-llama"
        assert set(meta["epsilon"]) == {"host-0", "host-1"}
        base = load_base_model(cfg.model)
        model = PeftModel.from_pretrained(base.model, str(path))
        scores = HeldOut.for_run(cfg, base).evaluate(model)
        assert scores == lines[meta["round"]]["heldout"]
    assert (full_run / "global" / "latest").resolve().name == "round-2"
    assert (full_run / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_with_the_same_result(full_run, config_file, tmp_path):
    out = tmp_path / "run"
    first = run_cli(
        "--config", str(config_file), "--out", str(out), "--quiet", "--stop-after", "1"
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in (out / "global").iterdir()) == ["latest", "round-1"]
    second = run_cli("--config", str(config_file), "--out", str(out), "--quiet")
    assert second.returncode == 0, second.stderr[-3000:]
    for rnd in (1, 2):
        a = load_file(
            str(full_run / "global" / f"round-{rnd}" / "adapter_model.safetensors")
        )
        b = load_file(
            str(out / "global" / f"round-{rnd}" / "adapter_model.safetensors")
        )
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    resumed, full = _metrics(out), _metrics(full_run)
    assert [ln["round"] for ln in resumed] == [0, 1, 2]
    for x, y in zip(resumed, full, strict=True):
        assert x["heldout"] == y["heldout"] and x.get("epsilon") == y.get("epsilon")
    # A finished run is left alone: nothing is trained or written twice.
    again = run_cli("--config", str(config_file), "--out", str(out), "--quiet")
    assert again.returncode == 0 and len(_metrics(out)) == 3


def test_corrupt_checkpoint_is_a_one_line_error(full_run, config_file, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(full_run, out, symlinks=True)
    (out / "global" / "round-2" / "adapter_model.safetensors").write_bytes(b"garbage")
    proc = run_cli("--config", str(config_file), "--out", str(out), "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "round-2/adapter_model.safetensors is missing or corrupt" in proc.stderr


def test_other_config_in_same_folder_is_refused(full_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(full_run, out, symlinks=True)
    proc = run_cli("--model", "tiny-gpt2", "--out", str(out), "--quiet")
    assert proc.returncode == 2 and "another config" in proc.stderr


def test_secure_aggregation_with_client_level_dp(tmp_path):
    """SecAgg+ and client-level DP together on the Simulation Engine: every round
    aggregates all hosts, each host clipped its update (C = 0.05, below what these
    hosts train), the server added noise of the stated size, and the client-level
    epsilon in metrics.jsonl and fedstream.json is Opacus's for the stated z."""
    from peft import PeftModel

    from common.models import load_base_model
    from server.client_dp import client_dp_for

    path = tmp_path / "run.toml"
    path.write_text(
        CONFIG.replace("hosts = 2", "hosts = 3")
        + "[aggregation]\nsecure = true\n"
        + "[client_dp]\nenabled = true\nclip_norm = 0.05\ntarget_epsilon = 10.0\n"
    )
    cfg = RunConfig.from_toml(path)
    out = tmp_path / "run"
    proc = run_cli("--config", str(path), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _metrics(out)[1:]
    mech = client_dp_for(cfg)
    assert mech is not None
    for ln in lines:
        assert ln["hosts"] == ["host-0", "host-1", "host-2"], ln["failed"]
        assert not ln["rejected"] and not ln["failed"]
        assert ln["weights"] == {h: 0.3333 for h in ln["hosts"]}
        dp = ln["client_dp"]
        assert dp["noise_multiplier"] == round(mech.noise_multiplier, 4)
        acc = RDPAccountant()
        acc.history = [(mech.noise_multiplier, 1.0, ln["round"])]
        assert dp["epsilon"] == pytest.approx(acc.get_epsilon(1e-3), abs=1e-4)
        # SecAgg+: the masked vector, 4 bytes a number, plus keys and shares
        assert all(b > 4 * 768 for b in ln["bytes"].values())
    assert lines[-1]["client_dp"]["epsilon"] == pytest.approx(10.0, rel=0.01)

    rounds = [
        load_file(str(out / "global" / f"round-{r}" / "adapter_model.safetensors"))
        for r in (1, 2)
    ]
    trained = [k for k in rounds[0] if "lora_B" in k]  # FFA-LoRA: A stays frozen
    assert sum(rounds[0][k].size for k in trained) == 768
    step = np.concatenate([(rounds[1][k] - rounds[0][k]).ravel() for k in trained])
    noise = mech.noise_multiplier * 0.05 / 3 * np.sqrt(step.size)  # expected norm
    # The round's change is the noise plus a clipped mean of norm <= C = 0.05.
    assert 0.75 * noise < np.linalg.norm(step) < 1.25 * noise, (
        np.linalg.norm(step),
        noise,
    )

    meta = json.loads((out / "global" / "latest" / "fedstream.json").read_text())
    assert meta["client_dp"] == {
        k: v for k, v in lines[-1]["client_dp"].items() if k != "clipped"
    }
    base = load_base_model(cfg.model)
    PeftModel.from_pretrained(base.model, str(out / "global" / "latest"))
