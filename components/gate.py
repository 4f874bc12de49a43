"""The pipeline's accept/hold-back rule as pure functions of accuracies (no KFP, no torch).

Two gates use it. Before the merge: the tuned adapter (as trained) must beat the untuned base by
``margin`` and reach ``min_accuracy``. After the merge: the export (as served: unquantised, in its
saved dtype) must score within ``export_tolerance`` of the tuned adapter, and beat the base and
the current champion (re-evaluated on the same held-out shards in the same run) by ``margin``.
"Beat by the margin" is strict: the difference must be > 0 and >= margin, so a run whose adapter
learned nothing (0.000 against a 0.000 base, as in generate mode) never passes. Only a negative
margin, set on purpose (smoke tests of the wiring), accepts a difference of 0 or down to it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Defaults of the pipeline parameters (pipelines/pipeline.py reads them from here).
DEFAULT_MARGIN = 0.02  # two points of accuracy: 3 of 160 demo examples, 74 of Oxford Pet's 3669
# Above chance for up to 5 classes (Oxford Pet: 1/37): a floor that an adapter which learned
# nothing cannot reach however weak the baseline.
DEFAULT_MIN_ACCURACY = 0.2
# nf4 (how the adapter was trained and evaluated) and the bf16 export differ in rounding only;
# a larger gap means the export is not the model that was evaluated.
DEFAULT_EXPORT_TOLERANCE = 0.03
_EPS = 1e-12  # a difference equal to a threshold up to float rounding counts as reaching it


@dataclasses.dataclass(frozen=True)
class Thresholds:
    margin: float = DEFAULT_MARGIN
    min_accuracy: float = DEFAULT_MIN_ACCURACY
    export_tolerance: float = DEFAULT_EXPORT_TOLERANCE

    def __post_init__(self) -> None:
        if not -1.0 <= self.margin <= 1.0:
            raise ValueError(f"margin {self.margin}: an accuracy difference, must lie in [-1, 1]")
        for name in ("min_accuracy", "export_tolerance"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} {value}: an accuracy (difference), must lie in [0, 1]")


def _beats(name: str, challenger: float, other: float, margin: float) -> dict[str, Any]:
    delta = challenger - other
    strict = margin >= 0
    passed = delta + _EPS >= margin and (delta > 0 or not strict)
    need = f"> 0 and >= {margin:+.4f}" if strict else f">= {margin:+.4f}"
    return {"check": name, "passed": passed, "delta": delta,
            "detail": f"{challenger:.4f} - {other:.4f} = {delta:+.4f}, needs {need}"}


def decide(baseline: float, tuned: float, thresholds: Thresholds, merged: float | None = None,
           champion: float | None = None) -> dict[str, Any]:
    """Every check with its numbers, and ``passed`` only if all hold.

    Without ``merged`` this is the pre-merge gate (tuned vs base and floor). With it, the merged
    export is the challenger: it must match the tuned adapter and beat the base, the floor and,
    when there is one, the champion. ``champion`` None means no champion is registered.
    """
    challenger = tuned if merged is None else merged
    checks = [_beats("beats_baseline", challenger, baseline, thresholds.margin),
              {"check": "min_accuracy", "passed": challenger + _EPS >= thresholds.min_accuracy,
               "detail": f"{challenger:.4f} >= {thresholds.min_accuracy:.4f}"}]
    if merged is not None:
        gap = abs(merged - tuned)
        checks.append({"check": "export_matches_tuned",
                       "passed": gap <= thresholds.export_tolerance + _EPS,
                       "detail": f"|{merged:.4f} - {tuned:.4f}| = {gap:.4f} <= "
                                 f"{thresholds.export_tolerance:.4f}"})
        if champion is not None:
            checks.append(_beats("beats_champion", merged, champion, thresholds.margin))
    failed = [c["check"] for c in checks if not c["passed"]]
    return {"passed": not failed, "failed": failed, "checks": checks,
            "accuracy_delta": challenger - baseline,
            "baseline_accuracy": baseline, "tuned_accuracy": tuned,
            "merged_accuracy": merged, "champion_accuracy": champion,
            **dataclasses.asdict(thresholds)}
