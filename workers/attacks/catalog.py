"""Attack id (kebab-case, as in the HTTP API) -> kernel and its frozen spec dataclass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from workers.attacks.advgan import AdvGANAttackSpec, advgan
from workers.attacks.apgd import APGDSpec, apgd, apgd_t
from workers.attacks.cw import CarliniWagnerL2Spec, carlini_wagner_l2
from workers.attacks.deepfool import DeepFoolSpec, deepfool
from workers.attacks.fab import FABSpec, fab_t
from workers.attacks.fgsm import FGSMSpec, fgsm
from workers.attacks.hop_skip_jump import HopSkipJumpSpec, hop_skip_jump
from workers.attacks.jsma import JSMASpec, jsma
from workers.attacks.mifgsm import MIFGSMSpec, mi_fgsm
from workers.attacks.pgd import PGDSpec, pgd
from workers.attacks.square import SquareSpec, square

Kernel = Callable[..., Any]

KERNELS: dict[str, tuple[Kernel, type]] = {
    "fgsm": (fgsm, FGSMSpec),
    "pgd": (pgd, PGDSpec),
    "deepfool": (deepfool, DeepFoolSpec),
    "mi-fgsm": (mi_fgsm, MIFGSMSpec),
    "apgd-ce": (apgd, APGDSpec),
    "apgd-t": (apgd_t, APGDSpec),
    "fab-t": (fab_t, FABSpec),
    "carlini-wagner-l2": (carlini_wagner_l2, CarliniWagnerL2Spec),
    "jsma": (jsma, JSMASpec),
    "square": (square, SquareSpec),
    "hop-skip-jump": (hop_skip_jump, HopSkipJumpSpec),
    "advgan": (advgan, AdvGANAttackSpec),  # its generator, eps and targeting are loaded by the job
}
