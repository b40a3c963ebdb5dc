"""Certificates, launcher/agent config errors, --insecure policy, SuperNode restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from client.supervisor import SupernodeSupervisor
from common.agent_config import AgentConfig, SupernodeSettings
from common.errors import ConfigError
from common.server_config import ServerConfig
from server.certs import make_certs
from server.launcher import Launcher
from tests.integration.agent_util import free_port
from tests.integration.deploy_util import ENV, alive, descendants, kill_tree, script


def test_certs_have_sans_chain_and_private_modes(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    made = make_certs(out, server_names=["fl.example.org", "10.0.0.5"], hosts=["a"])
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificates(made.server_cert.read_bytes())[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"fl.example.org", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert {"10.0.0.5", "127.0.0.1"} <= ips
    pub = ca.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert leaf.signature_hash_algorithm is not None
    pub.verify(
        leaf.signature,
        leaf.tbs_certificate_bytes,
        ec.ECDSA(leaf.signature_hash_algorithm),
    )
    for path in (made.ca_key, made.server_key, made.host_keys["a"][0]):
        assert path.stat().st_mode & 0o777 == 0o600, path
    # Adding a host later keeps the CA and the keys hosts already use.
    key_a = made.host_keys["a"][0].read_bytes()
    again = make_certs(out, server_names=["fl.example.org"], hosts=["a", "b"])
    assert again.ca_cert.read_bytes() == made.ca_cert.read_bytes()
    assert again.host_keys["a"][0].read_bytes() == key_a
    assert set(again.host_keys) == {"a", "b"}
    with pytest.raises(ConfigError, match="host name"):
        make_certs(out, server_names=["x"], hosts=["../evil"])


def _server_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [script("fedstream-server"), *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[server]\nlisten = "nope"\n', "server.listen must be host:port"),
        ('[server]\nlisen = "0.0.0.0:1"\n', "lisen"),
        ("[run.federation]\nrounds = 0\n", "[run] invalid config: federation.rounds"),
    ],
)
def test_bad_server_config_names_the_field(
    tmp_path: Path, toml: str, needle: str
) -> None:
    cfg = tmp_path / "server.toml"
    cfg.write_text(toml)
    proc = _server_cli("run", "--config", str(cfg))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_insecure_is_refused_in_production(tmp_path: Path) -> None:
    cfg = tmp_path / "server.toml"
    cfg.write_text("[server]\nproduction = true\n")
    proc = _server_cli("run", "--config", str(cfg), "--insecure")
    assert proc.returncode == 2
    assert "server.production" in proc.stderr and "--insecure" in proc.stderr

    agent = tmp_path / "agent.toml"
    agent.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[supernode]\nsuperlink = "127.0.0.1:1"\n'
        'root_certificates = "ca.crt"\nauth_key = "auth.key"\n'
    )
    proc = subprocess.run(
        [script("fedstream-agent"), "run", "--config", str(agent), "--insecure"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "supernode.production" in proc.stderr
    # Without TLS material a production agent config is refused at load time.
    agent.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[supernode]\nsuperlink = "127.0.0.1:1"\n'
    )
    with pytest.raises(ConfigError, match=r"supernode\.root_certificates"):
        AgentConfig.from_toml(agent)


def test_insecure_development_mode_warns(tmp_path: Path) -> None:
    cfg = tmp_path / "server.toml"
    cfg.write_text("[server]\nproduction = false\n")
    assert Launcher(ServerConfig.from_toml(cfg), insecure=True).insecure
    agent = tmp_path / "agent.toml"
    agent.write_text(
        f'data_dir = "{tmp_path / "data"}"\nsources = []\n[supernode]\n'
        'superlink = "127.0.0.1:1"\ninsecure = true\nproduction = false\n'
        "min_records = 1000000\n"
    )
    proc = subprocess.Popen(
        [script("fedstream-agent"), "run", "--config", str(agent), "--insecure"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert "running" in proc.stdout.readline()  # started, after the warning
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "WARNING: --insecure" in err


def test_supervisor_restarts_a_dead_supernode(tmp_path: Path) -> None:
    settings = SupernodeSettings(
        superlink=f"127.0.0.1:{free_port()}",  # nobody listens: it keeps retrying
        insecure=True,
        production=False,
        runtime_port=free_port(),
        restart_backoff_s=0.2,
    )
    data = tmp_path / "data"
    data.mkdir()
    sup = SupernodeSupervisor(settings, data)
    seen: set[int] = set()
    try:
        sup.start()
        deadline = time.monotonic() + 60
        while sup.proc is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sup.proc is not None
        first = sup.proc.pid
        time.sleep(2)
        seen.update(descendants(first))
        os.kill(first, signal.SIGKILL)
        while sup.starts < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sup.starts == 2 and sup.proc.pid != first
        cmd = Path(f"/proc/{sup.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"--node-config" in cmd
        # Flower's SuperNode through client.supernode: polls capped, tasks forked
        assert cmd[1:5] == [b"-m", b"client.supernode", b"--poll-interval", b"0.5"]
        assert b"--warm-clientapp" in cmd
        assert f'data-dir="{data.resolve()}"'.encode() in cmd
        seen.update(descendants(sup.proc.pid))
        last = sup.proc
    finally:
        sup.stop()
        kill_tree([p for p in seen if alive(p)])
    assert last.poll() is not None


def test_serverapp_reads_the_deploy_keys_of_the_app_config(tmp_path: Path) -> None:
    import tomllib

    from common.config import RunConfig, flatten
    from server.app import run_config_from_flat
    from tests.conftest import ROOT

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flat = flatten(data["tool"]["flwr"]["app"]["config"])
    cfg, mode = run_config_from_flat(flat)
    assert mode == "virtual" and cfg.model.name == "smollm2-135m"
    sent = RunConfig.build({"model": {"name": "tiny-llama"}, "out": str(tmp_path)})
    cfg, mode = run_config_from_flat(
        {**flat, "deploy.hosts": "nodes", "deploy.config": sent.to_toml()}
    )
    assert mode == "nodes" and cfg == sent
    with pytest.raises(ConfigError, match=r"deploy\.hosts"):
        run_config_from_flat({**flat, "deploy.hosts": "cloud"})
