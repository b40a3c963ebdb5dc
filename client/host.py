"""One data host's local state: its records, its privacy ledger, its cached model.

The host's data dir comes from ``node_config["data-dir"]`` (deployment) or, in
simulation, from the run's hosts folder and the virtual node's ``partition-id``::

    <data-dir>/store.db      the encrypted record store, with each record's privacy
                             spend (written by fedstream-agent or the simulator)
    <data-dir>/store.key     its key (0600), unless $FEDSTREAM_STORE_KEY is set
    <data-dir>/host.secret   32 random bytes (0600): seeds noise, sampling, coins

The DP-SGD noise and the Poisson sampling draw from generators seeded by
HMAC(host secret, round). Nothing the server knows (the run config, its seed) can
reproduce them, and a host that re-runs a round after a crash draws the same noise
again instead of releasing a second, independent noisy answer.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel

from client.store import Store, load_key
from common.config import RunConfig
from common.errors import DataError
from common.models import BaseModel, build_adapter_model, load_base_model
from common.secret_file import ensure_secret

__all__ = ["Host", "adapter_model", "ensure_secret", "resolve_data_dir"]

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_MODELS: dict[tuple[str, str, int], tuple[BaseModel, PeftModel]] = {}


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
    def secret_path(self) -> Path:
        return self.data_dir / "host.secret"

    def secret(self) -> bytes:
        """This host's secret, created (32 random bytes, mode 0600) on first use."""
        return ensure_secret(self.secret_path)

    def release_seed(self, release: int) -> int:
        """Seed for a release's DP noise and sampling: HMAC(secret, release number)."""
        mac = hmac.new(self.secret(), f"release:{release}".encode(), hashlib.sha256)
        return int.from_bytes(mac.digest()[:7], "big")

    def open_store(self) -> Store:
        """The host's store; it must exist (the agent or the simulator fills it)."""
        path = self.data_dir / "store.db"
        if not path.exists():
            raise DataError(
                f"host {self.name} has no store at {path}: start fedstream-agent "
                "with this data dir, or give the simulator data"
            )
        return Store(path, load_key(self.data_dir / "store.key", create=False))
