"""The learning-rate schedules per step, against hand-computed values, and across a resume."""

import math

import pytest
import torch

from multitune.config.schema import TrainConfig
from multitune.training.schedule import build_scheduler

TOTAL = 10  # warmup_ratio 0.2: 2 warmup steps, then 8 of decay


def learning_rates(kind: str, total: int = TOTAL, steps: int = TOTAL, state=None) -> list[float]:
    """The lr each optimizer step runs at (read before scheduler.step(), as the loop steps)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = build_scheduler(optimizer, TrainConfig(scheduler=kind, warmup_ratio=0.2), total)
    if state is not None:  # a resume restores both, as load_checkpoint does
        optimizer.load_state_dict(state[0])
        scheduler.load_state_dict(state[1])
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates, (optimizer.state_dict(), scheduler.state_dict())


def decay(kind: str, step: int, total: int = TOTAL, warmup: int = 2) -> float:
    progress = (step - warmup) / (total - warmup)
    return 1 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_each_step_runs_at_the_hand_computed_rate(kind):
    rates, _ = learning_rates(kind)
    warmup = [0.0, 0.5]  # step s of 2 warmup steps at s / 2, as the HF Trainer runs it
    after = [1.0 if kind == "constant" else decay(kind, s) for s in range(2, TOTAL)]
    assert rates == pytest.approx(warmup + after, abs=1e-12)
    if kind == "cosine":
        assert rates[6] == pytest.approx(0.5)  # half way through the decay


def test_resumed_schedule_continues_and_follows_a_longer_run():
    whole, _ = learning_rates("cosine")
    first, state = learning_rates("cosine", steps=4)
    rest, _ = learning_rates("cosine", steps=TOTAL - 4, state=state)
    assert first + rest == pytest.approx(whole, abs=1e-15)
    # Resumed with max_steps raised to 20 (4 warmup steps): step 4 runs at the saved rate, and
    # the decay then stretches to the new end.
    longer, _ = learning_rates("cosine", total=20, steps=6, state=state)
    stretched = [decay("cosine", s, total=20, warmup=4) for s in range(5, 10)]
    assert longer == pytest.approx([whole[4], *stretched], abs=1e-12)
