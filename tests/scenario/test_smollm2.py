"""The real-model path: packaged SmolLM2-135M, one short DP round in simulation."""

import json

import numpy as np
import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

CONFIG = """
[model]
name = "smollm2-135m"
max_length = 32
[training]
local_steps = 3
sample_rate = 0.25
batch_size = 16
[federation]
hosts = 2
rounds = 1
[data]
records_per_host = 64
heldout_per_domain = 8
"""


def test_smollm2_one_round(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from common.models import smollm2_dir

    cfg = tmp_path / "run.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "run"
    proc = run_cli("--config", str(cfg), "--out", str(out), "--quiet", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    base_loss = np.mean([v["loss"] for v in lines[0]["heldout"].values()])
    after = np.mean([v["loss"] for v in lines[1]["heldout"].values()])
    assert after < base_loss
    assert 0 < max(lines[1]["epsilon"].values()) <= 8.0

    meta = json.loads((out / "global" / "latest" / "fedstream.json").read_text())
    assert meta["base_model"]["name"] == "smollm2-135m"
    assert meta["base_model"]["model_type"] == "llama"
    folder = smollm2_dir()
    assert (folder / "model.safetensors").exists()  # the plain copy, reused next time
    base = AutoModelForCausalLM.from_pretrained(folder)
    model = PeftModel.from_pretrained(base, str(out / "global" / "latest"))
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and any(float(p.abs().max()) > 0 for p in b)
