"""Where training methods come from, the way Python plugins load: mimco's own modules, the entry
points of installed packages (group ``mimco.plugins``), and files named with ``--plugin FILE``.

A plugin is a module that registers what it brings when imported: a method and its config
sections (:func:`mimco.methods.register_method`). docs/architecture.md shows both ways of loading
one, so that every process of a run (torchrun's included) has the method.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType

from mimco.errors import MimcoError

#: mimco's own modules that register methods (imported by name: they sit above the config layer)
BUILTIN = ("mimco.methods", "mimco.eval.finetune", "mimco.eval.segfinetune", "mimco.pipeline")
_loaded = False


def load_plugins() -> None:
    """Import mimco's own methods and every installed plugin, once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN:
        importlib.import_module(name)
    for ep in importlib.metadata.entry_points(group="mimco.plugins"):
        try:
            ep.load()
        except Exception as e:  # a broken plugin names itself instead of a traceback from inside importlib
            raise MimcoError(f"the installed plugin {ep.name} ({ep.value}) failed to load: {type(e).__name__}: {e}; "
                             "fix or uninstall it") from e


def load_file(path: str | Path) -> ModuleType:
    """Import the Python file at ``path`` as a plugin (``--plugin FILE``): what it registers is then
    known to the run. Loading the same file twice returns the module already loaded."""
    p = Path(path).expanduser()
    if not p.is_file() or p.suffix != ".py":
        raise MimcoError(f"plugin file not found: {p} (--plugin takes a Python file that registers a method, e.g. "
                         "examples/simsiam.py)")
    name = f"mimco_plugin_{p.stem}"
    existing = sys.modules.get(name)
    if existing is not None and Path(getattr(existing, "__file__", "")).resolve() == p.resolve():
        return existing
    load_plugins()
    spec = importlib.util.spec_from_file_location(name, p)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except MimcoError:
        raise
    except Exception as e:
        del sys.modules[name]
        where = traceback.extract_tb(e.__traceback__)[-1]
        raise MimcoError(f"the plugin {p} failed to load: {type(e).__name__}: {e} (at {where.filename}:{where.lineno})"
                         ) from e
    return module
