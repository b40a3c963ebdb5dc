"""One data host's local state: its records, its privacy ledger, its cached model.

The host's data dir comes from ``node_config["data-dir"]`` (deployment) or, in
simulation, from the run's hosts folder and the virtual node's ``partition-id``::

    <data-dir>/records/*.jsonl|*.txt   records this host trains on
    <data-dir>/ledger.json             composed privacy spend (survives restarts)
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel

from common.config import RunConfig
from common.corpus import read_folder
from common.errors import DataError
from common.lm import Encoded, encode
from common.models import BaseModel, build_adapter_model, load_base_model
from common.privacy import Ledger

__all__ = ["Host", "adapter_model", "resolve_data_dir"]

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_MODELS: dict[tuple[str, str, int], tuple[BaseModel, PeftModel]] = {}
_DATA: dict[tuple[str, str, int], Encoded] = {}


def resolve_data_dir(node_config: dict[str, object], hosts_dir: str | None) -> Path:
    if "data-dir" in node_config:
        return Path(str(node_config["data-dir"]))
    if hosts_dir is not None and "partition-id" in node_config:
        return Path(hosts_dir) / f"host-{int(str(node_config['partition-id']))}"
    raise DataError(
        "this node has no data dir: start the SuperNode with "
        "--node-config 'data-dir=\"/path\"'"
    )


def adapter_model(cfg: RunConfig) -> tuple[BaseModel, PeftModel]:
    """The base model with LoRA for ``cfg``, built once per process and reused."""
    key = (cfg.model.name, cfg.lora.model_dump_json(), cfg.seed)
    with _LOCK:
        if key not in _MODELS:
            _MODELS.clear()  # one model per process: never hold two copies of weights
            base = load_base_model(cfg.model)
            _MODELS[key] = (base, build_adapter_model(base, cfg.lora, seed=cfg.seed))
        return _MODELS[key]


@dataclass
class Host:
    data_dir: Path
    cfg: RunConfig

    @property
    def name(self) -> str:
        return self.data_dir.name

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / "ledger.json"

    def ledger(self) -> Ledger:
        return Ledger.load(
            self.ledger_path,
            accountant=self.cfg.privacy.accountant,
            delta=self.cfg.privacy.delta,
        )

    def records(self, base: BaseModel) -> Encoded:
        key = (str(self.data_dir), self.cfg.model.name, self.cfg.model.max_length)
        with _LOCK:
            if key not in _DATA:
                texts = read_folder(self.data_dir / "records")
                _DATA[key] = encode(texts, base.tokenizer, self.cfg.model.max_length)
                log.info("Host %s: %d records loaded", self.name, len(texts))
            return _DATA[key]
