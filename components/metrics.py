"""Classification metrics in plain Python: accuracy, per-class precision/recall/F1, macro-F1,
confusion matrix, top-k accuracy.

Labels are class indices ``0..num_classes-1``; a prediction may also be ``UNKNOWN`` (-1), the
answer of a generation that names no class. How Unknown counts:

* it is always wrong: it lowers accuracy and the recall of the true class (a false negative);
* it is no class's false positive, so it leaves every class's precision alone;
* it gets its own last column in the confusion matrix (``include_unknown=True``) and its share
  of all predictions is ``unknown_rate``.

Macro-F1 is the unweighted mean of F1 over the true classes, i.e. the classes with at least one
example in ``y_true`` (scikit-learn's ``labels=unique(y_true)``). A class that is never
predicted has precision 0 (0/0 taken as 0, like scikit-learn's ``zero_division=0``), so F1 0.
"""

from __future__ import annotations

from typing import Sequence

UNKNOWN = -1  # predicted index of an answer that names no class


def _check(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> None:
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    for label in y_true:
        if not 0 <= label < num_classes:
            raise ValueError(f"true label {label} outside 0..{num_classes - 1}")
    for label in y_pred:
        if label != UNKNOWN and not 0 <= label < num_classes:
            raise ValueError(f"predicted label {label} outside 0..{num_classes - 1} (or {UNKNOWN} for Unknown)")


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    return _ratio(sum(t == p for t, p in zip(y_true, y_pred)), len(y_true))


def unknown_rate(y_pred: Sequence[int]) -> float:
    return _ratio(sum(p == UNKNOWN for p in y_pred), len(y_pred))


def confusion_matrix(
    y_true: Sequence[int], y_pred: Sequence[int], num_classes: int, include_unknown: bool = False
) -> list[list[int]]:
    """Counts with rows = true class, columns = predicted class (+ a last Unknown column)."""
    _check(y_true, y_pred, num_classes)
    if not include_unknown and UNKNOWN in y_pred:
        raise ValueError("Unknown predictions need include_unknown=True (an extra last column)")
    columns = num_classes + (1 if include_unknown else 0)
    matrix = [[0] * columns for _ in range(num_classes)]
    for true, pred in zip(y_true, y_pred):
        matrix[true][num_classes if pred == UNKNOWN else pred] += 1
    return matrix


def per_class_scores(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> list[dict]:
    """For each class index: precision, recall, f1, support (examples of that class)."""
    _check(y_true, y_pred, num_classes)
    true_pos = [0] * num_classes
    predicted = [0] * num_classes  # times the class was predicted (Unknown is no class's)
    support = [0] * num_classes
    for true, pred in zip(y_true, y_pred):
        support[true] += 1
        if pred != UNKNOWN:
            predicted[pred] += 1
            if pred == true:
                true_pos[true] += 1
    scores = []
    for c in range(num_classes):
        precision = _ratio(true_pos[c], predicted[c])
        recall = _ratio(true_pos[c], support[c])
        f1 = _ratio(2 * precision * recall, precision + recall)
        scores.append({"precision": precision, "recall": recall, "f1": f1, "support": support[c]})
    return scores


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> float:
    """Mean F1 over the classes present in ``y_true`` (see the module docstring)."""
    scores = per_class_scores(y_true, y_pred, num_classes)
    present = [s["f1"] for s in scores if s["support"] > 0]
    return _ratio(sum(present), len(present))


def top_k_accuracy(y_true: Sequence[int], ranked: Sequence[Sequence[int]], k: int) -> float:
    """Share of examples whose true class is among the first ``k`` of its ranking (best first)."""
    if len(y_true) != len(ranked):
        raise ValueError(f"{len(y_true)} true labels but {len(ranked)} rankings")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    return _ratio(sum(t in list(r)[:k] for t, r in zip(y_true, ranked)), len(y_true))
