"""Overlay colours, contours and written files of engine.visualize."""

import cv2
import numpy as np
import pytest

from engine.visualize import (
    GROUND_TRUTH_COLOUR,
    PREDICTION_COLOUR,
    _runs,
    heatmap_overlay,
    save_image,
    save_score_timeline,
    side_by_side,
)


def _grey_image() -> np.ndarray:
    return np.full((64, 64, 3), 128, dtype=np.uint8)


def _hot_map() -> np.ndarray:
    """16x16 map, hot in a block that covers image pixels ~[8:24, 8:24] once resized."""
    amap = np.zeros((16, 16), dtype=np.float32)
    amap[2:6, 2:6] = 1.0
    return amap


def _is_colour(pixel: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return tuple(int(c) for c in pixel) == colour


def test_overlay_shape_dtype_and_colours_follow_the_map():
    image = _grey_image()
    out = heatmap_overlay(image, _hot_map())
    assert out.shape == image.shape and out.dtype == np.uint8
    hot, cold = out[16, 16].astype(int), out[56, 8].astype(int)
    assert np.abs(hot - 128).max() > 30  # visibly changed where the map is high
    assert hot[0] > hot[2] + 30  # red end of JET
    assert cold[2] > cold[0] + 30  # blue end of JET
    np.testing.assert_array_equal(image, _grey_image())  # input left untouched


def test_gt_contour_is_green_and_interior_is_not():
    gt = np.zeros((64, 64), dtype=np.uint8)
    gt[40:56, 40:56] = 255
    out = heatmap_overlay(_grey_image(), _hot_map(), gt_mask=gt).astype(int)
    r, g, b = out[40, 40]  # corner of the GT square lies on its contour
    assert g > r + 100 and g > b + 100
    r, g, b = out[48, 48]
    assert not (g > r + 100 and g > b + 100)


def test_low_resolution_gt_is_scaled_to_the_image():
    gt = np.zeros((16, 16), dtype=bool)
    gt[10:14, 10:14] = True  # -> image pixels [40:56, 40:56]
    out = heatmap_overlay(_grey_image(), _hot_map(), gt_mask=gt)
    assert _is_colour(out[40, 40], GROUND_TRUTH_COLOUR)
    assert _is_colour(out[55, 55], GROUND_TRUTH_COLOUR)


def test_threshold_contour_drawn_only_when_threshold_given():
    def yellow_pixels(out):
        return int(np.all(out == PREDICTION_COLOUR, axis=2).sum())

    assert yellow_pixels(heatmap_overlay(_grey_image(), _hot_map())) == 0
    assert yellow_pixels(heatmap_overlay(_grey_image(), _hot_map(), threshold=0.5)) > 20


def test_threshold_keeps_a_normal_frame_from_turning_red():
    # Scores well below the threshold: without it the map maximum would be painted red.
    amap = np.random.default_rng(0).uniform(0.0, 1.0, size=(16, 16)).astype(np.float32)
    peak = np.unravel_index(np.argmax(cv2.resize(amap, (64, 64))), (64, 64))
    stretched = heatmap_overlay(_grey_image(), amap)[peak].astype(int)
    assert stretched[0] > stretched[2]
    calm = heatmap_overlay(_grey_image(), amap, threshold=10.0)[peak].astype(int)
    assert calm[2] > calm[0]


def test_explicit_vmin_vmax_override_the_map_range():
    amap = _hot_map()
    # With vmax far above the map, even the hot block stays at the blue end.
    out = heatmap_overlay(_grey_image(), amap, vmin=0.0, vmax=100.0).astype(int)
    assert out[16, 16][2] > out[16, 16][0]


@pytest.mark.parametrize("shape", [(64, 64), (64, 64, 1)])
def test_greyscale_input_matches_rgb_input(shape):
    grey = np.full(shape, 128, dtype=np.uint8)
    out = heatmap_overlay(grey, _hot_map())
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, heatmap_overlay(_grey_image(), _hot_map()))


def test_non_uint8_image_is_rejected():
    with pytest.raises(ValueError):
        heatmap_overlay(np.zeros((8, 8, 3), dtype=np.float32), np.zeros((8, 8)))


def test_save_image_writes_rgb_in_the_right_channel_order(tmp_path):
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    image[..., 0] = 200  # red
    path = save_image(tmp_path / "nested" / "red.png", image)
    read_bgr = cv2.imread(str(path))
    assert read_bgr is not None and read_bgr.shape == (4, 5, 3)
    assert (read_bgr[..., 2] == 200).all() and (read_bgr[..., 0] == 0).all()


def test_save_image_unknown_suffix_raises(tmp_path):
    with pytest.raises(OSError):
        save_image(tmp_path / "image.unknown", np.zeros((4, 4, 3), dtype=np.uint8))


def test_score_timeline_writes_a_wide_png(tmp_path):
    scores = np.sin(np.linspace(0, 6, 120)) + 1.0
    labels = np.zeros(120, dtype=int)
    labels[30:50] = 1
    labels[100:] = 1
    path = tmp_path / "plots" / "timeline.png"
    save_score_timeline(path, scores, labels=labels, threshold=1.5, title="clip 01")
    image = cv2.imread(str(path))
    assert image is not None
    height, width = image.shape[:2]
    assert width > height
    assert abs(width - 1200) <= 50 and abs(height - 300) <= 50


def test_score_timeline_rejects_mismatched_labels(tmp_path):
    with pytest.raises(ValueError):
        save_score_timeline(tmp_path / "t.png", [0.1, 0.2, 0.3], labels=[0, 1])


def test_runs_finds_contiguous_anomalous_stretches():
    assert _runs(np.array([0, 1, 1, 0, 1])) == [(1, 3), (4, 5)]
    assert _runs(np.array([1, 1, 0])) == [(0, 2)]
    assert _runs(np.zeros(3)) == []


def test_side_by_side_scales_to_common_height_and_adds_captions():
    small = np.zeros((32, 32, 3), dtype=np.uint8)
    large = np.full((64, 48), 255, dtype=np.uint8)
    tiled = side_by_side([small, large], ["frame", "map"])
    assert tiled.dtype == np.uint8
    assert tiled.shape[0] > 64  # caption strip on top
    assert tiled.shape[1] == 64 + 48  # 32x32 panel scaled to 64x64
    assert tiled[-1, -1].tolist() == [255, 255, 255]  # greyscale panel converted to RGB
    assert side_by_side([small, large]).shape == (64, 112, 3)
    with pytest.raises(ValueError):
        side_by_side([small], ["a", "b"])
