"""When our chunks leave out DeepSpeed's module forward hooks (dualpipe_plugin/deepspeed/forward_path.py).

One process, dualpipev on one pipeline rank (its two chunks on rank 0), three engines on the same model:
with DeepSpeed's defaults the chunks call ``PipelineModule.forward`` directly (DeepSpeed's forward
prologue never runs) and train exactly as through the hooks; a hook the user registers on the module,
or ``"memory_breakdown": true``, brings DeepSpeed's hooks back (the user's hook fires on every forward).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from dualpipe_plugin.launch import run_local  # noqa: E402

from .harness import Case, build_pipeline_module, data_iter, ds_config, skip_shm_comm_build  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]


def _rank(rank: int, world_size: int) -> dict:
    skip_shm_comm_build()
    import deepspeed

    import dualpipe_plugin.deepspeed  # noqa: F401
    from dualpipe_plugin.deepspeed.forward_path import hooks_idle

    deepspeed.init_distributed(dist_backend="gloo")
    case = Case(num_stages=1, plugin=True, pipeline={"schedule": "dualpipev"}, steps=2)
    out = {}
    for name in ("defaults", "user_hook", "memory_breakdown"):
        model = build_pipeline_module(case)
        config = ds_config(case)
        config["memory_breakdown"] = name == "memory_breakdown"
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        prologues, user_calls = [], []
        prologue = engine._forward_prologue
        engine._forward_prologue = lambda inputs, kwargs: (prologues.append(1), prologue(inputs, kwargs))[1]
        if name == "user_hook":
            engine.module.register_forward_hook(lambda module, args, output: user_calls.append(1))
        idle = hooks_idle(engine)
        losses = [float(engine.train_batch(data_iter(case, step, 0)).item()) for step in range(case.steps)]
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        out[name] = {"idle": idle, "prologues": len(prologues), "user_calls": len(user_calls), "losses": losses,
                     "params": params}
    return out


def test_deepspeed_forward_hooks_left_out_only_when_idle() -> None:
    out = run_local(_rank, 1, timeout_s=240)[0]
    forwards = 2 * 4 * 2  # two chunks x micro-batches x steps
    assert out["defaults"]["idle"] and out["defaults"]["prologues"] == 0
    for name in ("user_hook", "memory_breakdown"):
        assert not out[name]["idle"] and out[name]["prologues"] == forwards, name
    assert out["user_hook"]["user_calls"] == forwards
    for name in ("user_hook", "memory_breakdown"):  # the same training either way
        assert out[name]["losses"] == out["defaults"]["losses"]
        assert all(torch.equal(out[name]["params"][n], p) for n, p in out["defaults"]["params"].items())
