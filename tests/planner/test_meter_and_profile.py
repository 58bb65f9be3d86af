"""The saved-tensor meter and the layer profiler on one process: bytes exact, times present, cost file written.

No timing is asserted (timing claims live in benchmarks/); sizes are, to the byte.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dualpipe_plugin.cli import main
from dualpipe_plugin.planner.layers import profile_layer_row
from dualpipe_plugin.planner.meter import SavedTensorMeter
from dualpipe_plugin.planner.profile import ProfileTarget, profile_model
from dualpipe_plugin.runtime.weight_grad import WeightGradStore, bind_weight_split
from dualpipe_plugin.schedules.cost_file import load_costs

F32 = 4


def _block(dim=16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, dim), nn.Tanh())


def test_the_meter_counts_saved_storages_once_and_releases_them_with_the_graph():
    layer = _block()
    x = torch.randn(8, 16, requires_grad=True)
    meter = SavedTensorMeter(exclude=layer.parameters())
    with meter.counting():
        y = layer(x)  # the linear saves x, tanh its output y
        z = y.view(-1) * y.view(2, -1).view(-1)  # two more views of y's storage: counted once with y
    assert meter.live == 2 * 8 * 16 * F32
    assert meter.counted_bytes([x]) == 8 * 16 * F32
    z.sum().backward()
    del y, z
    assert meter.live == 8 * 16 * F32  # only x, which this test still holds
    assert meter.peak == 2 * 8 * 16 * F32


def test_the_meter_sees_what_deferred_weight_gradients_hold_until_w():
    layer = _block()
    store = WeightGradStore()
    binding = bind_weight_split([layer], store)
    meter = SavedTensorMeter(exclude=layer.parameters())
    meter.watch_store(store)
    x = torch.randn(8, 16, requires_grad=True)
    with meter.counting():
        y = layer(x)
    with store.capture((0, 0)):
        y.backward(torch.ones_like(y))
    del y, x
    assert meter.live == 2 * 8 * 16 * F32  # the linear's input and its output gradient, for W
    store.flush((0, 0))
    assert meter.live == 0
    binding.unbind()


def test_profiled_sizes_are_exact():
    dim, rows = 16, 8
    layers = [_block(dim) for _ in range(3)]
    costs = profile_layer_row(layers, torch.randn(rows, dim), repeats=1, warmup=0, loss=lambda y: y.pow(2).mean())
    tensor = rows * dim * F32
    first, middle, last = costs
    # The first layer's own input is the user's data (not counted); it saves tanh's output.
    assert (first.activation_bytes, first.saves_input_bytes, first.saves_output_bytes) == (tensor, 0, tensor)
    assert (middle.activation_bytes, middle.saves_input_bytes, middle.saves_output_bytes) == (2 * tensor, tensor, tensor)
    assert middle.w_store_bytes == 2 * tensor  # input and output gradient of the split Linear
    assert last.activation_bytes >= 2 * tensor  # plus what the loss saves
    params = (dim * dim + dim) * F32
    for cost in costs:
        assert (cost.param_bytes, cost.grad_bytes, cost.output_bytes) == (params, params, tensor)
        assert 2 * params <= cost.optimizer_bytes <= 2 * params + 64  # AdamW's two moments (+ step counters)
        assert min(cost.forward_ms, cost.input_grad_ms, cost.weight_grad_ms, cost.backward_ms) > 0
    assert all(p.grad is None for layer in layers for p in layer.parameters())  # left as found


def test_timed_runs_pay_neither_the_meter_nor_a_nested_weight_backward(monkeypatch):
    """The runtime runs a full B's forward with plain Linears and never meters bytes: the profile times the same
    work. Only the W flushes hand weight gradients over by hand (one per run), and the meter runs once."""
    import dualpipe_plugin.runtime.weight_grad as weight_grad

    handed, metered = [], []
    accumulate, counting = weight_grad.accumulate_weight_grads, SavedTensorMeter.counting
    monkeypatch.setattr(weight_grad, "accumulate_weight_grads", lambda grads: handed.append(1) or accumulate(grads))
    monkeypatch.setattr(SavedTensorMeter, "counting", lambda self: metered.append(1) or counting(self))
    profile_layer_row([_block()], torch.randn(8, 16), repeats=3, warmup=2)
    assert len(handed) == 1 + 2 + 3  # the sizes run, the warmup runs, the timed runs: their W, never their B
    assert len(metered) == 1


def test_profiling_restores_weights_and_unbinds_the_split():
    layer = _block()
    before = [p.detach().clone() for p in layer.parameters()]
    profile_layer_row([layer], torch.randn(4, 16), repeats=1, warmup=0)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    assert "forward" not in layer[0].__dict__


def test_profile_model_writes_a_cost_file_the_planner_reads(tmp_path):
    layers = [_block() for _ in range(4)]
    target = ProfileTarget.from_layers(layers, torch.randn(8, 16), loss=lambda y: y.pow(2).mean())
    profile = profile_model(target, repeats=1, warmup=0, overhead_microbatches=2)
    assert min(profile.runtime.overhead) >= 0 and "one-rank" in profile.runtime.note
    assert not profile.link.measured and "not measured" in profile.link.note
    path = profile.save(tmp_path / "costs.json")
    assert load_costs(path).layers == profile.layers
    assert json.loads(path.read_text())["microbatch"] == {"inputs": [[8, 16]], "dtype": ["float32"]}


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers=[]), "has no layers"),
    (dict(layers=[nn.Tanh()], names=["a", "b"]), "has 1 layers but 2 names"),
    (dict(layers=[nn.Tanh()], source="keras"), "source='keras'"),
])
def test_bad_targets_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProfileTarget(inputs=torch.zeros(1), **kwargs)


def test_the_profile_command_writes_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")  # a stray variable, as other tests leave it: not a launch
    out = tmp_path / "costs.json"
    model = "dualpipe_plugin.planner.targets:heavy_ends"
    assert main(["profile", "--model", model, "--out", str(out), "--repeats", "1", "--warmup", "0",
                 "--no-overhead"]) == 0
    assert "wrote" in capsys.readouterr().out
    profile = load_costs(out)
    assert len(profile.layers) == 8 and profile.layers[0].param_bytes == 4096 * 64 * F32


@pytest.mark.slow
def test_the_profile_command_measures_hop_and_overhead_on_local_processes(tmp_path, capsys):
    out = tmp_path / "costs.json"
    model = "dualpipe_plugin.planner.targets:heavy_ends"
    assert main(["profile", "--model", model, "--out", str(out), "--repeats", "1", "--warmup", "0",
                 "--ranks", "2"]) == 0
    assert "runtime overhead per action" in capsys.readouterr().out
    profile = load_costs(out)
    assert profile.link.measured and "pipeline group of 2 ranks" in profile.runtime.note
    assert all(value >= 0 for value in profile.runtime.overhead)


@pytest.mark.parametrize("argv, message", [
    (["--model", "nocolon"], "write MODULE:CALLABLE"),
    (["--model", "no_such_module_x:f"], "cannot import 'no_such_module_x'"),
    (["--model", "dualpipe_plugin.reference.heavy_ends:nothing"], "has no callable 'nothing'"),
    (["--model", "dualpipe_plugin.reference.heavy_ends:heavy_ends_layers"], "not a ProfileTarget"),
    (["--model", "x:y", "--ranks", "1"], "--ranks N (N >= 2)"),
    (["--model", "x:y", "--repeats", "0"], "--repeats must be >= 1"),
    (["--model", "x:y", "--out", "costs.txt"], "name it *.json"),
])
def test_bad_profile_arguments_are_one_line(tmp_path, capsys, argv, message):
    assert main(["profile", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
