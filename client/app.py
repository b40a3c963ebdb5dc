"""The fedstream ClientApp: one DP-LoRA round on a data host.

A train message carries the global adapter (fp32 ``arrays``) and a ``config``
record with the run settings (keys ``run.<section>.<field>``) and ``server-round``.
The reply holds the adapter delta (``arrays``, fp16 by default), a ``metrics``
record and an ``info`` record naming the host. Failures come back as error
replies, never as exceptions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import math
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secagg
from client.host import Host, adapter_model, resolve_data_dir
from client.trainer import train_local
from client.window import WindowSettings, host_epsilon, select_round
from common.adapter import (
    encode_delta,
    layout_id,
    load_trainable_state,
    trainable_shapes,
    unpack_global,
)
from common.config import RunConfig
from common.drift import BASELINE0, DriftState, observe, record_vectors, release
from common.errors import DataError, FedstreamError, PrivacyError
from common.lm import Encoded, encode_records, evaluate_loss, per_sample_loss
from common.privacy import StreamPlan, run_plan
from common.secagg import RECORD as SECAGG

__all__ = ["app", "coarse_count", "config_from_record", "drift_signal"]

log = logging.getLogger(__name__)

app = ClientApp()

ERROR_CODE = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def config_from_record(record: ConfigRecord) -> RunConfig:
    flat = {k[len("run.") :]: v for k, v in record.items() if k.startswith("run.")}
    return RunConfig.from_flat(flat)


def coarse_count(n: int) -> int:
    """Number of records rounded to a power of two: coarse by design, not DP."""
    return 0 if n <= 0 else 2 ** round(math.log2(n))


def examples_metric(expected: float, n: int, cfg: RunConfig) -> int:
    """The example count a host reports: under DP the expected training-set size
    computed from the noisy counts (post-processing of a DP output), else exact."""
    return max(1, round(expected)) if cfg.privacy.enabled else n


def drift_signal(
    model: torch.nn.Module,
    data: Encoded,
    idx: list[int],
    state: DriftState,
    *,
    cfg: RunConfig,
    plan: StreamPlan,
    expected: float,
    round_num: int,
    release_no: int,
    secret: bytes,
) -> tuple[float, bool]:
    """Release this round's drift statistics over the drift sample ``idx`` of
    ``data`` (see ``common.drift``) and feed them to the host's detector."""
    rel = None
    sigma = plan.count_noise / math.sqrt(cfg.drift.query_weight)
    if idx:
        sample = data.take(torch.tensor(idx, dtype=torch.long))
        model.eval()
        losses = []
        with torch.no_grad():
            for start in range(0, len(sample), cfg.data.eval_batch_size):
                part = torch.arange(
                    start, min(start + cfg.data.eval_batch_size, len(sample))
                )
                losses.append(per_sample_loss(model, sample.take(part)))
        log_loss = torch.cat(losses).clamp(min=1e-6).log().numpy().astype(np.float64)
        vectors = record_vectors(
            sample.input_ids.numpy(), sample.targets.numpy(), cfg.drift.buckets
        )
        rng = None
        if cfg.privacy.enabled:
            tag = f"drift:{release_no}".encode()
            seed = hmac.new(secret, tag, hashlib.sha256).digest()
            rng = np.random.default_rng(int.from_bytes(seed[:8], "big"))
        rel = release(
            log_loss,
            vectors,
            baseline=state.baseline if state.baseline is not None else BASELINE0,
            expected=expected,
            sigma=sigma,
            rng=rng,
        )
    return observe(
        state,
        rel,
        round_num=round_num,
        sigma=sigma if cfg.privacy.enabled else 0.0,
        delta=cfg.drift.ph_delta,
        threshold=cfg.drift.ph_lambda,
    )


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
        if SECAGG in msg.content.config_records:
            return secagg.handle(msg, context)
        return _train(msg, context)
    except Exception as err:
        return _error(msg, err)


def _train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    host, cfg, server_round = _host(msg, context)
    base, model = adapter_model(cfg)
    plan = run_plan(cfg)
    drift_weight = cfg.drift.query_weight if cfg.drift.enabled else 0
    window = WindowSettings(
        fresh_cap=cfg.window.fresh_cap, replay_cap=cfg.window.replay_cap
    )
    store = host.open_store()
    try:
        # Choose this round's records and commit their privacy spend before training:
        # the ledger is on disk before the update can leave the host.
        sel = select_round(
            store,
            plan,
            window,
            round_num=server_round,
            secret=host.secret(),
            drift_weight=drift_weight,
            drift_cap=cfg.drift.sample_cap,
        )
        epsilon = host_epsilon(store, plan) if cfg.privacy.enabled else 0.0
        store.set_meta_json(
            "plan", dataclasses.asdict(plan) | {"dp": cfg.privacy.enabled}
        )
        store.set_meta_json(
            "last_selection",
            dataclasses.asdict(sel)
            | {"eligible": len(sel.eligible), "drift": len(sel.drift)},
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
        stored = list(store.iter_records(sel.eligible))
        state = DriftState.from_json(store.meta_json("drift_state"))
    finally:
        store.close()
    records = [r.content for r in stored]
    data = encode_records(records, base.tokenizer, cfg.model.max_length)

    global_arrays = unpack_global(
        msg.content.array_records["arrays"], trainable_shapes(model)
    )
    load_trainable_state(model, global_arrays)
    score, event = 0.0, False
    if cfg.drift.enabled:
        in_sample = set(sel.drift)
        idx = [i for i, r in enumerate(stored) if r.seq in in_sample]
        score, event = drift_signal(
            model,
            data,
            idx,
            state,
            cfg=cfg,
            plan=plan,
            expected=sel.drift_expected if cfg.privacy.enabled else float(len(idx)),
            round_num=server_round,
            release_no=sel.release,
            secret=host.secret(),
        )
        store = host.open_store()
        try:
            store.set_meta_json("drift_state", state.to_json())
        finally:
            store.close()
        if event:
            log.warning("host %s: drift event in round %s", host.name, server_round)
    result = train_local(
        model,
        data,
        training=cfg.training,
        privacy=cfg.privacy,
        noise_multiplier=plan.noise_multiplier if cfg.privacy.enabled else None,
        seed=host.release_seed(sel.release),
        proximal_mu=cfg.aggregation.mu,
    )
    secure = cfg.aggregation.secure
    if secure:
        flat = np.concatenate(
            [(result.arrays[k] - global_arrays[k]).ravel() for k in global_arrays]
        ).astype(np.float32)
        clip = cfg.client_dp.clip_norm if cfg.client_dp.enabled else None
        norm = float(np.linalg.norm(flat.astype(np.float64)))
        if clip is not None and norm > clip:
            # Client-level DP under SecAgg+: the host clips before masking, since
            # the server never sees its update (server.client_dp).
            flat = (flat * np.float32(clip / norm)).astype(np.float32)
        keys = secagg.setup(context, flat, server_round)
    else:
        delta = encode_delta(result.arrays, global_arrays, cfg.training.update_dtype)
    metrics = MetricRecord(
        {
            "num-examples": examples_metric(sel.expected, len(data), cfg),
            "train-loss": round(result.mean_loss, 2),
            "drift-score": round(score, 3),
            "drift-event": int(event),
            "base-round": server_round,
            "epsilon": epsilon,
            "noise-multiplier": plan.noise_multiplier if cfg.privacy.enabled else 0.0,
            "steps": result.steps,
            "train-seconds": round(time.perf_counter() - t0, 1),
        }
    )
    layout = layout_id({k: tuple(v.shape) for k, v in global_arrays.items()})
    info = ConfigRecord({"host": host.name, "layout": layout})
    if secure:
        # No array leaves: the delta waits in the node state for SecAgg+ (its norm
        # is post-processing of the DP update: it costs no privacy).
        metrics["update-norm"] = float(np.linalg.norm(flat.astype(np.float64)))
        content = RecordDict({"metrics": metrics, "info": info, SECAGG: keys})
    else:
        content = RecordDict({"arrays": delta, "metrics": metrics, "info": info})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss of the received global adapter on this host's records (not DP: opt-in)."""
    try:
        host, cfg, _ = _host(msg, context)
        base, model = adapter_model(cfg)
        arrays = msg.content.array_records["arrays"]
        load_trainable_state(model, unpack_global(arrays, trainable_shapes(model)))
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
