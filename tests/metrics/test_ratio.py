"""RATIO: hand-computed radar areas, the normalisation, and the chart file."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
from PIL import Image

from recare.errors import RecareError
from recare.metrics.ratio import RadarNormalisation, compute_ratio, polygon_area, radar_chart, ratio


def test_ratio_hand_radars():
    assert ratio([1, 1, 1, 1]) == pytest.approx(1.0)
    assert ratio([0.5] * 5) == pytest.approx(0.25)
    assert ratio([1, 0, 1, 0]) == pytest.approx(0.0)  # every neighbour pair has a zero
    # (1*0.5 + 0.5*0.5 + 0.5*1) / 3 = 1.25 / 3
    assert ratio([1, 0.5, 0.5]) == pytest.approx(1.25 / 3)
    # order matters: (1*1 + 1*0 + 0*0 + 0*1) / 4 = 0.25 vs (1*0 + 0*1 + 1*0 + 0*1) / 4 = 0
    assert ratio([1, 1, 0, 0]) == pytest.approx(0.25)


def test_polygon_area_is_the_geometric_area():
    assert polygon_area([1, 1, 1, 1]) == pytest.approx(2.0)  # unit square rotated: diagonals 2
    assert polygon_area([1, 1, 1]) == pytest.approx(3 * math.sqrt(3) / 4)  # equilateral, circumradius 1
    # triangle (1, 0.5, 0.5): 1/2 sin(120 deg) * 1.25
    assert polygon_area([1, 0.5, 0.5]) == pytest.approx(0.5 * math.sqrt(3) / 2 * 1.25)


def test_ratio_rejects_bad_radii():
    with pytest.raises(RecareError, match="at least 3 axes"):
        ratio([1, 1])
    with pytest.raises(RecareError, match="radar radius"):
        ratio([1, 1.2, 1])
    with pytest.raises(RecareError, match="radar radius"):
        ratio([1, float("nan"), 1])


def test_normalisation_maps():
    norm = RadarNormalisation()
    assert norm.defence(11.14) == pytest.approx(0.8886)
    assert norm.defence(100) == 0.0 and norm.defence(0) == 1.0
    assert norm.clip(0.26) == pytest.approx(0.5)  # (0.26 - 0.20) / (0.32 - 0.20)
    assert norm.clip(0.40) == 1.0 and norm.clip(0.10) == 0.0  # clipped
    assert norm.fid(20.0) == pytest.approx(0.5)  # (30 - 20) / (30 - 10)
    assert norm.fid(5.0) == 1.0 and norm.fid(45.0) == 0.0
    assert norm.care(0.94) == 0.94
    with pytest.raises(RecareError, match="attack success rate"):
        norm.defence(101)
    with pytest.raises(RecareError, match="FID"):
        norm.fid(-1)
    with pytest.raises(RecareError, match="CARE"):
        norm.care(1.5)
    with pytest.raises(RecareError, match="clip_low < clip_high"):
        RadarNormalisation(clip_low=0.3, clip_high=0.3)
    with pytest.raises(RecareError, match="fid_best < fid_worst"):
        RadarNormalisation(fid_best=30, fid_worst=10)


def test_compute_ratio_paper_row_by_hand():
    # SD v1.4 row of SPEC 6: CCE-ASR 56.82, CLIP 0.3136, FID 14.12, CARE 0.97
    result = compute_ratio({"CCE": 56.82}, clip=0.3136, fid=14.12, care=0.97)
    d, c, f, k = 0.4318, (0.3136 - 0.20) / 0.12, (30 - 14.12) / 20, 0.97  # 0.4318, 0.94667, 0.794, 0.97
    assert list(result.radii) == ["defence:CCE", "CLIP", "FID", "CARE"]
    assert list(result.radii.values()) == pytest.approx([d, c, f, k])
    assert result.ratio == pytest.approx((d * c + c * f + f * k + k * d) / 4)
    assert result.ratio == pytest.approx(0.5874, abs=1e-4)
    out = result.to_dict()
    assert out["normalisation"] == asdict(RadarNormalisation())
    assert out["raw"] == {"defence:CCE": 56.82, "CLIP": 0.3136, "FID": 14.12, "CARE": 0.97}
    # several attacks, no FID; custom bounds are recorded
    norm = RadarNormalisation(clip_low=0.0, clip_high=0.5)
    two = compute_ratio({"CCE": 20.0, "UDA": 60.0}, clip=0.25, care=0.5, normalisation=norm)
    assert list(two.radii.values()) == pytest.approx([0.8, 0.4, 0.5, 0.5])
    assert two.ratio == pytest.approx((0.32 + 0.2 + 0.25 + 0.4) / 4)
    assert two.to_dict()["normalisation"]["clip_high"] == 0.5


def test_radar_chart_png(tmp_path):
    results = {"SD v1.4": {"defence:CCE": 0.43, "CLIP": 0.95, "FID": 0.79, "CARE": 0.97},
               "ReCARE": {"defence:CCE": 0.89, "CLIP": 0.88, "FID": 0.81, "CARE": 0.94}}
    path = radar_chart(results, tmp_path / "plots" / "radar.png", title="nudity")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.size[0] > 300 and img.size[1] > 300
    assert sorted(p.name for p in path.parent.iterdir()) == ["radar.png", "radar.svg"]  # no temporary file left
    assert "<svg" in (path.parent / "radar.svg").read_text() and "ReCARE" in (path.parent / "radar.svg").read_text()
    with pytest.raises(RecareError, match="expected"):
        radar_chart({"a": {"x": 1, "y": 1, "z": 1}, "b": {"x": 1, "z": 1, "y": 1}}, tmp_path / "bad.png")
    with pytest.raises(RecareError, match="no methods"):
        radar_chart({}, tmp_path / "none.png")
    assert not (tmp_path / "bad.png").exists()
