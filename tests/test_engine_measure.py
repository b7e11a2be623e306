"""marscale.engine.measure and marscale.engine.phases: the engine's own training step timed
by phase (masks, data, forward, backward, optimizer), on the demo model at 4 x 32 x 32."""

from __future__ import annotations

import pytest

from marscale.commands.compare import QUICK_OVERRIDES
from marscale.core import dist
from marscale.cost.counting import count_model
from marscale.engine.phases import PHASES, NoClock, PhaseClock

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", autouse=True)
def process_group():
    dist.init_distributed()


class FakeClock:
    def __init__(self, *times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def test_phase_clock_sums_each_phase_in_step_order():
    import torch

    clock = PhaseClock(torch.device("cpu"), FakeClock(10.0, 10.5, 11.0, 13.0, 13.25, 14.0))
    clock.start()
    for phase in ("masks", "data", "optimizer", "masks", "forward"):  # two micro-batches' worth, out of order
        clock.mark(phase)
    assert clock.take() == {"masks": 0.5 + 0.25, "data": 0.5, "forward": 0.75, "optimizer": 2.0}
    assert list(clock.take()) == []  # taken: the next step starts from nothing
    none = NoClock()
    none.start()
    none.mark("forward")  # the trainer's: nothing recorded, nothing to read


@pytest.mark.parametrize("entry", ["demo", "demo:model.arch=vit:masking.kind=none:model.decoder.enabled=false"])
def test_measured_phases_split_the_step_and_count_the_trained_parameters(entry):
    from marscale.cost.compare import Entry
    from marscale.engine.measure import measure

    cfg = Entry.parse(entry).load(QUICK_OVERRIDES)
    m = measure(cfg, batch=2, warmup=1, steps=2, videos=100)
    assert len(m.train_phase_s) == len(m.train_step_s) == 2 and m.clock == "cpu"
    for phases, step in zip(m.train_phase_s, m.train_step_s):
        assert tuple(phases) == PHASES and all(s > 0 for s in phases.values()), phases
        # One clock (process CPU time) for the step and its phases: the phases lie inside it,
        # and leave out only the call around them.
        assert 0.8 * step <= sum(phases.values()) <= step
    first, second = m.train_phase_s
    assert m.phase_median_s == pytest.approx({p: (first[p] + second[p]) / 2 for p in PHASES})
    assert m.trained_params == count_model(cfg.model, cfg.clip, 0.0).params_training
