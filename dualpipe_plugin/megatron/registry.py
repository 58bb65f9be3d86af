"""The schedule registry Megatron-Core lacks: ``register_schedule(name, fn)`` and ``get_forward_backward_func``.

Megatron-Core's ``get_forward_backward_func(pp_size, vp_size)`` (0.16) /
``get_forward_backward_func(pp_size, vp_size, schedule_pg_collection)`` (0.19) is an if/else over its
schedules. Ours answers the same call and adds named schedules::

    from dualpipe_plugin.megatron import get_forward_backward_func
    forward_backward = get_forward_backward_func()          # reads config.pipeline_schedule per call
    forward_backward = get_forward_backward_func(schedule="dualpipev")   # or name it
    losses = forward_backward(forward_step_func=..., data_iterator=..., model=..., num_microbatches=...,
                              seq_length=..., micro_batch_size=..., forward_only=False)

Names: ``dualpipe``, ``dualpipev``, ``1f1b``, ``zb1p`` (this package's schedules, run by
:class:`~dualpipe_plugin.megatron.schedule_fn.PipelineScheduleFunction`) and ``megatron`` (Megatron's own
choice, exactly as its ``get_forward_backward_func(pp_size, vp_size)`` makes it). A registered function
takes Megatron's keyword signature and returns what Megatron's schedules return, so a training loop calls
it unchanged.

Why a process-wide table. The house rule is "no module-level mutable state"; this is the one deliberate
exception. Megatron-LM's ``train()`` reaches the schedule through a bare ``get_forward_backward_func()``
call with no handle to pass, so the lookup must be process-wide, as Megatron's own if/else is. It is an
explicit object (:class:`ScheduleRegistry`), the module-level functions delegate to one default instance,
and tests or embedders can build their own instance. Importing this module imports neither torch nor
Megatron-Core.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from dualpipe_plugin.megatron.errors import UnknownScheduleError

__all__ = [
    "MEGATRON",
    "ScheduleRegistry",
    "default_registry",
    "get_forward_backward_func",
    "register_schedule",
    "schedule_names",
]

MEGATRON = "megatron"
"""The name that selects Megatron-Core's own schedule (1F1B, interleaved or no pipelining)."""

ForwardBackwardFunc = Callable[..., list]


def _builtin_factory(name: str) -> Callable[[], ForwardBackwardFunc]:
    def build() -> ForwardBackwardFunc:
        from dualpipe_plugin.megatron.schedule_fn import PipelineScheduleFunction

        return PipelineScheduleFunction(name)

    return build


def _megatron_choice(pp_size: int | None, vp_size: int | None, schedule_pg_collection: Any) -> ForwardBackwardFunc:
    from megatron.core.pipeline_parallel import schedules

    if schedule_pg_collection is not None:  # megatron-core >= 0.19 (its train() passes it)
        return schedules.get_forward_backward_func(pp_size, vp_size, schedule_pg_collection=schedule_pg_collection)
    return schedules.get_forward_backward_func(pp_size, vp_size)


class _ConfigDispatch:
    """What ``get_forward_backward_func()`` returns without a name: picks the schedule on every call from
    ``config.pipeline_schedule`` of the first model chunk (unset or ``"megatron"``: Megatron's own)."""

    def __init__(self, registry: "ScheduleRegistry", pp_size: int | None, vp_size: int | None,
                 schedule_pg_collection: Any):
        self._registry, self._pp_size, self._vp_size = registry, pp_size, vp_size
        self._schedule_pg_collection = schedule_pg_collection

    def __call__(self, **kwargs: Any) -> list:
        from megatron.core.utils import get_model_config

        model = kwargs.get("model")
        first = model[0] if isinstance(model, (list, tuple)) else model
        name = getattr(get_model_config(first), "pipeline_schedule", None)
        function = self._registry.get_forward_backward_func(
            self._pp_size, self._vp_size, schedule=name or MEGATRON, schedule_pg_collection=self._schedule_pg_collection
        )
        return function(**kwargs)


class ScheduleRegistry:
    """Schedule name -> forward-backward function with Megatron's keyword signature.

    Built-in entries are created on first lookup (importing torch and Megatron-Core then, not before).
    """

    def __init__(self, *, builtins: bool = True):
        self._lock = threading.Lock()
        self._factories: dict[str, Callable[[], ForwardBackwardFunc]] = {}
        self._functions: dict[str, ForwardBackwardFunc] = {}
        if builtins:
            from dualpipe_plugin.schedules import schedule_names as runtime_schedules

            for name in runtime_schedules():
                self._factories[name] = _builtin_factory(name)

    def register(self, name: str, fn: ForwardBackwardFunc, *, replace: bool = False) -> None:
        """Add ``fn`` under ``name`` (case-insensitive). Re-registering a name needs ``replace=True``."""
        if not callable(fn):
            raise TypeError(f"register_schedule({name!r}, fn): fn must be callable, got {type(fn).__name__}")
        key = self._key(name)
        if key == MEGATRON:
            raise UnknownScheduleError(f"{MEGATRON!r} is reserved for Megatron-Core's own schedule; pick another name")
        with self._lock:
            if not replace and (key in self._functions or key in self._factories):
                raise ValueError(f"schedule {key!r} is already registered; pass replace=True to override it")
            self._factories.pop(key, None)
            self._functions[key] = fn

    def names(self) -> tuple[str, ...]:
        """Registered names plus ``"megatron"``."""
        with self._lock:
            return tuple(sorted(set(self._factories) | set(self._functions))) + (MEGATRON,)

    def lookup(self, name: str) -> ForwardBackwardFunc:
        """The function registered under ``name`` (not ``"megatron"``)."""
        key = self._key(name)
        with self._lock:
            fn = self._functions.get(key)
            if fn is None and key in self._factories:
                fn = self._functions[key] = self._factories.pop(key)()
        if fn is None:
            raise UnknownScheduleError(
                f"unknown pipeline schedule {name!r}; valid schedules: {', '.join(self.names())} "
                f"(register your own with dualpipe_plugin.megatron.register_schedule)"
            )
        return fn

    def get_forward_backward_func(
        self, pp_size: int | None = None, vp_size: int | None = None, schedule_pg_collection: Any = None, *,
        schedule: str | None = None,
    ) -> ForwardBackwardFunc:
        """Megatron's ``get_forward_backward_func(pp_size, vp_size, schedule_pg_collection)`` plus ``schedule``.

        ``schedule=None``: a function that reads ``config.pipeline_schedule`` on each call;
        ``"megatron"``: Megatron-Core's own choice for (pp_size, vp_size); any other name: that entry.
        ``schedule_pg_collection`` (megatron-core >= 0.19) is handed to Megatron's own choice; this package's
        schedules take their groups from the ``pg_collection`` of each call.
        """
        if schedule is None:
            return _ConfigDispatch(self, pp_size, vp_size, schedule_pg_collection)
        if self._key(schedule) == MEGATRON:
            return _megatron_choice(pp_size, vp_size, schedule_pg_collection)
        return self.lookup(schedule)

    @staticmethod
    def _key(name: str) -> str:
        if not isinstance(name, str) or not name:
            raise UnknownScheduleError(f"a pipeline schedule name must be a non-empty string, got {name!r}")
        return name.lower()


_DEFAULT: ScheduleRegistry | None = None
_DEFAULT_LOCK = threading.Lock()


def default_registry() -> ScheduleRegistry:
    """The process-wide registry behind :func:`register_schedule` and :func:`get_forward_backward_func`."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = ScheduleRegistry()
        return _DEFAULT


def register_schedule(name: str, fn: ForwardBackwardFunc, *, replace: bool = False) -> None:
    """Register a forward-backward function (Megatron's keyword signature) under ``name``."""
    default_registry().register(name, fn, replace=replace)


def get_forward_backward_func(
    pp_size: int | None = None, vp_size: int | None = None, schedule_pg_collection: Any = None, *,
    schedule: str | None = None,
) -> ForwardBackwardFunc:
    """Drop-in for ``megatron.core.pipeline_parallel.get_forward_backward_func`` (see the module docstring)."""
    return default_registry().get_forward_backward_func(pp_size, vp_size, schedule_pg_collection, schedule=schedule)


def schedule_names() -> tuple[str, ...]:
    return default_registry().names()
