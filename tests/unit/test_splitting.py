from collections import Counter

from multitune.data.splitting import split_indices


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    strata = [f"c{i % 7}" for i in range(300)]
    assert split_indices(strata, 0.2, seed=1) == split_indices(strata, 0.2, seed=1)
    assert split_indices(strata, 0.2, seed=1) != split_indices(strata, 0.2, seed=2)


def test_split_is_stratified_80_20_within_one_example_per_class():
    strata = ["a"] * 101 + ["b"] * 37 + ["c"] * 9 + ["d"] * 3
    train, validation = split_indices(strata, 0.2, seed=0)
    assert sorted(train + validation) == list(range(len(strata)))  # a partition
    per_class = Counter(strata[i] for i in validation)
    totals = Counter(strata)
    for name, total in totals.items():
        assert abs(per_class[name] - 0.2 * total) <= 1, name


def test_unstratified_split_takes_a_fifth():
    train, validation = split_indices([None] * 50, 0.2, seed=0)
    assert len(validation) == 10 and len(train) == 40
