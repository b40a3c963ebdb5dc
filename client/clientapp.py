"""The ClientApp a SuperNode loads (``[tool.flwr.app.components] clientapp``).

Flower 1.42's SuperNode starts a fresh ClientApp process for every message, and
importing the training code (torch, transformers, PEFT, Opacus) takes seconds to tens
of seconds on a busy host. This front never imports it when it can avoid it: train
and evaluate messages go to the host's training worker (``client.worker``, kept
running by the agent with the code imported and the model built) when one listens
on the data dir, and run here (``client.app``) otherwise; the SecAgg+ exchanges after
training (``client.secagg``) are answered here from the node state.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from common.errors import FedstreamError
from common.secagg import RECORD

__all__ = ["app"]

log = logging.getLogger(__name__)

app = ClientApp()

ERROR_CODE = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION, as client.app


@app.train()
def train(msg: Message, context: Context) -> Message:
    if RECORD in msg.content.config_records:
        from client import secagg

        try:
            return secagg.handle(msg, context)
        except Exception as err:
            reason = (
                str(err)
                if isinstance(err, FedstreamError)
                else f"{type(err).__name__}: {err}"
            )
            log.error("%s", reason)
            return Message(Error(code=ERROR_CODE, reason=reason), reply_to=msg)
    return _run("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _run("evaluate", msg, context)


def _run(op: str, msg: Message, context: Context) -> Message:
    """``op`` on the host's training worker, or here when none listens."""
    from client.worker import WorkerUnavailable, call

    if os.environ.get("FEDSTREAM_PROFILE_CLIENTAPP"):
        print(
            f"{time.strftime('%H:%M:%S')} clientapp {os.getpid()}: {op} handler "
            f"entered {_age():.2f} s after the process started",
            file=sys.stderr,
            flush=True,
        )

    data_dir = context.node_config.get("data-dir")
    if isinstance(data_dir, str) and data_dir:
        try:
            return call(Path(data_dir), op, msg, context)
        except WorkerUnavailable:
            log.info("no training worker in %s: training in this process", data_dir)
        except OSError as err:  # the worker died mid-answer: it sent nothing whole
            reason = f"training worker failed: {err}"
            log.error("%s", reason)
            return Message(Error(code=ERROR_CODE, reason=reason), reply_to=msg)
    from client import app as training

    handler = training.train if op == "train" else training.evaluate
    return handler(msg, context)


def _age() -> float:
    """Seconds since this process started (a forked one: since the fork)."""
    with open("/proc/self/stat") as fh:
        start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as fh:
        uptime = float(fh.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
