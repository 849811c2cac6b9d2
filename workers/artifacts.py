"""Job artifacts: the adversarial batch as ``.npy``, a PNG grid, and the per-sample table."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

GRID_COLUMNS = 8
GRID_SCALE = 3


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _to_uint8(images: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    lo, hi = bounds
    scaled = (images - lo) / (hi - lo)
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)


def grid_png(
    x: np.ndarray, x_adv: np.ndarray, bounds: tuple[float, float], columns: int = GRID_COLUMNS
) -> bytes:
    """Rows: clean, adversarial, perturbation amplified to the full range (grey = unchanged).

    ``x`` and ``x_adv`` are float NCHW; the first ``columns`` samples are shown, each upscaled.
    """
    count = min(columns, x.shape[0])
    clean, adv = x[:count], x_adv[:count]
    delta = adv - clean
    peak = float(np.abs(delta).max()) or 1.0
    amplified = 0.5 + 0.5 * delta / peak
    rows = [_to_uint8(clean, bounds), _to_uint8(adv, bounds), _to_uint8(amplified, (0.0, 1.0))]
    channels, height, width = x.shape[1:]
    pad = 2
    canvas = np.full(
        (3 * (height + pad) + pad, count * (width + pad) + pad, channels), 255, dtype=np.uint8
    )
    for r, row in enumerate(rows):
        for c in range(count):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            canvas[top : top + height, left : left + width] = row[c].transpose(1, 2, 0)
    mode = "L" if channels == 1 else "RGB"
    image = Image.fromarray(canvas[:, :, 0] if channels == 1 else canvas, mode=mode)
    image = image.resize((image.width * GRID_SCALE, image.height * GRID_SCALE), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def csv_bytes(header: Sequence[str], rows: Sequence[Sequence[object]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()
