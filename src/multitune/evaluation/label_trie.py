"""Constrained decoding for classification: generation can only spell out a known label.

Each label's token sequence is stored followed by an end token, so a label that is a prefix of
another (tokens ``[5]`` and ``[5, 6]``) stays distinct: after ``5`` both ``6`` and the end
token are allowed, and the end token decides. A finished sequence maps back to its label index,
so scoring never has to parse free text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_ROOT = 0


class LabelTrie:
    """A token trie over label sequences, each terminated by ``end_token_id``.

    Nodes are integers; ``_children[node]`` maps a token to the child node, and the node reached
    by a label's end token is recorded in ``_label_at_leaf``.
    """

    def __init__(self, end_token_id: int) -> None:
        self.end_token_id = end_token_id
        self._children: list[dict[int, int]] = [{}]
        self._label_at_leaf: dict[int, int] = {}
        self.num_labels = 0
        self.max_sequence_length = 0  # longest label sequence including its end token

    @classmethod
    def from_token_sequences(
        cls,
        seqs: Sequence[Sequence[int]],
        end_token_id: int,
        label_names: Sequence[str] | None = None,
    ) -> LabelTrie:
        """Build the trie; label ``i`` is ``seqs[i]`` (its names, for error messages only).

        Raises ValueError for an empty label set, an empty sequence, a sequence containing the
        end token, or two labels with identical token sequences (they could never be told apart).
        """
        if not seqs:
            raise ValueError("cannot build a label trie from zero labels")
        if label_names is not None and len(label_names) != len(seqs):
            raise ValueError(f"got {len(label_names)} label names for {len(seqs)} token sequences")
        names = (
            [repr(n) for n in label_names]
            if label_names is not None
            else [f"#{i}" for i in range(len(seqs))]
        )
        trie = cls(end_token_id)
        for index, seq in enumerate(seqs):
            seq = [int(t) for t in seq]
            if not seq:
                raise ValueError(f"label {names[index]} (index {index}) has no tokens")
            if end_token_id in seq:
                raise ValueError(
                    f"label {names[index]} (index {index}) tokens {seq} contain the end token "
                    f"{end_token_id}; pick an end token that no label uses"
                )
            node = trie._walk(seq, create=True)
            leaf = trie._children[node].get(end_token_id)
            if leaf is not None:
                other = trie._label_at_leaf[leaf]
                raise ValueError(
                    f"labels {names[other]} (index {other}) and {names[index]} (index {index}) "
                    f"both tokenize to {seq}; constrained decoding cannot tell them apart"
                )
            leaf = trie._add_child(node, end_token_id)
            trie._label_at_leaf[leaf] = index
            trie.max_sequence_length = max(trie.max_sequence_length, len(seq) + 1)
        trie.num_labels = len(seqs)
        return trie

    def _add_child(self, node: int, token: int) -> int:
        child = len(self._children)
        self._children.append({})
        self._children[node][token] = child
        return child

    def _walk(self, prefix: Sequence[int], create: bool = False) -> int:
        node = _ROOT
        for position, token in enumerate(prefix):
            token = int(token)
            child = self._children[node].get(token)
            if child is None:
                if not create:
                    raise ValueError(
                        f"prefix {list(prefix)} leaves the label trie at position {position} "
                        f"(token {token}); it does not start any label"
                    )
                child = self._add_child(node, token)
            node = child
        return node

    def allowed_next(self, prefix: Sequence[int]) -> list[int]:
        """Sorted tokens that keep ``prefix`` on a label path; ``[]`` once a label is complete.

        Raises ValueError if ``prefix`` is not the start of any label sequence.
        """
        return sorted(self._children[self._walk(prefix)])

    def forced_completion(self, prefix: Sequence[int]) -> list[int] | None:
        """The rest of the only label ``prefix`` can still become (its end token included), or
        None while two or more labels remain. Greedy decoding has a single allowed token at
        every step of that rest, so it needs no model call to finish the row."""
        node, rest = self._walk(prefix), []
        while node not in self._label_at_leaf:
            children = self._children[node]
            if len(children) != 1:
                return None
            ((token, node),) = children.items()
            rest.append(token)
        return rest

    def label_index(self, completed_sequence: Sequence[int]) -> int:
        """Label index for a full label sequence that ends with the end token."""
        node = self._walk(completed_sequence)
        if node not in self._label_at_leaf:
            raise ValueError(
                f"sequence {list(completed_sequence)} is not a complete label: it must end with "
                f"end token {self.end_token_id} right after a label's tokens"
            )
        return self._label_at_leaf[node]


def constrained_greedy_step(
    logits: torch.Tensor,
    prefixes: Sequence[Sequence[int]],
    trie: LabelTrie | Sequence[LabelTrie],
) -> torch.Tensor:
    """Greedy next token per row among the tokens ``trie`` allows after that row's prefix.

    ``logits`` is ``[B, V]`` and ``prefixes[b]`` holds the tokens generated so far for row b.
    ``trie`` is one trie for every row (a label set) or one per row (each multiple-choice
    question's own choices); all must share the end token.
    Rows whose prefix is already a complete label get the end token again, so a batched
    loop can keep stepping until every row is done. Returns a ``[B]`` long tensor on the logits'
    device. Equivalent to masking disallowed tokens to -inf and taking the argmax (ties go to the
    lowest token id), except that the result is an allowed token even when every allowed logit
    is -inf or NaN.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    batch_size, vocab_size = logits.shape
    if len(prefixes) != batch_size:
        raise ValueError(f"got {len(prefixes)} prefixes for a batch of {batch_size} logit rows")
    tries = [trie] * batch_size if isinstance(trie, LabelTrie) else list(trie)
    if len(tries) != batch_size:
        raise ValueError(f"got {len(tries)} tries for a batch of {batch_size} logit rows")
    allowed = [t.allowed_next(prefix) or [t.end_token_id] for t, prefix in zip(tries, prefixes)]
    width = max(len(tokens) for tokens in allowed)
    largest = max(max(tokens) for tokens in allowed)
    if largest >= vocab_size:
        raise ValueError(
            f"label token id {largest} is outside the logits' vocabulary of size {vocab_size}"
        )
    # Pad ragged candidate lists with a copy of the row's first candidate: a copy maps back to
    # the same token whichever index wins, so the padding needs no mask of its own.
    candidates = torch.tensor(
        [tokens + [tokens[0]] * (width - len(tokens)) for tokens in allowed],
        dtype=torch.long,
        device=logits.device,
    )
    # Gathering the candidates instead of masking the full row means argmax only ever sees
    # allowed tokens, so an all -inf (or NaN) row still picks a valid one.
    best = logits.gather(1, candidates).argmax(dim=1, keepdim=True)
    return candidates.gather(1, best).squeeze(1)
