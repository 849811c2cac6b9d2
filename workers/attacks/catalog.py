"""Attack id (kebab-case, as in the HTTP API) -> kernel and its frozen spec dataclass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from workers.attacks.deepfool import DeepFoolSpec, deepfool
from workers.attacks.fgsm import FGSMSpec, fgsm
from workers.attacks.pgd import PGDSpec, pgd

Kernel = Callable[..., Any]

KERNELS: dict[str, tuple[Kernel, type]] = {
    "fgsm": (fgsm, FGSMSpec),
    "pgd": (pgd, PGDSpec),
    "deepfool": (deepfool, DeepFoolSpec),
}
