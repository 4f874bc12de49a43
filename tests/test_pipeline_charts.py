"""The pictures in the reports: the loss curve and the confusion heatmap, as inline SVG."""

from __future__ import annotations

import json
import re
import types
import xml.etree.ElementTree as ET

import pytest

from components.files import write_json_atomic
from pipelines import charts, runtime

SVG = "{http://www.w3.org/2000/svg}"


def test_line_chart_draws_every_point_in_order():
    svg = ET.fromstring(charts.line_chart([10, 20, 30], [2.0, 1.0, 0.5], "loss", "loss"))
    (line,) = svg.iter(f"{SVG}polyline")
    points = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
    assert len(points) == 3 and points[0][0] < points[1][0] < points[2][0]
    assert points[0][1] < points[1][1] < points[2][1]  # SVG y grows downwards: loss falls
    with pytest.raises(ValueError, match="as many x as y"):
        charts.line_chart([1, 2], [1.0], "loss", "loss")


def test_heatmap_has_a_cell_per_count_and_shades_by_row_share():
    svg = ET.fromstring(charts.heatmap(["a", "b"], [[3, 1, 0], [0, 4, 0]], "cm",
                                       predicted_names=["a", "b", "Unknown"]))
    rects = list(svg.iter(f"{SVG}rect"))
    assert len(rects) == 6
    shade = [int(re.match(r"rgb\((\d+)", r.get("fill")).group(1)) for r in rects]
    assert shade[4] < shade[0] < shade[1] < shade[2]  # 4/4 darker than 3/4, than 1/4, than 0
    with pytest.raises(ValueError, match="2 x 2"):
        charts.heatmap(["a", "b"], [[1, 2, 3]], "cm")


def test_training_curve_artifacts_come_from_the_logged_steps(tmp_path):
    adapter = tmp_path / "adapter"
    log = [{"step": s, "loss": 3.0 / s, "lr": 1e-3 * (1 - s / 40)} for s in (10, 20, 30, 40)]
    write_json_atomic(adapter / "train_metrics.json", {"log": log})
    curve = types.SimpleNamespace(path=str(tmp_path / "curve.html"))
    series = types.SimpleNamespace(path=str(tmp_path / "series.json"))
    runtime.publish_training_curve(str(adapter), curve, series)
    assert json.loads((tmp_path / "series.json").read_text()) == {
        "step": [10, 20, 30, 40], "loss": [e["loss"] for e in log],
        "learning_rate": [e["lr"] for e in log]}
    page = (tmp_path / "curve.html").read_text()
    assert page.count("<polyline") == 2 and "learning rate" in page and "4 logged steps" in page
