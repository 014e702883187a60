"""Which network devices the KV transport may listen on.

UCX (under NIXL and ucxx) opens a TCP listener on every device it may use, whatever address the
worker's HTTP API binds to; `UCX_NET_DEVICES` is what restricts it. By default a worker restricts it
to the device that holds the address it advertises (loopback for `agentkv up`), so the transport is
reachable exactly where the worker says it is, and nowhere else. docs/transfer.md#network.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct
from pathlib import Path

log = logging.getLogger("agentkv.transfer")

ALL = "all"  # --transfer-devices all: UCX's default, every device
_SIOCGIFADDR = 0x8915


def net_devices_for(host: str) -> str:
    """The device whose address is `host` ("lo" for loopback); "" where that cannot be told (a
    wildcard such as 0.0.0.0, a name that does not resolve, an address no device holds)."""
    try:
        address = ipaddress.ip_address(socket.getaddrinfo(host, None)[0][4][0].split("%")[0])
    except (OSError, ValueError, IndexError):
        return ""
    if address.is_unspecified:
        return ""
    for name, addresses in _device_addresses().items():
        if address in addresses or (address.is_loopback and any(a.is_loopback for a in addresses)):
            return name
    return ""


def bind_transport_to(devices: str, *, explicit: bool = False) -> None:
    """Restrict UCX to `devices` (a UCX_NET_DEVICES value; "" or "all": leave UCX's default). Call it
    before the transport is created: UCX reads its environment once. An operator's own
    UCX_NET_DEVICES wins over a derived default, not over an explicit `--transfer-devices`."""
    if not devices or devices == ALL:
        if not os.environ.get("UCX_NET_DEVICES"):
            log.warning("the KV transport listens on every network device (no UCX_NET_DEVICES, no --transfer-devices)")
        return
    if explicit:
        os.environ["UCX_NET_DEVICES"] = devices
    else:
        os.environ.setdefault("UCX_NET_DEVICES", devices)


def listen_device() -> str | None:
    """The network interface a listener should advertise: the first one in UCX_NET_DEVICES that is an
    interface of this host (RDMA entries such as mlx5_0:1 are not); None: no restriction, any."""
    names = {name for _, name in socket.if_nameindex()}
    wanted = [d for d in os.environ.get("UCX_NET_DEVICES", "").split(",") if d and d != ALL]
    return next((d for d in wanted if d in names), None)


def _device_addresses() -> dict[str, set[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    found: dict[str, set] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                found.setdefault(name, set()).add(ipaddress.ip_address(raw[20:24]))
            except OSError:  # no IPv4 address
                found.setdefault(name, set())
    inet6 = Path("/proc/net/if_inet6")
    for line in inet6.read_text().splitlines() if inet6.exists() else []:
        fields = line.split()
        found.setdefault(fields[-1], set()).add(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
    return found
