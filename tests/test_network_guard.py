"""The network guard that keeps the test run on 127.0.0.1 (called directly: nothing is sent)."""

from __future__ import annotations

import socket

import pytest
from network_guard import _refuse_outside_connections


@pytest.mark.parametrize("address", [("192.0.2.1", 80), ("example.org", 443)])
def test_outside_address_is_refused(address: tuple[str, int]) -> None:
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError, match=r"only 127\.0\.0\.1"):
        _refuse_outside_connections("socket.connect", (sock, address))


@pytest.mark.parametrize("address", [("127.0.0.1", 5000), ("localhost", 4200), ("::1", 80)])
def test_loopback_is_allowed(address: tuple[str, int]) -> None:
    with socket.socket() as sock:
        _refuse_outside_connections("socket.connect", (sock, address))
