"""A network namespace joined to this one by a veth pair, for cutting one host off.

``Namespace`` creates the namespace and the pair (``10.213.N.1`` on this side,
``10.213.N.2`` inside), ``wrap`` runs a command inside it, ``cut``/``restore`` take
the link down and up (packets are dropped, connections hang as on a real network
cut, no process is touched), and ``close`` deletes both. Needs root or
CAP_NET_ADMIN and iproute2 (see ``available``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

__all__ = ["Namespace", "available"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def available() -> bool:
    """Whether namespaces can be made here (a throwaway one is tried)."""
    if shutil.which("ip") is None:
        return False
    name = f"fsprobe{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except (subprocess.CalledProcessError, OSError):
        return False
    _ip("netns", "del", name)
    return True


class Namespace:
    def __init__(self, index: int) -> None:
        tag = f"{os.getpid() % 10000}x{index}"
        self.name = f"fs{tag}"
        self.outer = f"fso{tag}"  # veth ends: interface names are <= 15 chars
        self.inner = f"fsi{tag}"
        subnet = 16 + (os.getpid() + index) % 200
        self.host_ip = f"10.213.{subnet}.1"
        self.ns_ip = f"10.213.{subnet}.2"
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
            _ip("link", "set", self.inner, "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/24", "dev", self.outer)
            _ip("link", "set", self.outer, "up")
            self._inside("addr", "add", f"{self.ns_ip}/24", "dev", self.inner)
            self._inside("link", "set", self.inner, "up")
            self._inside("link", "set", "lo", "up")
        except Exception:
            self.close()
            raise

    def _inside(self, *args: str) -> None:
        _ip("netns", "exec", self.name, "ip", *args)

    def wrap(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def cut(self) -> None:
        _ip("link", "set", self.outer, "down")

    def restore(self) -> None:
        _ip("link", "set", self.outer, "up")

    def close(self) -> None:
        for args in (("link", "del", self.outer), ("netns", "del", self.name)):
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                _ip(*args)
