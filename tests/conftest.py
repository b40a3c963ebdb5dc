"""Shared fixtures: offline Hugging Face, a private model cache, tiny models, a
filled host store, Flower's task identity."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
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


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Messages need a task identity, as run_simulation sets for the ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield


def fill_store(data_dir: Path, host: int, n: int = 32) -> None:
    """A new data dir whose encrypted store holds ``n`` built-in records of host
    ``host``'s domain, ingested through the quality gate."""
    import json

    from client.ingest import Ingestor
    from client.store import Store, load_key
    from common.corpus import host_records

    data_dir.mkdir(parents=True)
    store = Store(data_dir / "store.db", load_key(data_dir / "store.key"))
    rows = host_records(host, n, seed=0)
    Ingestor(store).submit([(json.dumps({"text": t}).encode(), "t") for t in rows])
    store.close()


def aggregate_named(strat, rnd: int, replies):  # type: ignore[no-untyped-def]
    """``strat.aggregate_train`` with the packed global adapter it returns
    (``common.adapter.pack_global``) as named tensors, for assertions per tensor."""
    from common.adapter import to_record, unpack_global

    record, metrics = strat.aggregate_train(rnd, replies)
    if record is None:
        return None, metrics
    shapes = {k: tuple(v.shape) for k, v in strat.global_arrays.items()}
    return to_record(unpack_global(record, shapes)), metrics
