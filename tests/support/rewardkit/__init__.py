"""Tiny random reward models of the real architectures, written in the real file formats into a temporary
``models/reward_models/`` folder, for tests that score through the production loaders."""

import socket


def _refuse(*args, **kwargs):
    raise AssertionError("a reward backend tried to open a network connection")


def block_network(monkeypatch) -> None:
    """Make every outgoing connection fail loudly (weights must come from local files only)."""
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
