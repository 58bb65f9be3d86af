"""The cost file and the plan built from it (``advise --profile``): schedule, C, cut, memory, how to apply it."""

from __future__ import annotations

import json

import pytest

from dualpipe_plugin.cli import main
from dualpipe_plugin.schedules import CostModelError
from dualpipe_plugin.schedules.cost_file import CostProfile, LayerCost, LinkCost, Runtime, load_costs
from dualpipe_plugin.schedules.plan import format_bytes, megatron_layout, parse_bytes, plan, profile_units


def _layer(name, ms, *, attach=None, params=1 << 20, activation=1 << 16):
    return LayerCost(name=name, forward_ms=ms, input_grad_ms=ms, weight_grad_ms=ms, backward_ms=2 * ms,
                     activation_bytes=activation, output_bytes=1 << 12, param_bytes=params, grad_bytes=params,
                     optimizer_bytes=2 * params, attach=attach)


def heavy_ends(source="layers", blocks=10) -> CostProfile:
    attach = ("next", "previous") if source == "megatron" else (None, None)
    layers = [_layer("embedding", 3.0, attach=attach[0])] + [_layer(f"block {i}", 1.0) for i in range(blocks)]
    layers.append(_layer("head", 3.0, attach=attach[1]))
    return CostProfile(layers=tuple(layers), source=source, model="heavy ends",
                       runtime=Runtime(F=0.05, I=0.06, W=0.07, B=0.08), link=LinkCost(latency_ms=0.2, measured=True))


def test_the_cost_file_round_trips_and_keeps_unknown_keys(tmp_path):
    profile = heavy_ends()
    data = profile.to_dict()
    data["note"] = "edited by hand"
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(data))
    loaded = load_costs(path)
    assert loaded.layers == profile.layers and loaded.link == profile.link and loaded.runtime == profile.runtime
    assert loaded.to_dict()["note"] == "edited by hand"
    assert loaded.to_dict()["version"] == 1


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(version=7), "has version 7; this dualpipe-plugin reads version 1"),
    (lambda d: d.update(format="x"), "is not a cost file"),
    (lambda d: d["layers"][2].pop("forward_ms"), r"layers\[2\].forward_ms is missing"),
    (lambda d: d["layers"][1].update(activation_bytes=-5), r"layers\[1\].activation_bytes=-5 is not a number >= 0"),
    (lambda d: d["layers"][0].update(attach="up"), r"attach='up'; use null"),
    (lambda d: d["link"].update(latency_ms="fast"), "latency_ms='fast' is not a number"),
])
def test_a_bad_cost_file_names_the_entry_and_the_fix(tmp_path, edit, match):
    data = heavy_ends().to_dict()
    edit(data)
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CostModelError, match=match):
        load_costs(path)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(CostModelError, match="does not exist; write it with dualpipe-plugin profile"):
        load_costs(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CostModelError, match="is not valid JSON"):
        load_costs(tmp_path / "bad.json")


def test_attached_layers_form_one_unit():
    profile = heavy_ends("megatron", blocks=4)
    assert profile.unit_spans() == ((0, 2), (2, 3), (3, 4), (4, 6))
    units = profile_units(profile)
    assert [u.F for u in units] == [4.0, 1.0, 1.0, 4.0]
    assert profile.layer_bounds((0, 1, 3, 4)) == (0, 2, 4, 6)


def test_bytes_parse_and_print():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("1.5 GB") == 1.5e9
    assert parse_bytes("4096") == 4096
    for bad in ("80XB", "-1GiB", "nanGiB", ""):
        with pytest.raises(CostModelError, match="is not a positive size; write e.g. 80GiB"):
            parse_bytes(bad)
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert megatron_layout((3, 2, 2, 3)) == "Ettt|tt|tt|tttL"


def test_plan_moves_blocks_off_the_heavy_rank_and_says_how_to_apply_it():
    result = plan(heavy_ends(), 4, [16], schedules=["dualpipev"])
    best = result.best
    assert best.schedule == "dualpipev"
    assert best.result.step_time < 0.9 * best.uniform_step_time
    bounds = result.layer_bounds(best)
    assert bounds[:2] == (0, 1) and bounds[-2:] == (11, 12)
    text = result.explain()
    assert f'"partition_method": "boundaries:{",".join(map(str, bounds))}"' in text
    assert f"stage_modules(layers, 'dualpipev', num_ranks=4, rank=r, boundaries={bounds})" in text
    assert "uniform cuts would take" in text and "rank 0:" in text


def test_a_megatron_profile_prints_stage_layers_or_megatrons_own_layout():
    result = plan(heavy_ends("megatron", blocks=8), 2, [8], schedules=["dualpipev", "1f1b"])
    by_name = {c.schedule: c for c in result.ranking}
    lines = result.apply_lines(by_name["dualpipev"])
    counts = result.stage_units(by_name["dualpipev"])
    assert sum(counts) == 8 and lines == [
        f"Megatron:   configure_model_config(config, 'dualpipev', stage_layers={counts})  (transformer layers per "
        f"stage, stage 0 first)"]
    one_chunk = result.apply_lines(by_name["1f1b"])[0]
    assert f"pipeline_model_parallel_layout={megatron_layout(result.stage_units(by_name['1f1b']))!r}" in one_chunk


def test_a_cap_too_small_for_any_cut_is_reported():
    result = plan(heavy_ends(), 2, [4], memory_cap=1 << 20)
    assert result.best is None
    assert "no cut fits the memory cap of 1.00 MiB" in result.explain()


def test_advise_with_a_profile_on_the_command_line(tmp_path, capsys):
    path = heavy_ends().save(tmp_path / "costs.json")
    assert main(["advise", "--profile", str(path), "-P", "4", "-C", "8,16", "--memory-cap", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "DeepSpeed:" in out and "boundaries:" in out and "peak memory" in out
    assert main(["advise", "--profile", str(path), "-P", "4", "-C", "16", "--json", "--schedules", "zbv"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["best"]["schedule"] == "zbv" and data["best"]["layer_bounds"][0] == 0


@pytest.mark.parametrize("argv, message", [
    (["-C", "8", "--memory-cap", "80XB"], "memory cap '80XB' is not a positive size"),
    (["-C", "8,x"], "--microbatches '8,x': give a whole number or a comma list"),
    (["-C", "8", "--zero-stage", "1", "--data-parallel", "0"], "data_parallel must be a whole number >= 1"),
    (["-C", "8", "--schedules", "gpipe"], "unknown pipeline schedule 'gpipe'"),
])
def test_bad_advise_profile_input_is_one_line(tmp_path, capsys, argv, message):
    path = heavy_ends().save(tmp_path / "costs.json")
    assert main(["advise", "--profile", str(path), "-P", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_list_of_counts_needs_a_profile(capsys):
    assert main(["advise", "-P", "4", "-C", "8,16"]) == 2
    assert "without --profile give one count" in capsys.readouterr().err
