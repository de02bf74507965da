"""Session-wide test settings: no hub access (every model comes from files the tests write), and the shared test
support package (tests/support/rewardkit: tiny reward models) importable as ``rewardkit``."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_SUPPORT = str(Path(__file__).resolve().parent / "support")
if _SUPPORT not in sys.path:
    sys.path.append(_SUPPORT)
