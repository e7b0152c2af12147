"""Which network interfaces a node is reachable on, and which to advertise on.

mDNS is sent on the LAN interfaces only: loopback reaches no other machine, and container
and VM bridges (docker0, br-*, veth*, virbr*) would advertise addresses peers cannot reach.
`--mdns-interface` names the ones to use instead, loopback included, when that is wrong.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import ifaddr  # zeroconf's own dependency for listing interfaces

from node.errors import RinginferError

VIRTUAL_PREFIXES = ("lo", "docker", "br-", "veth", "virbr", "vmnet", "vboxnet", "cni", "flannel",
                    "cali", "tun", "tap", "utun", "awdl", "llw", "zt", "tailscale")  # fmt: skip


@dataclass(frozen=True)
class Interface:
    name: str
    address: str  # IPv4
    prefix: int

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(f"{self.address}/{self.prefix}", strict=False)

    @property
    def virtual(self) -> bool:
        ip = ipaddress.ip_address(self.address)
        return ip.is_loopback or ip.is_link_local or self.name.startswith(VIRTUAL_PREFIXES)


def all_interfaces() -> list[Interface]:
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):  # IPv4; IPv6 addresses come as tuples
                found.append(Interface(adapter.nice_name, ip.ip, ip.network_prefix))
    return found


def lan_interfaces(asked: list[str] | None = None) -> list[Interface]:
    """The interfaces to advertise on: those named in `asked` (names or addresses), or
    every IPv4 interface that is not loopback, link-local, or a container/VM bridge."""
    interfaces = all_interfaces()
    if not asked:
        return [i for i in interfaces if not i.virtual]
    chosen = [i for i in interfaces if i.name in asked or i.address in asked]
    missing = set(asked) - {i.name for i in chosen} - {i.address for i in chosen}
    if missing:
        have = ", ".join(f"{i.name} {i.address}" for i in interfaces)
        raise RinginferError(
            f"no IPv4 interface {', '.join(sorted(missing))} on this machine (have: {have})"
        )
    return chosen


def primary_address() -> str:
    """The address peers on the LAN most likely reach us at (no packet is sent): the one
    the default route leaves from, else the first LAN interface's, else loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            return s.getsockname()[0]
        except OSError:
            pass
    lan = lan_interfaces()
    return lan[0].address if lan else "127.0.0.1"


def best_address(addresses: list[str], interfaces: list[Interface]) -> str | None:
    """Of a peer's advertised addresses, one on a network we share, else the first."""
    for a in addresses:
        if any(ipaddress.ip_address(a) in i.network for i in interfaces):
            return a
    return addresses[0] if addresses else None


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
