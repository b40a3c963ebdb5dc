"""``fedstream-server``: certificates, the launcher, status.

* ``certs --out DIR --host NAME ... [--server-name NAME ...]``: CA, SuperLink
  certificate, one SuperNode key pair per data host.
* ``run --config server.toml [--insecure] [--keep-serving]``: SuperLink + the fedstream
  run, resumable; with ``--keep-serving`` the SuperLink stays up for other runs.
* ``status --config server.toml [--json]``: rounds, connected hosts, last aggregate,
  epsilon per host.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from common.errors import FedstreamError
from common.server_config import ServerConfig

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedstream-server", description="fedstream server launcher"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("certs", help="create a CA, SuperLink cert and host keys")
    c.add_argument("--out", required=True, help="folder to write into")
    c.add_argument(
        "--host",
        action="append",
        default=[],
        help="data host name (repeat); gets hosts/NAME/auth.{key,pub}",
    )
    c.add_argument(
        "--server-name",
        action="append",
        default=[],
        help="DNS name or IP the hosts use to reach the SuperLink (repeat); "
        "localhost and 127.0.0.1 are always included",
    )
    c.add_argument("--days", type=int, default=365, help="validity in days")
    c.add_argument("--force", action="store_true", help="new CA and host keys")
    r = sub.add_parser("run", help="start the SuperLink and the run (resumes)")
    r.add_argument("--config", required=True)
    r.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS, no node auth: local development only",
    )
    r.add_argument(
        "--keep-serving",
        action="store_true",
        help="keep the SuperLink up after the run completes, for other runs "
        "(flwr run .), until SIGTERM",
    )
    s = sub.add_parser("status", help="rounds, hosts, last aggregate, epsilon")
    s.add_argument("--config", required=True)
    s.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        # Imported here: the launcher pulls in torch/peft (run folder), which a
        # config error or `certs` should not wait for.
        if args.cmd == "certs":
            from server.certs import make_certs

            names = args.server_name or ["localhost"]
            made = make_certs(
                args.out,
                server_names=names,
                hosts=args.host,
                days=args.days,
                force=args.force,
            )
            print(made.summary())
            return 0
        cfg = ServerConfig.from_toml(args.config)
        from server.launcher import launch, status

        if args.cmd == "run":
            return launch(cfg, insecure=args.insecure, keep_serving=args.keep_serving)
        info = status(cfg)
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            for key, value in info.items():
                print(f"{key:>16}: {value}")
        return 0
    except (FedstreamError, OSError) as err:
        print(f"fedstream-server: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
