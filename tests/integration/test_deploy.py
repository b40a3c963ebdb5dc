"""A real deployment on loopback: ``fedstream-server run`` (flower-superlink with TLS
and SuperNode authentication) and three ``fedstream-agent run`` hosts, each supervising
a flower-supernode with its own key. One federation is shared by the checks below;
they run in file order while it trains: intruders during round 1, three rounds with
every host, then one host cut off (SIGSTOP) for a round and back for the last.
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from server.certs import host_key_pair
from tests.integration.agent_util import free_port
from tests.integration.deploy_util import (
    ENV,
    Proc,
    descendants,
    kill_tree,
    metrics,
    push_stream,
    run_tracked,
    script,
    start,
    wait_for,
    write_agent,
)

pytestmark = pytest.mark.slow

HOSTS = ["h0", "h1", "h2"]
CLEAN = 3  # rounds with every host; then one host is cut off for a round
ROUNDS = CLEAN + 2


class Federation:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.certs = root / "certs"
        self.port = free_port()
        self.superlink = f"127.0.0.1:{self.port}"
        self.out = root / "run"
        self.state = root / "state"
        self.server_toml = root / "server.toml"
        self.server: Proc | None = None
        self.agents: dict[str, Proc] = {}
        self.data: dict[str, Path] = {}
        self.configs: dict[str, Path] = {}
        self.agent_codes: dict[str, int] = {}

    def server_config(self) -> None:
        self.server_toml.write_text(
            f"[server]\n"
            f'listen = "{self.superlink}"\n'
            f'certs = "certs"\n'
            f'state_dir = "state"\n'
            f"[run]\n"
            f'out = "run"\n'
            f"[run.model]\n"
            f'name = "tiny-llama"\n'
            f"[run.training]\n"
            f"local_steps = 2\n"
            f"[run.federation]\n"
            f"rounds = {ROUNDS}\n"
            f"min_hosts = {len(HOSTS)}\n"
            f"round_timeout = 300\n"
        )


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory):
    f = Federation(tmp_path_factory.mktemp("deploy"))
    certs = subprocess.run(
        [script("fedstream-server"), "certs", "--out", str(f.certs)]
        + [a for h in HOSTS for a in ("--host", h)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert certs.returncode == 0, certs.stderr
    f.certs_summary = certs.stdout  # type: ignore[attr-defined]
    f.server_config()
    try:
        for i, name in enumerate(HOSTS):
            cfg, data, port = write_agent(
                f.root, name, superlink=f.superlink, certs=f.certs, min_records=100
            )
            f.configs[name], f.data[name] = cfg, data
            f.agents[name] = start(
                [script("fedstream-agent"), "run", "--config", str(cfg)],
                f.root / f"{name}.log",
            )
            push_stream(i, 160, port, f.root)
        f.server = start(
            [script("fedstream-server"), "run", "--config", str(f.server_toml)],
            f.root / "server.log",
        )
        yield f
    finally:
        for name, proc in f.agents.items():
            f.agent_codes.setdefault(name, proc.stop())
        if f.server is not None:
            f.server.stop()


def test_certs_cli_writes_keys_with_private_permissions(fed: Federation) -> None:
    assert "hosts/<name>/auth.key" in fed.certs_summary  # type: ignore[attr-defined]
    for name in HOSTS:
        key = fed.certs / "hosts" / name / "auth.key"
        assert key.stat().st_mode & 0o777 == 0o600
        assert (
            (fed.certs / "hosts" / name / "auth.pub")
            .read_text()
            .startswith("ecdsa-sha2-nistp384 ")
        )
    assert (fed.certs / "superlink.key").stat().st_mode & 0o777 == 0o600
    assert (fed.certs / "ca.key").stat().st_mode & 0o777 == 0o600


def test_federation_starts_with_all_hosts_online(fed: Federation) -> None:
    assert fed.server is not None
    wait_for(lambda: len(metrics(fed.out)) >= 1, 240, "round 0 (base) metrics")
    info: dict[str, object] = {}

    def online() -> bool:
        proc = subprocess.run(
            [
                script("fedstream-server"),
                "status",
                "--config",
                str(fed.server_toml),
                "--json",
            ],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        info.update(json.loads(proc.stdout))
        hosts = info.get("connected_hosts")
        return isinstance(hosts, list) and len(hosts) == len(HOSTS)

    wait_for(online, 120, "three SuperNodes online")
    assert info["rounds_total"] == ROUNDS


def test_unknown_key_is_rejected(fed: Federation) -> None:
    stranger = fed.root / "stranger"
    host_key_pair(stranger / "auth.key", stranger / "auth.pub")
    code = run_tracked(
        [
            script("flower-supernode"),
            "--superlink",
            fed.superlink,
            "--root-certificates",
            str(fed.certs / "ca.crt"),
            "--auth-supernode-private-key",
            str(stranger / "auth.key"),
            "--port",
            str(free_port()),
            "--node-config",
            f'data-dir="{stranger}"',
            "--max-retries",
            "2",
            "--max-wait-time",
            "20",
        ],
        fed.root / "stranger.log",
        timeout=120,
    )
    assert code != 0
    log = (fed.state / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in log


def test_plain_text_to_tls_superlink_fails(fed: Federation) -> None:
    # Raw plain HTTP to the TLS port: no HTTP answer comes back.
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://{fed.superlink}/", timeout=10)
    # A SuperNode that does not use TLS cannot join.
    stranger = fed.root / "plain"
    stranger.mkdir(exist_ok=True)
    code = run_tracked(
        [
            script("flower-supernode"),
            "--superlink",
            fed.superlink,
            "--insecure",
            "--port",
            str(free_port()),
            "--node-config",
            f'data-dir="{stranger}"',
            "--max-retries",
            "2",
            "--max-wait-time",
            "20",
        ],
        fed.root / "plain.log",
        timeout=120,
    )
    assert code != 0


def test_three_rounds_complete_with_every_host(fed: Federation) -> None:
    wait_for(lambda: len(metrics(fed.out)) > CLEAN, 600, f"{CLEAN} rounds")
    lines = metrics(fed.out)[1 : CLEAN + 1]
    assert [ln["round"] for ln in lines] == list(range(1, CLEAN + 1))
    for ln in lines:
        # Neither the stranger nor the plain-text SuperNode disturbed a round.
        assert sorted(ln["hosts"]) == HOSTS, ln  # type: ignore[arg-type]
        assert not ln["failed"] and not ln["rejected"], ln
        assert set(ln["epsilon"]) == set(HOSTS)  # type: ignore[arg-type]


def test_cut_off_host_times_out_and_rejoins(fed: Federation) -> None:
    """SIGSTOP (no network namespaces here) of h1's agent, SuperNode and ClientApp."""
    cut = fed.agents["h1"]

    def training_next_round() -> bool:
        return len(metrics(fed.out)) == CLEAN + 1 and _in_round(cut)

    wait_for(training_next_round, 300, f"h1 training in round {CLEAN + 1}")
    tree = [cut.popen.pid, *descendants(cut.popen.pid)]
    kill_tree(tree, signal.SIGSTOP)
    try:
        wait_for(lambda: len(metrics(fed.out)) > CLEAN + 1, 300, "round without h1")
    finally:
        kill_tree(tree, signal.SIGCONT)
    cut_round = metrics(fed.out)[CLEAN + 1]
    assert sorted(cut_round["hosts"]) == ["h0", "h2"], cut_round  # type: ignore[arg-type]
    assert cut_round["failed"], cut_round  # h1's timeout is reported, not hidden
    assert fed.server is not None
    code = fed.server.popen.wait(timeout=600)
    log = fed.server.log.read_text()
    assert code == 0, log[-3000:]
    assert f"round {ROUNDS}/{ROUNDS} saved" in log
    last = metrics(fed.out)[ROUNDS]
    assert sorted(last["hosts"]) == HOSTS, last  # type: ignore[arg-type]


def test_every_round_adapter_is_saved_and_loads(fed: Federation) -> None:
    from peft import PeftModel

    from common.config import ModelConfig
    from common.models import load_base_model

    assert [ln["round"] for ln in metrics(fed.out)] == list(range(ROUNDS + 1))
    previous = None
    for n in range(1, ROUNDS + 1):
        folder = fed.out / "global" / f"round-{n}"
        meta = json.loads((folder / "fedstream.json").read_text())
        assert meta["round"] == n
        base = load_base_model(ModelConfig(name="tiny-llama"))
        model = PeftModel.from_pretrained(base.model, str(folder))
        weights = {
            k: v.detach().clone()
            for k, v in model.state_dict().items()
            if "lora_B" in k
        }
        assert weights
        if previous is not None:
            assert any(not (weights[k] == previous[k]).all() for k in weights)
        previous = weights


def _in_round(proc: Proc) -> bool:
    """A ClientApp process runs under this agent: it is training right now."""
    proc.track()
    for pid in descendants(proc.popen.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"flwr-clientapp" in cmd:
            return True
    return False


def test_agents_drain_on_sigterm_and_keep_their_ledger(fed: Federation) -> None:
    for name, proc in fed.agents.items():
        proc.track()
        proc.popen.send_signal(signal.SIGTERM)
        fed.agent_codes[name] = proc.popen.wait(timeout=60)
        proc.reap()
        assert fed.agent_codes[name] == 0, proc.log.read_text()[-2000:]
        assert "drained and stopped" in proc.log.read_text()
    for name in HOSTS:
        out = subprocess.run(
            [
                script("fedstream-agent"),
                "status",
                "--config",
                str(fed.configs[name]),
                "--json",
            ],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        info = json.loads(out.stdout)
        assert info["last_round"] == ROUNDS
        assert 0 < info["epsilon_spent"] <= 8.0
