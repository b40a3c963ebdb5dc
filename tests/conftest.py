"""Shared fixtures: offline Hugging Face, a private model cache, tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
TINY = ["tiny-llama", "tiny-gpt2", "tiny-gptneox", "tiny-qwen2"]


def run_cli(
    *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m server.sim ARGS`` in a fresh process (Ray needs its own)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "server.sim", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=ROOT,
    )


@pytest.fixture
def tiny_cfg():
    from common.config import RunConfig

    return RunConfig.build(
        {
            "model": {"name": "tiny-llama", "max_length": 48},
            "training": {"sample_rate": 0.1, "local_steps": 4, "learning_rate": 1e-2},
            "privacy": {"noise_multiplier": 0.8},
        }
    )
