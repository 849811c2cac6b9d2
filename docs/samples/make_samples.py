"""Write the sample images that the README's multipart example uploads: the first two images of
the Fashion-MNIST test split (index 0, an ankle boot, class 9; index 1, a pullover, class 2) as
28x28 grayscale PNG files beside this script.

Run from the repository root: ``.venv/bin/python docs/samples/make_samples.py``. It reads the
hosted data set where the service does (Debian's ``dataset-fashion-mnist``, or ``ADVERSA_DATA_DIR``),
so the files are the service's own ``fashion-mnist:test`` samples, byte for byte the same on every run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from models.datasets import load_split  # noqa: E402

SAMPLES = {"ankle-boot.png": (0, 9), "pullover.png": (1, 2)}  # file -> (test index, class)


def main() -> None:
    split = load_split("fashion-mnist:test", os.environ.get("ADVERSA_DATA_DIR"))
    for name, (index, label) in SAMPLES.items():
        if split.labels[index] != label:
            raise SystemExit(f"test image {index}: expected class {label}, got {split.labels[index]}")
        path = Path(__file__).with_name(name)
        Image.fromarray(split.images[index]).save(path, format="PNG", optimize=True)
        print(f"{path}: test image {index}, class {label}")  # noqa: T201


if __name__ == "__main__":
    main()
