"""A process that advertises COUNT fake ringinfer nodes of cluster 'default' over mDNS.

`python -m tests.spoofer ADDRESS COUNT`: every advert says what an advert of a node with a
secret says (our protocol, cluster 'default', key 'curve') and names a port of ADDRESS:
one in ten a port that accepts connections and never speaks (a handshake that never
completes), the others closed ports. Prints 'ready' once all are announced, then waits to
be killed.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import sys

from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from discovery.mdns import SERVICE, Advert
from node.cluster.secret import TAG
from protocol.wire import VERSION

BASE_PORT = 30000


def silent_ports(address: str, count: int) -> list[socket.socket]:
    """Listening sockets that accept and never answer."""
    socks = []
    for i in range(count):
        s = socket.socket()
        s.bind((address, BASE_PORT + i))
        s.listen(64)
        socks.append(s)
    return socks


def advert(i: int) -> Advert:
    return Advert(
        id=secrets.token_hex(8), name=f"spoof{i}", version="0", protocol=VERSION,
        port=BASE_PORT + i, cluster="default", device="cpu", memory_total=1 << 40,
        memory_available=1 << 40, flops=1e15, bandwidth=1e12, models=("m",), key=TAG,
    )  # fmt: skip


async def main(address: str, count: int) -> None:
    held = silent_ports(address, count // 10)
    azc = AsyncZeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
    infos = [
        ServiceInfo(SERVICE, f"spoof{i}.{SERVICE}", addresses=[socket.inet_aton(address)],
                    port=BASE_PORT + i, properties=advert(i).txt(), server=f"spoof{i}.local.")
        for i in range(count)
    ]  # fmt: skip
    for start in range(0, count, 50):  # no probing: announced at once, as a spoofer would
        batch = infos[start : start + 50]
        await asyncio.gather(*[
            await azc.async_register_service(info, cooperating_responders=True)
            for info in batch
        ])  # fmt: skip
    print("ready", flush=True)
    await asyncio.sleep(3600)
    del held


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
