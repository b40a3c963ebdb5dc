"""The fedstream ClientApp: one DP-LoRA round on a data host.

A train message carries the global adapter (fp32 ``arrays``) and a ``config``
record with the run settings (keys ``run.<section>.<field>``) and ``server-round``.
The reply holds the adapter delta (``arrays``, fp16 by default), a ``metrics``
record and an ``info`` record naming the host. Failures come back as error
replies, never as exceptions.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.host import Host, adapter_model, resolve_data_dir
from client.trainer import train_local
from client.window import WindowSettings, host_epsilon, select_round
from common.adapter import encode_delta, from_record, layout_id, load_trainable_state
from common.config import RunConfig
from common.errors import DataError, FedstreamError, PrivacyError
from common.lm import encode_records, evaluate_loss
from common.privacy import stream_plan

__all__ = ["app", "coarse_count", "config_from_record"]

log = logging.getLogger(__name__)

app = ClientApp()

ERROR_CODE = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def config_from_record(record: ConfigRecord) -> RunConfig:
    flat = {k[len("run.") :]: v for k, v in record.items() if k.startswith("run.")}
    return RunConfig.from_flat(flat)


def coarse_count(n: int) -> int:
    """Number of records rounded to a power of two: coarse by design, not DP."""
    return 0 if n <= 0 else 2 ** round(math.log2(n))


def _host(msg: Message, context: Context) -> tuple[Host, RunConfig, int]:
    record = msg.content.config_records["config"]
    cfg = config_from_record(record)
    hosts_dir = record.get("hosts-dir")
    data_dir = resolve_data_dir(dict(context.node_config), hosts_dir)  # type: ignore[arg-type]
    return Host(data_dir, cfg), cfg, int(record.get("server-round", 0))  # type: ignore[arg-type]


def _error(msg: Message, err: Exception) -> Message:
    reason = (
        str(err) if isinstance(err, FedstreamError) else f"{type(err).__name__}: {err}"
    )
    log.error("%s", reason)
    return Message(Error(code=ERROR_CODE, reason=reason), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        return _train(msg, context)
    except Exception as err:
        return _error(msg, err)


def _train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    host, cfg, server_round = _host(msg, context)
    base, model = adapter_model(cfg)
    plan = stream_plan(cfg.privacy, cfg.training, rounds=cfg.federation.rounds)
    window = WindowSettings(
        fresh_cap=cfg.window.fresh_cap, replay_cap=cfg.window.replay_cap
    )
    store = host.open_store()
    try:
        # Choose this round's records and commit their privacy spend before training:
        # the ledger is on disk before the update can leave the host.
        sel = select_round(
            store, plan, window, round_num=server_round, secret=host.secret()
        )
        epsilon = host_epsilon(store, plan) if cfg.privacy.enabled else 0.0
        store.set_meta_json(
            "plan", dataclasses.asdict(plan) | {"dp": cfg.privacy.enabled}
        )
        store.set_meta_json(
            "last_selection", dataclasses.asdict(sel) | {"eligible": len(sel.eligible)}
        )
        if not sel.eligible:
            if sel.live == 0 and store.count(live=False) > 0:
                raise PrivacyError(
                    f"host {host.name}: privacy budget spent: every record has used "
                    f"its budget (epsilon {epsilon:.3f} of "
                    f"{cfg.privacy.target_epsilon}); "
                    "this host trains again when new records arrive"
                )
            raise DataError(f"host {host.name}: no record is eligible this round")
        records = [r.content for r in store.iter_records(sel.eligible)]
    finally:
        store.close()
    data = encode_records(records, base.tokenizer, cfg.model.max_length)

    global_arrays = from_record(msg.content.array_records["arrays"])
    load_trainable_state(model, global_arrays)
    result = train_local(
        model,
        data,
        training=cfg.training,
        privacy=cfg.privacy,
        noise_multiplier=plan.noise_multiplier if cfg.privacy.enabled else None,
        seed=host.round_seed(server_round),
    )
    delta = encode_delta(result.arrays, global_arrays, cfg.training.update_dtype)
    metrics = MetricRecord(
        {
            "num-examples": coarse_count(len(data)),
            "train-loss": round(result.mean_loss, 2),
            "epsilon": epsilon,
            "noise-multiplier": plan.noise_multiplier if cfg.privacy.enabled else 0.0,
            "steps": result.steps,
            "train-seconds": round(time.perf_counter() - t0, 1),
        }
    )
    layout = layout_id({k: tuple(v.shape) for k, v in global_arrays.items()})
    info = ConfigRecord({"host": host.name, "layout": layout})
    content = RecordDict({"arrays": delta, "metrics": metrics, "info": info})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss of the received global adapter on this host's records (not DP: opt-in)."""
    try:
        host, cfg, _ = _host(msg, context)
        base, model = adapter_model(cfg)
        load_trainable_state(model, from_record(msg.content.array_records["arrays"]))
        store = host.open_store()
        try:
            recent = [r.content for r in store.iter_records(store.recent(256))]
        finally:
            store.close()
        data = encode_records(recent, base.tokenizer, cfg.model.max_length)
        loss, _ = evaluate_loss(model, data, cfg.data.eval_batch_size)
        metrics: dict[str, Any] = {
            "num-examples": coarse_count(len(data)),
            "eval-loss": round(loss, 2),
        }
        content = RecordDict(
            {
                "metrics": MetricRecord(metrics),
                "info": ConfigRecord({"host": host.name}),
            }
        )
        return Message(content=content, reply_to=msg)
    except Exception as err:
        return _error(msg, err)
