"""The accept/hold-back rule (components.gate.decide) at each of its boundaries, no KFP."""

from __future__ import annotations

import pytest

from components.gate import Thresholds, decide

T = Thresholds(margin=0.02, min_accuracy=0.2, export_tolerance=0.03)


def failed(**kwargs) -> list[str]:
    return decide(thresholds=T, **kwargs)["failed"]


def test_an_adapter_that_learned_nothing_fails_even_with_margin_zero():
    # generate mode: the untuned base answers Unknown everywhere (0.000); so does a failed adapter
    assert failed(baseline=0.0, tuned=0.0) == ["beats_baseline", "min_accuracy"]
    zero = Thresholds(margin=0.0, min_accuracy=0.0)
    assert decide(0.0, 0.0, zero)["failed"] == ["beats_baseline"]  # strict: equal never passes
    assert decide(0.0, 0.01, zero)["passed"]
    # a negative margin is an explicit opt-out (wiring smoke tests): equal or slightly worse passes
    smoke = Thresholds(margin=-0.1, min_accuracy=0.0)
    assert decide(0.5, 0.5, smoke)["passed"] and decide(0.5, 0.4, smoke)["passed"]
    assert not decide(0.5, 0.3999, smoke)["passed"]


@pytest.mark.parametrize("tuned, passes", [(0.52, True), (0.5199, False), (0.53, True)])
def test_margin_boundary(tuned, passes):
    assert ("beats_baseline" not in failed(baseline=0.5, tuned=tuned)) is passes


@pytest.mark.parametrize("tuned, passes", [(0.2, True), (0.1999, False)])
def test_min_accuracy_boundary(tuned, passes):
    assert ("min_accuracy" not in failed(baseline=0.0, tuned=tuned)) is passes


@pytest.mark.parametrize("merged, passes", [(0.90, True), (0.87, True), (0.8699, False),
                                            (0.93, True), (0.9301, False)])
def test_export_must_match_the_tuned_accuracy_within_the_tolerance(merged, passes):
    assert ("export_matches_tuned" not in failed(baseline=0.1, tuned=0.9, merged=merged)) is passes


def test_after_the_merge_the_export_is_the_challenger():
    # the export as served must itself beat the base and the floor, not only the tuned adapter
    assert failed(baseline=0.5, tuned=0.53, merged=0.51) == ["beats_baseline"]
    decision = decide(0.1, 0.9, T, merged=0.9)
    assert decision["passed"] and decision["merged_accuracy"] == 0.9
    assert [c["check"] for c in decision["checks"]] == ["beats_baseline", "min_accuracy",
                                                        "export_matches_tuned"]


@pytest.mark.parametrize("bad", [dict(margin=-1.01), dict(min_accuracy=1.5),
                                 dict(export_tolerance=-1.0)])
def test_thresholds_outside_an_accuracy_range_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Thresholds(**bad)
