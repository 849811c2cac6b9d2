"""The worker side of the attack registry (``contracts.attacks``): each entry's kernel and frozen
spec dataclass, resolved from their import paths, and the conversion of an attack's Params into
its spec, field by field."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from contracts.attacks import ATTACKS

Kernel = Callable[..., Any]


def resolve(path: str) -> Any:
    """``"package.module:attribute"`` -> the attribute."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


KERNELS: dict[str, tuple[Kernel, type]] = {
    name: (resolve(entry.kernel), resolve(entry.spec)) for name, entry in ATTACKS.items()
}


def kernel_spec(attack: Any, loaded: Mapping[str, Any] | None = None) -> tuple[Kernel, Any]:
    """The kernel and its spec dataclass for ``attack`` (its pydantic Params). Every parameter but
    the entry's ``job_fields`` is a field of the spec, passed as is: a parameter the spec does not
    know is an error, never dropped. ``loaded``: spec fields the job loaded itself (``advgan``: the
    trained generator and the eps and targeting of its card, see ``workers.jobs.load_attack``); they
    take precedence over the params. The job judges every output itself (``check`` off)."""
    entry = ATTACKS[attack.name]
    kernel, spec_cls = KERNELS[attack.name]
    fields = {f.name for f in dataclasses.fields(spec_cls)}
    values = attack.model_dump(exclude={"name", *entry.job_fields})
    unknown = sorted(values.keys() - fields)
    if unknown:
        raise TypeError(f"{attack.name}: expected parameters that {spec_cls.__name__} has, got {unknown}")
    values.update(loaded or {})
    if "check" in fields:
        values["check"] = False
    return kernel, spec_cls(**values)
