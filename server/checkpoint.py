"""The run folder: versioned global adapters, metrics, and resume.

::

    <out>/config.toml                 the validated run config (resume checks it)
    <out>/global/round-N/             PEFT adapter + fedstream.json, one per round
    <out>/global/latest -> round-N    symlink to the newest complete round
    <out>/metrics.jsonl               one JSON object per round (round 0 = base model)
    <out>/report.png                  plots of metrics.jsonl

A round is complete when ``global/round-N`` exists: it is written to a temporary folder
and renamed into place after its metrics line is on disk, so a crash leaves either the
whole round or none of it. Resume truncates metrics beyond the last complete round.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.numpy import load_file

from common.adapter import check_compatible, load_trainable_state
from common.config import RunConfig
from common.errors import CheckpointError

__all__ = ["RunFolder"]

_ROUND = re.compile(r"^round-(\d+)$")


class RunFolder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.global_dir = self.path / "global"
        self.metrics_path = self.path / "metrics.jsonl"
        self.config_path = self.path / "config.toml"
        self.report_path = self.path / "report.png"

    # -- config ---------------------------------------------------------------------
    def bind(self, cfg: RunConfig) -> None:
        """Create the folder, or check that an existing one belongs to ``cfg``."""
        self.global_dir.mkdir(parents=True, exist_ok=True)
        if self.config_path.exists():
            try:
                old = RunConfig.from_toml(self.config_path)
            except Exception as err:
                raise CheckpointError(
                    f"{self.config_path} is unreadable ({err}); use a new --out folder"
                ) from None
            if old.fingerprint() != cfg.fingerprint():
                raise CheckpointError(
                    f"run folder {self.path} was made with another config; resume with "
                    "the same settings or choose a new --out folder"
                )
        else:
            _atomic_write(self.config_path, cfg.to_toml())

    # -- rounds ---------------------------------------------------------------------
    def completed_rounds(self) -> list[int]:
        if not self.global_dir.is_dir():
            return []
        return sorted(
            int(m.group(1))
            for p in self.global_dir.iterdir()
            if (m := _ROUND.match(p.name)) and p.is_dir()
        )

    def last_round(self) -> int:
        rounds = self.completed_rounds()
        return rounds[-1] if rounds else 0

    def round_dir(self, n: int) -> Path:
        return self.global_dir / f"round-{n}"

    def load_arrays(
        self, n: int, shapes: dict[str, tuple[int, ...]]
    ) -> OrderedDict[str, np.ndarray]:
        """The trainable tensors saved for round ``n``, in ``shapes`` order."""
        path = self.round_dir(n) / "adapter_model.safetensors"
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as err:
            raise CheckpointError(
                f"{path} is missing or corrupt ({err}); delete {self.round_dir(n)} to "
                f"resume from round {n - 1}"
            ) from None
        picked = {k: tensors[k] for k in shapes if k in tensors}
        try:
            check_compatible(picked, shapes)
        except Exception as err:
            raise CheckpointError(
                f"{path} does not fit this run's adapter: {err}"
            ) from None
        return OrderedDict((k, picked[k].astype(np.float32)) for k in shapes)

    def save_round(
        self,
        n: int,
        model: PeftModel,
        arrays: dict[str, np.ndarray],
        meta: dict[str, Any],
        metrics: dict[str, Any],
    ) -> Path:
        """Save adapter + metadata, append the metrics line, then publish the round."""
        if self.round_dir(n).exists():
            raise CheckpointError(
                f"{self.round_dir(n)} exists already; refusing to overwrite"
            )
        load_trainable_state(model, arrays)
        tmp = Path(tempfile.mkdtemp(prefix=f".round-{n}-", dir=self.global_dir))
        model.save_pretrained(str(tmp))
        _atomic_write(
            tmp / "fedstream.json", json.dumps(meta, indent=1, sort_keys=True)
        )
        self.append_metrics(metrics)
        os.replace(tmp, self.round_dir(n))
        link_tmp = self.global_dir / f".latest-{os.getpid()}"
        if link_tmp.is_symlink() or link_tmp.exists():
            link_tmp.unlink()
        os.symlink(f"round-{n}", link_tmp)
        os.replace(link_tmp, self.global_dir / "latest")
        return self.round_dir(n)

    def clean_partial(self) -> None:
        """Drop leftovers of an interrupted round: temp folders and extra metrics."""
        for p in self.global_dir.glob(".round-*"):
            shutil.rmtree(p, ignore_errors=True)
        last = self.last_round()
        kept = [m for m in self.read_metrics() if m.get("round", 0) <= last]
        _atomic_write(self.metrics_path, "".join(json.dumps(m) + "\n" for m in kept))

    # -- metrics --------------------------------------------------------------------
    def append_metrics(self, line: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn last line from a crash; its round is redone
        return out


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def now() -> float:
    return round(time.time(), 3)
