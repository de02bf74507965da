"""The headless ComfyUI client now lives in :mod:`flowgrpo.client`; re-exported here for the tests."""

from flowgrpo.client import ComfyClient, ComfyError  # noqa: F401

__all__ = ["ComfyClient", "ComfyError"]
