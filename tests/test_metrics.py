"""Metrics against values computed by hand (the working is in the comments)."""

from __future__ import annotations

import pytest

from components import metrics
from components.metrics import UNKNOWN as U

# Example A: 3 classes, two Unknown answers.
#   index:  0  1  2  3  4  5  6  7
A_TRUE = [0, 0, 0, 1, 1, 2, 2, 2]
A_PRED = [0, 0, 1, 1, U, 2, 0, U]
# Right at 0, 1, 3, 5 -> accuracy 4/8. Unknown at 4 and 7 -> unknown rate 2/8.
# class 0: predicted at 0, 1, 6 (3 times), right twice -> P 2/3; 3 examples, 2 found -> R 2/3; F1 2/3
# class 1: predicted at 2, 3, right once -> P 1/2; 2 examples, 1 found -> R 1/2; F1 1/2
# class 2: predicted at 5 only, right -> P 1; 3 examples, 1 found -> R 1/3;
#          F1 = 2 * 1 * (1/3) / (1 + 1/3) = (2/3) / (4/3) = 1/2
# macro-F1 = (2/3 + 1/2 + 1/2) / 3 = 5/9
A_CONFUSION = [
    # pred: 0  1  2  Unknown
    [2, 1, 0, 0],  # true 0: 0, 0, 1
    [0, 1, 0, 1],  # true 1: 1, Unknown
    [1, 0, 1, 1],  # true 2: 2, 0, Unknown
]


def test_example_a_accuracy_and_unknown_rate():
    assert metrics.accuracy(A_TRUE, A_PRED) == pytest.approx(0.5)
    assert metrics.unknown_rate(A_PRED) == pytest.approx(0.25)


def test_example_a_per_class():
    scores = metrics.per_class_scores(A_TRUE, A_PRED, 3)
    expected = [(2 / 3, 2 / 3, 2 / 3, 3), (1 / 2, 1 / 2, 1 / 2, 2), (1.0, 1 / 3, 1 / 2, 3)]
    for got, (precision, recall, f1, support) in zip(scores, expected):
        assert got["precision"] == pytest.approx(precision)
        assert got["recall"] == pytest.approx(recall)
        assert got["f1"] == pytest.approx(f1)
        assert got["support"] == support


def test_example_a_macro_f1_and_confusion():
    assert metrics.macro_f1(A_TRUE, A_PRED, 3) == pytest.approx(5 / 9)
    assert metrics.confusion_matrix(A_TRUE, A_PRED, 3, include_unknown=True) == A_CONFUSION


# Example B: 4 classes; everything predicted as class 1; class 3 has no example at all.
B_TRUE = [0, 1, 1, 2]
B_PRED = [1, 1, 1, 1]
# class 0: never predicted -> P 0/0 taken as 0; R 0/1 = 0; F1 0
# class 1: predicted 4 times, right twice -> P 1/2; R 2/2 = 1; F1 = 2 * 0.5 * 1 / 1.5 = 2/3
# class 2: never predicted -> P 0, R 0/1 = 0, F1 0
# class 3: no example, never predicted -> all 0, support 0, and left out of macro-F1
# macro-F1 over the true classes {0, 1, 2} = (0 + 2/3 + 0) / 3 = 2/9 (with class 3 it would be 1/6)


def test_never_predicted_class_has_precision_zero_and_absent_class_is_not_averaged():
    scores = metrics.per_class_scores(B_TRUE, B_PRED, 4)
    assert [s["precision"] for s in scores] == pytest.approx([0.0, 0.5, 0.0, 0.0])
    assert [s["recall"] for s in scores] == pytest.approx([0.0, 1.0, 0.0, 0.0])
    assert [s["f1"] for s in scores] == pytest.approx([0.0, 2 / 3, 0.0, 0.0])
    assert [s["support"] for s in scores] == [1, 2, 1, 0]
    assert metrics.macro_f1(B_TRUE, B_PRED, 4) == pytest.approx(2 / 9)
    assert metrics.accuracy(B_TRUE, B_PRED) == pytest.approx(0.5)
    assert metrics.confusion_matrix(B_TRUE, B_PRED, 4) == [
        [0, 1, 0, 0],
        [0, 2, 0, 0],
        [0, 1, 0, 0],
        [0, 0, 0, 0],
    ]


def test_all_unknown_gives_zero_scores_without_crashing():
    # Every answer Unknown: no class is ever predicted, so every P is 0/0 -> 0 and every R 0.
    scores = metrics.per_class_scores([0, 1], [U, U], 2)
    assert all(s["precision"] == s["recall"] == s["f1"] == 0.0 for s in scores)
    assert metrics.macro_f1([0, 1], [U, U], 2) == 0.0
    assert metrics.unknown_rate([U, U]) == 1.0
    assert metrics.confusion_matrix([0, 1], [U, U], 2, include_unknown=True) == [[0, 0, 1], [0, 0, 1]]


def test_top_k_accuracy():
    # True 2 ranked first; true 0 ranked third; true 1 ranked second.
    y_true = [2, 0, 1]
    ranked = [[2, 0, 1], [1, 2, 0], [0, 1, 2]]
    assert metrics.top_k_accuracy(y_true, ranked, 1) == pytest.approx(1 / 3)
    assert metrics.top_k_accuracy(y_true, ranked, 2) == pytest.approx(2 / 3)
    assert metrics.top_k_accuracy(y_true, ranked, 3) == pytest.approx(1.0)
    # k beyond the number of classes is the same as all of them
    assert metrics.top_k_accuracy(y_true, ranked, 5) == pytest.approx(1.0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="2 true labels but 1"):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="true label 3 outside 0..2"):
        metrics.per_class_scores([3], [0], 3)
    with pytest.raises(ValueError, match="predicted label 5"):
        metrics.confusion_matrix([0], [5], 3)
    with pytest.raises(ValueError, match="include_unknown"):
        metrics.confusion_matrix([0], [U], 3)
    with pytest.raises(ValueError, match="k must be positive"):
        metrics.top_k_accuracy([0], [[0]], 0)
