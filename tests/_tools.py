"""Load a tools/ script as a module: tools are scripts, not a package, so tests import them by path."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str):
    """tools/<name>.py as a fresh module (not registered in sys.modules). tools/ goes on sys.path
    first, since some tools import their siblings (e.g. upcycle's write_checkpoint)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
