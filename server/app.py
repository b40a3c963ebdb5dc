"""The fedstream ServerApp: rounds of FedAvg over DP-LoRA deltas, with checkpoints.

``run_server`` is the whole server loop; the ``app`` object below runs it from Flower's
``run_config`` (``flwr run .``), and ``server.sim`` runs it in simulation.
"""

from __future__ import annotations

import logging
import threading
import time
import tomllib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.adapter import load_trainable_state, pack_global, trainable_state
from common.config import RunConfig
from common.errors import ConfigError
from common.models import build_adapter_model, load_base_model
from server.checkpoint import RunFolder, now
from server.checks import update_norm_bound
from server.client_dp import ClientDP, client_dp_for
from server.evaluation import HeldOut
from server.grid import PollingGrid, fast_polling
from server.policies import make_policy
from server.report import write_report
from server.secure import SecureAdapterFedAvg
from server.strategy import AdapterFedAvg

__all__ = ["app", "run_config_from_flat", "run_server"]

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]
RELEASE_WAIT_S = 10.0  # longest wait for the next round's push before evaluating


def run_server(
    grid: Grid,
    cfg: RunConfig,
    *,
    hosts_dir: str | None = None,
    on_round: RoundCallback | None = None,
    stop_after: int | None = None,
    before_round: Callable[[int], None] | None = None,
    overlap_default: bool = False,
) -> RunFolder:
    """Run (or resume) the federation described by ``cfg`` on ``grid``.

    ``stop_after`` ends this invocation after that round, as an interruption would;
    running again with the same run folder resumes after the last complete round.
    ``overlap_default`` is ``federation.overlap_eval`` when the config leaves it
    unset (``main`` sets it for deployed hosts).
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
    overlap = cfg.federation.overlap_eval
    if overlap is None:
        overlap = overlap_default
    evaluator = _RoundPublisher(folder, model, heldout, on_round, background=overlap)
    if overlap and isinstance(grid, PollingGrid):
        # Evaluate once the next round's messages are out: pushing them competes
        # for the CPU (and the GIL) with the evaluation, and every host waits on it.
        grid.after_push.append(evaluator.release)
        evaluator.wait_for_release = True

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
        for h, m in outcome.metrics.items():
            if "epsilon" in m:
                epsilon[h] = m["epsilon"]
        line = {
            "round": rnd,
            "hosts": outcome.hosts,
            "train_loss": {h: m.get("train-loss") for h, m in outcome.metrics.items()},
            "train_s": {h: m.get("train-seconds") for h, m in outcome.metrics.items()},
            "heldout": None,  # filled in by the evaluation
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
            "wall_s": None,  # below
            "wait_s": round(outcome.wait_s, 2),  # train messages out -> replies in
            "eval_s": None,  # held-out evaluation of the new adapter
            "time": None,
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
        arrays_now = OrderedDict(
            (k, v.copy()) for k, v in strategy.global_arrays.items()
        )
        if overlap:
            # The round's period: from the previous aggregate to this one (the
            # previous round's evaluation ran meanwhile, off this path).
            line["wall_s"] = round(time.perf_counter() - clock["t"], 2)
            clock["t"] = time.perf_counter()
            evaluator.publish(rnd, arrays_now, meta, line)
            return None
        scores = evaluator.publish(rnd, arrays_now, meta, line, wall_from=clock["t"])
        clock["t"] = time.perf_counter()
        flat: dict[str, int | float | list[int] | list[float]] = {
            f"{d}-ppl": v["ppl"] for d, v in scores.items()
        }
        return MetricRecord(flat) if flat else None

    strategy.start(
        grid=grid,
        initial_arrays=pack_global(arrays),
        num_rounds=last - start,
        timeout=fed.round_timeout,
        evaluate_fn=evaluate_fn,
    )
    evaluator.join()
    write_report(folder, epsilon_budget=budget)
    return folder


class _RoundPublisher:
    """Evaluates a round's adapter on the held-out sets, then publishes the round
    (``RunFolder.save_round``: adapter, fedstream.json, metrics line).

    With ``background`` the work runs in a thread while the next round trains (with
    ``wait_for_release``, from ``release()``: once that round's messages are out, or
    after ``RELEASE_WAIT_S`` if they are not, e.g. while the next round waits for
    ``federation.min_hosts`` hosts).
    The next ``publish`` (or ``join``) waits for it first, so rounds are published in
    order, the model is used by one round at a time, and an error in the thread is
    raised in the server loop. A crash before the thread published round N leaves
    round N unpublished; resume trains it again.
    """

    def __init__(
        self,
        folder: RunFolder,
        model: Any,
        heldout: HeldOut,
        on_round: RoundCallback | None,
        *,
        background: bool,
    ) -> None:
        self.folder = folder
        self.model = model
        self.heldout = heldout
        self.on_round = on_round
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.wait_for_release = False  # start each evaluation at release()
        self._go = threading.Event()

    def release(self) -> None:
        """The next round's messages are out: the pending evaluation may start."""
        self._go.set()

    def publish(
        self,
        rnd: int,
        arrays: OrderedDict[str, np.ndarray],
        meta: dict[str, Any],
        line: dict[str, Any],
        *,
        wall_from: float | None = None,
    ) -> dict[str, Any]:
        self.join()
        if not self.background:
            return self._run(rnd, arrays, meta, line, wall_from)
        self._go.clear()
        if not self.wait_for_release:
            self._go.set()
        self._thread = threading.Thread(
            target=self._guarded,
            args=(rnd, arrays, meta, line, None),
            name=f"publish-round-{rnd}",
            daemon=True,
        )
        self._thread.start()
        return {}

    def join(self) -> None:
        if self._thread is not None:
            self._go.set()  # no next round to wait for
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _guarded(self, *args: Any) -> None:
        try:
            # The next push may never come soon: a round that waits for hosts to
            # (re)connect must not hold the previous round's publication back.
            self._go.wait(timeout=RELEASE_WAIT_S)
            self._run(*args)
        except BaseException as err:  # raised again by join() in the server loop
            self._error = err

    def _run(
        self,
        rnd: int,
        arrays: OrderedDict[str, np.ndarray],
        meta: dict[str, Any],
        line: dict[str, Any],
        wall_from: float | None,
    ) -> dict[str, Any]:
        load_trainable_state(self.model, arrays)
        t_eval = time.perf_counter()
        scores = self.heldout.evaluate(self.model)
        line["heldout"] = scores
        line["eval_s"] = round(time.perf_counter() - t_eval, 2)
        if wall_from is not None:  # from one published adapter to this one
            line["wall_s"] = round(time.perf_counter() - wall_from, 2)
        line["time"] = now()
        self.folder.save_round(rnd, self.model, arrays, meta, line)
        if self.on_round:
            self.on_round(line)
        return scores


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
        grid = fast_polling(grid, cfg.federation.poll_interval)
        run_server(grid, cfg, overlap_default=True)
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
