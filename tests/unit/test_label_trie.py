"""Label trie and constrained greedy decoding: every decode must spell out a real label."""

import pytest
import torch

from multitune.evaluation.label_trie import LabelTrie, constrained_greedy_step

VOCAB_SIZE = 50
END = 2
# Six labels sharing prefixes the way banking77 intents do ("card_arrival" / "card_linking"),
# including labels that are prefixes of others ("card" of everything card_*,
# "card_arrival" of "card_arrival_late").
LABEL_NAMES = [
    "card_arrival",
    "card_linking",
    "card",
    "card_arrival_late",
    "balance",
    "bank_transfer",
]
LABEL_SEQS = [[11, 12, 13], [11, 12, 14], [11], [11, 12, 13, 15], [20, 21], [20, 30, 31, 32]]


@pytest.fixture
def trie() -> LabelTrie:
    return LabelTrie.from_token_sequences(LABEL_SEQS, END, LABEL_NAMES)


def _brute_force_allowed(prefix: list[int]) -> list[int]:
    full = [seq + [END] for seq in LABEL_SEQS]
    return sorted(
        {s[len(prefix)] for s in full if s[: len(prefix)] == prefix and len(s) > len(prefix)}
    )


def test_allowed_next_matches_brute_force_on_every_prefix(trie):
    prefixes = {tuple(seq[:n]) for seq in LABEL_SEQS for n in range(len(seq) + 1)}
    for prefix in sorted(prefixes):
        assert trie.allowed_next(list(prefix)) == _brute_force_allowed(list(prefix)), prefix
    assert trie.allowed_next([]) == [11, 20]
    assert trie.allowed_next([11]) == [END, 12]
    assert trie.allowed_next([11, 12, 13]) == [END, 15]
    assert trie.allowed_next([11, 12, 13, END]) == []
    assert trie.max_sequence_length == 5
    assert trie.num_labels == 6


def test_label_index_round_trips_every_label(trie):
    for index, seq in enumerate(LABEL_SEQS):
        assert trie.label_index(seq + [END]) == index


def test_label_that_is_prefix_of_another_is_told_apart_by_end_token():
    trie = LabelTrie.from_token_sequences([[5], [5, 6]], end_token_id=0)
    assert trie.allowed_next([5]) == [0, 6]
    assert trie.label_index([5, 0]) == 0
    assert trie.label_index([5, 6, 0]) == 1
    # The same holds when the longer label is added first.
    reversed_trie = LabelTrie.from_token_sequences([[5, 6], [5]], end_token_id=0)
    assert reversed_trie.label_index([5, 0]) == 1


def test_duplicate_token_sequences_raise_naming_both_labels():
    with pytest.raises(ValueError, match=r"'card_arrival' \(index 0\) and 'arrival' \(index 2\)"):
        LabelTrie.from_token_sequences(
            [[11, 12], [11], [11, 12]], END, ["card_arrival", "x", "arrival"]
        )
    with pytest.raises(
        ValueError, match=r"#0 \(index 0\) and #1 \(index 1\) both tokenize to \[7\]"
    ):
        LabelTrie.from_token_sequences([[7], [7]], END)


def test_invalid_label_sets_raise():
    with pytest.raises(ValueError, match="zero labels"):
        LabelTrie.from_token_sequences([], END)
    with pytest.raises(ValueError, match="'b' \\(index 1\\) has no tokens"):
        LabelTrie.from_token_sequences([[3], []], END, ["a", "b"])
    with pytest.raises(ValueError, match="contain the end token 2"):
        LabelTrie.from_token_sequences([[3, END]], END)
    with pytest.raises(ValueError, match="2 label names for 1 token sequences"):
        LabelTrie.from_token_sequences([[3]], END, ["a", "b"])


def test_off_trie_and_incomplete_sequences_raise(trie):
    with pytest.raises(ValueError, match=r"leaves the label trie at position 1 \(token 99\)"):
        trie.allowed_next([11, 99])
    with pytest.raises(ValueError, match="leaves the label trie"):
        trie.allowed_next([11, END, 12])  # nothing follows a completed label
    with pytest.raises(ValueError, match="not a complete label"):
        trie.label_index([11, 12])


def _decode_greedily(trie: LabelTrie, batch_size: int, next_logits) -> list[list[int]]:
    """The batched loop a generation recipe runs: step every row until each emits the end token."""
    prefixes: list[list[int]] = [[] for _ in range(batch_size)]
    for step in range(trie.max_sequence_length):
        tokens = constrained_greedy_step(next_logits(step), prefixes, trie)
        assert tokens.shape == (batch_size,) and tokens.dtype == torch.long
        for prefix, token in zip(prefixes, tokens.tolist(), strict=True):
            if not prefix or prefix[-1] != END:
                prefix.append(token)
        if all(prefix[-1] == END for prefix in prefixes):
            return prefixes
    raise AssertionError(f"decoding did not finish within {trie.max_sequence_length} steps")


def test_random_logits_always_decode_to_a_valid_label(trie):
    seen = set()
    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        decoded = _decode_greedily(
            trie, 4, lambda step, gen=gen: torch.randn(4, VOCAB_SIZE, generator=gen) * 5
        )
        for seq in decoded:
            seen.add(trie.label_index(seq))
    # Every label, including the prefix labels, is reachable; a trie that blocked one would fail.
    assert seen == set(range(len(LABEL_SEQS)))


@pytest.mark.parametrize("target", range(len(LABEL_SEQS)), ids=LABEL_NAMES)
def test_greedy_decoding_follows_the_logits_and_ignores_disallowed_tokens(trie, target):
    path = LABEL_SEQS[target] + [END]

    def next_logits(step: int) -> torch.Tensor:
        logits = torch.zeros(1, VOCAB_SIZE)
        logits[0, 49] = 100.0  # the model's favourite token is never allowed
        logits[0, path[step]] = 1.0
        return logits

    assert trie.label_index(_decode_greedily(trie, 1, next_logits)[0]) == target


def test_step_equals_masked_argmax_reference(trie):
    prefixes = [[], [11], [11, 12], [11, 12, 13], [20], [20, 30, 31], [20, 30, 31, 32]]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(len(prefixes), VOCAB_SIZE, generator=gen)
        mask = torch.ones_like(logits, dtype=torch.bool)
        for row, prefix in enumerate(prefixes):
            mask[row, trie.allowed_next(prefix)] = False
        expected = logits.masked_fill(mask, float("-inf")).argmax(dim=1)
        assert torch.equal(constrained_greedy_step(logits, prefixes, trie), expected)


def test_step_picks_an_allowed_token_when_allowed_logits_are_inf_or_nan(trie):
    logits = torch.full((3, VOCAB_SIZE), float("-inf"))
    logits[2] = float("nan")
    tokens = constrained_greedy_step(logits, [[], [11, 12], [20]], trie).tolist()
    assert tokens[0] in (11, 20) and tokens[1] in (13, 14) and tokens[2] in (21, 30)


def test_step_repeats_end_token_for_finished_rows(trie):
    logits = torch.randn(2, VOCAB_SIZE)
    tokens = constrained_greedy_step(logits, [[11, END], [20, 21, END]], trie)
    assert tokens.tolist() == [END, END]


def test_step_rejects_bad_shapes(trie):
    with pytest.raises(ValueError, match="got 1 prefixes for a batch of 2"):
        constrained_greedy_step(torch.zeros(2, VOCAB_SIZE), [[]], trie)
    with pytest.raises(ValueError, match=r"must be \[batch, vocab\]"):
        constrained_greedy_step(torch.zeros(VOCAB_SIZE), [[]], trie)
    with pytest.raises(
        ValueError, match="token id 20 is outside the logits' vocabulary of size 15"
    ):
        constrained_greedy_step(torch.zeros(1, 15), [[]], trie)


def test_forced_completion_is_the_only_path_left_or_none():
    trie = LabelTrie.from_token_sequences([[5, 6], [5, 7], [8, 9, 10]], end_token_id=0)
    assert trie.forced_completion([]) is None
    assert trie.forced_completion([5]) is None  # 6 or 7
    assert trie.forced_completion([8]) == [9, 10, 0]
    assert trie.forced_completion([5, 6]) == [0]
    assert trie.forced_completion([5, 6, 0]) == []
    prefix_label = LabelTrie.from_token_sequences([[5], [5, 6]], end_token_id=0)
    assert prefix_label.forced_completion([5]) is None  # end here, or go on to 6
