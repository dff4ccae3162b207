"""Pure metric functions over plain Python lists.

Classification metrics come from scikit-learn (a dependency already), so F1 and MCC are the
definitions everyone else reports; the tests pin them to hand computations and to the values of
the hand-written versions they replaced. Generation metrics wrap sacrebleu where a standard
implementation exists (BLEU, chrF) and implement ROUGE-L and SQuAD-style exact match / token F1
directly.

Every function raises ``ValueError`` on empty input or mismatched lengths: a metric of 0.0 on an
empty evaluation set would look like a real (terrible) score in a dashboard.
"""

from __future__ import annotations

import json
import logging
import re
import string
import warnings
from collections import Counter
from collections.abc import Hashable, Sequence
from pathlib import Path

import sacrebleu
from sklearn import metrics as sk_metrics

logger = logging.getLogger(__name__)

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _check_pair(preds: Sequence, golds: Sequence, what: str = "preds/golds") -> None:
    first, second = what.split("/")
    if len(preds) != len(golds):
        raise ValueError(
            f"{first} and {second} must have the same length, got {len(preds)} {first} "
            f"and {len(golds)} {second}"
        )
    if len(preds) == 0:
        raise ValueError(f"cannot compute a metric on empty {first}/{second}: no examples")


# --- classification -------------------------------------------------------------------------


def accuracy(preds: Sequence[Hashable], golds: Sequence[Hashable]) -> float:
    """Fraction of positions where ``preds[i] == golds[i]``."""
    _check_pair(preds, golds)
    return sum(p == g for p, g in zip(preds, golds, strict=True)) / len(golds)


def macro_f1(
    preds: Sequence[Hashable],
    golds: Sequence[Hashable],
    labels: Sequence[Hashable] | None = None,
) -> float:
    """Unweighted mean of per-label F1 (``sklearn.metrics.f1_score(average="macro")``).

    Averages over ``labels`` when given (other values only count as errors against those
    labels), else over the union of gold and predicted labels; a label with no predictions and
    no golds scores 0 (``zero_division=0``).
    """
    _check_pair(preds, golds)
    if labels is not None and len(labels) == 0:
        raise ValueError("labels must be None or a non-empty list of labels to average over")
    return float(
        sk_metrics.f1_score(
            list(golds),
            list(preds),
            labels=None if labels is None else list(labels),
            average="macro",
            zero_division=0,
        )
    )


def binary_f1(preds: Sequence[Hashable], golds: Sequence[Hashable], positive: Hashable) -> float:
    """F1 of the ``positive`` label alone (0.0 when it never appears in preds or golds)."""
    _check_pair(preds, golds)
    return macro_f1(preds, golds, labels=[positive])


def mcc(preds: Sequence[Hashable], golds: Sequence[Hashable]) -> float:
    """Multiclass Matthews correlation coefficient (``sklearn.metrics.matthews_corrcoef``,
    Gorodkin's R_K statistic); 0.0 when either side holds a single class (undefined there)."""
    _check_pair(preds, golds)
    with warnings.catch_warnings():
        # One class on both sides: sklearn warns about its confusion matrix shape, then answers
        # the documented 0.0; the warning would only clutter an evaluation log.
        warnings.filterwarnings("ignore", "A single label was found", UserWarning)
        return float(sk_metrics.matthews_corrcoef(list(golds), list(preds)))


# --- generation ------------------------------------------------------------------------------


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU from sacrebleu (default 13a tokenisation), on sacrebleu's 0-100 scale."""
    _check_pair(hyps, refs, "hyps/refs")
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF from sacrebleu (character 6-grams, beta 2), on sacrebleu's 0-100 scale."""
    _check_pair(hyps, refs, "hyps/refs")
    return float(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    # One rolling row of the dynamic programme: O(len(a) * len(b)) time, O(len(b)) memory.
    row = [0] * (len(b) + 1)
    for token_a in a:
        diagonal = 0
        for j, token_b in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if token_a == token_b else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def _rouge_l_one(hyp: str, ref: str) -> float:
    hyp_tokens, ref_tokens = hyp.lower().split(), ref.lower().split()
    if not hyp_tokens or not ref_tokens:
        # Same convention as SQuAD F1 below: two empty strings agree perfectly.
        return float(hyp_tokens == ref_tokens)
    lcs = _lcs_length(hyp_tokens, ref_tokens)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp_tokens), lcs / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def rouge_l(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Mean over examples of the ROUGE-L F1 (LCS of lowercased whitespace tokens), 0-1."""
    _check_pair(hyps, refs, "hyps/refs")
    return sum(_rouge_l_one(h, r) for h, r in zip(hyps, refs, strict=True)) / len(refs)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 answer normalisation: lowercase, drop punctuation and articles, squash spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction of examples whose normalised hypothesis equals the normalised reference."""
    _check_pair(hyps, refs, "hyps/refs")
    return sum(
        normalize_answer(h) == normalize_answer(r) for h, r in zip(hyps, refs, strict=True)
    ) / len(refs)


def _token_f1_one(hyp: str, ref: str) -> float:
    hyp_tokens, ref_tokens = normalize_answer(hyp).split(), normalize_answer(ref).split()
    if not hyp_tokens or not ref_tokens:
        # SQuAD's rule: an empty answer is right only against an empty reference.
        return float(hyp_tokens == ref_tokens)
    num_same = sum((Counter(hyp_tokens) & Counter(ref_tokens)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(hyp_tokens), num_same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Mean over examples of SQuAD token-overlap F1 on normalised answers, 0-1."""
    _check_pair(hyps, refs, "hyps/refs")
    return sum(_token_f1_one(h, r) for h, r in zip(hyps, refs, strict=True)) / len(refs)


# --- confusion matrix ------------------------------------------------------------------------


def confusion_matrix(
    preds: Sequence[Hashable], golds: Sequence[Hashable], labels: Sequence[Hashable]
) -> list[list[int]]:
    """Counts with rows indexed by gold label and columns by predicted label, in ``labels`` order.

    A value outside ``labels`` raises instead of being dropped, so counts always sum to the
    number of examples; map unparseable generations to an explicit label (e.g. "<invalid>").
    """
    _check_pair(preds, golds)
    index = {label: i for i, label in enumerate(labels)}
    if len(index) != len(labels):
        duplicates = sorted({repr(x) for x in labels if list(labels).count(x) > 1})
        raise ValueError(f"labels must be unique, got duplicates: {', '.join(duplicates)}")
    matrix = [[0] * len(labels) for _ in labels]
    for row, (pred, gold) in enumerate(zip(preds, golds, strict=True)):
        for name, value in (("gold", gold), ("predicted", pred)):
            if value not in index:
                raise ValueError(
                    f"{name} label {value!r} at example {row} is not in labels {list(labels)!r}; "
                    "add it to labels (e.g. an explicit '<invalid>' label for bad generations)"
                )
        matrix[index[gold]][index[pred]] += 1
    return matrix


def _check_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[Hashable]) -> None:
    if len(matrix) != len(labels) or any(len(row) != len(labels) for row in matrix):
        raise ValueError(
            f"confusion matrix must be {len(labels)}x{len(labels)} to match labels, got rows of "
            f"lengths {[len(row) for row in matrix]}"
        )


def top_confused_pairs(
    matrix: Sequence[Sequence[int]], labels: Sequence[Hashable], k: int = 10
) -> list[dict]:
    """The ``k`` largest off-diagonal cells as ``{"gold", "predicted", "count"}`` dicts.

    Sorted by count descending, then gold and predicted label for a stable order; zero cells
    are left out, so fewer than ``k`` pairs may come back.
    """
    _check_matrix(matrix, labels)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    pairs = [
        {"gold": labels[i], "predicted": labels[j], "count": int(count)}
        for i, row in enumerate(matrix)
        for j, count in enumerate(row)
        if i != j and count > 0
    ]
    pairs.sort(key=lambda p: (-p["count"], p["gold"], p["predicted"]))
    return pairs[:k]


def save_confusion_matrix(
    path_json: str | Path,
    matrix: Sequence[Sequence[int]],
    labels: Sequence[Hashable],
    png_path: str | Path | None = None,
) -> Path | None:
    """Write ``{"labels": [...], "matrix": [[...]]}`` to ``path_json``; optionally a heatmap.

    matplotlib is optional: when it is not installed the PNG is skipped with a warning and the
    JSON (the source of truth) is still written. Returns the PNG path when one was written.
    """
    _check_matrix(matrix, labels)
    path_json = Path(path_json)
    path_json.parent.mkdir(parents=True, exist_ok=True)
    payload = {"labels": list(labels), "matrix": [[int(c) for c in row] for row in matrix]}
    path_json.write_text(json.dumps(payload, indent=2) + "\n")
    if png_path is None:
        return None
    try:
        # Figure directly (not pyplot): no global figure state and no GUI backend selection.
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed; skipping confusion matrix PNG %s", png_path)
        return None
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    size = max(4.0, 0.5 * len(labels) + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.add_subplot()
    image = ax.imshow(payload["matrix"], cmap="Blues")
    fig.colorbar(image, ax=ax)
    ticks = range(len(labels))
    ax.set_xticks(ticks, [str(x) for x in labels], rotation=90)
    ax.set_yticks(ticks, [str(x) for x in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    return png_path
