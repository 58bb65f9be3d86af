"""The one patching room of the Megatron adapter: named attribute replacements, applied and undone as a set.

Three things in this adapter replace bindings of Megatron's modules, because Megatron offers no hook
there: CPU mode (:mod:`~dualpipe_plugin.megatron.cpu_mode`), the placement hooks that number a V's layers
(:mod:`~dualpipe_plugin.megatron.placement`) and :func:`~dualpipe_plugin.megatron.lm_patch.patch_megatron_lm`.
All three describe each replacement as a :class:`Patch` (owner, attribute, replacement, why) and apply
it through a :class:`PatchSet`, which records what each attribute held before and puts it back on
:meth:`PatchSet.undo`. :func:`everywhere` finds the modules that imported a function by name (``from x
import f`` makes a second binding that patching ``x.f`` alone would miss).

Patch sets that stand for process-wide state (CPU mode, the placement hooks) are reference-counted or
install-once objects owned by their module; :func:`patch_megatron_lm` returns its set as the undo handle.
"""

from __future__ import annotations

import sys
import threading
import types
from typing import Any, Callable, Iterable, NamedTuple

__all__ = ["Patch", "PatchSet", "everywhere"]

_MISSING = object()


class Patch(NamedTuple):
    """One attribute to replace: ``setattr(owner, attr, replacement)`` while applied."""

    owner: Any
    attr: str
    replacement: Any
    why: str = ""

    @property
    def target(self) -> str:
        """``module.Class.attr`` or ``module.attr``: where the replacement goes."""
        name = getattr(self.owner, "__qualname__", None) or getattr(self.owner, "__name__", "?")
        module = getattr(self.owner, "__module__", None)
        if isinstance(self.owner, types.ModuleType) or module is None:
            return f"{name}.{self.attr}"
        return f"{module}.{name}.{self.attr}"


def _own_attribute(owner: Any, attr: str) -> Any:
    """The attribute as stored on ``owner`` itself (not inherited), or ``_MISSING``."""
    if isinstance(owner, (type, types.ModuleType)):
        return owner.__dict__.get(attr, _MISSING)
    return getattr(owner, attr, _MISSING)


def everywhere(
    home: types.ModuleType, attr: str, make: Callable[[Any], Any], why: str = "",
    *, prefixes: tuple[str, ...] | None = ("megatron.",),
) -> list[Patch]:
    """Patches replacing ``home.attr`` with ``make(original)`` in ``home`` and in every loaded module that
    holds the same object under the same name (``from home import attr``) and whose name starts with one
    of ``prefixes`` (``None``: any loaded module, e.g. a training script's ``__main__`` or Megatron-LM's
    ``gpt_builders``; the identity check keeps it to real by-name imports)."""
    original = getattr(home, attr)
    replacement = make(original)
    holders = [home] + [
        module for name, module in list(sys.modules.items())
        if module is not None and module is not home and (prefixes is None or name.startswith(prefixes))
        and getattr(module, attr, None) is original
    ]
    return [Patch(holder, attr, replacement, why) for holder in holders]


class PatchSet:
    """Patches applied together and undone together, in reverse order (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._applied: list[tuple[Patch, Any]] = []  # (patch, what the attribute held before)

    @property
    def lock(self) -> threading.RLock:
        """Held while applying or undoing; owners take it to make check-then-apply atomic."""
        return self._lock

    @property
    def applied(self) -> tuple[Patch, ...]:
        with self._lock:
            return tuple(patch for patch, _ in self._applied)

    def __bool__(self) -> bool:
        return bool(self._applied)

    def apply(self, patches: Iterable[Patch]) -> None:
        """Apply ``patches`` in order; if one fails, every patch of this set is undone and it re-raises."""
        with self._lock:
            try:
                for patch in patches:
                    self._applied.append((patch, _own_attribute(patch.owner, patch.attr)))
                    setattr(patch.owner, patch.attr, patch.replacement)
            except BaseException:
                self.undo()
                raise

    def undo(self) -> None:
        """Restore every patched attribute to what it held before (deleting ones that did not exist)."""
        with self._lock:
            for patch, original in reversed(self._applied):
                if original is _MISSING:
                    if patch.attr in getattr(patch.owner, "__dict__", {}):
                        delattr(patch.owner, patch.attr)
                else:
                    setattr(patch.owner, patch.attr, original)
            self._applied.clear()
