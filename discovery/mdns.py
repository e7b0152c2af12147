"""mDNS: every daemon advertises `_ringinfer._tcp.local.` and browses for the others.

mDNS only introduces nodes, and proves nothing (anyone may advertise): once found, a node is
sent a HELLO over ZeroMQ on probation, and from then on the ring connection's heartbeats decide
who is alive (mDNS TTLs are minutes long). A clean
exit unregisters the service, which browsers hear at once as a goodbye.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from discovery.interfaces import Interface, best_address

SERVICE = "_ringinfer._tcp.local."
PROBE_SERVICE = "_ringinfer-probe._tcp.local."  # `doctor`'s multicast probe, unseen by daemons
RESOLVE_MS = 3000

log = logging.getLogger("ringinfer")


@dataclass(frozen=True)
class Advert:
    """What a node says about itself in its TXT record (every value a short string)."""

    id: str
    name: str
    version: str  # ringinfer's
    protocol: int  # the wire protocol's
    port: int
    cluster: str
    device: str
    memory_total: int
    memory_available: int
    flops: float
    bandwidth: float
    models: tuple[str, ...]
    # 'curve' with a cluster secret, '' without: nothing derived from the secret, which
    # would let anyone who hears it test guessed secrets offline (node/cluster/secret.py)
    key: str = ""
    address: str = ""  # where it is reached: from the record's addresses, not the TXT
    instance: str = ""  # the mDNS service instance name

    def txt(self) -> dict[str, str]:
        return {
            "id": self.id, "name": self.name[:63], "ver": self.version, "proto": str(self.protocol),
            "port": str(self.port), "cluster": self.cluster[:63], "device": self.device,
            "mem": str(self.memory_total), "avail": str(self.memory_available),
            "flops": f"{self.flops:.4g}", "bw": f"{self.bandwidth:.4g}",
            "models": ",".join(self.models)[:200], "key": self.key[:16],
        }  # fmt: skip

    @classmethod
    def from_txt(cls, txt: dict[str, str], address: str, instance: str = "") -> Advert | None:
        """None for a record that is not a well-formed ringinfer advert."""
        try:
            return cls(
                id=txt["id"][:64], name=txt.get("name", "")[:64], version=txt.get("ver", "?"),
                protocol=int(txt["proto"]), port=int(txt["port"]), cluster=txt["cluster"][:64],
                device=txt.get("device", "?")[:16], memory_total=int(txt.get("mem", 0)),
                memory_available=int(txt.get("avail", 0)), flops=float(txt.get("flops", 0)),
                bandwidth=float(txt.get("bw", 0)),
                models=tuple(m for m in txt.get("models", "").split(",") if m),
                key=txt.get("key", "")[:16], address=address, instance=instance,
            )  # fmt: skip
        except (KeyError, ValueError):
            return None

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"


def _label(advert: Advert) -> str:
    """'<name>-<id prefix>', safe as a DNS label."""
    name = re.sub(r"[^A-Za-z0-9-]", "-", advert.name)[:40].strip("-") or "node"
    return f"{name}-{advert.id[:8]}"


class Discovery:
    """Advertise one node and report every advert seen (`on_found`) or gone (`on_gone`).

    With `advert` None it only browses (`ringinfer doctor`).
    """

    def __init__(
        self,
        advert: Advert | None,
        interfaces: list[Interface],
        on_found: Callable[[Advert], None],
        on_gone: Callable[[str], None] = lambda name: None,
        service: str = SERVICE,
        browse: tuple[str, ...] = (SERVICE,),
    ) -> None:
        self.advert, self.interfaces = advert, interfaces
        self.service, self.browse = service, browse
        self.on_found, self.on_gone = on_found, on_gone
        self.azc: AsyncZeroconf | None = None
        self.browser: AsyncServiceBrowser | None = None
        self.info: AsyncServiceInfo | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        addresses = [i.address for i in self.interfaces]
        self.azc = AsyncZeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
        if self.advert is not None:
            # The host name is per process: two processes with one id (a copied data dir)
            # must not answer for each other's address.
            label = _label(self.advert)
            self.info = AsyncServiceInfo(
                self.service,
                f"{label}.{self.service}",
                addresses=[socket.inet_aton(a) for a in addresses],
                port=self.advert.port,
                properties=self.advert.txt(),
                server=f"{label}-{secrets.token_hex(3)}.local.",
            )
            await self.azc.async_register_service(self.info, allow_name_change=True)
        if self.browse:
            self.browser = AsyncServiceBrowser(
                self.azc.zeroconf, list(self.browse), handlers=[self._changed]
            )

    def _changed(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            self.on_gone(name)
            return
        task = asyncio.ensure_future(self._resolve(zeroconf, service_type, name))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        if self.info is not None and name == self.info.name:
            return  # ourselves
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zeroconf, RESOLVE_MS):
            log.debug("mDNS: %s did not resolve", name)
            return
        txt = {
            k.decode(errors="replace"): (v or b"").decode(errors="replace")
            for k, v in info.properties.items()
        }
        address = best_address(info.parsed_addresses(IPVersion.V4Only), self.interfaces)
        advert = Advert.from_txt(txt, address or "", name)
        if advert is None or not advert.address:
            log.debug("mDNS: ignoring malformed advert %s", name)
            return
        self.on_found(advert)

    async def close(self) -> None:
        """Unregister (peers hear a goodbye now) and stop browsing."""
        for task in list(self.tasks):
            task.cancel()
        if self.browser is not None:
            await self.browser.async_cancel()
        if self.azc is not None:
            if self.info is not None:
                await self.azc.async_unregister_service(self.info)
            await self.azc.async_close()
