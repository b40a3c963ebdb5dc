"""deploy/ assets parse, validate against their schemas, and agree with the CLIs.

Kubernetes manifests are checked with kubernetes-validate (the official OpenAPI
schemas, offline), the compose file with the Compose Specification schema that
check-jsonschema vendors; TOML configs load into the launcher's and agent's models.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from common.agent_config import AgentConfig
from common.server_config import DEFAULT_PORT, ServerConfig
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _server_cfg() -> ServerConfig:
    return ServerConfig.from_toml(DEPLOY / "config" / "server.toml")


def test_configs_validate_and_ports_match_the_cli_default() -> None:
    server = _server_cfg()
    assert server.server.listen.endswith(f":{DEFAULT_PORT}")
    assert server.server.production and not server.server.insecure
    for path in sorted((DEPLOY / "config").glob("agent*.toml")):
        agent = AgentConfig.from_toml(path)
        assert agent.supernode is not None, path
        assert agent.supernode.superlink.endswith(f":{DEFAULT_PORT}"), path
        assert agent.supernode.production and not agent.supernode.insecure


def test_compose_file_is_valid_and_consistent() -> None:
    schema_file = (
        importlib.resources.files("check_jsonschema")
        / "builtin_schemas"
        / "vendor"
        / "compose-spec.json"
    )
    schema = json.loads(schema_file.read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    jsonschema.validate(compose, schema)
    services = compose["services"]
    assert {"certs", "server", "agent-1", "agent-2"} <= set(services)
    # Every named volume is declared; every bind-mounted file exists.
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src, _dst = vol.split(":")[:2]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), f"{name}: {src}"
            else:
                assert src in compose["volumes"], f"{name}: {src}"
        entry = svc.get("entrypoint", [None])[0]
        assert entry in SCRIPTS, f"{name}: {entry}"
    server = services["server"]
    assert f"{DEFAULT_PORT}:{DEFAULT_PORT}" in server["ports"]
    cfg = _server_cfg()
    mounts = {v.split(":")[1] for v in server["volumes"]}
    assert cfg.server.certs in mounts and cfg.server.state_dir in mounts
    # certs are made for exactly the hosts that use them, with the server's name.
    cmd = services["certs"]["command"]
    hosts = {cmd[i + 1] for i, a in enumerate(cmd) if a == "--host"}
    assert hosts == {"agent-1", "agent-2"}
    assert cmd[cmd.index("--server-name") + 1] == "server"
    for host in hosts:
        svc = services[host]
        binds = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        agent = AgentConfig.from_toml(DEPLOY / binds["/etc/fedstream/agent.toml"])
        assert agent.supernode is not None
        assert agent.supernode.superlink == f"server:{DEFAULT_PORT}"
        assert agent.supernode.auth_key == f"/certs/hosts/{host}/auth.key"
        assert agent.data_dir in binds


@pytest.mark.parametrize("name", ["server.yaml", "agents.yaml"])
def test_kubernetes_manifests_validate(name: str) -> None:
    for doc in _docs(DEPLOY / "k8s" / name):
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_kubernetes_manifests_agree_with_the_configs() -> None:
    server_docs = {d["kind"]: d for d in _docs(DEPLOY / "k8s" / "server.yaml")}
    text = server_docs["ConfigMap"]["data"]["server.toml"]
    cfg = ServerConfig.model_validate({**tomllib.loads(text), "base": "/"})
    port = int(cfg.server.listen.rsplit(":", 1)[1])
    assert port == DEFAULT_PORT
    assert server_docs["Service"]["spec"]["ports"][0]["port"] == DEFAULT_PORT
    pod = server_docs["Deployment"]["spec"]["template"]["spec"]
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {cfg.server.certs, cfg.server.state_dir} <= mounts
    assert pod["containers"][0]["command"] == ["fedstream-server"]

    agent_docs = {d["kind"]: d for d in _docs(DEPLOY / "k8s" / "agents.yaml")}
    agent_text = agent_docs["ConfigMap"]["data"]["agent.toml"]
    agent = AgentConfig.model_validate(tomllib.loads(agent_text))
    assert agent.supernode is not None
    svc = server_docs["Service"]["metadata"]["name"]
    assert agent.supernode.superlink == f"{svc}:{DEFAULT_PORT}"
    sts = agent_docs["StatefulSet"]["spec"]
    claims = {c["metadata"]["name"] for c in sts["volumeClaimTemplates"]}
    mounts = {
        m["mountPath"]: m["name"]
        for m in sts["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    assert mounts[agent.data_dir] in claims  # the data dir is persistent
    assert "fedstream-agent run --config" in " ".join(
        sts["template"]["spec"]["containers"][0]["args"]
    )


def test_systemd_units_run_the_cli_with_shipped_configs() -> None:
    for unit, script in [
        ("fedstream-agent.service", "fedstream-agent"),
        ("fedstream-server.service", "fedstream-server"),
    ]:
        text = (DEPLOY / "systemd" / unit).read_text()
        sections = re.findall(r"^\[(\w+)\]$", text, re.M)
        assert sections == ["Unit", "Service", "Install"], unit
        exec_start = re.search(r"^ExecStart=(.+)$", text, re.M)
        assert exec_start, unit
        argv = exec_start.group(1).split()
        assert Path(argv[0]).name == script and script in SCRIPTS
        assert argv[1:3] == ["run", "--config"]
        assert re.search(r"^KillSignal=SIGTERM$", text, re.M)
    agent = AgentConfig.from_toml(DEPLOY / "config" / "agent.toml")
    unit = (DEPLOY / "systemd" / "fedstream-agent.service").read_text()
    assert agent.data_dir.startswith("/var/lib/fedstream")
    assert "ReadWritePaths=/var/lib/fedstream" in unit


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_copy_existing_sources_and_pin_torch(name: str) -> None:
    text = (DEPLOY / name).read_text()
    copied = [
        src
        for line in re.findall(r"^COPY (.+)$", text, re.M)
        for src in line.split()[:-1]
    ]
    for src in copied:
        assert (ROOT / src).exists(), src
    # setup.py builds the native ingestion paths; without it an image runs the
    # pure-Python ones
    assert "setup.py" in copied
    assert re.search(r'python -c "import client\._native, client\._pii"', text)
    assert "torch==2.13.0" in text
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text
    assert f"EXPOSE {DEFAULT_PORT}" in text
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))  # type: ignore[union-attr]
    assert entry[0] in SCRIPTS
