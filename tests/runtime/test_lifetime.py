"""A pipeline its user drops is freed at once, by reference counting, with nothing left for the cyclic GC.

Why it matters: the pipeline holds its transport, and the transport holds process groups. A gloo group
that is still alive when the interpreter starts finalising can abort the process ("terminate called
without an active exception"): its worker thread may still be releasing the last collective's tensors,
which needs the GIL, and a thread asking for the GIL during finalisation is killed. A group freed while
the interpreter is alive joins its threads with the GIL released, which is safe. So a pipeline that lives
in ``main()`` must release its groups when ``main()`` returns, not in the final garbage collection.
(tests/runtime/test_elastic.py hit this under load, before the executor's op table stopped holding bound
methods of the executor itself.)
"""

from __future__ import annotations

import gc
import weakref
from contextlib import contextmanager

import pytest

from dualpipe_plugin.moe import lm_loss, moe_chunks, moe_layers
from dualpipe_plugin.runtime.pipeline import DualPipeline, stage_modules
from tests.moe.harness import MoECase, data
from tests.runtime.harness import Case, batch, build_layers, loss_fn, one_thread
from tests.runtime.test_units import Loopback


@contextmanager
def _no_cyclic_gc():
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _dense_pipeline(case: Case, transport) -> tuple[DualPipeline, tuple]:
    chunks = stage_modules(build_layers(case), case.schedule, 1, 0)
    pipe = DualPipeline(chunks, case.schedule, loss_fn=loss_fn, transport=transport, **case.options)
    return pipe, batch(case, 0)


def _moe_pipeline(overlap: bool, transport) -> tuple[DualPipeline, tuple]:
    case = MoECase(ranks=1, ep=1, microbatches=2, blocks=2)
    chunks = moe_chunks(moe_layers(case.config, case.blocks, seed=case.seed), case.schedule, 1, 0)
    pipe = DualPipeline(chunks, case.schedule, loss_fn=lm_loss, transport=transport, overlap=overlap)
    return pipe, data(case, replica=0)


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda t: _dense_pipeline(Case("dualpipev", 1, 2), t), id="dualpipev"),
        pytest.param(lambda t: _dense_pipeline(Case("zb1p", 1, 2), t), id="zb1p"),
        pytest.param(lambda t: _dense_pipeline(Case("dualpipev", 1, 2, options={"split_weights": False}), t),
                     id="dualpipev-no-split"),
        pytest.param(lambda t: _moe_pipeline(True, t), id="moe-overlap"),
        pytest.param(lambda t: _moe_pipeline(False, t), id="moe-sequential"),
    ],
)
def test_dropped_pipeline_and_its_transport_die_without_the_cyclic_gc(build) -> None:
    with one_thread(), _no_cyclic_gc():
        transport = Loopback()
        pipe, (inputs, labels) = build(transport)
        pipe.step(inputs, labels, num_microbatches=2)
        pipe.step(inputs, labels, num_microbatches=2)
        refs = {"pipeline": weakref.ref(pipe), "executor": weakref.ref(pipe.executor),
                "transport": weakref.ref(transport)}
        if pipe.executor.overlap is not None:
            refs["overlap engine"] = weakref.ref(pipe.executor.overlap)
        del pipe, transport
        alive = [name for name, ref in refs.items() if ref() is not None]
        assert not alive, f"{alive} outlived their last reference: a reference cycle holds them"
