"""Pictures for humans: heat-map overlays, score timelines and tiled report panels.

All images are RGB uint8 in and out; OpenCV's BGR order stays inside this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import ArrayLike

# RGB colours. Yellow for the prediction stands out on the JET palette; green is the
# usual convention for ground truth.
PREDICTION_COLOUR = (255, 230, 0)
GROUND_TRUTH_COLOUR = (0, 255, 0)
_CAPTION_HEIGHT = 24


def heatmap_overlay(
    image_rgb: np.ndarray,
    anomaly_map: np.ndarray,
    *,
    threshold: float | None = None,
    gt_mask: np.ndarray | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.45,
) -> np.ndarray:
    """Blend a JET-coloured anomaly map over an image, with optional contours.

    Parameters
    ----------
    image_rgb : np.ndarray
        uint8, (H, W, 3) RGB, (H, W, 4) RGBA, or greyscale (H, W) / (H, W, 1).
    anomaly_map : np.ndarray
        (h, w) float map; resized bilinearly to (H, W).
    threshold : float, optional
        Decision threshold: ``map > threshold`` is outlined in yellow. When ``vmax``
        is not given, the colour scale reaches at least ``1.5 * threshold`` so a
        normal frame stays blue instead of being stretched to red (scores are
        assumed non-negative, as SPADE's kNN distances are).
    gt_mask : np.ndarray, optional
        Ground truth at any resolution; ``> 0`` is outlined in green.
    vmin, vmax : float, optional
        Colour-scale limits; default to the map's min and max.
    alpha : float
        Weight of the heat map in the blend.

    Returns
    -------
    np.ndarray
        uint8 (H, W, 3) RGB.
    """
    image = _to_rgb(image_rgb)
    height, width = image.shape[:2]
    amap = resize_map(anomaly_map, height, width)

    low = float(amap.min()) if vmin is None else float(vmin)
    if vmax is not None:
        high = float(vmax)
    else:
        high = float(amap.max())
        if threshold is not None:
            high = max(high, 1.5 * float(threshold))
    if high > low:
        scaled = np.clip((amap - low) / (high - low), 0.0, 1.0)
    else:
        scaled = np.zeros_like(amap)

    heat_bgr = cv2.applyColorMap(np.round(scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat_bgr, cv2.COLOR_BGR2RGB)
    overlay = cv2.addWeighted(heat, alpha, image, 1.0 - alpha, 0.0)

    thickness = 1 if min(height, width) < 256 else 2
    if threshold is not None:
        _draw_outline(overlay, amap > threshold, PREDICTION_COLOUR, thickness)
    if gt_mask is not None:
        gt = np.asarray(gt_mask)
        if gt.ndim == 3 and gt.shape[2] == 1:
            gt = gt[:, :, 0]
        gt = (gt > 0).astype(np.uint8)
        if gt.shape != (height, width):
            gt = cv2.resize(gt, (width, height), interpolation=cv2.INTER_NEAREST)
        # Drawn last so the ground truth stays visible where the outlines meet.
        _draw_outline(overlay, gt > 0, GROUND_TRUTH_COLOUR, thickness)
    return overlay


def save_image(path: str | Path, image_rgb: np.ndarray) -> Path:
    """Write an RGB (or greyscale) uint8 image; the format follows the suffix (.png, .jpg).

    Parent folders are created. Raises ``OSError`` if OpenCV cannot write the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.asarray(image_rgb)
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    try:
        written = cv2.imwrite(str(path), image)
    except cv2.error as exc:  # OpenCV raises on an unknown suffix, returns False on I/O failure
        raise OSError(f"could not write image {path}: {exc.msg.strip() or exc}") from exc
    if not written:
        raise OSError(f"could not write image {path}: check the suffix (.png, .jpg) and permissions")
    return path


def save_score_timeline(
    path: str | Path,
    scores: ArrayLike,
    *,
    labels: ArrayLike | None = None,
    threshold: float | None = None,
    title: str = "",
    shade_label: str = "anomalous (ground truth)",
) -> None:
    """Plot per-frame anomaly scores to a ~1200x300 px PNG; frames with labels == 1 are shaded.

    Parameters
    ----------
    path : str or Path
        Output file; parent folders are created.
    scores : array-like of float
        One score per frame.
    labels : array-like of {0, 1}, optional
        Ground truth per frame; anomalous runs are shaded light red.
    threshold : float, optional
        Drawn as a dashed horizontal line.
    title : str
        Figure title.
    """
    # Imported here so `import engine` does not pay for matplotlib. Figure + the Agg
    # canvas avoid pyplot's global backend, which would clash with a caller's GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    frames = np.arange(values.size)

    fig = Figure(figsize=(12, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if labels is not None:
        flags = np.asarray(labels).reshape(-1)
        if flags.size != values.size:
            raise ValueError(f"labels has {flags.size} frames but scores has {values.size}")
        for i, (start, stop) in enumerate(_runs(flags > 0)):
            ax.axvspan(start - 0.5, stop - 0.5, color="tab:red", alpha=0.15, linewidth=0,
                       label=shade_label if i == 0 else None)
    ax.plot(frames, values, color="tab:blue", linewidth=1.0, label="score")
    if threshold is not None:
        ax.axhline(threshold, color="black", linestyle="--", linewidth=1.0, label="threshold")
    ax.set_xlabel("frame")
    ax.set_ylabel("anomaly score")
    if values.size:
        ax.set_xlim(-0.5, values.size - 0.5)
    if title:
        ax.set_title(title)
    if labels is not None or threshold is not None:
        ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")


def side_by_side(images: Sequence[np.ndarray], labels: Sequence[str] | None = None) -> np.ndarray:
    """Tile images horizontally at a common height, with an optional caption strip on top.

    Parameters
    ----------
    images : sequence of np.ndarray
        uint8 RGB or greyscale panels; each is scaled to the tallest panel's height,
        keeping its aspect ratio.
    labels : sequence of str, optional
        One caption per panel.

    Returns
    -------
    np.ndarray
        uint8 (H [+ caption], sum of widths, 3) RGB.
    """
    if not images:
        raise ValueError("side_by_side needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images")
    panels = [_to_rgb(image) for image in images]
    height = max(panel.shape[0] for panel in panels)
    resized = []
    for panel in panels:
        if panel.shape[0] != height:
            width = max(1, round(panel.shape[1] * height / panel.shape[0]))
            panel = cv2.resize(panel, (width, height), interpolation=cv2.INTER_LINEAR)
        resized.append(panel)

    if labels is not None:
        captioned = []
        for panel, text in zip(resized, labels):
            strip = np.zeros((_CAPTION_HEIGHT, panel.shape[1], 3), dtype=np.uint8)
            cv2.putText(strip, str(text), (4, _CAPTION_HEIGHT - 8), cv2.FONT_HERSHEY_SIMPLEX,
                        0.5, (255, 255, 255), 1, cv2.LINE_AA)
            captioned.append(np.vstack([strip, panel]))
        resized = captioned
    return np.hstack(resized)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as contiguous uint8 (H, W, 3) RGB."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return np.ascontiguousarray(image[:, :, :3])
    if image.ndim == 3 and image.shape[2] == 3:
        return np.ascontiguousarray(image)
    raise ValueError(f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got {image.shape}")


def resize_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """An (h, w) map, or (1, h, w) / (h, w, 1), as float32 at (height, width), bilinear."""
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.ndim == 3 and amap.shape[0] == 1:
        amap = amap[0]
    elif amap.ndim == 3 and amap.shape[2] == 1:
        amap = amap[:, :, 0]
    if amap.ndim != 2:
        raise ValueError(f"expected an (h, w) anomaly map, got shape {amap.shape}")
    if amap.shape != (height, width):
        amap = cv2.resize(amap, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32, copy=False)
    return amap


def _draw_outline(canvas: np.ndarray, region: np.ndarray, colour: tuple[int, int, int],
                  thickness: int) -> None:
    # RETR_LIST keeps hole boundaries too, so a ring-shaped region is drawn as a ring.
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(canvas, contours, -1, colour, thickness)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """Half-open [start, stop) index ranges where ``flags`` is True."""
    padded = np.concatenate([[False], np.asarray(flags, dtype=bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))
