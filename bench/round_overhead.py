"""Round overhead of a real deployment on loopback.

Starts ``fedstream-server run`` (flower-superlink with TLS and SuperNode
authentication) and N ``fedstream-agent run`` hosts with their own keys, pushes the
built-in streams with ``fedstream-agent push``, runs R rounds and prints JSON: per
round, the server's wall time for the round (from one saved global adapter to the
next, as ``metrics.jsonl`` records it) divided by the slowest host's local training
time (``train-seconds``, measured inside the ClientApp). Target <= 1.10.

    python bench/round_overhead.py --hosts 4 --rounds 3 --model tiny-llama [--secure]

``--no-worker`` runs the hosts without their training worker (``supernode.worker =
false``: every round's ClientApp process imports the training code and builds the
model, as before the worker existed). ``--stock`` runs with Flower's own polling
(the SuperNode asks for messages every 3 s, the server for replies every 3 s), a
fresh ``flwr-clientapp`` process started per message (``supernode.warm_clientapp =
false``) and the held-out evaluation on the round's path (``federation.overlap_eval
= false``), for a side-by-side comparison with the defaults (0.5 s, 0.2 s, forked
ClientApp processes, evaluation while the next round trains; ``wall_s`` is then the
time from one aggregate to the next). ``--secure`` runs the same with SecAgg+
(``aggregation.secure = true``): compare its round wall times with a plain run's for
the secure/plain round-time ratio; ``--secure-vs-plain`` runs both, one after the
other, and prints the ratios (round time, round by round, and bytes per host; plain
hosts send fp16 deltas by default, secure ones one uint32 per number).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.agent_util import free_port  # noqa: E402
from tests.integration.deploy_util import (  # noqa: E402
    ENV,
    metrics,
    push_stream,
    script,
    start,
    write_agent,
)


def run(
    hosts: int,
    rounds: int,
    model: str,
    steps: int,
    records: int,
    secure: bool = False,
    worker: bool = True,
    keep: bool = False,
    stock: bool = False,
) -> dict:
    where = (
        contextlib.nullcontext(tempfile.mkdtemp(prefix="round-overhead-"))
        if keep
        else tempfile.TemporaryDirectory(prefix="round-overhead-")
    )
    with where as tmp:
        if keep:
            print(f"logs and run folder kept in {tmp}", file=sys.stderr)
        root = Path(tmp)
        names = [f"h{i}" for i in range(hosts)]
        certs = root / "certs"
        subprocess.run(
            [script("fedstream-server"), "certs", "--out", str(certs)]
            + [a for n in names for a in ("--host", n)],
            env=ENV,
            check=True,
            capture_output=True,
        )
        superlink = f"127.0.0.1:{free_port()}"
        (root / "server.toml").write_text(
            f'[server]\nlisten = "{superlink}"\n'
            f'[run]\nout = "run"\n[run.model]\nname = "{model}"\n'
            f"[run.training]\nlocal_steps = {steps}\n"
            f"[run.federation]\nrounds = {rounds}\nmin_hosts = {hosts}\n"
            + ("poll_interval = 3.0\noverlap_eval = false\n" if stock else "")
            + f"[run.aggregation]\nsecure = {str(secure).lower()}\n"
        )
        procs = []
        try:
            for i, name in enumerate(names):
                cfg, _, port = write_agent(
                    root,
                    name,
                    superlink=superlink,
                    certs=certs,
                    min_records=1,
                    supernode_extra=f"worker = {str(worker).lower()}\n"
                    + (
                        "poll_interval = 3.0\nwarm_clientapp = false\n" if stock else ""
                    ),
                )
                procs.append(
                    start(
                        [script("fedstream-agent"), "run", "--config", str(cfg)],
                        root / f"{name}.log",
                    )
                )
                push_stream(i, records, port, root)
            t0 = time.perf_counter()
            server = start(
                [
                    script("fedstream-server"),
                    "run",
                    "--config",
                    str(root / "server.toml"),
                ],
                root / "server.log",
            )
            procs.append(server)
            code = server.popen.wait(timeout=3600)
            total = time.perf_counter() - t0
            if code != 0:
                raise SystemExit((root / "server.log").read_text()[-2000:])
            lines = metrics(root / "run")[1:]
        finally:
            for p in procs:
                p.stop()
    per_round = []
    for ln in lines:
        train = [v for v in ln["train_s"].values() if v is not None]  # type: ignore[union-attr]
        slowest = max(train)
        per_round.append(
            {
                "round": ln["round"],
                "hosts": len(ln["hosts"]),  # type: ignore[arg-type]
                "wall_s": ln["wall_s"],
                "slowest_train_s": slowest,
                # the server's own parts: waiting for the replies, held-out eval
                "wait_s": ln.get("wait_s"),
                "eval_s": ln.get("eval_s"),
                "ratio": round(float(ln["wall_s"]) / slowest, 3),  # type: ignore[arg-type]
            }
        )
    return {
        "bench": "round_overhead",
        "model": model,
        "hosts": hosts,
        "rounds": rounds,
        "local_steps": steps,
        "secure": secure,
        "worker": worker,
        "stock": stock,
        "bytes_per_host": lines[-1]["bytes"] if lines else {},
        "per_round": per_round,
        "median_ratio": statistics.median(r["ratio"] for r in per_round),
        "target": 1.10,
        "total_s": round(total, 1),
    }


def compare(runs: dict[str, dict]) -> dict:
    """Secure/plain ratios, round by round: round time and bytes per host."""
    plain, secure = runs["plain"], runs["secure"]
    ratios = [
        round(s["wall_s"] / p["wall_s"], 3)
        for p, s in zip(plain["per_round"], secure["per_round"], strict=True)
    ]
    bytes_ratio = {
        h: round(secure["bytes_per_host"][h] / b, 3)
        for h, b in plain["bytes_per_host"].items()
        if h in secure["bytes_per_host"]
    }
    return {
        "runs": runs,
        "round_time_ratio": ratios,
        # round 1 also builds the model on every host; later rounds are the steady
        # state
        "median_round_time_ratio": statistics.median(ratios[1:] or ratios),
        "round_time_target": 1.5,
        "bytes_ratio": bytes_ratio,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--steps", type=int, default=4, help="local DP-SGD steps")
    p.add_argument("--records", type=int, default=200, help="records per host")
    p.add_argument(
        "--secure", action="store_true", help="SecAgg+ (aggregation.secure = true)"
    )
    p.add_argument(
        "--no-worker", action="store_true", help="hosts without the training worker"
    )
    p.add_argument(
        "--stock",
        action="store_true",
        help="Flower's own polls (SuperNode 3 s, server 3 s), a fresh "
        "flwr-clientapp process per message, and the held-out evaluation on the "
        "round's path, as before they were changed",
    )
    p.add_argument(
        "--secure-vs-plain",
        action="store_true",
        help="run the federation plain, then with SecAgg+, and print both and "
        "the secure/plain ratios of round time and bytes per host",
    )
    p.add_argument("--keep", action="store_true", help="keep the logs and run folder")
    a = p.parse_args()
    if a.secure_vs_plain:
        runs = {
            name: run(
                a.hosts,
                a.rounds,
                a.model,
                a.steps,
                a.records,
                secure,
                worker=not a.no_worker,
                keep=a.keep,
                stock=a.stock,
            )
            for name, secure in (("plain", False), ("secure", True))
        }
        print(json.dumps({"bench": "secagg_deploy", **compare(runs)}, indent=1))
        return
    result = run(
        a.hosts,
        a.rounds,
        a.model,
        a.steps,
        a.records,
        a.secure,
        worker=not a.no_worker,
        keep=a.keep,
        stock=a.stock,
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
