"""A LAN of network namespaces joined by a bridge: real hosts for mDNS, made by the tests.

Needs root and iproute2. Every name carries this process's id, and `close()` deletes the
namespaces (which deletes their veth pairs and the bridge), so runs never collide or leak.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def require_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("real mDNS between hosts needs network namespaces, which need root")
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need iproute2's `ip`")


class Lan:
    """`hosts` namespaces with eth0 at 10.<x>.<y>.<i>/24 on one bridge, multicast routed."""

    def __init__(self, hosts: int) -> None:
        tag = f"ri{os.getpid() % 100000}"
        self.bridge_ns = f"{tag}-lan"
        self.hosts = [f"{tag}-h{i + 1}" for i in range(hosts)]
        pid = os.getpid()
        self.subnet = f"10.{100 + pid % 100}.{(pid // 100) % 250}"
        self.made: list[str] = []
        try:
            self._make()
        except BaseException:
            self.close()
            raise

    def _make(self) -> None:
        _ip("netns", "add", self.bridge_ns)
        self.made.append(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, ns in enumerate(self.hosts):
            _ip("netns", "add", ns)
            self.made.append(ns)
            port = f"v{i + 1}"
            _ip("-n", self.bridge_ns, "link", "add", port, "type", "veth", "peer", "name",
                "eth0", "netns", ns)  # fmt: skip
            _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def cable(self, i: int, up: bool) -> None:
        """Pull (or plug back) host i's cable: its port on the bridge goes down (or up)."""
        _ip("-n", self.bridge_ns, "link", "set", f"v{i + 1}", "up" if up else "down")

    def shape(self, i: int, rate: str) -> None:
        """Cap host i's network card at `rate` (tc's units: 1gbit, 100mbit) both ways, as a
        real LAN's link: a token bucket on its eth0 and on its port of the bridge."""
        for ns, dev in ((self.hosts[i], "eth0"), (self.bridge_ns, f"v{i + 1}")):
            cmd = ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
                   "tbf", "rate", rate, "burst", "256kb", "latency", "50ms"]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[4:])}: {proc.stderr.strip()}")

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def close(self) -> None:
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.made = []


def module_lan(hosts: int):  # noqa: ANN201 - a pytest fixture
    """A test module's `lan` fixture: `hosts` namespaces, made once and removed after."""

    @pytest.fixture(scope="module")
    def lan():  # noqa: ANN202
        require_netns()
        made = Lan(hosts)
        yield made
        made.close()

    return lan
