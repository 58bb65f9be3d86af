"""``--pipeline-schedule`` and ``patch_megatron_lm()`` against stand-in Megatron-LM modules.

Megatron-LM (``megatron.training``) is not installed here. The stand-ins below call the patched bindings
the way Megatron-LM's ``initialize_megatron`` / ``pretrain_gpt.py`` / ``get_model`` / ``train`` do (from
memory of Megatron-LM ~0.12-0.14): what is tested is that each binding is replaced, composes with what it
wraps and is undone — not a real Megatron-LM run.
"""

from __future__ import annotations

import argparse
import sys
import types

import pytest

pytest.importorskip("megatron.core")

from dualpipe_plugin.megatron import (  # noqa: E402
    MegatronScheduleError,
    add_pipeline_schedule_args,
    patch_megatron_lm,
)
from dualpipe_plugin.megatron.args import apply_schedule_args  # noqa: E402
from dualpipe_plugin.megatron.placement import remove_placement_hooks  # noqa: E402

pytestmark = pytest.mark.megatron


def _namespace(**overrides) -> argparse.Namespace:
    values = dict(pipeline_schedule="dualpipev", pipeline_model_parallel_size=2, num_layers=8,
                  virtual_pipeline_model_parallel_size=None, num_layers_per_virtual_pipeline_stage=None,
                  global_batch_size=16, micro_batch_size=2, data_parallel_size=2)
    values.update(overrides)
    return argparse.Namespace(**values)


def test_the_flag_parses_with_megatron_default():
    parser = add_pipeline_schedule_args(argparse.ArgumentParser())
    assert parser.parse_args([]).pipeline_schedule == "megatron"
    assert parser.parse_args(["--pipeline-schedule", "DualPipeV"]).pipeline_schedule == "dualpipev"
    with pytest.raises(SystemExit):
        parser.parse_args(["--pipeline-schedule", "gpipe"])


def test_apply_schedule_args_sets_two_virtual_stages_and_checks():
    args = apply_schedule_args(_namespace())
    assert args.virtual_pipeline_model_parallel_size == 2
    assert apply_schedule_args(args) is args  # idempotent
    assert apply_schedule_args(_namespace(pipeline_schedule="zb1p")).virtual_pipeline_model_parallel_size is None
    with pytest.raises(MegatronScheduleError, match="remove --virtual-pipeline-model-parallel-size"):
        apply_schedule_args(_namespace(virtual_pipeline_model_parallel_size=2))
    with pytest.raises(MegatronScheduleError, match="not divisible by 4"):
        apply_schedule_args(_namespace(num_layers=6))
    with pytest.raises(MegatronScheduleError, match=r"= 2 micro-batches per step\): raise --global-batch-size"):
        apply_schedule_args(_namespace(global_batch_size=8))


# ----------------------------------------------------------------------------- stand-in Megatron-LM


class _StandIn:
    """megatron.training.{arguments, initialize, global_vars, training} plus a pretrain_gpt-like module."""

    def __init__(self, argv: list[str]):
        import torch
        from megatron.core import pipeline_parallel
        from megatron.core.transformer import TransformerConfig

        self.argv = argv
        self.provider_calls: list[tuple] = []
        package = types.ModuleType("megatron.training")
        package.__path__ = []
        arguments = types.ModuleType("megatron.training.arguments")
        initialize = types.ModuleType("megatron.training.initialize")
        global_vars = types.ModuleType("megatron.training.global_vars")
        training = types.ModuleType("megatron.training.training")
        pretrain_gpt = types.ModuleType("megatron.training.standin_pretrain_gpt")

        def parse_args(extra_args_provider=None, ignore_unknown_args=False):
            parser = argparse.ArgumentParser()
            for flag in ("--num-layers", "--pipeline-model-parallel-size", "--virtual-pipeline-model-parallel-size",
                         "--num-layers-per-virtual-pipeline-stage", "--global-batch-size", "--micro-batch-size"):
                parser.add_argument(flag, type=int, default=None)
            if extra_args_provider is not None:
                parser = extra_args_provider(parser)
            return parser.parse_args(self.argv)

        def validate_args(args, defaults={}):
            args.data_parallel_size = 2
            return args

        def core_transformer_config_from_args(args, config_class=None):
            return TransformerConfig(num_layers=args.num_layers, hidden_size=32, num_attention_heads=4,
                                     pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                                     virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
                                     pipeline_dtype=torch.float32)

        arguments.parse_args, arguments.validate_args = parse_args, validate_args
        arguments.core_transformer_config_from_args = core_transformer_config_from_args
        # By-name imports, as `from megatron.training.arguments import ...` leaves them.
        initialize.parse_args, initialize.validate_args = parse_args, validate_args
        pretrain_gpt.core_transformer_config_from_args = core_transformer_config_from_args

        def initialize_megatron(extra_args_provider=None):
            args = initialize.parse_args(extra_args_provider)
            initialize.validate_args(args, {})
            global_vars.ARGS = args
            return args

        initialize.initialize_megatron = initialize_megatron
        global_vars.get_args = lambda: global_vars.ARGS

        def get_model(model_provider_func, model_type=None, wrap_with_ddp=True):
            args = global_vars.get_args()
            vp, pp_rank, pp = args.virtual_pipeline_model_parallel_size, 0, args.pipeline_model_parallel_size
            chunks = []
            for i in range(vp or 1):  # Megatron's own placement: stage i*P + r
                pre = pp_rank == 0 and i == 0
                post = pp_rank == pp - 1 and i == (vp or 1) - 1
                chunks.append(model_provider_func(pre_process=pre, post_process=post, vp_stage=i if vp else None))
            return chunks

        training.get_model = get_model
        training.get_forward_backward_func = pipeline_parallel.get_forward_backward_func
        self.modules = {
            "megatron.training": package, "megatron.training.arguments": arguments,
            "megatron.training.initialize": initialize, "megatron.training.global_vars": global_vars,
            "megatron.training.training": training, "megatron.training.standin_pretrain_gpt": pretrain_gpt,
        }
        for name, module in self.modules.items():
            if name != "megatron.training":
                setattr(package, name.rsplit(".", 1)[1], module)
        self.arguments, self.initialize, self.training = arguments, initialize, training
        self.pretrain_gpt = pretrain_gpt
        self.originals = {
            "parse_args": parse_args, "validate_args": validate_args,
            "core_transformer_config_from_args": core_transformer_config_from_args, "get_model": get_model,
            "get_forward_backward_func": pipeline_parallel.get_forward_backward_func,
        }

    def provider(self, config):
        import torch

        def model_provider(pre_process=True, post_process=True, vp_stage=None):
            self.provider_calls.append((vp_stage, pre_process, post_process))
            chunk = types.SimpleNamespace(config=config, pre_process=pre_process, post_process=post_process,
                                          share_embeddings_and_output_weights=True)
            chunk.parameters = lambda: iter(())
            if pre_process:
                chunk.embedding = types.SimpleNamespace(word_embeddings=types.SimpleNamespace(
                    weight=torch.nn.Parameter(torch.full((4, 2), 3.0))))
            if post_process:
                chunk.output_layer = types.SimpleNamespace(weight=torch.nn.Parameter(torch.zeros(4, 2)))
            return chunk

        return model_provider


@pytest.fixture
def standin(monkeypatch):
    from megatron.core import parallel_state

    stand_in = _StandIn(["--num-layers", "8", "--pipeline-model-parallel-size", "2", "--global-batch-size", "16",
                         "--micro-batch-size", "2", "--pipeline-schedule", "dualpipev"])
    for name, module in stand_in.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_group", lambda: None)
    yield stand_in
    remove_placement_hooks()


def test_patch_megatron_lm_routes_a_megatron_lm_style_run(standin):
    from megatron.core import pipeline_parallel
    from megatron.core.pipeline_parallel import schedules

    megatron_own = schedules.get_forward_backward_func
    patch = patch_megatron_lm()
    try:
        # 1-2: initialize_megatron parses the flag (chained provider) and validation sets two chunks.
        args = standin.initialize.initialize_megatron(extra_args_provider=lambda p: p)
        assert args.pipeline_schedule == "dualpipev" and args.virtual_pipeline_model_parallel_size == 2
        # 3: pretrain_gpt's by-name import marks the config (and the layer hooks answer for it).
        config = standin.pretrain_gpt.core_transformer_config_from_args(args)
        assert config.pipeline_schedule == "dualpipev"
        from megatron.core.transformer import transformer_layer

        assert transformer_layer.get_transformer_layer_offset(config, 1, 0) == 6
        # 4: get_model hands the provider the V's pre/post-process and ties the embedding copy.
        chunks = standin.training.get_model(standin.provider(config))
        assert standin.provider_calls == [(0, True, False), (1, False, True)]  # Megatron would say (1, False, False)
        assert bool((chunks[1].output_layer.weight == 3.0).all()) and chunks[1].output_layer.weight.shared
        # 5: train() asks training.get_forward_backward_func(); the registry picks by config.
        dispatch = standin.training.get_forward_backward_func()
        assert type(dispatch).__name__ == "_CheckedDispatch"
        assert type(pipeline_parallel.get_forward_backward_func()).__name__ == "_CheckedDispatch"
        assert schedules.get_forward_backward_func is megatron_own  # Megatron's own stays reachable
    finally:
        patch.undo()
    for name in ("parse_args", "validate_args", "core_transformer_config_from_args"):
        assert getattr(standin.arguments, name) is standin.originals[name]
    assert standin.initialize.parse_args is standin.originals["parse_args"]
    assert standin.pretrain_gpt.core_transformer_config_from_args is standin.originals[
        "core_transformer_config_from_args"]
    assert standin.training.get_model is standin.originals["get_model"]
    assert pipeline_parallel.get_forward_backward_func is standin.originals["get_forward_backward_func"]


def test_patch_megatron_lm_refuses_vp_with_dualpipev(standin):
    standin.argv += ["--virtual-pipeline-model-parallel-size", "2"]
    patch = patch_megatron_lm()
    try:
        with pytest.raises(MegatronScheduleError, match="places two chunks per rank itself"):
            standin.initialize.initialize_megatron()
    finally:
        patch.undo()


def test_patch_megatron_lm_without_megatron_lm_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.training", None)
    with pytest.raises(ImportError, match="use launch/pretrain_gpt.py"):
        patch_megatron_lm()


def test_run_megatron_lm_runs_the_script_patched(standin, tmp_path):
    from dualpipe_plugin.megatron import run_megatron_lm

    script = tmp_path / "pretrain_gpt.py"
    script.write_text(
        "import sys\n"
        "from megatron.training import training\n"
        "assert type(training.get_forward_backward_func()).__name__ == '_CheckedDispatch'\n"
        "sys.modules['megatron.training.training'].ran = sys.argv[1:]\n"
    )
    saved_argv = sys.argv
    patch = None
    try:
        patch = run_megatron_lm.main([str(script), "--pipeline-schedule", "dualpipev"])
        assert standin.training.ran == ["--pipeline-schedule", "dualpipev"]
    finally:
        sys.argv = saved_argv
        if patch is not None:
            patch.undo()
    assert standin.training.get_forward_backward_func is standin.originals["get_forward_backward_func"]
