"""Run configuration: one TOML file, validated once into frozen pydantic models.

The same models are built from a TOML file (``RunConfig.from_toml``), from Flower's
flat ``run_config`` (``RunConfig.from_flat``, keys like ``privacy.target-epsilon``) and
from the ConfigRecord the server sends to hosts. Unknown keys are errors.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import ConfigError

__all__ = [
    "AggregationConfig",
    "ClientDPConfig",
    "DataConfig",
    "DriftConfig",
    "FederationConfig",
    "FrozenModel",
    "LoraSettings",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "TrainingConfig",
    "WindowConfig",
    "format_validation_error",
    "read_toml",
    "validated",
]


class FrozenModel(BaseModel):
    """Frozen, unknown keys forbidden, defaults validated: every config section."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class ModelConfig(FrozenModel):
    name: str = Field(
        "smollm2-135m",
        description="Preset name (smollm2-135m, tiny-llama, tiny-gpt2, tiny-gptneox, "
        "tiny-qwen2), a local model folder, or a Hugging Face cache name.",
    )
    max_length: int = Field(40, ge=8, le=4096, description="Tokens per record.")


class LoraSettings(FrozenModel):
    rank: int = Field(4, ge=1, le=256, description="LoRA rank r.")
    alpha: int = Field(8, ge=1, description="LoRA scaling numerator (alpha/r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on LoRA input.")
    targets: list[str] | None = Field(
        None, description="Module names to adapt; detected per architecture if unset."
    )
    ffa: bool = Field(
        True,
        description="FFA-LoRA: A frozen at its seeded init, only B trained and sent.",
    )


class PrivacyConfig(FrozenModel):
    enabled: bool = Field(True, description="DP-SGD on hosts; false trains without DP.")
    target_epsilon: float | None = Field(
        8.0, gt=0, description="Per-host epsilon after all planned rounds."
    )
    noise_multiplier: float | None = Field(
        None, gt=0, description="Gaussian noise sigma; overrides target_epsilon."
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="DP delta.")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-record clipping bound C.")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant.")
    grad_sample_mode: Literal["lora", "hooks", "functorch"] = Field(
        "lora",
        description="Per-sample gradients: 'lora' (lean path for LoRA's Linear "
        "layers) or Opacus's 'hooks' / 'functorch'.",
    )
    count_noise: float = Field(
        10.0,
        gt=0,
        description="Gaussian noise sigma on the per-group record counts that set "
        "the window/replay rates (charged to every live record each round).",
    )

    @model_validator(mode="after")
    def _one_noise_source(self) -> PrivacyConfig:
        if (
            self.enabled
            and self.target_epsilon is None
            and self.noise_multiplier is None
        ):
            raise ValueError(
                "set privacy.target_epsilon or privacy.noise_multiplier when "
                "privacy.enabled = true"
            )
        return self


class TrainingConfig(FrozenModel):
    local_steps: int = Field(4, ge=1, description="DP-SGD steps per host per round.")
    batch_size: int = Field(
        16, ge=1, description="Fixed normaliser B of each step's gradient sum."
    )
    sample_rate: float = Field(
        0.05,
        gt=0,
        le=1,
        description="Poisson rate q: each record joins each step's batch with "
        "probability q, independent of every other record.",
    )
    learning_rate: float = Field(2e-2, gt=0, description="Local learning rate.")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="Local optimizer.")
    update_dtype: Literal["float16", "float32"] = Field(
        "float16", description="Wire dtype of adapter deltas."
    )
    max_loss_ratio: float = Field(
        4.0,
        gt=1,
        description="A host fails its round if its loss after training exceeds "
        "this multiple of the loss before.",
    )


class WindowConfig(FrozenModel):
    fresh_cap: int = Field(
        512, ge=1, description="Expected records a round from the fresh window."
    )
    replay_cap: int = Field(
        256, ge=1, description="Expected records a round from each replay group."
    )


class DriftConfig(FrozenModel):
    enabled: bool = Field(
        True,
        description="Host-side drift detection; its DP release is charged to the "
        "sampled fresh records.",
    )
    query_weight: int = Field(
        16,
        ge=1,
        le=100,
        description="The drift release is a Gaussian query with noise "
        "privacy.count_noise / sqrt(query_weight), charged as query_weight counts.",
    )
    sample_cap: int = Field(
        128, ge=8, description="Expected fresh records a round in the drift sample."
    )
    buckets: int = Field(
        32, ge=8, le=4096, description="Hashed token buckets of the token histogram."
    )
    ph_delta: float = Field(
        1.0,
        ge=0,
        description="Page-Hinkley tolerance per round, in standard deviations of "
        "the no-change signal.",
    )
    ph_lambda: float = Field(
        6.0,
        gt=0,
        description="Page-Hinkley alarm threshold (a drift event), in standard "
        "deviations.",
    )


POLICY_MU = {"fedprox": 1.0, "drift": 1.0}  # proximal_mu defaults per policy


class AggregationConfig(FrozenModel):
    policy: str = Field(
        "fedavg",
        description="Server weighting policy from the registry: fedavg, fedprox, "
        "drift (server.policies).",
    )
    proximal_mu: float | None = Field(
        None,
        ge=0,
        description="Proximal pull toward the global adapter on hosts; unset: the "
        "policy's default (fedavg 0, fedprox and drift 1.0).",
    )
    drift_boost: float = Field(
        2.0, ge=0, description="drift: weight factor 1 + drift_boost x drift score."
    )
    norm_limit: float = Field(
        3.0,
        gt=1,
        description="drift: an update longer than norm_limit x the median norm is "
        "scaled down to that length.",
    )
    server_boost: float = Field(
        2.0,
        ge=0,
        description="drift: server step 1 + server_boost x the weighted mean drift "
        "score, applied to the round's weighted mean update (1 with no drift).",
    )
    max_server_step: float = Field(
        3.0, ge=1, description="drift: upper bound of the server step."
    )
    min_cosine: float = Field(
        -0.15,
        ge=-1,
        le=1,
        description="drift: an update whose cosine with the others' mean is below "
        "this gets its weight damped linearly to 0 at min_cosine - 0.2.",
    )
    max_update_norm: float | None = Field(
        None,
        ge=0,
        description="Reject an update whose L2 norm is above this. Unset: the most "
        "Adam can move the adapter in a round (server.checks; none for SGD); 0: off.",
    )
    secure: bool = Field(
        False,
        description="SecAgg+: the server sees only the weighted sum of the updates; "
        "weights are agreed before masking (server.secure).",
    )
    secure_shares: int = Field(
        0,
        ge=0,
        description="SecAgg+: neighbours per host (itself included) that hold shares "
        "of its keys; 0: every host (odd numbers; threshold: a majority).",
    )

    @property
    def mu(self) -> float:
        """The proximal coefficient hosts use: explicit, else the policy's default."""
        if self.proximal_mu is not None:
            return self.proximal_mu
        return POLICY_MU.get(self.policy, 0.0)


class ClientDPConfig(FrozenModel):
    """Client-level DP at the server (``server.client_dp``), on top of record-level
    DP-SGD on every host."""

    enabled: bool = Field(
        False,
        description="Clip each host's update to clip_norm, weigh hosts equally and "
        "add Gaussian noise to the round's sum (DP-FedAvg).",
    )
    clip_norm: float | None = Field(
        None, gt=0, description="L2 bound C on one host's update (required if on)."
    )
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        description="Noise std on the sum / C; overrides target_epsilon.",
    )
    target_epsilon: float | None = Field(
        None, gt=0, description="Client-level epsilon after all planned rounds."
    )
    delta: float = Field(
        1e-3, gt=0, lt=1, description="Client-level delta (well below 1 / hosts)."
    )

    @model_validator(mode="after")
    def _complete_when_enabled(self) -> ClientDPConfig:
        if not self.enabled:
            return self
        if self.clip_norm is None:
            raise ValueError(
                "set client_dp.clip_norm (the L2 bound on one host's update) when "
                "client_dp.enabled = true"
            )
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(
                "set client_dp.target_epsilon or client_dp.noise_multiplier when "
                "client_dp.enabled = true"
            )
        return self


OPERATIONAL = ("poll_interval", "overlap_eval")  # federation keys not fingerprinted


class FederationConfig(FrozenModel):
    hosts: int = Field(4, ge=1, description="Virtual hosts in simulation.")
    rounds: int = Field(3, ge=1, description="Federated rounds.")
    fraction_train: float = Field(1.0, gt=0, le=1, description="Hosts sampled a round.")
    min_hosts: int = Field(1, ge=1, description="Minimum hosts to start a round.")
    fraction_evaluate: float = Field(
        0.0, ge=0, le=1, description="Hosts asked for local evaluation (not DP)."
    )
    round_timeout: float = Field(3600.0, gt=0, description="Seconds to wait a round.")
    poll_interval: float = Field(
        0.2,
        gt=0,
        le=60,
        description="Seconds between the server's polls for replies (deployment).",
    )
    overlap_eval: bool | None = Field(
        None,
        description="Evaluate round N's held-out sets while round N+1 trains; "
        "default: on with deployed hosts, off in simulation.",
    )


class DataConfig(FrozenModel):
    source: str = Field(
        "builtin",
        description="'builtin' streams, or a folder with one sub-folder per host of "
        ".jsonl/.txt files.",
    )
    scenario: str | None = Field(
        None,
        description="A drifting federation: built-in scenario name or scenario TOML "
        "(common.scenario); hosts receive its records round by round.",
    )
    records_per_host: int = Field(320, ge=1, description="Built-in records per host.")
    heldout_per_domain: int = Field(24, ge=1, description="Held-out records a domain.")
    eval_batch_size: int = Field(32, ge=1, description="Batch size for evaluation.")


class RunConfig(FrozenModel):
    seed: int = Field(0, description="Seed for everything.")
    out: str = Field("runs/latest", description="Run folder.")
    model: ModelConfig = ModelConfig()
    lora: LoraSettings = LoraSettings()
    privacy: PrivacyConfig = PrivacyConfig()
    training: TrainingConfig = TrainingConfig()
    window: WindowConfig = WindowConfig()
    federation: FederationConfig = FederationConfig()
    data: DataConfig = DataConfig()
    drift: DriftConfig = DriftConfig()
    aggregation: AggregationConfig = AggregationConfig()
    client_dp: ClientDPConfig = ClientDPConfig()

    # -- construction ---------------------------------------------------------------
    @classmethod
    def build(cls, data: dict[str, Any]) -> RunConfig:
        return validated(cls, data)

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        return cls.build(read_toml(path))

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> RunConfig:
        """Build from dotted keys (Flower run_config / ConfigRecord)."""
        return cls.build(unflatten(flat))

    def with_overrides(self, **sections: Any) -> RunConfig:
        """A copy with some fields replaced, validated again."""
        data = self.model_dump()
        for key, value in sections.items():
            if isinstance(value, dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return RunConfig.build(data)

    # -- serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def to_flat(self) -> dict[str, Any]:
        """Dotted keys with scalar values, as a Flower ConfigRecord holds them."""
        flat: dict[str, Any] = {}
        for key, value in flatten(self.to_dict()).items():
            flat[key] = ",".join(value) if isinstance(value, list) else value
        return flat

    def fingerprint(self) -> str:
        """Hash of everything that shapes the trained adapter (not where it goes)."""
        data = self.to_dict()
        data.pop("out", None)
        for key in OPERATIONAL:  # how the server runs, not what it trains
            data["federation"].pop(key, None)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a ``ConfigError``."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


M = TypeVar("M", bound=BaseModel)


def validated(cls: type[M], data: dict[str, Any]) -> M:
    """``cls`` from ``data``; problems become one ``ConfigError`` naming the fields."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


_LIST_FIELDS = {("lora", "targets")}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = [p.replace("-", "_") for p in key.split(".")]
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {key!r} nests under a plain value")
        if tuple(parts) in _LIST_FIELDS and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        node[parts[-1]] = value
    return nested


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: ``privacy.delta: Input should be less than 1 (got 2)``."""
    lines = []
    for problem in err.errors():
        field = ".".join(str(p) for p in problem["loc"]) or "config"
        msg = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            msg = "unknown key; remove it or fix its spelling"
            lines.append(f"{field}: {msg}")
            continue
        got = problem.get("input")
        suffix = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{field}: {msg}{suffix}")
    return "invalid config: " + "; ".join(lines)
