"""recipes/*.py are scripts, not package modules: tests load them by path, once per name."""
import importlib.util
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load_recipe(stem: str, module_name: str | None = None):
    """recipes/<stem>.py as the module `module_name` (default: stem); the one already loaded under that name, if
    another test file loaded it (its dataclasses must stay the ones the recipe's functions check against)."""
    name = module_name or stem
    if hasattr(sys.modules.get(name), "run"):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module
