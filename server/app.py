"""The fedstream ServerApp: rounds of FedAvg over DP-LoRA deltas, with checkpoints.

``run_server`` is the whole server loop; the ``app`` object below runs it from Flower's
``run_config`` (``flwr run .``), and ``server.sim`` runs it in simulation.
"""

from __future__ import annotations

import logging
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.adapter import load_trainable_state, to_record, trainable_state
from common.config import RunConfig
from common.errors import ConfigError
from common.models import build_adapter_model, load_base_model
from server.checkpoint import RunFolder, now
from server.checks import update_norm_bound
from server.client_dp import ClientDP, client_dp_for
from server.evaluation import HeldOut
from server.policies import make_policy
from server.report import write_report
from server.secure import SecureAdapterFedAvg
from server.strategy import AdapterFedAvg

__all__ = ["app", "run_config_from_flat", "run_server"]

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]


def run_server(
    grid: Grid,
    cfg: RunConfig,
    *,
    hosts_dir: str | None = None,
    on_round: RoundCallback | None = None,
    stop_after: int | None = None,
    before_round: Callable[[int], None] | None = None,
) -> RunFolder:
    """Run (or resume) the federation described by ``cfg`` on ``grid``.

    ``stop_after`` ends this invocation after that round, as an interruption would;
    running again with the same run folder resumes after the last complete round.
    """
    folder = RunFolder(cfg.out)
    folder.bind(cfg)
    budget = cfg.privacy.target_epsilon if cfg.privacy.enabled else None
    folder.clean_partial()
    base = load_base_model(cfg.model)
    model = build_adapter_model(base, cfg.lora, seed=cfg.seed)
    shapes = {k: tuple(v.shape) for k, v in trainable_state(model).items()}
    start = folder.last_round()
    arrays = folder.load_arrays(start, shapes) if start else trainable_state(model)
    last = (
        cfg.federation.rounds
        if stop_after is None
        else min(stop_after, cfg.federation.rounds)
    )
    if last <= start:
        log.info(
            "Run folder %s already has %d rounds; nothing to do", folder.path, start
        )
        write_report(folder, epsilon_budget=budget)
        return folder
    if start:
        log.info("Resuming %s after round %d", folder.path, start)

    heldout = HeldOut.for_run(cfg, base)
    policy = make_policy(cfg.aggregation)
    client_dp = client_dp_for(cfg)
    if client_dp is not None:
        log.info(
            "Client-level DP: clip %.4g, noise multiplier %.4g, epsilon <= %.3g "
            "(delta %g) after %d rounds; hosts weigh equally",
            client_dp.clip_norm,
            client_dp.noise_multiplier,
            client_dp.epsilon(cfg.federation.rounds),
            client_dp.delta,
            cfg.federation.rounds,
        )
    identity = base.identity()
    epsilon: dict[str, float] = {}
    for line in folder.read_metrics():
        epsilon.update(line.get("epsilon", {}))

    base_config: dict[str, Any] = {f"run.{k}": v for k, v in cfg.to_flat().items()}
    if hosts_dir is not None:
        base_config["hosts-dir"] = hosts_dir
    fed = cfg.federation
    secure: dict[str, Any] = {}
    strategy_cls = AdapterFedAvg
    if cfg.aggregation.secure:
        strategy_cls = SecureAdapterFedAvg
        secure = {
            "shares": cfg.aggregation.secure_shares,
            "stage_timeout": fed.round_timeout,
        }
    strategy = strategy_cls(
        **secure,
        global_arrays=arrays,
        base_config=base_config,
        round_offset=start,
        policy=policy,
        before_round=before_round,
        max_update_norm=update_norm_bound(cfg, sum(v.size for v in arrays.values())),
        client_dp=client_dp,
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_hosts,
        min_evaluate_nodes=fed.min_hosts,
        min_available_nodes=fed.min_hosts,
    )
    clock = {"t": time.perf_counter()}

    def evaluate_fn(server_round: int, _arrays: ArrayRecord) -> MetricRecord | None:
        rnd = start + server_round
        if server_round == 0:
            if start == 0 and not folder.read_metrics():
                line = {"round": 0, "heldout": heldout.evaluate(model), "time": now()}
                folder.append_metrics(line)
                if on_round:
                    on_round(line)
            clock["t"] = time.perf_counter()
            return None
        outcome = strategy.outcome
        load_trainable_state(model, strategy.global_arrays)
        t_eval = time.perf_counter()
        scores = heldout.evaluate(model)
        eval_s = time.perf_counter() - t_eval
        for h, m in outcome.metrics.items():
            if "epsilon" in m:
                epsilon[h] = m["epsilon"]
        line = {
            "round": rnd,
            "hosts": outcome.hosts,
            "train_loss": {h: m.get("train-loss") for h, m in outcome.metrics.items()},
            "train_s": {h: m.get("train-seconds") for h, m in outcome.metrics.items()},
            "heldout": scores,
            "epsilon": dict(sorted(epsilon.items())),
            "bytes": outcome.bytes,
            "rejected": outcome.rejected,
            "failed": outcome.failed,
            "policy": policy.name,
            "weights": outcome.weights,
            "drift": outcome.drift,
            "drift_events": outcome.drift_events,
            "damped": outcome.damped,
            "server_step": round(outcome.step, 4),
            "wall_s": round(time.perf_counter() - clock["t"], 2),
            "wait_s": round(outcome.wait_s, 2),  # train messages out -> replies in
            "eval_s": round(eval_s, 2),  # held-out evaluation of the new adapter
            "time": now(),
        }
        summary = client_dp_summary(client_dp, rnd) if client_dp is not None else None
        if summary is not None:
            line["client_dp"] = {
                **summary,
                "clipped": outcome.clipped,  # host -> norm before clipping
            }
        meta = {
            "round": rnd,
            "epsilon": line["epsilon"],
            "delta": cfg.privacy.delta if cfg.privacy.enabled else None,
            "dp": cfg.privacy.enabled,
            "config_hash": cfg.fingerprint(),
            "base_model": identity,
            "hosts": outcome.hosts,
        }
        if summary is not None:  # the mechanism, not the per-host norms
            meta["client_dp"] = summary
        folder.save_round(rnd, model, strategy.global_arrays, meta, line)
        if on_round:
            on_round(line)
        clock["t"] = time.perf_counter()
        flat: dict[str, int | float | list[int] | list[float]] = {
            f"{d}-ppl": v["ppl"] for d, v in scores.items()
        }
        return MetricRecord(flat) if flat else None

    strategy.start(
        grid=grid,
        initial_arrays=to_record(arrays),
        num_rounds=last - start,
        timeout=fed.round_timeout,
        evaluate_fn=evaluate_fn,
    )
    write_report(folder, epsilon_budget=budget)
    return folder


def client_dp_summary(client_dp: ClientDP, rnd: int) -> dict[str, Any]:
    """The client-level guarantee after ``rnd`` rounds (every round counted, whether
    or not it changed the adapter), for the metrics line and ``fedstream.json``."""
    return {
        "epsilon": round(client_dp.epsilon(rnd), 4),
        "delta": client_dp.delta,
        "noise_multiplier": round(client_dp.noise_multiplier, 4),
        "clip_norm": client_dp.clip_norm,
    }


def run_config_from_flat(flat: dict[str, Any]) -> tuple[RunConfig, str]:
    """The run config and hosts mode ("virtual" or "nodes") from Flower's run_config.

    The launcher sends the whole validated run config as TOML text
    (``deploy.config``); flat keys serve ``flwr run .`` users.
    """
    flat = dict(flat)
    hosts_mode = str(flat.pop("deploy.hosts", "virtual"))
    if hosts_mode not in ("virtual", "nodes"):
        raise ConfigError(
            f"deploy.hosts must be 'virtual' or 'nodes', got {hosts_mode!r}"
        )
    text = str(flat.pop("deploy.config", ""))
    if text:
        return RunConfig.build(tomllib.loads(text)), hosts_mode
    return RunConfig.from_flat(flat), hosts_mode


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: settings from ``[tool.flwr.app.config]``.

    ``deploy.hosts = "nodes"`` (set by ``fedstream-server run``, or by hand with
    ``flwr run . <superlink> --run-config "deploy.hosts='nodes'"``) means the
    SuperNodes bring their data dirs; otherwise virtual hosts get built-in streams.
    """
    from server.sim import prepare_hosts, scenario_feeder

    cfg, hosts_mode = run_config_from_flat(dict(context.run_config))
    cfg = cfg.with_overrides(out=str(Path(cfg.out).resolve()))
    if hosts_mode == "nodes":
        log.info("Run folder %s, deployed hosts", cfg.out)
        run_server(grid, cfg)
        return
    # Virtual nodes (Flower's simulation runtime) have no data dir of their own: give
    # them the built-in streams, one per node. Deployed nodes bring "data-dir".
    nodes = len(list(grid.get_node_ids()))
    if nodes > cfg.federation.hosts:
        cfg = cfg.with_overrides(federation={"hosts": nodes})
    cfg, hosts_dir, _ = prepare_hosts(cfg)
    log.info("Run folder %s, %d hosts", cfg.out, cfg.federation.hosts)
    run_server(
        grid,
        cfg,
        hosts_dir=str(hosts_dir),
        before_round=scenario_feeder(cfg, hosts_dir),
    )
