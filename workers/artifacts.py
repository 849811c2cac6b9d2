"""Job artifacts: the adversarial batch as ``.npy``, a PNG grid, and the per-sample table."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

GRID_COLUMNS = 8
GRID_SCALE = 3  # the largest upscaling factor of the grid's tiles
# Small images are upscaled by a whole factor (at most GRID_SCALE) towards tiles of this side; a
# 3x224x224 grid is big enough (and, 3x upscaled, about 16 megapixels).
GRID_TILE_PX = 96


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _to_uint8(images: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    lo, hi = bounds
    scaled = np.nan_to_num((images - lo) / (hi - lo))
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)


def display_layout(pixels: np.ndarray) -> np.ndarray:
    """8-bit ``(k, C, H, W)`` images as a picture shows them: ``(k, H, W)`` grey for one channel,
    ``(k, H, W, 3)`` RGB for three, and for any other number of channels (no colour model to map
    them to) ``(k, H, C * W)`` grey, the channels side by side."""
    k, channels, height, width = pixels.shape
    if channels == 1:
        return pixels[:, 0]
    if channels == 3:
        return pixels.transpose(0, 2, 3, 1)
    return pixels.transpose(0, 2, 1, 3).reshape(k, height, channels * width)


def grid_png(
    x: np.ndarray, x_adv: np.ndarray, bounds: tuple[float, float], columns: int = GRID_COLUMNS
) -> bytes:
    """Rows: clean, adversarial, perturbation amplified to the full range (grey = unchanged).

    ``x`` and ``x_adv`` are float NCHW in ``bounds``; the first ``columns`` samples are shown. The
    PNG is grey (mode L) for one channel and RGB for three (see ``display_layout`` for others);
    small images are upscaled (nearest neighbour).
    """
    count = min(columns, x.shape[0])
    clean, adv = x[:count], x_adv[:count]
    delta = adv - clean
    peak = (float(np.abs(delta).max()) if delta.size else 0.0) or 1.0
    amplified = 0.5 + 0.5 * delta / peak
    rows = [display_layout(_to_uint8(clean, bounds)), display_layout(_to_uint8(adv, bounds)),
            display_layout(_to_uint8(amplified, (0.0, 1.0)))]
    height, width = rows[0].shape[1:3]
    pad = 2
    canvas = np.full((3 * (height + pad) + pad, count * (width + pad) + pad, *rows[0].shape[3:]), 255,
                     dtype=np.uint8)
    for r, row in enumerate(rows):
        for c in range(count):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            canvas[top : top + height, left : left + width] = row[c]
    image = Image.fromarray(canvas)  # 2-D: mode L; (H, W, 3): RGB
    scale = max(1, min(GRID_SCALE, GRID_TILE_PX // max(height, width)))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def csv_bytes(header: Sequence[str], rows: Sequence[Sequence[object]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()
