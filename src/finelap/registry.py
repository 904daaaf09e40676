"""Name -> builder registries (audio encoders, training objectives) and preset lookup.

Behaviour comes from config, never from name strings (DESIGN principle 3): a config says
`audio_encoder: cnn`, the registry maps that name to a builder, and the builder reads its typed config.
A registry lists modules that populate it, imported on first lookup, so `get` works without the caller
having imported `finelap.models` first — and importing `finelap.registry` itself stays free.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from pathlib import Path
from typing import Callable, Generic, Iterable, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """`@REG.register("name")` adds an object; `REG.get("name")` returns it; `REG.names()` lists them.

    modules: imported on the first lookup (a missing one is skipped); packages: every module in
    them is imported on the first lookup, so adding a file to the package is enough to register.
    """

    def __init__(self, name: str, modules: Iterable[str] = (), packages: Iterable[str] = ()) -> None:
        self.name = name
        self._items: dict[str, T] = {}
        self._modules = tuple(modules)  # imported lazily; their decorators fill the registry
        self._packages = tuple(packages)  # every module of these packages is imported lazily too
        self._loaded = False

    def register(self, name: str | None = None, *, override: bool = False) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__", None)
            if not key:
                raise ValueError(f"{self.name} registry: give a name for {obj!r}")
            if key in self._items and not override and self._items[key] is not obj:
                raise ValueError(f"{self.name} {key!r} is already registered ({self._items[key]!r})")
            self._items[key] = obj
            return obj

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self._modules:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as e:  # module not written yet: fine; a broken one is not
                if not (e.name and (module == e.name or module.startswith(e.name + "."))):
                    raise
        for package in self._packages:  # a new file in the package registers itself: no list to edit
            path = getattr(importlib.import_module(package), "__path__", None)
            if path is None:
                raise ValueError(f"{self.name} registry: {package!r} is a module, not a package")
            for info in pkgutil.iter_modules(path, package + "."):
                importlib.import_module(info.name)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown {self.name} {name!r}{hint}; available: {', '.join(self.names()) or '(none)'}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items


AUDIO_ENCODERS: Registry = Registry(
    "audio encoder", ["finelap.models.audio_encoders", "finelap.models.pretrained", "finelap.models.published", "finelap.models.eat"]
)
# training objectives (finelap.losses.objective.Objective instances), one per module of finelap.losses
LOSSES: Registry = Registry("loss", packages=["finelap.losses"])
# preset name -> YAML path, for presets that live outside the searched config folders
PRESETS: Registry[Path] = Registry("preset")


def preset_dirs() -> list[Path]:
    """Folders searched for `<preset>.yaml`: the source checkout's configs/ (editable installs), then
    the copy shipped as package data (finelap/configs)."""
    here = Path(__file__).resolve().parent
    return [d for d in (here.parents[1] / "configs", here / "configs") if d.is_dir()]


def preset_names() -> list[str]:
    found = {p.stem for d in preset_dirs() for p in d.glob("*.yaml")}
    return sorted(found | set(PRESETS.names()))


def preset_path(name: str) -> Path:
    """Path of the YAML file for preset `name` (e.g. "finelap" -> configs/finelap.yaml)."""
    if name in PRESETS:
        return Path(PRESETS.get(name))
    for d in preset_dirs():
        if (d / f"{name}.yaml").is_file():
            return d / f"{name}.yaml"
    close = difflib.get_close_matches(name, preset_names(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown preset {name!r}{hint}; available: {', '.join(preset_names()) or '(none)'}")
