"""Keeps the test run on 127.0.0.1: an audit hook refuses any other socket connection."""

from __future__ import annotations

import ipaddress
import socket
import sys


def _is_local(address: object) -> bool:
    if not isinstance(address, tuple) or not address:
        return True  # AF_UNIX paths and the like
    host = str(address[0])
    if host in {"localhost", ""}:
        return True
    try:
        return ipaddress.ip_address(host.split("%", maxsplit=1)[0]).is_loopback
    except ValueError:
        return False  # a host name: resolving it already means leaving the machine


def _refuse_outside_connections(event: str, args: tuple[object, ...]) -> None:
    if event != "socket.connect":
        return
    sock, address = args[0], args[1]
    inet = isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6)
    if inet and not _is_local(address):
        raise ConnectionRefusedError(f"test tried to reach {address}: only 127.0.0.1 is allowed")




def install() -> None:
    sys.addaudithook(_refuse_outside_connections)
