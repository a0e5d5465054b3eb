"""The loss figure: axis labels, a smoothed line over the raw steps, the same figure as SVG, and the
panels of an adopted stage 1 marked as reused (recare.train.outputs.plot_losses)."""

import math

from PIL import Image

from recare.train.outputs import plot_losses, smoothing_window


def _rows():
    rows = [("erase", 1, s, 1e-3 * (1 + math.sin(s)) + 1e-4, None, None) for s in range(1, 31)]
    rows += [("stage2", 0, s, 0.02 + 0.01 * math.cos(s), 0.01, 0.01) for s in range(1, 31)]
    return rows


def test_smoothing_window():
    assert [smoothing_window(n) for n in (1, 5, 6, 30, 200, 2000)] == [1, 1, 2, 3, 10, 100]


def test_loss_figure_smoothed_labelled_vector_and_marks_a_reused_stage1(tmp_path):
    plot_losses(tmp_path / "l.png", _rows(), "ReCARE: nudity", svg_path=tmp_path / "l.svg", stage1_from="stereo")
    svg = (tmp_path / "l.svg").read_text()
    assert "step" in svg and "loss (MSE)" in svg and "mean of 3" in svg and "faint: every step" in svg
    assert svg.count("reused from run 'stereo'") == 1  # on the stage-1 panel, not on stage 2
    with Image.open(tmp_path / "l.png") as image:
        assert image.width <= 1900  # two panels: scaled to the page by the report's CSS
    plot_losses(tmp_path / "m.png", _rows(), svg_path=tmp_path / "m.svg")
    assert "reused" not in (tmp_path / "m.svg").read_text()
