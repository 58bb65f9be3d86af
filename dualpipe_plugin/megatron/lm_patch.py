"""``patch_megatron_lm()``: Megatron-LM's own training code (``megatron.training``) on ``--pipeline-schedule``.

For Megatron-LM's ``pretrain_gpt.py`` (or any script calling ``pretrain``), without editing it::

    python -m dualpipe_plugin.megatron.run_megatron_lm [--cpu] pretrain_gpt.py <Megatron-LM args> --pipeline-schedule dualpipev

(under torchrun: ``torchrun ... -m dualpipe_plugin.megatron.run_megatron_lm pretrain_gpt.py ...``), or call
``dualpipe_plugin.megatron.patch_megatron_lm()`` at the top of the script, before it imports
``megatron.training``. Either way the script's own ``model_provider``, ``forward_step``, ``get_batch``,
``loss_func`` and dataset provider run unchanged.

What it replaces (each function in its defining module and in every loaded module that imported it by name,
the script's ``__main__`` and Megatron-LM's ``gpt_builders`` included; hooks in
:mod:`~dualpipe_plugin.megatron.lm_hooks`, applied as one :class:`PatchSet` that ``.undo()`` restores):

1. ``arguments.parse_args``: ``--pipeline-schedule`` and the other pipeline flags parse alongside
   Megatron-LM's; for a two-chunk schedule two virtual stages per rank are requested before validation
   (Megatron's ``--num-virtual-stages-per-pipeline-rank``), so its own p2p/param-gather settings follow.
2. ``arguments.validate_args``: after Megatron-LM's validation the schedule is checked and its options
   are put on ``args.pipeline_options``.
3. ``core_transformer_config_from_args``: the config is marked with the schedule and its options
   (switching the placement hooks on for it) and checked.
4. ``training.get_model`` and (megatron-core >= 0.19's builder path) ``dist_utils.build_virtual_pipeline_stages``:
   each chunk is built with the placement's ``pre_process``/``post_process``; copies that must start equal
   are made equal; DualPipe's mirrored copies are marked as checkpoint replicas (Megatron-LM's own
   checkpointing then saves each stage once and loads both copies).
5. ``is_first_or_last_pipeline_stage`` and ``get_batch_on_this_tp_rank``: which chunk reads which part of
   a batch, and which ranks build datasets, follow the placement (a V's rank 0 reads tokens for its first
   chunk and labels for its last; with tensor parallelism the whole batch reaches every TP rank there).
6. ``training.get_forward_backward_func`` and ``megatron.core.pipeline_parallel.get_forward_backward_func``:
   this package's registry, which picks the function from ``config.pipeline_schedule`` on each call
   (``megatron``, the default, gives Megatron's own). A model built without the placement although the
   arguments ask for one of this package's schedules (a patch applied too late) is refused at the first
   step on every rank, naming the fix, before any transfer: never a hang.

Tested against megatron-core 0.19.2's ``megatron.training`` (its ``pretrain()``, on CPU/gloo) in
``tests/megatron/test_megatron_lm.py``; the same bindings against stand-ins in ``tests/megatron/test_args.py``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from dualpipe_plugin.megatron import lm_hooks
from dualpipe_plugin.megatron.patching import Patch, PatchSet, everywhere

__all__ = ["patch_megatron_lm"]

_OPTIONAL_TARGETS = (
    ("megatron.training.models.dist_utils", "build_virtual_pipeline_stages", lm_hooks.build_stages_hook,
     "the builder path's pre/post-process per chunk"),
    ("megatron.training.utils.common_utils", "is_first_or_last_pipeline_stage", lm_hooks.stage_predicate_hook,
     "which chunks read data and which ranks build datasets follow the placement"),
    ("megatron.training.utils", "is_first_or_last_pipeline_stage", lm_hooks.stage_predicate_hook,
     "which chunks read data and which ranks build datasets follow the placement"),
    ("megatron.core.utils", "get_batch_on_this_tp_rank", lm_hooks.get_batch_on_tp_rank_hook,
     "a rank holding a first and a last stage gets the whole batch"),
    ("megatron.training.utils", "get_batch_on_this_tp_rank", lm_hooks.get_batch_on_tp_rank_hook,
     "a rank holding a first and a last stage gets the whole batch"),
    ("megatron.training.argument_utils", "core_transformer_config_from_args", lm_hooks.config_hook,
     "mark the config"),
)
"""(module, function, hook, why) that exist only in some Megatron-LM releases: patched where present."""


def _by_name(home: Any, attr: str, make: Callable, why: str) -> list[Patch]:
    return everywhere(home, attr, make, why, prefixes=None)


def _optional_patches(done: set) -> list[Patch]:
    patches = []
    for module_name, attr, make, why in _OPTIONAL_TARGETS:
        try:
            home = importlib.import_module(module_name)
        except ImportError:
            continue
        original = getattr(home, attr, None)
        if original is None or id(original) in done:
            continue
        done.add(id(original))
        patches += _by_name(home, attr, make, why)
    return patches


def patch_megatron_lm() -> PatchSet:
    """Route Megatron-LM's training through ``--pipeline-schedule`` (see the module docstring for what changes).

    Call once, before the training script imports ``megatron.training`` (the runner does). Returns the
    applied :class:`PatchSet` (``.undo()`` restores every binding). Raises ``ImportError`` naming the fix
    when Megatron-LM's ``megatron.training`` package is not importable.
    """
    try:
        from megatron.training import arguments, training
    except ImportError as error:
        raise ImportError(
            "patch_megatron_lm() patches Megatron-LM's megatron.training package, which is not importable "
            f"here ({error}); install megatron-core >= 0.19 (its wheel ships it) or Megatron-LM, or use "
            "launch/pretrain_gpt.py, which runs on Megatron-Core alone"
        ) from None
    import megatron.core.pipeline_parallel as core_pipeline_parallel

    patches = PatchSet()
    planned = [
        *_by_name(arguments, "parse_args", lm_hooks.parse_args_hook, "chain the pipeline flags; two virtual stages"),
        *_by_name(arguments, "validate_args", lm_hooks.validate_args_hook, "check the schedule; its options on args"),
        *_by_name(training, "get_model", lm_hooks.get_model_hook, "the placement's pre/post-process per chunk"),
        # Only these two bindings: megatron.core.pipeline_parallel.schedules keeps Megatron's own function,
        # which the registry calls for the 'megatron' schedule.
        *(Patch(owner, "get_forward_backward_func", lm_hooks.forward_backward_hook(owner.get_forward_backward_func),
                "the registry picks the schedule from config.pipeline_schedule")
          for owner in (training, core_pipeline_parallel)),
    ]
    done = {id(arguments.parse_args), id(arguments.validate_args), id(training.get_model)}
    config_from_args = getattr(arguments, "core_transformer_config_from_args", None)
    if config_from_args is not None:
        done.add(id(config_from_args))
        planned += _by_name(arguments, "core_transformer_config_from_args", lm_hooks.config_hook, "mark the config")
    planned += _optional_patches(done)
    patches.apply(planned)
    return patches
