"""Configuration of the data-host agent (``fedstream-agent --config agent.toml``).

Validated once into frozen models like the run config; unknown keys are errors that
name the field. Sources are picked by name from the registry in ``client.sources``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from common.config import FrozenModel, read_toml, validated

__all__ = [
    "AgentConfig",
    "GateConfig",
    "GrpcSource",
    "JsonlSource",
    "KafkaSource",
    "StoreSettings",
    "SupernodeSettings",
]


class StoreSettings(FrozenModel):
    key_file: str | None = Field(
        None,
        description="Key file (created 0600 on first start); default "
        "<data_dir>/store.key. $FEDSTREAM_STORE_KEY (base64) takes precedence.",
    )
    quota_bytes: int = Field(0, ge=0, description="Disk quota for records; 0 = none.")
    synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="SQLite synchronous: FULL survives power loss too."
    )
    retention_days: float = Field(
        0.0, ge=0, description="Delete records older than this; 0 keeps them."
    )


class GateConfig(FrozenModel):
    max_raw_bytes: int = Field(262_144, ge=64, description="Largest raw input.")
    max_text_bytes: int = Field(32_768, ge=16, description="Largest text.")
    max_depth: int = Field(4, ge=1, le=64, description="JSON nesting limit.")
    max_tags: int = Field(16, ge=0, description="Tags per record.")
    horizon: int = Field(10_000, ge=0, description="Records checked for near-dups.")
    near_threshold: float = Field(
        0.8, gt=0, le=1, description="MinHash Jaccard at which a record is a near-dup."
    )
    pii_extra: dict[str, str] = Field(
        default_factory=dict, description="Extra PII patterns: NAME = regex."
    )
    workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Processes that check the stream sources' next batches (gate, "
        "PII, hashes, sketches, sealing) while the agent decides and commits; "
        "0: all in the agent's process; default 1 with 2 or more CPUs, else 0.",
    )


class GrpcSource(FrozenModel):
    type: Literal["grpc"] = "grpc"
    listen: str = Field(
        "127.0.0.1:7700", description="host:port of the ingest service."
    )
    max_records_per_call: int = Field(10_000, ge=1, description="Per request.")


class JsonlSource(FrozenModel):
    type: Literal["jsonl"] = "jsonl"
    path: str = Field(description="A .jsonl file, or a folder of them (tailed).")
    poll_s: float = Field(0.5, gt=0, description="Seconds between looks for new data.")
    batch: int = Field(512, ge=1, description="Records per transaction.")


class KafkaSource(FrozenModel):
    type: Literal["kafka"] = "kafka"
    bootstrap: str = Field(description="Broker host:port list.")
    topic: str = Field(description="Topic to consume.")
    group: str = Field("fedstream-agent", description="Consumer group id.")
    batch: int = Field(512, ge=1, description="Records per transaction.")


Source = Annotated[GrpcSource | JsonlSource | KafkaSource, Field(discriminator="type")]


class SupernodeSettings(FrozenModel):
    """The ``flower-supernode`` the agent runs and restarts (``[supernode]``)."""

    superlink: str = Field(description="host:port of the SuperLink.")
    root_certificates: str | None = Field(
        None, description="CA certificate (ca.crt) that signed the SuperLink's."
    )
    auth_key: str | None = Field(
        None, description="This host's SuperNode private key (hosts/NAME/auth.key)."
    )
    insecure: bool = Field(
        False, description="Plain HTTP, no authentication: development only."
    )
    production: bool = Field(True, description="Refuse insecure when true.")
    runtime_port: int = Field(
        9094, ge=1, lt=65536, description="Local port of the SuperNode's runtime API."
    )
    min_records: int = Field(
        1, ge=0, description="Start the SuperNode once the store holds this many."
    )
    restart_backoff_s: float = Field(
        1.0, gt=0, description="First wait before a restart; doubles up to 30 s."
    )
    node_config: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Extra node_config (data-dir is added)."
    )
    poll_interval: float = Field(
        0.5,
        gt=0,
        le=3,
        description="Seconds the SuperNode waits between asking the SuperLink for a "
        "message while idle, and between looks for the ClientApp's reply "
        "(Flower's own: 3 and 0.5).",
    )
    warm_clientapp: bool = Field(
        True,
        description="Start each message's flwr-clientapp process ahead of time, so "
        "that it has imported Flower when its message arrives (client.superexec).",
    )
    worker: bool = Field(
        True,
        description="Keep a training worker (client.worker) running so that rounds "
        "do not import the training code and build the model again each time.",
    )

    @model_validator(mode="after")
    def _check(self) -> SupernodeSettings:
        if not self.insecure:
            missing = [
                n for n in ("root_certificates", "auth_key") if not getattr(self, n)
            ]
            if missing:
                raise ValueError(
                    f"supernode.{missing[0]} is required unless supernode.insecure "
                    "= true"
                )
        if self.insecure and self.production:
            raise ValueError(
                "supernode.insecure is refused because supernode.production = true; "
                "set supernode.production = false for local development"
            )
        return self


def _default_source() -> GrpcSource | JsonlSource | KafkaSource:
    return GrpcSource()


class AgentConfig(FrozenModel):
    data_dir: str = Field(description="The host's data dir (store, ledger, keys).")
    store: StoreSettings = StoreSettings()
    gate: GateConfig = GateConfig()
    sources: list[Source] = Field(default_factory=lambda: [_default_source()])
    supernode: SupernodeSettings | None = Field(
        None, description="Run a flower-supernode for this host (deployment)."
    )

    @classmethod
    def from_toml(cls, path: str | Path) -> AgentConfig:
        return validated(cls, read_toml(path))

    @property
    def key_path(self) -> Path:
        return Path(self.store.key_file or Path(self.data_dir) / "store.key")

    @property
    def store_path(self) -> Path:
        return Path(self.data_dir) / "store.db"
