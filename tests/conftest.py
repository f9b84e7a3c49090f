"""Shared test set-up: the offline environment, and a guard against outside connections."""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

import pytest

import llama_adapter_v2  # noqa: F401 - applies offline.env before any heavy import

REPO = Path(__file__).resolve().parents[1]
SHARED_REAL = REPO.parent / "shared" / "data" / "real"


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


sys.addaudithook(_refuse_outside_connections)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def real_data() -> Path:
    """../shared/data/real, or a skip that says why (CI has it; a bare clone may not)."""
    if not SHARED_REAL.is_dir():
        pytest.skip(f"real-data kit not found at {SHARED_REAL} (it lives in ../shared beside the clone)")
    return SHARED_REAL
