"""A real deployment on loopback: ``fedstream-server run`` (flower-superlink with TLS
and SuperNode authentication) and three ``fedstream-agent run`` hosts, each supervising
a flower-supernode with its own key, data pushed with ``fedstream-agent push``.

One federation (3 rounds, every round needs the 3 hosts connected to start) is shared
by the checks below, which run in file order while it trains:

* an unknown key and a plain-text SuperNode try to join during the first rounds;
* round 1 completes with every host;
* round 2: ``kill -9`` of h2 (agent, SuperNode, ClientApp) and SIGSTOP of h1 (no
  network namespaces here) in the middle of the round; it completes with h0 once
  Flower's heartbeat gives up on the two, and reports both as failed;
* h2 restarts on its data dir and h1 resumes; both rejoin round 3; ``kill -9`` of the
  whole server (launcher, SuperLink, ServerApp) in the middle of round 3; the
  restarted launcher (``--keep-serving``) resumes at round 3, which completes with
  every host; no global version is lost or written twice;
* ``flwr run .`` submits a second run to the same SuperLink, which trains a round
  with every host under SecAgg+ (each host's update arrives masked); SIGTERM then
  stops the launcher with exit code 0;
* every round's adapter loads; the agents drain on SIGTERM with their ledgers.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tomli_w

from server.certs import host_key_pair
from tests.integration.agent_util import free_port, stored_count, wait_port
from tests.integration.deploy_util import (
    ENV,
    Proc,
    agent_status,
    descendants,
    kill_tree,
    ledger_round,
    metrics,
    push_stream,
    script,
    start,
    wait_for,
    write_agent,
)

pytestmark = pytest.mark.slow

HOSTS = ["h0", "h1", "h2"]
FAULT = 2  # the round in which h2 is killed and h1 is cut off
ROUNDS = FAULT + 1
STATUS = [
    script("fedstream-server"),
    "status",
    "--config",
]  # the round after: both rejoin, the server is killed and resumes


class Federation:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.certs = root / "certs"
        self.port = free_port()
        self.superlink = f"127.0.0.1:{self.port}"
        self.out = root / "run"
        self.state = root / "state"
        self.server_toml = root / "server.toml"
        self.servers: list[Proc] = []
        self.agents: dict[str, Proc] = {}
        self.data: dict[str, Path] = {}
        self.configs: dict[str, Path] = {}
        self.agent_codes: dict[str, int] = {}
        self.intruders: dict[str, Proc] = {}
        self.certs_summary = ""
        self.status: dict[str, object] = {}
        self.status_poll = threading.Thread(target=self._poll_status, daemon=True)
        self.stored_h2 = 0
        self.epsilon_h2 = 0.0

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
            # A fixed sigma, not one planned for exactly ROUNDS rounds: the round
            # re-run after the server crash spends the hosts' budget once more.
            f"[run.privacy]\n"
            f"noise_multiplier = 1.0\n"
            f"[run.federation]\n"
            f"rounds = {ROUNDS}\n"
            f"min_hosts = {len(HOSTS)}\n"
            f"round_timeout = 300\n"
        )

    def _poll_status(self) -> None:
        """``fedstream-server status`` until it lists every host online."""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                proc = subprocess.run(
                    [*STATUS, str(self.server_toml), "--json"],
                    env=ENV,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            except subprocess.TimeoutExpired:  # a loaded machine: ask again
                continue
            if proc.returncode == 0:
                self.status = json.loads(proc.stdout)
                hosts = self.status.get("connected_hosts")
                if isinstance(hosts, list) and len(hosts) == len(HOSTS):
                    return
            time.sleep(1)

    def start_server(self, log: str, *extra: str) -> Proc:
        proc = start(
            [
                script("fedstream-server"),
                "run",
                "--config",
                str(self.server_toml),
                *extra,
            ],
            self.root / log,
        )
        self.servers.append(proc)
        return proc

    def start_agent(self, name: str) -> Proc:
        self.agents[name] = start(
            [script("fedstream-agent"), "run", "--config", str(self.configs[name])],
            self.root / f"{name}.log",
        )
        return self.agents[name]

    def start_intruders(self) -> None:
        """Both intruders at once, while the federation trains."""
        stranger = self.root / "stranger"
        host_key_pair(stranger / "auth.key", stranger / "auth.pub")
        plain = self.root / "plain"
        plain.mkdir(exist_ok=True)
        common = ["--max-retries", "2", "--max-wait-time", "20"]
        self.intruders["unknown-key"] = start(
            [
                script("flower-supernode"),
                "--superlink",
                self.superlink,
                "--root-certificates",
                str(self.certs / "ca.crt"),
                "--auth-supernode-private-key",
                str(stranger / "auth.key"),
                "--port",
                str(free_port()),
                "--node-config",
                f'data-dir="{stranger}"',
                *common,
            ],
            self.root / "stranger.log",
        )
        self.intruders["plain-text"] = start(
            [
                script("flower-supernode"),
                "--superlink",
                self.superlink,
                "--insecure",
                "--port",
                str(free_port()),
                "--node-config",
                f'data-dir="{plain}"',
                *common,
            ],
            self.root / "plain.log",
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
    f.certs_summary = certs.stdout
    f.server_config()
    try:
        ports = {}
        for name in HOSTS:
            cfg, data, ports[name] = write_agent(
                f.root, name, superlink=f.superlink, certs=f.certs, min_records=100
            )
            f.configs[name], f.data[name] = cfg, data
            f.start_agent(name)
        # The server starts while the hosts receive their records: a round starts
        # only once all three SuperNodes are connected.
        f.start_server("server.log")
        with ThreadPoolExecutor(len(HOSTS)) as pool:
            pushed = [
                pool.submit(push_stream, i, 160, ports[n], f.root)
                for i, n in enumerate(HOSTS)
            ]
            for job in pushed:
                job.result()
        for name in HOSTS:
            assert stored_count(f.data[name]) >= 100, name
        wait_port(f.port, timeout=120)
        f.start_intruders()
        f.status_poll.start()
        yield f
    finally:
        for proc in f.intruders.values():
            proc.stop(timeout=5)
        for name, proc in f.agents.items():
            f.agent_codes.setdefault(name, proc.stop())
        for proc in f.servers:
            proc.stop()


def test_certs_cli_writes_keys_with_private_permissions(fed: Federation) -> None:
    assert "hosts/<name>/auth.key" in fed.certs_summary
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
    # Polled in the background from the start (fixture), so a slow status call on a
    # loaded machine never holds up the scenarios that follow.
    fed.status_poll.join(timeout=240)
    info = fed.status
    assert isinstance(info.get("connected_hosts"), list), info
    # By host name: the launcher kept the node id each host's key registered as.
    assert info["connected_hosts"] == HOSTS, info
    assert info["rounds_total"] == ROUNDS


def test_unknown_key_is_rejected(fed: Federation) -> None:
    proc = fed.intruders["unknown-key"]
    assert proc.popen.wait(timeout=120) != 0
    proc.reap()
    log = (fed.state / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in log


def test_plain_text_to_tls_superlink_fails(fed: Federation) -> None:
    # Raw plain HTTP to the TLS port: no HTTP answer comes back.
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://{fed.superlink}/", timeout=10)
    # A SuperNode that does not use TLS cannot join.
    proc = fed.intruders["plain-text"]
    assert proc.popen.wait(timeout=120) != 0
    proc.reap()


def test_rounds_complete_with_every_host(fed: Federation) -> None:
    wait_for(lambda: len(metrics(fed.out)) >= FAULT, 600, f"{FAULT - 1} rounds")
    lines = metrics(fed.out)[1:FAULT]
    assert [ln["round"] for ln in lines] == list(range(1, FAULT))
    for ln in lines:
        # Neither the stranger nor the plain-text SuperNode disturbed a round.
        assert sorted(ln["hosts"]) == HOSTS, ln  # type: ignore[arg-type]
        assert not ln["failed"] and not ln["rejected"], ln
        assert set(ln["epsilon"]) == set(HOSTS)  # type: ignore[arg-type]


def test_killed_and_cut_off_hosts_fail_the_round_for_themselves_only(
    fed: Federation,
) -> None:
    """kill -9 of h2 and SIGSTOP of h1 while both train in round FAULT."""
    killed, cut = fed.agents["h2"], fed.agents["h1"]
    stopped: list[int] = []

    def strike() -> bool:
        """Each host as soon as its ledger has committed round FAULT (it trains now,
        its update has not left): h2 killed, h1 stopped."""
        assert len(metrics(fed.out)) == FAULT, "round ended before both were hit"
        if killed.popen.poll() is None and ledger_round(fed.data["h2"]) == FAULT:
            fed.stored_h2 = stored_count(fed.data["h2"])
            killed.kill9()
        if not stopped and ledger_round(fed.data["h1"]) == FAULT:
            stopped.extend([cut.popen.pid, *descendants(cut.popen.pid)])
            kill_tree(stopped, signal.SIGSTOP)
        return killed.popen.poll() is not None and bool(stopped)

    wait_for(lambda: len(metrics(fed.out)) == FAULT, 600, f"round {FAULT - 1}")
    try:
        wait_for(strike, 300, f"h1 and h2 training in round {FAULT}", poll=0.1)
        # The killed host's ledger is on disk: its round-FAULT spend is committed.
        assert ledger_round(fed.data["h2"]) == FAULT
        status = agent_status(fed.configs["h2"])
        fed.epsilon_h2 = float(status["epsilon_spent"])  # type: ignore[arg-type]
        assert fed.epsilon_h2 > 0
        wait_for(lambda: len(metrics(fed.out)) > FAULT, 300, f"round {FAULT}")
    finally:
        kill_tree(stopped, signal.SIGCONT)
        fed.start_agent("h2")  # same data dir and key: it rejoins
    line = metrics(fed.out)[FAULT]
    assert line["hosts"] == ["h0"], line
    # Both failures are reported (as Flower's node ids), not hidden.
    assert len(line["failed"]) == 2, line  # type: ignore[arg-type]
    # The killed host's store survived: every acknowledged record is still there.
    assert stored_count(fed.data["h2"]) == fed.stored_h2


def test_server_kill9_resumes_at_the_next_round(fed: Federation) -> None:
    """Both hosts rejoin round ROUNDS; kill -9 of the server in its middle."""
    first = fed.servers[0]

    def all_training() -> bool:
        return len(metrics(fed.out)) == ROUNDS and all(
            ledger_round(fed.data[h]) == ROUNDS for h in HOSTS
        )

    wait_for(all_training, 300, f"every host training in round {ROUNDS}", poll=0.2)
    first.kill9()
    saved = sorted(p.name for p in (fed.out / "global").glob("round-*"))
    assert saved == [f"round-{n}" for n in range(1, ROUNDS)], saved
    second = fed.start_server("server2.log", "--keep-serving")
    wait_for(
        lambda: (
            "SuperLink stays up" in second.log.read_text()
            or second.popen.poll() is not None
        ),
        600,
        "the resumed run to complete",
    )
    log = second.log.read_text()
    assert second.popen.poll() is None, log[-3000:]
    assert f"run submitted: rounds {ROUNDS}..{ROUNDS}" in log
    assert f"round {ROUNDS}/{ROUNDS} saved" in log
    # Every round once: no global version lost, none written twice.
    lines = metrics(fed.out)
    assert [ln["round"] for ln in lines] == list(range(ROUNDS + 1))
    # The killed host and the cut-off host are back.
    assert sorted(lines[ROUNDS]["hosts"]) == HOSTS, lines[ROUNDS]  # type: ignore[arg-type]
    assert stored_count(fed.data["h2"]) == fed.stored_h2


def test_flwr_run_dot_against_the_launchers_superlink(
    fed: Federation, tmp_path: Path
) -> None:
    """``flwr run .`` with the launcher's Flower home: a second run on the same
    SuperLink and the same hosts (their data dirs from their node config), with
    SecAgg+."""
    from common.config import RunConfig
    from tests.conftest import ROOT

    server = fed.servers[-1]
    out = fed.root / "flwr-run"
    cfg = tmp_path / "run-config.toml"
    # Keys that [tool.flwr.app.config] lacks (Flower refuses unknown override keys)
    # travel in deploy.config, a whole run config as TOML text.
    run = RunConfig.build(
        {
            "out": str(out),
            "model": {"name": "tiny-llama"},
            "training": {"local_steps": 2},
            "privacy": {"noise_multiplier": 1.0},
            "federation": {"rounds": 1, "min_hosts": len(HOSTS)},
            "aggregation": {"secure": True},  # SecAgg+ across the real processes
        }
    )
    overrides = {"deploy.hosts": "nodes", "deploy.config": run.to_toml()}
    cfg.write_text(tomli_w.dumps(overrides))
    env = {**ENV, "FLWR_HOME": str(fed.state / "flwr-home")}
    proc = subprocess.run(
        [
            script("flwr"),
            "run",
            str(ROOT),
            "fedstream",
            "--run-config",
            str(cfg),
            "--stream",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    lines = metrics(out)
    assert [ln["round"] for ln in lines] == [0, 1], lines
    assert sorted(lines[1]["hosts"]) == HOSTS, lines[1]  # type: ignore[arg-type]
    assert (out / "global" / "round-1" / "adapter_model.safetensors").exists()
    # Under SecAgg+ each host sent its update masked, one uint32 per number (plain
    # hosts send fp16: half of that), plus keys and shares.
    from safetensors.numpy import load_file

    adapter = load_file(str(out / "global" / "round-1" / "adapter_model.safetensors"))
    trained = sum(v.size for k, v in adapter.items() if "lora_B" in k)
    for host, sent in lines[1]["bytes"].items():  # type: ignore[union-attr]
        assert 4 * trained < sent < 1.1 * 4 * trained + 8192, (host, sent, trained)
    # The launcher's own run folder is untouched, and SIGTERM stops it cleanly.
    assert [ln["round"] for ln in metrics(fed.out)] == list(range(ROUNDS + 1))
    server.popen.send_signal(signal.SIGTERM)
    assert server.popen.wait(timeout=60) == 0, server.log.read_text()[-3000:]
    server.reap()


def test_every_round_adapter_is_saved_and_loads(fed: Federation) -> None:
    from peft import PeftModel

    from common.config import ModelConfig
    from common.models import load_base_model

    assert [ln["round"] for ln in metrics(fed.out)] == list(range(ROUNDS + 1))
    assert sorted(p.name for p in (fed.out / "global").glob("round-*")) == [
        f"round-{n}" for n in range(1, ROUNDS + 1)
    ]
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


def test_clientapp_tasks_were_forked_from_each_hosts_fork_server(
    fed: Federation,
) -> None:
    """Every message's ClientApp process came from the host's fork server
    (client.warm_clientapp), none was started cold: the SuperNodes ran our
    SuperExec."""
    for name in HOSTS:
        log = (fed.data[name] / "supernode.log").read_text()
        forked = log.count("clientapp fork server: task process")
        # h0 trained every round of both runs; the others missed at most one
        assert forked >= ROUNDS, (name, log[-2000:])
        assert "started without the fork server" not in log, name


def test_agents_drain_on_sigterm_and_keep_their_ledger(fed: Federation) -> None:
    for proc in fed.agents.values():
        proc.track()
        proc.popen.send_signal(signal.SIGTERM)
    for name, proc in fed.agents.items():
        fed.agent_codes[name] = proc.popen.wait(timeout=60)
        proc.reap()
        assert fed.agent_codes[name] == 0, proc.log.read_text()[-2000:]
        assert "drained and stopped" in proc.log.read_text()
    with ThreadPoolExecutor(len(HOSTS)) as pool:
        statuses = pool.map(agent_status, (fed.configs[h] for h in HOSTS))
        infos = dict(zip(HOSTS, statuses, strict=True))
    for info in infos.values():
        # The last round each host trained: round 1 of the second run (flwr run .).
        assert info["last_round"] == 1
        assert 0 < info["epsilon_spent"] <= 8.0  # type: ignore[operator]
    # h2 kept its ledger across kill -9 and spent more after it rejoined.
    assert infos["h2"]["epsilon_spent"] > fed.epsilon_h2  # type: ignore[operator]
