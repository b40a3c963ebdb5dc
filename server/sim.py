"""``fedstream-sim``: a federation of virtual data hosts on one machine.

Each virtual host gets its own data dir under ``<out>/hosts/host-i`` (records, privacy
ledger), exactly as a deployed host does, and the same ClientApp and ServerApp run on
Flower's Simulation Engine (Ray).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client.ingest import Ingestor
from client.store import Store, load_key
from common.config import RunConfig
from common.corpus import host_folders, host_stream
from common.errors import DataError, FedstreamError
from common.model_names import check_model_name
from common.secret_file import ensure_secret

__all__ = ["build_config", "main", "prepare_hosts", "run"]

log = logging.getLogger(__name__)


def build_config(args: argparse.Namespace) -> RunConfig:
    cfg = RunConfig.from_toml(args.config) if args.config else RunConfig()
    over: dict[str, Any] = {}
    if args.model:
        over.setdefault("model", {})["name"] = args.model
    if args.hosts is not None:
        over.setdefault("federation", {})["hosts"] = args.hosts
    if args.rounds is not None:
        over.setdefault("federation", {})["rounds"] = args.rounds
    if args.no_dp:
        over.setdefault("privacy", {})["enabled"] = False
    if args.data:
        over.setdefault("data", {})["source"] = str(Path(args.data).resolve())
    if args.scenario:
        from common.scenario import BUILTIN, load_scenario

        spec = args.scenario
        scen = load_scenario(spec)  # a bad file fails here, naming the field
        spec = spec if spec in BUILTIN else str(Path(spec).resolve())
        over.setdefault("data", {})["scenario"] = spec
        over.setdefault("federation", {})["hosts"] = len(scen.hosts)
        if args.rounds is None:
            over["federation"]["rounds"] = scen.rounds
    if args.policy:
        over.setdefault("aggregation", {})["policy"] = args.policy
    if args.seed is not None:
        over["seed"] = args.seed
    if args.out:
        over["out"] = args.out
    return cfg.with_overrides(**over) if over else cfg


def _host_inputs(cfg: RunConfig) -> list[list[bytes]]:
    """Raw inputs per host: the built-in streams, or the files of each host folder."""
    if cfg.data.source == "builtin":
        return [
            [
                json.dumps(r).encode()
                for r in host_stream(i, cfg.data.records_per_host, seed=cfg.seed)
            ]
            for i in range(cfg.federation.hosts)
        ]
    hosts = []
    for folder in host_folders(Path(cfg.data.source)):
        raw: list[bytes] = []
        for path in sorted(folder.iterdir()):
            if path.suffix == ".jsonl":
                raw += [ln for ln in path.read_bytes().splitlines() if ln.strip()]
            elif path.suffix == ".txt":
                raw += [
                    json.dumps({"text": ln.decode("utf-8", "replace")}).encode()
                    for ln in path.read_bytes().splitlines()
                    if ln.strip()
                ]
        hosts.append(raw)
    return hosts


def prepare_hosts(cfg: RunConfig) -> tuple[RunConfig, Path, list[dict[str, int]]]:
    """Give every virtual host a data dir whose store holds its stream.

    Records go through the same quality gate as on a deployed host (malformed lines
    are quarantined with their reason). Returns the config (hosts = folders), the
    hosts folder and each host's ingestion counters.
    """
    hosts_dir = Path(cfg.out).resolve() / "hosts"
    if cfg.data.scenario is not None:
        return _prepare_scenario_hosts(cfg, hosts_dir)
    inputs = _host_inputs(cfg)
    summaries = []
    for i, raw in enumerate(inputs):
        store = _virtual_store(cfg, hosts_dir / f"host-{i}", i)
        try:
            if not store.counters().get("received"):
                ingestor = Ingestor(store)
                for start in range(0, len(raw), 512):
                    ingestor.submit([(r, "sim") for r in raw[start : start + 512]])
            counters = store.counters()
        finally:
            store.close()
        if not counters.get("stored"):
            reasons = {
                k.split(":", 1)[1]: v
                for k, v in counters.items()
                if k.startswith("quarantined:")
            }
            where = cfg.data.source if cfg.data.source != "builtin" else "built-in"
            raise DataError(
                f"host-{i} ({where}) has no usable records: "
                f"{counters.get('received', 0)} received, quarantined by reason "
                f"{reasons or '{}'}"
            )
        summaries.append(counters)
    if cfg.federation.hosts != len(inputs):
        cfg = cfg.with_overrides(federation={"hosts": len(inputs)})
    return cfg, hosts_dir, summaries


def _virtual_store(cfg: RunConfig, data_dir: Path, i: int) -> Store:
    """Open a virtual host's store, creating its secret and key on first use."""
    # Virtual hosts share one machine with the server anyway; deriving their
    # secret and store key from the run seed makes simulations reproducible.
    # A deployed host creates random ones on first use.
    derive = f"fedstream-sim:{cfg.seed}:host-{i}".encode()
    ensure_secret(data_dir / "host.secret", hashlib.sha256(derive).digest())
    key = base64.b64encode(hashlib.sha256(b"store:" + derive).digest()) + b"\n"
    ensure_secret(data_dir / "store.key", key)
    return Store(data_dir / "store.db", load_key(data_dir / "store.key"))


def _prepare_scenario_hosts(
    cfg: RunConfig, hosts_dir: Path
) -> tuple[RunConfig, Path, list[dict[str, int]]]:
    from common.scenario import load_scenario

    assert cfg.data.scenario is not None
    scen = load_scenario(cfg.data.scenario)
    summaries = []
    for i in range(len(scen.hosts)):
        store = _virtual_store(cfg, hosts_dir / f"host-{i}", i)
        try:
            summaries.append(store.counters())
        finally:
            store.close()
    if cfg.federation.hosts != len(scen.hosts):
        cfg = cfg.with_overrides(federation={"hosts": len(scen.hosts)})
    return cfg, hosts_dir, summaries


def scenario_feeder(cfg: RunConfig, hosts_dir: Path) -> Callable[[int], None] | None:
    """The simulated streams of a scenario: before round r, every virtual host's store
    receives that round's records through the quality gate (once: the round is
    committed as the source's offset in the same transaction)."""
    if cfg.data.scenario is None:
        return None
    from common.scenario import load_scenario, round_records

    scen = load_scenario(cfg.data.scenario)

    def feed(rnd: int) -> None:
        for i in range(len(scen.hosts)):
            store = _virtual_store(cfg, hosts_dir / f"host-{i}", i)
            try:
                if int(store.offset("scenario") or 0) >= rnd:
                    continue
                records = round_records(scen, i, rnd, seed=cfg.seed)
                Ingestor(store).submit(
                    [(json.dumps(r).encode(), "scenario") for r in records],
                    offsets={"scenario": str(rnd)},
                )
            finally:
                store.close()

    return feed


class _Console:
    """Progress bar and a per-round table (rich)."""

    def __init__(self, cfg: RunConfig, quiet: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.quiet = quiet
        self.console = Console(
            highlight=False, width=None if sys.stdout.isatty() else 200
        )
        self.progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=quiet,
        )
        self.task = self.progress.add_task("rounds", total=cfg.federation.rounds)
        self.base: dict[str, float] = {}

    def on_round(self, line: dict[str, Any]) -> None:
        ppl = {d: v["ppl"] for d, v in line.get("heldout", {}).items()}
        if line["round"] == 0:
            self.base = ppl
            self._print("round 0 (base model): held-out ppl " + _fmt(ppl))
            return
        losses = [v for v in line.get("train_loss", {}).values() if v is not None]
        eps = max(line.get("epsilon", {}).values(), default=0.0)
        kib = [b / 1024 for b in line.get("bytes", {}).values()]
        self._print(
            f"round {line['round']}: hosts {len(line['hosts'])}"
            f" | train loss {sum(losses) / max(len(losses), 1):.3f}"
            f" | held-out ppl {_fmt(ppl)}"
            f" | eps max {eps:.2f}"
            + (
                f" | client eps {line['client_dp']['epsilon']:.2f}"
                if "client_dp" in line
                else ""
            )
            + f" | {max(kib, default=0):.0f} KiB/host"
            f" | {line['wall_s']:.0f}s"
            + (
                f" | drift events {','.join(line['drift_events'])}"
                if line.get("drift_events")
                else ""
            )
            + (
                f" | {line['policy']} weights "
                + " ".join(f"{w:.2f}" for _, w in sorted(line["weights"].items()))
                if line.get("policy") and line["policy"] != "fedavg"
                else ""
            )
            + (f" | rejected {line['rejected']}" if line.get("rejected") else "")
            + (f" | failed {line['failed']}" if line.get("failed") else "")
        )
        self.progress.update(self.task, completed=line["round"])

    def _print(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text)


def _fmt(ppl: dict[str, float]) -> str:
    return " ".join(f"{d}={v:.2f}" for d, v in sorted(ppl.items())) or "-"


def run(
    cfg: RunConfig,
    *,
    stop_after: int | None = None,
    quiet: bool = False,
    verbose: bool = False,
) -> Path:
    """Run (or resume) a simulated federation; returns the run folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Fail fast, in this process, on what would otherwise fail inside every host:
    # the data first (before the seconds of importing torch and transformers).
    cfg, hosts_dir, ingested = prepare_hosts(cfg)
    check_model_name(cfg.model.name)
    from common.privacy import run_noise_multiplier
    from server.checkpoint import RunFolder
    from server.client_dp import client_dp_for

    folder = RunFolder(cfg.out)
    folder.bind(cfg)
    sigma = None
    if cfg.privacy.enabled:
        sigma = run_noise_multiplier(cfg)  # an unreachable target fails here
    client = client_dp_for(cfg)  # and an unreachable client-level one here
    if not verbose:
        for category in (DeprecationWarning, FutureWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    from common.adapter import trainable_state
    from common.models import build_adapter_model, load_base_model

    if cfg.model.name == "smollm2-135m" and not quiet:
        from common.models import cache_dir

        if not (cache_dir() / "models" / "smollm2-135m" / "config.json").exists():
            print("Materialising SmolLM2-135M from its GGUF file (once, about 30 s)...")
    base = load_base_model(cfg.model)
    if folder.last_round():
        model = build_adapter_model(base, cfg.lora, seed=cfg.seed)
        shapes = {k: tuple(v.shape) for k, v in trainable_state(model).items()}
        folder.load_arrays(folder.last_round(), shapes)
    del base
    last = cfg.federation.rounds if stop_after is None else stop_after
    if folder.last_round() >= min(last, cfg.federation.rounds):
        # Nothing to train (the last checkpoint loads): no Ray; the report is
        # brought up to date.
        from server.report import write_report

        budget = cfg.privacy.target_epsilon if cfg.privacy.enabled else None
        write_report(folder, epsilon_budget=budget)
        if not quiet:
            print(
                f"fedstream-sim: {cfg.out} already has {folder.last_round()} rounds; "
                "nothing to do"
            )
        return Path(cfg.out)
    ui = _Console(cfg, quiet)
    if not quiet:
        dp = (
            f"DP-SGD sigma={sigma:.3f} C={cfg.privacy.max_grad_norm} "
            f"q={cfg.training.sample_rate}"
            f" -> epsilon <= {cfg.privacy.target_epsilon} (delta={cfg.privacy.delta})"
            if sigma is not None
            else "no DP (privacy.enabled = false)"
        )
        if client is not None:
            dp += (
                f"; client-level DP z={client.noise_multiplier:.3f} "
                f"C={client.clip_norm} -> epsilon <= "
                f"{client.epsilon(cfg.federation.rounds):.3g} (delta={client.delta})"
            )
        ui.console.print(
            f"fedstream-sim: {cfg.federation.hosts} hosts x "
            f"{cfg.federation.rounds} rounds, "
            f"model {cfg.model.name}, LoRA r={cfg.lora.rank}"
            f"{' FFA' if cfg.lora.ffa else ''}, {dp}\nrun folder: {cfg.out}"
        )
        if cfg.data.scenario is not None:
            ui.console.print(
                f"scenario {cfg.data.scenario}: records reach the hosts round by round"
            )
        for i, c in enumerate(ingested if cfg.data.scenario is None else []):
            reasons = {
                k.split(":", 1)[1]: v
                for k, v in c.items()
                if k.startswith("quarantined:")
            }
            ui.console.print(
                f"host-{i}: {c.get('stored', 0)} records stored"
                + (
                    f", {c.get('duplicates', 0)} duplicates"
                    if c.get("duplicates")
                    else ""
                )
                + (f", quarantined {reasons}" if reasons else "")
            )

    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import run_server

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, _context: Any) -> None:
        run_server(
            grid,
            cfg,
            hosts_dir=str(hosts_dir),
            on_round=ui.on_round,
            stop_after=stop_after,
            before_round=scenario_feeder(cfg, hosts_dir),
        )

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": max(os.cpu_count() or 1, 1),
            "include_dashboard": False,
            "logging_level": "INFO" if verbose else "ERROR",
            "log_to_driver": verbose,
        },
    }
    with ui.progress:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.federation.hosts,
            backend_config=backend_config,  # type: ignore[arg-type]
            verbose_logging=verbose,
        )
    out = Path(cfg.out)
    if not quiet:
        ui.console.print(
            f"done: {out}/global/latest, {out}/metrics.jsonl, {out}/report.png"
        )
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedstream-sim",
        description="Federated DP-LoRA fine-tuning with virtual data hosts on this "
        "machine.",
    )
    p.add_argument("--config", help="run config TOML (defaults are built in)")
    p.add_argument("--model", help="preset, local folder, or HF cache name")
    p.add_argument("--hosts", type=int, help="number of virtual hosts")
    p.add_argument("--rounds", type=int, help="federated rounds")
    p.add_argument("--out", help="run folder (resumes if it exists)")
    p.add_argument("--seed", type=int, help="seed for everything")
    p.add_argument(
        "--no-dp", action="store_true", help="train without DP, for comparison"
    )
    p.add_argument("--data", help="folder with one sub-folder of .jsonl/.txt per host")
    p.add_argument(
        "--scenario",
        help="drifting federation: built-in name (abrupt, gradual, recurring, noisy, "
        "noisy-clean, languages, code-prose) or a scenario TOML file",
    )
    p.add_argument("--policy", help="aggregation policy: fedavg, fedprox, drift")
    p.add_argument(
        "--stop-after", type=int, help="stop after this round (resume later)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--verbose", action="store_true", help="Flower and Ray logs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = build_config(args)
        run(cfg, stop_after=args.stop_after, quiet=args.quiet, verbose=args.verbose)
    except FedstreamError as err:
        print(f"fedstream-sim: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
