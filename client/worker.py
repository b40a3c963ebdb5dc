"""The data host's training worker: one long-lived process that answers the train
and evaluate messages of the SuperNode's ClientApp.

Flower 1.42's SuperNode starts a fresh ``flwr-clientapp`` process for every message.
Importing the training code (torch, transformers, PEFT, Opacus) and building the
model in each of them costs seconds to tens of seconds of CPU a round per host,
outside training. The agent therefore keeps this worker running next to the
SuperNode (``supernode.worker``, on by default): it imports ``client.app`` once, keeps
the model built (``client.host.adapter_model``), and listens on a Unix socket in the
data dir (``trainer.sock``, mode 0600, so only the agent's user can reach it). The
ClientApp (``client.clientapp``) hands each train/evaluate message and its
``Context`` to the worker and returns the worker's reply and node state; with no
worker listening it runs the same code in its own process. Flower still carries
every message between the SuperLink and the SuperNode: the socket never leaves the
host and carries nothing the ClientApp process would not hold itself.

Protocol: one request per connection, answered in order (one round at a time, as
the SuperNode sends them): ``op`` (1 byte, ``T`` train or ``E`` evaluate), then the
message and the context as Flower protobufs, each behind an 8-byte big-endian length;
the answer is the reply message and the context after the call, framed the same way.

The socket is reached through ``/proc/self/fd/N/trainer.sock`` with ``N`` an open
descriptor of the data dir, so a long data-dir path never hits the 108-byte limit
of Unix socket addresses.

    python -m client.worker --data-dir DIR
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext  # type: ignore[attr-defined]
from flwr.proto.message_pb2 import Message as ProtoMessage  # type: ignore[attr-defined]

__all__ = ["SOCKET", "WorkerUnavailable", "call", "serve"]

log = logging.getLogger(__name__)

SOCKET = "trainer.sock"
OPS = {"train": b"T", "evaluate": b"E"}
_LEN = struct.Struct("!Q")


class WorkerUnavailable(OSError):
    """No worker listens on this data dir (the caller runs the code itself)."""


@contextlib.contextmanager
def _address(data_dir: Path) -> Iterator[str]:
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET}"
    finally:
        os.close(fd)


def _send(sock: socket.socket, *parts: bytes) -> None:
    sock.sendall(b"".join(_LEN.pack(len(p)) + p for p in parts))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("training worker closed the connection mid-answer")
        buf += chunk
    return bytes(buf)


def _recv_part(sock: socket.socket) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    return _recv_exact(sock, n)


def _encode(msg: Message, context: Context) -> tuple[bytes, bytes]:
    return (
        message_to_proto(msg).SerializeToString(),
        context_to_proto(context).SerializeToString(),
    )


def _decode(msg: bytes, context: bytes) -> tuple[Message, Context]:
    pm, pc = ProtoMessage(), ProtoContext()
    pm.ParseFromString(msg)
    pc.ParseFromString(context)
    return message_from_proto(pm), context_from_proto(pc)


def call(data_dir: Path, op: str, msg: Message, context: Context) -> Message:
    """Have the worker of ``data_dir`` answer ``msg``; ``context.state`` is updated
    to the worker's. Raises ``WorkerUnavailable`` when no worker listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _address(data_dir) as address:
            try:
                sock.connect(address)
            except (FileNotFoundError, ConnectionRefusedError) as err:
                raise WorkerUnavailable(str(err)) from None
        sock.sendall(OPS[op])
        _send(sock, *_encode(msg, context))
        reply, ctx = _decode(_recv_part(sock), _recv_part(sock))
    finally:
        sock.close()
    context.state = ctx.state
    if reply.has_error():
        return Message(reply.error, reply_to=msg)
    return Message(content=reply.content, reply_to=msg)


def _answer(conn: socket.socket) -> None:
    from client import app

    op = _recv_exact(conn, 1)
    msg, context = _decode(_recv_part(conn), _recv_part(conn))
    handler = {OPS["train"]: app.train, OPS["evaluate"]: app.evaluate}.get(op)
    if handler is None:
        raise ValueError(f"unknown worker op {op!r}")
    t0 = time.perf_counter()
    reply = handler(msg, context)
    took = time.perf_counter() - t0
    _send(conn, *_encode(reply, context))
    log.info(
        "answered %s message %s (%s) in %.2f s",
        msg.metadata.message_type,
        msg.metadata.message_id,
        "error" if reply.has_error() else "reply",
        took,
    )


def serve(data_dir: Path, *, ready: list[socket.socket] | None = None) -> None:
    """Import the training code, listen on the data dir's socket, answer forever
    (until SIGTERM/SIGINT). ``ready`` (tests) receives the listening socket."""
    from client import app  # noqa: F401  (the import this worker exists to hold)

    data_dir = data_dir.resolve()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with _address(data_dir) as address:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)  # a socket left by a killed worker
        old = os.umask(0o177)
        try:
            server.bind(address)
        finally:
            os.umask(old)
    server.listen(4)
    log.info("training worker listening in %s", data_dir)
    if ready is not None:
        ready.append(server)
    while True:
        try:
            conn, _ = server.accept()
        except OSError:  # closed by a test, or by the signal handler
            return
        with conn:
            try:
                _answer(conn)
            except Exception:  # a broken request: this one fails, the worker stays
                log.exception("training worker: request failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.worker")
    parser.add_argument("--data-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.data_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
