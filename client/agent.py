"""``fedstream-agent``: the data-host agent.

* ``run --config agent.toml``: opens the encrypted store and starts every configured
  source; SIGTERM or SIGINT drains (in-flight commits finish and are acknowledged, no
  new input is taken) and exits 0.
* ``push FILE --to HOST:PORT``: sends a JSONL file to a running agent over gRPC and
  prints what happened to each line (stored, duplicate, quarantined with reason).
* ``status --config agent.toml``: records stored and quarantined (by reason), PII
  redactions, disk use, and the host's privacy spend.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from client.front import tune_process
from client.gate import Gate, GateSettings
from client.ingest import Ingestor
from client.sources import SOURCES
from client.store import Store, load_key
from client.supervisor import ProcessSupervisor, SupernodeSupervisor, worker_command
from common.agent_config import AgentConfig
from common.errors import ConfigError, FedstreamError

__all__ = ["Agent", "main", "push", "status"]

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
        key = load_key(cfg.key_path)
        self.store = Store(
            cfg.store_path,
            key,
            quota_bytes=cfg.store.quota_bytes,
            synchronous=cfg.store.synchronous,
        )
        g = cfg.gate
        gate = Gate(
            GateSettings(
                max_raw_bytes=g.max_raw_bytes,
                max_text_bytes=g.max_text_bytes,
                max_depth=g.max_depth,
                max_tags=g.max_tags,
                pii_extra=dict(g.pii_extra),
            )
        )
        workers = g.workers
        if workers is None:
            workers = 1 if (os.cpu_count() or 1) >= 2 else 0
        self.ingestor = Ingestor(
            self.store,
            gate,
            horizon=g.horizon,
            near_threshold=g.near_threshold,
            workers=workers,
        )
        self._stop_retention = threading.Event()
        self._retention = threading.Thread(target=self._retention_loop, daemon=True)
        self.supervisor: SupernodeSupervisor | None = None
        self.worker: ProcessSupervisor | None = None
        if cfg.supernode is not None:
            data_dir = Path(cfg.data_dir)
            self.supervisor = SupernodeSupervisor(
                cfg.supernode, data_dir, ready=self._has_records
            )
            if cfg.supernode.worker:
                self.worker = ProcessSupervisor(
                    "worker",
                    worker_command(data_dir),
                    data_dir,
                    restart_backoff_s=cfg.supernode.restart_backoff_s,
                )
        self.sources: list[Any] = []
        for src in cfg.sources:
            factory = SOURCES[src.type]
            if src.type == "grpc":
                self.sources.append(factory(src, self.ingestor, self.stats))
            else:
                self.sources.append(factory(src, self.ingestor))

    def start(self) -> None:
        for src in self.sources:
            src.start()
            log.info("Source %s started", src.name)
        if self.cfg.store.retention_days > 0:
            self._retention.start()
        if self.worker is not None:
            self.worker.start()
        if self.supervisor is not None:
            self.supervisor.start()

    def _has_records(self) -> bool:
        assert self.cfg.supernode is not None
        with self.ingestor.lock:
            return self.store.count() >= self.cfg.supernode.min_records

    def stop(self) -> None:
        for src in self.sources:
            src.stop()  # in-flight commits finish and are acknowledged
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.worker is not None:
            self.worker.stop()
        self._stop_retention.set()
        if self._retention.is_alive():
            self._retention.join()
        self.ingestor.close()
        self.store.close()

    def _retention_loop(self) -> None:
        """Apply ``store.retention_days`` at start and then every minute."""
        while True:
            cutoff = time.time() - self.cfg.store.retention_days * 86400
            with self.ingestor.lock:  # never purge under a commit in progress
                removed = self.store.purge(cutoff)
            if removed:
                log.info("Retention: removed %d records", removed)
            if self._stop_retention.wait(60):
                return

    def stats(self) -> Any:
        from common.proto import ingest_pb2

        info = status_dict(self.cfg, self.store)
        return ingest_pb2.Stats(
            received=info["received"],
            stored=info["stored"],
            duplicates=info["duplicates"],
            quarantined=info["quarantined"],
            quarantined_by_reason=info["quarantined_by_reason"],
            pii_redactions=info["pii_redactions"],
            bytes_used=info["bytes_used"],
            bytes_quota=info["bytes_quota"],
            epsilon_spent=info["epsilon_spent"],
            epsilon_budget=info["epsilon_budget"] or 0.0,
            window=info["window"],
            replay=info["replay"],
            can_train=info["can_train"],
        )


def status_dict(cfg: AgentConfig, store: Store) -> dict[str, Any]:
    counters = store.counters()
    plan = store.meta_json("plan")  # written by the ClientApp at each round
    last = store.meta_json("last_selection") or {}
    epsilon, budget = 0.0, None
    if plan and plan.get("dp"):
        from common.privacy import StreamPlan  # imports torch: only when trained

        fields = {k: v for k, v in plan.items() if k != "dp"}
        stream = StreamPlan(**fields)
        epsilon = max((stream.epsilon(m, c) for m, c, _ in store.spend()), default=0.0)
        budget = stream.record_budget
    live = store.count()
    drift = store.meta_json("drift_state") or {}
    return {
        "received": counters.get("received", 0),
        "stored": counters.get("stored", 0),
        "duplicates": counters.get("duplicates", 0),
        "quarantined": counters.get("quarantined", 0),
        "quarantined_by_reason": {
            k.split(":", 1)[1]: v
            for k, v in counters.items()
            if k.startswith("quarantined:")
        },
        "pii_redactions": {
            k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("pii:")
        },
        "live_records": live,
        "retired_records": store.count(live=False) - live,
        "last_round": store.meta_int("last_round", 0),
        "window": int(last.get("fresh", 0)),
        "replay": int(last.get("replay", 0)),
        "epsilon_spent": epsilon,
        "epsilon_budget": budget,
        "epsilon_left": None if budget is None else max(budget - epsilon, 0.0),
        "can_train": live > 0,
        "drift_score": (drift.get("last") or {}).get("score", 0.0),
        "drift_events": drift.get("events", []),
        "bytes_used": store.bytes_used(),
        "bytes_quota": cfg.store.quota_bytes,
    }


def status(cfg: AgentConfig) -> dict[str, Any]:
    store = Store(cfg.store_path, load_key(cfg.key_path, create=False))
    try:
        return status_dict(cfg, store)
    finally:
        store.close()


INSECURE_WARNING = (
    "WARNING: --insecure: the SuperNode connects without TLS or authentication; "
    "for local development only"
)


def with_insecure(cfg: AgentConfig) -> AgentConfig:
    """``cfg`` with ``supernode.insecure`` set, refused in production."""
    sn = cfg.supernode
    if sn is None:
        raise ConfigError("--insecure needs a [supernode] section in the config")
    if sn.production:
        raise ConfigError(
            "--insecure is refused because supernode.production = true; set "
            "supernode.production = false for local development"
        )
    return cfg.model_copy(
        update={"supernode": sn.model_copy(update={"insecure": True})}
    )


def run(cfg: AgentConfig, *, stop: threading.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or ``stop`` is set); drain and return 0."""
    stop = stop or threading.Event()
    if cfg.supernode is not None and cfg.supernode.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    agent = Agent(cfg)
    tune_process()

    def _signal(signum: int, _frame: Any) -> None:
        log.info("Signal %d: draining", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
    agent.start()
    print(
        f"fedstream-agent: running ({', '.join(s.name for s in agent.sources)}); "
        f"store {cfg.store_path}"
        + (f"; supernode -> {cfg.supernode.superlink}" if cfg.supernode else ""),
        flush=True,
    )
    stop.wait()
    agent.stop()
    print("fedstream-agent: drained and stopped", flush=True)
    return 0


def push(
    path: Path, target: str, *, batch: int = 500, timeout: float = 60
) -> dict[str, Any]:
    """Send every line of ``path`` to the agent at ``target``; returns the totals."""
    import grpc

    from common.proto import ingest_pb2, ingest_pb2_grpc

    if not path.exists():
        raise FedstreamError(f"{path} does not exist")
    reasons: dict[str, int] = {}
    totals: dict[str, Any] = {
        "stored": 0,
        "duplicates": 0,
        "quarantined": 0,
        "reasons": reasons,
    }
    with grpc.insecure_channel(target) as channel:
        stub = ingest_pb2_grpc.IngestStub(channel)
        lines = [ln for ln in path.read_bytes().split(b"\n") if ln.strip()]
        for start in range(0, len(lines), batch):
            chunk = [ingest_pb2.Record(raw=ln) for ln in lines[start : start + batch]]
            try:
                reply = stub.PushBatch(
                    ingest_pb2.RecordBatch(records=chunk), timeout=timeout
                )
            except grpc.RpcError as err:
                raise FedstreamError(
                    f"push to {target} failed after {start} lines: "
                    f"{err.code().name}: {err.details()}"
                ) from None
            totals["stored"] += reply.stored
            totals["duplicates"] += reply.duplicates
            totals["quarantined"] += reply.quarantined
            for ack in reply.acks:
                if ack.reason and ack.status == ingest_pb2.Ack.QUARANTINED:
                    reasons[ack.reason] = reasons.get(ack.reason, 0) + 1
    return totals


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedstream-agent", description="fedstream data-host agent"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="ingest from the configured sources")
    r.add_argument("--config", required=True)
    r.add_argument(
        "--insecure",
        action="store_true",
        help="SuperNode without TLS or auth: local development only",
    )
    s = sub.add_parser("status", help="what the store holds and the privacy spend")
    s.add_argument("--config", required=True)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    u = sub.add_parser("push", help="send a JSONL file to a running agent")
    u.add_argument("file")
    u.add_argument("--to", required=True, help="host:port of the agent's gRPC source")
    u.add_argument("--batch", type=int, default=500)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.cmd == "run":
            cfg = AgentConfig.from_toml(args.config)
            return run(with_insecure(cfg) if args.insecure else cfg)
        if args.cmd == "status":
            info = status(AgentConfig.from_toml(args.config))
            if args.json:
                print(json.dumps(info, indent=1))
            else:
                for key, value in info.items():
                    print(f"{key:>22}: {value}")
            return 0
        totals = push(Path(args.file), args.to, batch=args.batch)
        print(
            f"stored {totals['stored']}, duplicates {totals['duplicates']}, "
            f"quarantined {totals['quarantined']} {totals['reasons'] or ''}".rstrip()
        )
        return 0
    except (FedstreamError, OSError) as err:
        print(f"fedstream-agent: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
