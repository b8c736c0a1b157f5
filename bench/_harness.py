"""Where the peer harness (`common.py` of ../shared/peer-bench) comes from.

Preferred: the live copy in $PEER_BENCH_DIR (default: the sibling ../shared/peer-bench of this repository), so
Conveyor is measured with exactly the code the peers were measured with. Fallback: the vendored copy
`bench/peer_common.py` (same code, for machines without shared/).
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
DEFAULT_PEER_DIR = os.path.normpath(os.path.join(REPO_DIR, "..", "shared", "peer-bench"))


def peer_dir() -> str:
    return os.environ.get("PEER_BENCH_DIR") or DEFAULT_PEER_DIR


def load_common() -> ModuleType:
    """The harness module: `common` from the peer folder if present, else `peer_common` (vendored)."""
    folder = peer_dir()
    if os.path.isfile(os.path.join(folder, "common.py")):
        if folder not in sys.path:
            sys.path.insert(0, folder)
        return importlib.import_module("common")
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)
    return importlib.import_module("peer_common")
