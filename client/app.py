"""The fedstream ClientApp: one DP-LoRA round on a data host.

A train message carries the global adapter (fp32 ``arrays``) and a ``config``
record with the run settings (keys ``run.<section>.<field>``) and ``server-round``.
The reply holds the adapter delta (``arrays``, fp16 by default), a ``metrics``
record and an ``info`` record naming the host. Failures come back as error
replies, never as exceptions.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.host import Host, adapter_model, resolve_data_dir
from client.trainer import train_local
from common.adapter import encode_delta, from_record, layout_id, load_trainable_state
from common.config import RunConfig
from common.errors import FedstreamError, PrivacyError
from common.lm import evaluate_loss
from common.privacy import DPEvent, planned_noise_multiplier

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
    data = host.records(base)
    ledger = host.ledger()

    sigma = None
    if cfg.privacy.enabled:
        sigma = planned_noise_multiplier(
            cfg.privacy, cfg.training, rounds=cfg.federation.rounds
        )
        planned = DPEvent(
            noise_multiplier=sigma,
            sample_rate=cfg.training.sample_rate,
            steps=cfg.training.local_steps,
            round=server_round,
        )
        budget = cfg.privacy.target_epsilon
        if budget is not None and ledger.epsilon_with(planned) > budget * (1 + 1e-3):
            raise PrivacyError(
                f"host {host.name}: privacy budget spent "
                f"(epsilon {ledger.epsilon():.3f} "
                f"of {budget}); another round would exceed privacy.target_epsilon, so "
                "this host stops training"
            )

    global_arrays = from_record(msg.content.array_records["arrays"])
    load_trainable_state(model, global_arrays)
    result = train_local(
        model,
        data,
        training=cfg.training,
        privacy=cfg.privacy,
        noise_multiplier=sigma,
        seed=host.round_seed(server_round),
        round_num=server_round,
    )
    if result.event is not None:
        ledger.record(result.event)
        ledger.save(host.ledger_path)  # committed before the update leaves the host

    delta = encode_delta(result.arrays, global_arrays, cfg.training.update_dtype)
    metrics = MetricRecord(
        {
            "num-examples": coarse_count(len(data)),
            "train-loss": round(result.mean_loss, 2),
            "epsilon": ledger.epsilon() if cfg.privacy.enabled else 0.0,
            "noise-multiplier": float(sigma or 0.0),
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
        data = host.records(base)
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
