"""Issue 14's "done when": a DeepSpeed user's script (tests/deepspeed/user_script.py: its own AdamW with two
parameter groups and a LambdaLR, a tied embedding, ZeRO-1, bf16, clipping) through the ``deepspeed``
launcher on CPU, 4 processes (P=2 x DP=2), changing only the JSON's ``"schedule"`` between runs.

Each run is a new launch: dualpipev trains and saves, another schedule resumes and saves, dualpipev
resumes; every loss and the final parameters are compared with one uninterrupted TrainSchedule run.
Not bit for bit here, by design of the model: under the V the tied embedding's two uses (first and last
stage) sit on rank 0 as ONE module, whose bf16 gradient sums both uses in schedule order, where
TrainSchedule keeps a copy per stage and adds the two at the end; the difference stays at bf16 rounding
(measured: losses within 1e-5 relative, parameters within one bf16 step). Bit-exact resumes are tested in
test_checkpoint_placement.py (fp32, untied). A refused resume ends with one ``error:`` line on every rank.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from dualpipe_plugin.launch import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "tests/deepspeed/user_script.py"
LAUNCH_TIMEOUT_S = 300
BASE_CONFIG = {
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4, "zero_optimization": {"stage": 1},
    "bf16": {"enabled": True}, "gradient_clipping": 1.0, "steps_per_print": 10**9,
    "zero_allow_untested_optimizer": True,
}


def _config(tmp_path: Path, schedule: str) -> str:
    path = tmp_path / f"ds_{schedule}.json"
    path.write_text(json.dumps({**BASE_CONFIG, "pipeline": {"schedule": schedule, "timeout_s": 120}}))
    return str(path)


def _launch(tmp_path: Path, schedule: str, *args: str) -> tuple[int, str, list[dict]]:
    """``launch/deepspeed_local.sh 4 user_script.py ...`` (the deepspeed launcher, DS_ACCELERATOR=cpu):
    (exit status, output, rank 0's per-step records)."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}}
    env.update(DUALPIPE_CPU="1", MASTER_PORT=str(free_port()), PYTHON=sys.executable)
    command = ["bash", "launch/deepspeed_local.sh", "4", SCRIPT, "--deepspeed_config", _config(tmp_path, schedule),
               *args]
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:
        try:
            output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(f"{' '.join(command)} did not finish in {LAUNCH_TIMEOUT_S} s:\n{output[-6000:]}")
    steps = [json.loads(line) for line in output.splitlines() if line.startswith('{"step"')]
    return proc.returncode, output, steps


def _trained(tmp_path: Path, schedule: str, *args: str) -> list[float]:
    code, output, steps = _launch(tmp_path, schedule, *args)
    assert code == 0, output[-6000:]
    return [record["loss"] for record in steps]


def _dump(directory: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Parameters by data-parallel replica (names are global: layer index, and local expert index, which is
    the same for every rank of one replica)."""
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for file in sorted(directory.glob("rank*.pt")):
        dump = torch.load(file, weights_only=False)
        merged.setdefault(dump["dp_id"], {}).update(dump["params"])
    return merged


def _assert_close_to(reference: dict, resumed: dict) -> None:
    assert reference.keys() == resumed.keys()
    for dp_id in reference:
        assert reference[dp_id].keys() == resumed[dp_id].keys()
        for name, value in reference[dp_id].items():
            step = 2.0**-7 * value.abs().clamp(min=2.0**-6)  # one bf16 step of the value (or of 1/64 near 0)
            assert ((resumed[dp_id][name] - value).abs() <= step).all(), name


def _resume_chain(tmp_path: Path, middle: str, *model: str) -> None:
    reference_dump, dump, ckpt = tmp_path / "reference", tmp_path / "dump", str(tmp_path / "ckpt")
    reference = _trained(tmp_path, "deepspeed", *model, "--steps", "4", "--dump", str(reference_dump))
    assert len(reference) == 4
    losses = _trained(tmp_path, "dualpipev", *model, "--steps", "2", "--save", ckpt, "--save-tag", "v")
    losses += _trained(tmp_path, middle, *model, "--steps", "3", "--load", ckpt, "--load-tag", "v", "--save", ckpt,
                       "--save-tag", "m")
    losses += _trained(tmp_path, "dualpipev", *model, "--steps", "4", "--load", ckpt, "--load-tag", "m", "--dump",
                       str(dump))
    assert losses == pytest.approx(reference, rel=1e-5)
    _assert_close_to(_dump(reference_dump), _dump(dump))


@pytest.mark.slow
@pytest.mark.deepspeed
def test_user_script_dense_resumes_across_schedules_and_refuses_a_plain_deepspeed_checkpoint(tmp_path: Path) -> None:
    """dualpipev -> TrainSchedule ("schedule": "deepspeed") -> dualpipev against TrainSchedule; then a checkpoint
    plain DeepSpeed wrote (no plugin imported) resumed in full under dualpipev: one error line on every rank."""
    _resume_chain(tmp_path, "deepspeed")
    stock = str(tmp_path / "stock")
    _trained(tmp_path, "deepspeed", "--no-plugin", "--steps", "1", "--save", stock)
    code, output, _ = _launch(tmp_path, "dualpipev", "--steps", "2", "--load", stock)
    assert code != 0 and "Traceback" not in output, output[-6000:]
    errors = [line for line in output.splitlines() if "user_script.py: error:" in line]
    assert len(errors) == 4 and len(set(errors)) == 1, errors  # one line, the same, on each of the 4 ranks
    assert re.search(r"written by DeepSpeed without dualpipe_plugin .*load_module_only=True", errors[0]), errors[0]


@pytest.mark.slow
@pytest.mark.deepspeed
def test_user_script_moe_resumes_across_schedules(tmp_path: Path) -> None:
    """The same script with deepspeed.moe.layer.MoE blocks (EP=2 over the data-parallel ranks):
    dualpipev -> 1f1b -> dualpipev against TrainSchedule."""
    _resume_chain(tmp_path, "1f1b", "--moe")
