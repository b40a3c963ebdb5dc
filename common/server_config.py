"""Configuration of the server launcher (``fedstream-server run --config server.toml``).

::

    [server]                 # the SuperLink and how the run is submitted
    listen = "0.0.0.0:9093"  # one HTTPS port: Fleet, Control and Runtime APIs
    certs = "certs"          # ca.crt, superlink.crt, superlink.key
    authorized_keys = []     # SuperNode public keys; default <certs>/hosts/*/auth.pub
    state_dir = "state"      # SuperLink database, Flower home, logs
    production = true        # refuses --insecure
    [run]                    # the fedstream run config (see README), e.g.
    out = "runs/deploy"
    federation = { rounds = 3, min_hosts = 2 }

Relative paths are relative to the config file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from common.config import FrozenModel, RunConfig, read_toml, validated
from common.errors import ConfigError

__all__ = ["DEFAULT_PORT", "ServerConfig", "ServerSettings", "split_address"]

DEFAULT_PORT = 9093


def split_address(address: str, *, field: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{field} must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


class ServerSettings(FrozenModel):
    listen: str = Field(
        f"0.0.0.0:{DEFAULT_PORT}",
        description="host:port the SuperLink serves (Fleet, Control, Runtime APIs).",
    )
    certs: str = Field(
        "certs", description="Folder with ca.crt, superlink.crt, superlink.key."
    )
    authorized_keys: list[str] = Field(
        default_factory=list,
        description="SuperNode public keys (OpenSSH) to register; default "
        "<certs>/hosts/*/auth.pub.",
    )
    state_dir: str = Field(
        "state", description="SuperLink database, Flower home and logs."
    )
    production: bool = Field(True, description="Refuse --insecure when true.")
    insecure: bool = Field(
        False, description="Plain HTTP, no node authentication: development only."
    )
    install_dependencies: bool = Field(
        False,
        description="Let the SuperLink install the app's dependencies per run "
        "(uv); off where they are preinstalled.",
    )
    app_dir: str | None = Field(
        None, description="The Flower App folder; default: this installation's."
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        split_address(v, field="server.listen")
        return v


class ServerConfig(FrozenModel):
    server: ServerSettings = ServerSettings()
    run: dict[str, Any] = Field(default_factory=dict, description="Run config.")
    base: str = Field(".", description="Folder relative paths are resolved from.")

    @classmethod
    def from_toml(cls, path: str | Path) -> ServerConfig:
        data = read_toml(path)
        data.setdefault("base", str(Path(path).resolve().parent))
        cfg = validated(cls, data)
        cfg.run_config()  # validate the [run] table now, naming its fields
        return cfg

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.base) / p

    def run_config(self) -> RunConfig:
        data = dict(self.run)
        data["out"] = str(self.path(str(data.get("out", "runs/deploy"))).resolve())
        try:
            return RunConfig.build(data)
        except ConfigError as err:
            raise ConfigError(f"[run] {err}") from None

    @property
    def certs_dir(self) -> Path:
        return self.path(self.server.certs)

    @property
    def state_dir(self) -> Path:
        return self.path(self.server.state_dir)

    def public_keys(self) -> list[Path]:
        if self.server.authorized_keys:
            return [self.path(k) for k in self.server.authorized_keys]
        return sorted(self.certs_dir.glob("hosts/*/auth.pub"))
