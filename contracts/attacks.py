"""The attack registry: one entry per attack, read by the gateway, the jobs, the audits and the
benches. Torch-free, so that the gateway validates a request without loading a kernel.

An entry holds what the rest of the system knows about an attack: its kebab-case id (as in the HTTP
API), its pydantic ``Params`` model (``contracts.specs``), the norms it runs in, its flags, its
budget rule (``check``: what depends on the model and the configured limits, raising
``AttackInvalid(field, message)`` that the gateway answers as a 422), and where the worker finds its
kernel and spec dataclass (``"module:attribute"``, resolved lazily by ``workers.attacks.catalog``,
which turns Params into the spec field by field).

Adding an attack: its kernel file, its Params model (and its member of ``contracts.specs.AttackParams``),
its entry below, and one row of ``tests/unit/test_attack_contract.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel

from contracts.specs import (
    AdvGANParams,
    APGDParams,
    APGDTParams,
    CarliniWagnerL2Params,
    DeepFoolParams,
    FABTParams,
    FGSMParams,
    HopSkipJumpParams,
    JSMAParams,
    MIFGSMParams,
    PGDParams,
    SquareParams,
)

# JSMA in logit space searches feature pairs: quadratic in C x H x W, refused above this.
JSMA_MAX_PAIR_FEATURES = 2**14
# APGD-T's targeted DLR loss needs a third class (``workers.attacks.apgd.DLR_MIN_CLASSES``).
DLR_MIN_CLASSES = 3


class CardLike(Protocol):
    """What a budget rule reads of the model (``models.manifest.ModelCard``)."""

    @property
    def num_classes(self) -> int: ...

    @property
    def input_shape(self) -> tuple[int, ...]: ...


class LimitsLike(Protocol):
    """What a budget rule reads of the configured limits (``service.settings.Settings``)."""

    @property
    def max_steps(self) -> int: ...

    @property
    def max_queries(self) -> int: ...


class AttackInvalid(ValueError):
    """Parameters that the model or the configured limits rule out: ``field`` (``attack.steps``) and
    a message saying what was expected and what was got."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


Check = Callable[[Any, CardLike, LimitsLike], None]
# Params fields that the job reads itself instead of handing them to the kernel.
TARGETS = frozenset({"targets", "target_mode"})


@dataclass(frozen=True)
class AttackEntry:
    """One attack. ``norms``: those it runs in, the default first (an attack with one norm has no
    ``norm`` parameter). Flags: ``black_box`` (scores or labels only: no gradients, no surrogate),
    ``minimal`` (minimal perturbation: no eps, its size is the result), ``targeted`` (accepts
    ``targeted``/``targets``/``target_mode``), ``single_step`` (the audit's probe: it does not
    join the cascade), ``uses_generator`` (runs a trained generator at its card's eps).
    ``min_classes``: the fewest classes a model needs. ``job_fields``: Params fields the job reads
    itself (targets; the generator to load), every other one is a field of the spec dataclass."""

    name: str
    params: type[BaseModel]
    kernel: str
    spec: str
    norms: tuple[str, ...]
    check: Check
    black_box: bool = False
    minimal: bool = False
    targeted: bool = False
    single_step: bool = False
    uses_generator: bool = False
    min_classes: int = 2
    job_fields: frozenset[str] = frozenset()

    def norm(self, params: Any) -> str:
        """The norm ``params`` run in (and a minimal attack's size is measured in)."""
        return str(params.norm) if len(self.norms) > 1 else self.norms[0]


# --- budget rules ------------------------------------------------------------------------------


def _steps(total: int, limits: LimitsLike) -> None:
    if total > limits.max_steps:
        raise AttackInvalid("attack.steps", f"expected steps x restarts (x target classes) <= "
                                            f"{limits.max_steps}, got {total}")


def _queries(max_queries: int, limits: LimitsLike) -> None:
    if max_queries > limits.max_queries:
        raise AttackInvalid("attack.max_queries", f"expected at most {limits.max_queries} queries "
                                                  f"per image, got {max_queries}")


def _target_classes(n_target_classes: int, card: CardLike) -> None:
    if n_target_classes > card.num_classes - 1:
        raise AttackInvalid("attack.n_target_classes", f"expected at most {card.num_classes - 1}, "
                                                       f"got {n_target_classes}")


def _no_rule(params: Any, card: CardLike, limits: LimitsLike) -> None:
    """Nothing beyond the Params' own constraints (and the gateway's eps and targets checks)."""


def _check_pgd(p: PGDParams, card: CardLike, limits: LimitsLike) -> None:
    _steps(p.steps * p.restarts, limits)


def _check_mi_fgsm(p: MIFGSMParams, card: CardLike, limits: LimitsLike) -> None:
    _steps(p.steps, limits)


def _check_apgd_ce(p: APGDParams, card: CardLike, limits: LimitsLike) -> None:
    _steps(p.steps * p.restarts, limits)


def _check_apgd_t(p: APGDTParams, card: CardLike, limits: LimitsLike) -> None:
    _steps(p.steps * p.restarts * p.n_target_classes, limits)
    if card.num_classes < DLR_MIN_CLASSES:
        raise AttackInvalid("attack.name", f"expected a model with at least {DLR_MIN_CLASSES} classes for the "
                                           f"targeted DLR loss, got {card.num_classes}")
    _target_classes(p.n_target_classes, card)


def _check_fab_t(p: FABTParams, card: CardLike, limits: LimitsLike) -> None:
    _steps(p.steps * p.n_target_classes, limits)
    _target_classes(p.n_target_classes, card)


def _check_carlini_wagner(p: CarliniWagnerL2Params, card: CardLike, limits: LimitsLike) -> None:
    total = p.binary_search_steps * p.max_iter
    if total > limits.max_steps:
        raise AttackInvalid("attack.max_iter", f"expected binary_search_steps x max_iter <= "
                                               f"{limits.max_steps}, got {total}")


def _check_square(p: SquareParams, card: CardLike, limits: LimitsLike) -> None:
    _queries(p.max_queries, limits)


def _check_hop_skip_jump(p: HopSkipJumpParams, card: CardLike, limits: LimitsLike) -> None:
    _steps(p.steps, limits)
    _queries(p.max_queries, limits)
    if p.initial_num_evals > p.max_num_evals:
        raise AttackInvalid("attack.initial_num_evals", f"expected at most max_num_evals "
                                                        f"({p.max_num_evals}), got {p.initial_num_evals}")


def _check_jsma(p: JSMAParams, card: CardLike, limits: LimitsLike) -> None:
    size = math.prod(card.input_shape)
    if p.space == "logits" and size > JSMA_MAX_PAIR_FEATURES:
        raise AttackInvalid("attack.space", f"expected space 'probabilities' on inputs of more than "
                                            f"{JSMA_MAX_PAIR_FEATURES} values (the logit-space pair search "
                                            f"is quadratic in them), got {size}")


def _check_deepfool(p: DeepFoolParams, card: CardLike, limits: LimitsLike) -> None:
    if p.max_iter > limits.max_steps:
        raise AttackInvalid("attack.max_iter", f"expected at most {limits.max_steps}, got {p.max_iter}")
    if p.candidates > card.num_classes:
        raise AttackInvalid("attack.candidates", f"expected at most {card.num_classes} (the "
                                                 f"model's classes), got {p.candidates}")


# --- the registry --------------------------------------------------------------------------------

_ENTRIES = (
    AttackEntry("fgsm", FGSMParams, "workers.attacks.fgsm:fgsm", "workers.attacks.fgsm:FGSMSpec",
                ("linf", "l2"), _no_rule, targeted=True, single_step=True, job_fields=TARGETS),
    AttackEntry("pgd", PGDParams, "workers.attacks.pgd:pgd", "workers.attacks.pgd:PGDSpec",
                ("linf", "l2"), _check_pgd, targeted=True, job_fields=TARGETS),
    AttackEntry("deepfool", DeepFoolParams, "workers.attacks.deepfool:deepfool",
                "workers.attacks.deepfool:DeepFoolSpec", ("l2", "linf"), _check_deepfool, minimal=True),
    AttackEntry("mi-fgsm", MIFGSMParams, "workers.attacks.mifgsm:mi_fgsm", "workers.attacks.mifgsm:MIFGSMSpec",
                ("linf", "l2"), _check_mi_fgsm, targeted=True, job_fields=TARGETS),
    AttackEntry("carlini-wagner-l2", CarliniWagnerL2Params, "workers.attacks.cw:carlini_wagner_l2",
                "workers.attacks.cw:CarliniWagnerL2Spec", ("l2",), _check_carlini_wagner, minimal=True,
                targeted=True, job_fields=TARGETS),
    AttackEntry("jsma", JSMAParams, "workers.attacks.jsma:jsma", "workers.attacks.jsma:JSMASpec",
                ("l0",), _check_jsma, minimal=True, targeted=True, job_fields=TARGETS),
    AttackEntry("apgd-ce", APGDParams, "workers.attacks.apgd:apgd", "workers.attacks.apgd:APGDSpec",
                ("linf", "l2"), _check_apgd_ce),
    AttackEntry("apgd-t", APGDTParams, "workers.attacks.apgd:apgd_t", "workers.attacks.apgd:APGDSpec",
                ("linf", "l2"), _check_apgd_t, targeted=True, min_classes=DLR_MIN_CLASSES, job_fields=TARGETS),
    AttackEntry("fab-t", FABTParams, "workers.attacks.fab:fab_t", "workers.attacks.fab:FABSpec",
                ("linf", "l2"), _check_fab_t, targeted=True, job_fields=TARGETS),
    AttackEntry("square", SquareParams, "workers.attacks.square:square", "workers.attacks.square:SquareSpec",
                ("linf", "l2"), _check_square, black_box=True, targeted=True, job_fields=TARGETS),
    AttackEntry("hop-skip-jump", HopSkipJumpParams, "workers.attacks.hop_skip_jump:hop_skip_jump",
                "workers.attacks.hop_skip_jump:HopSkipJumpSpec", ("l2", "linf"), _check_hop_skip_jump,
                black_box=True, minimal=True, targeted=True, job_fields=TARGETS),
    # Its generator, and the eps and targeting of the generator's card, are loaded by the job.
    AttackEntry("advgan", AdvGANParams, "workers.attacks.advgan:advgan",
                "workers.attacks.advgan:AdvGANAttackSpec", ("linf",), _no_rule, uses_generator=True,
                job_fields=frozenset({"generator"})),
)
ATTACKS: dict[str, AttackEntry] = {entry.name: entry for entry in _ENTRIES}


def entry_for(params: Any) -> AttackEntry:
    """The entry of an attack's Params."""
    return ATTACKS[params.name]
