"""Classes registered by name (opt-out methods, model families): one decorator to register,
one lookup with a clear error, the built-in modules imported on first use."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Sequence

from linernotes.errors import LinernotesError


class Registry:
    """Classes by their `name` attribute; `what` names them in errors ("unlearning method",
    "Methods"), `modules` are imported before any lookup (they register the built-in ones)."""

    def __init__(self, what: str, plural: str, modules: Sequence[str]):
        self.what, self.plural, self.modules = what, plural, tuple(modules)
        self._classes: dict[str, type] = {}

    def register(self, cls: type) -> type:
        """Class decorator: make `cls` available by its `name`."""
        if not getattr(cls, "name", ""):
            raise ValueError(f"{cls.__name__} needs a name to be registered.")
        self._classes[cls.name] = cls
        return cls

    def all(self) -> dict[str, type]:
        """Every registered class by name (importing the built-in ones)."""
        for module in self.modules:
            importlib.import_module(module)
        return dict(self._classes)

    def get(self, name: str) -> type:
        """The class registered as `name`, or a clear error with the closest names."""
        known = self.all()
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=2)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise LinernotesError(f"Unknown {self.what} {name!r}.{hint} {self.plural}: "
                                  f"{', '.join(sorted(known))}.")
        return known[name]
