"""Metric functions against scikit-learn / sacrebleu references and hand-computed values."""

import json
import math
import random
import sys

import pytest
import sacrebleu
from sklearn import metrics as sk

from multitune.evaluation.metrics import (
    accuracy,
    binary_f1,
    bleu,
    chrf,
    confusion_matrix,
    exact_match,
    macro_f1,
    mcc,
    normalize_answer,
    rouge_l,
    save_confusion_matrix,
    token_f1,
    top_confused_pairs,
)

# (preds, golds) pairs covering the cases where hand-written metrics usually go wrong.
CLASSIFICATION_CASES = {
    # "d" is a gold label that is never predicted; "a" is over-predicted.
    "multiclass_never_predicted": (
        ["a", "c", "c", "a", "a", "c", "a", "b", "b", "a"],
        ["a", "b", "c", "a", "b", "c", "d", "a", "b", "d"],
    ),
    # "z" is predicted but never gold.
    "multiclass_predicted_only": (
        ["x", "y", "z", "x", "z", "y"],
        ["x", "y", "y", "x", "x", "y"],
    ),
    "binary": ([1, 0, 1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0, 1, 1]),
    "perfect": (["p", "q", "r", "q"], ["p", "q", "r", "q"]),
    "all_wrong": ([1, 0, 1, 0, 1], [0, 1, 0, 1, 0]),
    "single_class_perfect": (["only"] * 4, ["only"] * 4),
    "constant_prediction": (["a"] * 5, ["a", "b", "a", "c", "b"]),
}


def _random_case(seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    golds = [rng.randrange(5) for _ in range(60)]
    # Mostly right, so the scores are away from 0 and the comparison is meaningful.
    preds = [g if rng.random() < 0.6 else rng.randrange(6) for g in golds]
    return preds, golds


CASES = list(CLASSIFICATION_CASES.items()) + [
    (f"random_{seed}", _random_case(seed)) for seed in range(5)
]


# sklearn warns about its own confusion matrix shape on the single-class case; not our concern.
@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")
@pytest.mark.parametrize(("preds", "golds"), [c for _, c in CASES], ids=[n for n, _ in CASES])
def test_classification_metrics_match_sklearn(preds, golds):
    assert accuracy(preds, golds) == pytest.approx(sk.accuracy_score(golds, preds), abs=1e-12)
    assert macro_f1(preds, golds) == pytest.approx(
        sk.f1_score(golds, preds, average="macro", zero_division=0), abs=1e-12
    )
    assert mcc(preds, golds) == pytest.approx(sk.matthews_corrcoef(golds, preds), abs=1e-12)
    for positive in sorted(set(golds) | set(preds)):
        assert binary_f1(preds, golds, positive) == pytest.approx(
            sk.f1_score(golds, preds, labels=[positive], average="macro", zero_division=0),
            abs=1e-12,
        )


# (macro F1, MCC) of every case from the hand-written versions these replaced (integer counts,
# one sqrt): the switch to scikit-learn changed no score.
HAND_WRITTEN_VALUES = {
    "multiclass_never_predicted": (0.42500000000000004, 0.3395596923305582),
    "multiclass_predicted_only": (0.5333333333333333, 0.5773502691896257),
    "binary": (0.6190476190476191, 0.2581988897471611),
    "perfect": (1.0, 1.0),
    "all_wrong": (0.0, -1.0),
    "single_class_perfect": (1.0, 0.0),
    "constant_prediction": (0.19047619047619047, 0.0),
    "random_0": (0.5122689977762441, 0.4976772472728214),
    "random_1": (0.5295135988118443, 0.5459770983668395),
    "random_2": (0.4918768970493108, 0.5045504417852782),
    "random_3": (0.49179894179894185, 0.48074048072371656),
    "random_4": (0.5722411852846635, 0.6233229556900212),
}


@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")
@pytest.mark.parametrize(("name", "case"), CASES, ids=[n for n, _ in CASES])
def test_classification_metrics_equal_the_hand_written_versions(name, case):
    expected_f1, expected_mcc = HAND_WRITTEN_VALUES[name]
    assert macro_f1(*case) == pytest.approx(expected_f1, abs=1e-12)
    assert mcc(*case) == pytest.approx(expected_mcc, abs=1e-12)


def test_macro_f1_over_given_labels_matches_sklearn():
    preds, golds = CLASSIFICATION_CASES["multiclass_never_predicted"]
    # "e" appears nowhere (scores 0 under zero_division=0); "c" is left out of the average.
    labels = ["a", "b", "d", "e"]
    expected = sk.f1_score(golds, preds, labels=labels, average="macro", zero_division=0)
    assert macro_f1(preds, golds, labels=labels) == pytest.approx(expected, abs=1e-12)
    assert macro_f1(preds, golds, labels=labels) != pytest.approx(macro_f1(preds, golds))


def test_classification_metrics_hand_computed_values():
    # Per-label F1 on the never-predicted case: a = 2*2/(5+3), b = 2*1/(2+3), c = 2*2/(3+2), d = 0.
    preds, golds = CLASSIFICATION_CASES["multiclass_never_predicted"]
    assert accuracy(preds, golds) == pytest.approx(0.5)
    assert macro_f1(preds, golds) == pytest.approx((0.5 + 0.4 + 0.8 + 0.0) / 4)
    # sklearn's docstring example.
    assert mcc([1, -1, 1, 1], [1, 1, 1, -1]) == pytest.approx(-1 / 3)
    assert mcc(*CLASSIFICATION_CASES["all_wrong"]) == pytest.approx(-1.0)
    assert mcc(*CLASSIFICATION_CASES["perfect"]) == pytest.approx(1.0)
    # Undefined correlation (a single class on one side) is reported as 0, like sklearn.
    assert mcc(*CLASSIFICATION_CASES["single_class_perfect"]) == 0.0
    assert binary_f1(*CLASSIFICATION_CASES["all_wrong"], positive=1) == 0.0
    assert binary_f1(["a", "b"], ["a", "b"], positive="never_seen") == 0.0


BLEU_HYP, BLEU_REF = "the cat sat on the mat", "the cat sat on a mat"


def test_bleu_hand_computed_and_matches_sacrebleu():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths so no brevity penalty.
    assert bleu([BLEU_HYP], [BLEU_REF]) == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-9)
    hyps = [BLEU_HYP, "a quick brown dog jumps", "hello there"]
    refs = [BLEU_REF, "the quick brown fox jumps over", "hello there general kenobi"]
    expected = sacrebleu.corpus_bleu(hyps, [refs]).score
    assert bleu(hyps, refs) == pytest.approx(expected, abs=1e-9)
    # Corpus statistics are pooled, so this is not the mean of sentence scores.
    sentence_mean = (
        sum(sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(hyps, refs, strict=True)) / 3
    )
    assert bleu(hyps, refs) != pytest.approx(sentence_mean)
    assert bleu(refs, refs) == pytest.approx(100.0)


def test_chrf_matches_sacrebleu():
    hyps = [BLEU_HYP, "a quick brown dog jumps"]
    refs = [BLEU_REF, "the quick brown fox jumps over"]
    assert chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
    assert chrf(refs, refs) == pytest.approx(100.0)
    assert chrf(["xyz"], ["abc"]) == 0.0


def test_rouge_l_hand_computed():
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides.
    assert rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # Lowercased; LCS "b d": P = 2/4, R = 2/3, F = 4/7.
    assert rouge_l(["A B C D"], ["b d e"]) == pytest.approx(4 / 7)
    # Order matters (subsequence, not bag of words): LCS 1 of 3.
    assert rouge_l(["a b c"], ["c b a"]) == pytest.approx(1 / 3)
    assert rouge_l(["x y"], ["z"]) == 0.0
    assert rouge_l(["", "a"], ["", ""]) == pytest.approx(0.5)
    assert rouge_l(
        ["the cat sat on the mat", "A B C D"], ["the cat is on the mat", "b d e"]
    ) == pytest.approx((5 / 6 + 4 / 7) / 2)


def test_normalize_answer_squad_rules():
    assert normalize_answer("  The Eiffel   Tower! ") == "eiffel tower"
    # Articles go only as whole words: "theater" and "anthem" survive.
    assert normalize_answer("The theater, an anthem; a-ok.") == "theater anthem aok"


def test_exact_match_and_token_f1_hand_computed():
    hyps = ["The Eiffel Tower!", "in 1889", "an apple a day", "cat cat dog", "nothing"]
    refs = ["eiffel tower", "1889", "the apple", "cat dog dog", "something"]
    assert exact_match(hyps, refs) == pytest.approx(1 / 5)
    # Per example: 1; P 1/2 R 1 -> 2/3; "apple day" vs "apple" -> 2/3; overlap 2 of 3 each -> 2/3; 0.
    assert token_f1(hyps, refs) == pytest.approx((1 + 2 / 3 + 2 / 3 + 2 / 3 + 0) / 5)
    # An answer that normalises to nothing is right only against an empty reference.
    assert token_f1(["the", "a"], ["", "x"]) == pytest.approx(0.5)
    assert exact_match(["The."], [""]) == 1.0


ALL_METRICS = [accuracy, macro_f1, mcc, bleu, chrf, rouge_l, exact_match, token_f1]


@pytest.mark.parametrize("metric", ALL_METRICS, ids=lambda f: f.__name__)
def test_metrics_reject_empty_input(metric):
    with pytest.raises(ValueError, match="empty"):
        metric([], [])


@pytest.mark.parametrize("metric", ALL_METRICS, ids=lambda f: f.__name__)
def test_metrics_reject_length_mismatch(metric):
    with pytest.raises(ValueError, match=r"same length, got 2 \w+ and 3"):
        metric(["a", "b"], ["a", "b", "c"])


def test_binary_f1_and_confusion_matrix_reject_bad_input():
    with pytest.raises(ValueError, match="empty"):
        binary_f1([], [], positive=1)
    with pytest.raises(ValueError, match="same length"):
        confusion_matrix([1], [1, 0], labels=[0, 1])
    with pytest.raises(ValueError, match="non-empty list of labels"):
        macro_f1([1], [1], labels=[])


def test_confusion_matrix_matches_sklearn():
    preds, golds = CLASSIFICATION_CASES["multiclass_never_predicted"]
    labels = ["d", "a", "b", "c"]
    expected = sk.confusion_matrix(golds, preds, labels=labels).tolist()
    assert confusion_matrix(preds, golds, labels) == expected
    assert expected[0] == [0, 2, 0, 0]  # rows are gold: both "d" examples predicted "a"


def test_confusion_matrix_rejects_unknown_and_duplicate_labels():
    with pytest.raises(ValueError, match=r"predicted label 'oops' at example 1 is not in labels"):
        confusion_matrix(["a", "oops"], ["a", "b"], ["a", "b"])
    with pytest.raises(ValueError, match=r"gold label 'c' at example 0"):
        confusion_matrix(["a"], ["c"], ["a", "b"])
    with pytest.raises(ValueError, match=r"duplicates: 'a'"):
        confusion_matrix(["a"], ["a"], ["a", "b", "a"])


def test_top_confused_pairs_sorted_by_count_then_names():
    labels = ["a", "b", "c"]
    matrix = [
        [9, 2, 5],
        [2, 7, 0],
        [1, 5, 3],
    ]
    pairs = top_confused_pairs(matrix, labels, k=4)
    assert pairs == [
        {"gold": "a", "predicted": "c", "count": 5},
        {"gold": "c", "predicted": "b", "count": 5},
        {"gold": "a", "predicted": "b", "count": 2},
        {"gold": "b", "predicted": "a", "count": 2},
    ]
    # Zero cells and the diagonal never appear, so k larger than the pairs returns them all.
    assert len(top_confused_pairs(matrix, labels, k=100)) == 5
    with pytest.raises(ValueError, match="must be 3x3"):
        top_confused_pairs([[1, 2], [3, 4]], labels)


def test_save_confusion_matrix_writes_json_and_skips_png_without_matplotlib(
    tmp_path, monkeypatch, caplog
):
    # A None entry in sys.modules makes the import raise ImportError, even where it is installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    matrix, labels = [[3, 1], [0, 4]], ["neg", "pos"]
    png = tmp_path / "cm.png"
    written = save_confusion_matrix(tmp_path / "out" / "cm.json", matrix, labels, png_path=png)
    assert written is None
    assert not png.exists()
    assert "matplotlib is not installed" in caplog.text
    saved = json.loads((tmp_path / "out" / "cm.json").read_text())
    assert saved == {"labels": ["neg", "pos"], "matrix": [[3, 1], [0, 4]]}


def test_save_confusion_matrix_writes_png_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "cm.png"
    written = save_confusion_matrix(tmp_path / "cm.json", [[3, 1], [0, 4]], ["n", "p"], png)
    assert written == png
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mcc_is_bounded_on_many_random_cases():
    # A cheap property check across many shapes that the sklearn comparisons above do not cover.
    for seed in range(50):
        preds, golds = _random_case(100 + seed)
        value = mcc(preds, golds)
        assert -1.0 <= value <= 1.0 and not math.isnan(value)
        assert value == pytest.approx(sk.matthews_corrcoef(golds, preds), abs=1e-12)
