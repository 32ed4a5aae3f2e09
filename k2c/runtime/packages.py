"""Importing a generated package from its folder, from any working directory."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def import_package(folder: str | Path, name: str | None = None) -> ModuleType:
    """Import the generated package in `folder` (e.g. `generated/k2_tiny`) as `name` (default: the folder's name).

    Several builds of one spec can live side by side under different names.
    """
    folder = Path(folder).resolve()
    name = name or folder.name
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None or not (folder / "__init__.py").is_file():
        raise ImportError(f"{folder} is not a generated k2c package (no __init__.py)")
    module = importlib.util.module_from_spec(spec)
    # an earlier import under this name (another build, or this one before a rebuild) must not lend its submodules
    for stale in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        del sys.modules[stale]
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
