"""plan_packing: placement, capacity, rank balance, determinism, and C++ == Python reference."""

from __future__ import annotations

import random

import pytest
import torch

from multitune.ops import plan_packing, reference_plan_packing

pytestmark = pytest.mark.usefixtures("cpp_backend")

CAPACITY = 512


def random_lengths(num_examples: int, seed: int, max_length: int = CAPACITY) -> list[int]:
    rng = random.Random(seed)
    # Half drawn from a few values so that ties (resolved by the seed) are common.
    common = [max_length // 64 + 1, max_length // 5, max_length // 2, max_length - 1, max_length]
    return [
        rng.choice(common) if rng.random() < 0.5 else rng.randint(1, max_length)
        for _ in range(num_examples)
    ]


def rank_tokens(plan, lengths):
    return [sum(lengths[i] for bin_ in bins for i in bin_) for bins in plan]


@pytest.mark.parametrize("num_ranks", [1, 3, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_example_placed_once_within_capacity_and_equal_steps(num_ranks, seed):
    lengths = random_lengths(700, seed)
    plan = plan_packing(lengths, CAPACITY, num_ranks, seed)
    placed = sorted(i for bins in plan for bin_ in bins for i in bin_)
    assert placed == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in bin_) for bins in plan for bin_ in bins) <= CAPACITY
    assert len(plan) == num_ranks
    assert len({len(bins) for bins in plan}) == 1  # same number of steps on every rank


@pytest.mark.parametrize("num_ranks", [2, 3, 8])
def test_rank_token_totals_differ_by_at_most_the_longest_example(num_ranks):
    for seed in range(5):
        lengths = random_lengths(301, seed)
        tokens = rank_tokens(plan_packing(lengths, CAPACITY, num_ranks, seed), lengths)
        assert max(tokens) - min(tokens) <= max(lengths)


def test_packing_is_near_the_token_lower_bound():
    lengths = random_lengths(2000, seed=7)
    plan = plan_packing(lengths, CAPACITY, num_ranks=1, seed=0)
    lower_bound = -(-sum(lengths) // CAPACITY)
    assert lower_bound <= len(plan[0]) <= 1.02 * lower_bound


def test_best_fit_decreasing_on_a_hand_worked_example():
    # 6 opens bin A (4 left); 5 opens bin B (5 left); 4 fills A exactly (best fit, not B);
    # 3 and 2 then fill B.
    plan = plan_packing([6, 5, 4, 3, 2], capacity=10, num_ranks=1, seed=0)
    assert sorted(sorted(bin_) for bin_ in plan[0]) == [[0, 2], [1, 3, 4]]


def bin_token_sums(plan, lengths):
    return sorted(sorted(sum(lengths[i] for i in bin_) for bin_ in bins) for bins in plan)


def test_rank_with_fewer_bins_splits_a_bin_to_match_step_count():
    # Dealt longest first, one rank gets 5+5+1 (bins [5,5] and [1]); the other gets 5+5, which
    # fit one bin, and splits it so that both ranks run 2 steps.
    lengths = [5, 5, 5, 5, 1]
    plan = plan_packing(lengths, capacity=10, num_ranks=2, seed=0)
    assert bin_token_sums(plan, lengths) == [[1, 10], [5, 5]]


def test_rank_with_too_few_examples_gets_an_empty_bin():
    lengths = [10, 10, 10]
    plan = plan_packing(lengths, capacity=10, num_ranks=2, seed=0)
    assert bin_token_sums(plan, lengths) == [[0, 10], [10, 10]]
    assert sorted(len(bin_) for bins in plan for bin_ in bins) == [0, 1, 1, 1]


def test_same_seed_same_plan_other_seed_other_order():
    lengths = random_lengths(200, seed=3)
    first = plan_packing(lengths, CAPACITY, 4, seed=11)
    assert plan_packing(lengths, CAPACITY, 4, seed=11) == first
    assert plan_packing(lengths, CAPACITY, 4, seed=12) != first


@pytest.mark.parametrize("num_ranks", [1, 2, 5])
def test_cpp_plan_equals_python_reference(num_ranks):
    for seed in range(-2, 6):
        lengths = random_lengths(60 + 17 * seed, seed, max_length=100) + [0, 0]
        cpp = plan_packing(torch.tensor(lengths), 100, num_ranks, seed)
        assert cpp == reference_plan_packing(lengths, 100, num_ranks, seed)


def test_edge_cases_agree_with_reference():
    for lengths, num_ranks in [([], 3), ([4], 3), ([3, 3, 3, 3], 4), ([0, 0, 0], 2)]:
        assert plan_packing(lengths, 8, num_ranks, 0) == reference_plan_packing(
            lengths, 8, num_ranks, 0
        )
    assert plan_packing([], 8, 3, 0) == [[], [], []]


@pytest.mark.parametrize("planner", [plan_packing, reference_plan_packing])
def test_over_long_example_error_names_its_index(planner):
    with pytest.raises(ValueError, match="example 3 has length 600, longer than the packing"):
        planner([10, 20, 30, 600, 5], 512, 2, 0)


@pytest.mark.parametrize("planner", [plan_packing, reference_plan_packing])
def test_invalid_arguments_raise(planner):
    with pytest.raises(ValueError, match="num_ranks must be positive"):
        planner([1, 2], 8, 0, 0)
    with pytest.raises(ValueError, match="example 1 has negative length"):
        planner([1, -2], 8, 1, 0)
