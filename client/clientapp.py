"""The ClientApp a SuperNode loads (``[tool.flwr.app.components] clientapp``).

Flower 1.42's SuperNode starts a fresh ClientApp process for every message, and
importing the training code (torch, transformers, PEFT, Opacus) takes seconds to tens
of seconds on a busy host. This front imports it only for the messages that need it
(train, evaluate: ``client.app``); the SecAgg+ exchanges after training
(``client.secagg``) are answered without it, from the node state.
"""

from __future__ import annotations

import logging

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
    from client.app import train as train_round

    return train_round(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from client.app import evaluate as evaluate_round

    return evaluate_round(msg, context)
