"""Model and generator cards: what the registries know about a model or a trained AdvGAN
generator, readable without torch.

The gateway validates inputs against a card (shape, bounds, classes) before anything is queued,
so this module must stay free of torch imports.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Generic, Literal, Self, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from models.registry_store import StoreRegistry

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def check_name(value: str) -> str:
    """A registry name: lowercase kebab-case, at most 63 characters."""
    if not NAME_RE.match(value):
        raise ValueError(f"expected a lowercase kebab-case name of at most 63 characters, got {value!r}")
    return value


RegistryName = Annotated[str, AfterValidator(check_name)]
HOSTED_DIR = Path(__file__).resolve().parent / "hosted"
CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.safetensors"
ONNX_FILE = "model.onnx"
ONNX_ARCHITECTURE = "onnx"
DETECTOR_FILE = "detector.json"
GENERATOR_FILE = "generator.safetensors"
DISCRIMINATOR_FILE = "discriminator.safetensors"
COMPOSITE_ARCHITECTURES = ("preprocessing", "ensemble")


class Lineage(BaseModel):
    """Where a model came from: enough to retrain it."""

    model_config = ConfigDict(extra="forbid")

    base_model: str | None = None
    recipe: str
    data: str
    seed: int
    parameters: dict[str, Any] = Field(default_factory=dict)
    created: str


class Composition(BaseModel):
    """A model built from other registry models instead of weights of its own.

    ``preprocessing``: ``steps`` (input transformations, in order) in front of ``base``.
    ``ensemble``: ``members`` combined by ``combine``. ``differentiable`` is false when some step
    has no usable gradient (bit depth, JPEG, a vote): attacks on it need BPDA or no gradients.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["preprocessing", "ensemble"]
    base: str | None = None
    steps: tuple[dict[str, Any], ...] = ()
    members: tuple[str, ...] = ()
    combine: Literal["mean-probabilities", "majority-vote"] | None = None
    differentiable: bool = True
    randomized: bool = False

    @model_validator(mode="after")
    def _parts(self) -> Composition:
        if self.kind == "preprocessing" and (self.base is None or not self.steps):
            raise ValueError("expected a base model and at least one step for preprocessing")
        if self.kind == "ensemble" and (len(self.members) < 2 or self.combine is None):
            raise ValueError("expected at least two members and a combine rule for an ensemble")
        return self

    @property
    def parts(self) -> tuple[str, ...]:
        """The registry references this model is made of."""
        return (self.base,) if self.base is not None else self.members


class RegistryCard(BaseModel):
    """What every card in a registry has: a kebab-case name, a version, and an owner (``team``;
    null for hosted entries, which every team sees)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: RegistryName
    version: int = Field(ge=1)
    team: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def visible_to(self, team: str) -> bool:
        return self.team is None or self.team == team

    def stored_files(self) -> dict[str, str]:
        """The files of this version besides the card: file name -> sha256."""
        return {}

    @classmethod
    def read(cls, path: Path) -> Self:
        return cls.model_validate(json.loads(path.read_text()))

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n")


class RobustnessEvaluation(BaseModel):
    """How a card's ``robust_accuracy@<norm>:<eps>`` figures were measured: the attacks in cascade
    order (each on the samples the previous left standing; a figure names an evaluation that
    includes ``apgd-t``, a loss that a saturated softmax cannot flatten), their budget, and the
    images (the first ``images`` of ``data`` from ``offset``). ``robust`` holds the count behind
    each figure (``norm:eps`` -> samples that survived)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attacks: tuple[str, ...] = Field(min_length=1)
    norm: Literal["linf", "l2"] = "linf"
    eps: tuple[float, ...] = Field(min_length=1)
    steps: int = Field(ge=1)
    restarts: int = Field(default=1, ge=1)
    n_target_classes: int = Field(ge=1)
    data: str
    offset: int = Field(default=0, ge=0)
    images: int = Field(ge=1)
    seed: int
    robust: dict[str, int] = Field(default_factory=dict)
    bpda: bool = False
    torch: str | None = None
    seconds: float | None = None


class Throughput(BaseModel):
    """Images per second measured on one device at one batch size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str
    batch_size: int = Field(ge=1)
    forward: float = Field(ge=0, description="images/s, forward only")
    forward_backward: float = Field(ge=0, description="images/s, forward and input gradient")


class Registration(BaseModel):
    """What the service measured and recorded when a team uploaded this version (null for hosted
    models and for models made by defense jobs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["safetensors", "onnx"]
    files: dict[str, str] = Field(description="file name -> sha256")
    bytes: int = Field(ge=0, description="total size of the uploaded files")
    parameters: int = Field(ge=0)
    opset: int | None = Field(default=None, description="ONNX opset of the uploaded graph")
    throughput: list[Throughput] = Field(default_factory=list)
    checks: dict[str, str] = Field(default_factory=dict, description="check -> what was measured")
    created: str
    job: str | None = Field(default=None, description="the registration job")


class ModelCard(RegistryCard):
    """A model card (manifest) of one version of one registered model.

    ``architecture`` is a catalog name (``models.architectures``) for safetensors weights, ``onnx``
    for an uploaded ONNX graph (``model.onnx``, converted with onnx2torch; ``sha256`` is the
    graph's), or the composition kind. ``files`` lists every further file of the version with its
    sha256 (a defense trained from an ONNX model keeps the graph and adds ``weights.safetensors``).
    ``gradients`` is false when the registration probe found zero input gradients: audits then
    use black-box attacks and say so.
    """

    architecture: str
    input_shape: tuple[int, int, int]
    bounds: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$",
                               description="of the weights file; null for compositions")
    composition: Composition | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    robustness: RobustnessEvaluation | None = Field(
        default=None, description="the evaluation behind the robust_accuracy figures of metrics")
    lineage: Lineage
    description: str = ""
    files: dict[str, str] = Field(default_factory=dict, description="further files -> sha256")
    gradients: bool = Field(default=True, description="false: the input gradient is zero or unusable")
    batch_size: dict[str, int] = Field(default_factory=dict,
                                       description="device type -> chunk size chosen at registration")
    static_batch: int | None = Field(default=None, ge=1, description="an ONNX graph exported with a "
                                     "fixed batch size: inputs are padded or split to it")
    registration: Registration | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        channels = self.input_shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"expected mean and std with {channels} entries, one per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("expected strictly positive std")
        if not self.bounds[0] < self.bounds[1]:
            raise ValueError(f"expected bounds lo < hi, got {self.bounds}")
        if len(self.classes) < 2:
            raise ValueError("expected at least two classes")
        if (self.composition is None) == (self.sha256 is None):
            raise ValueError("expected weights (sha256) or a composition, exactly one of them")
        if self.composition is not None and self.architecture != self.composition.kind:
            raise ValueError(f"expected architecture {self.composition.kind!r} for a composition")
        return self

    @property
    def differentiable(self) -> bool:
        return self.gradients and (self.composition is None or self.composition.differentiable)

    @property
    def weights_file(self) -> str:
        """The file ``sha256`` is the digest of."""
        return ONNX_FILE if self.architecture == ONNX_ARCHITECTURE else WEIGHTS_FILE

    def stored_files(self) -> dict[str, str]:
        return {**self.files, **({self.weights_file: self.sha256} if self.sha256 is not None else {})}

    @property
    def num_classes(self) -> int:
        return len(self.classes)


_SHA256 = r"^[0-9a-f]{64}$"


class GeneratorCard(RegistryCard):
    """A trained AdvGAN generator (Xiao et al. 2018), one version of one name in the generator
    registry (``<var>/generators/<name>/<version>/``: this card, ``generator.safetensors`` and
    ``discriminator.safetensors``, each checked against its sha256 before it is parsed).

    The generator maps inputs of ``input_shape`` in ``bounds`` to a perturbation inside the Linf
    ``eps`` ball (by construction). It was trained against ``target_model`` (``mode``: through its
    gradients, or only from its scores with a distilled surrogate), towards ``target_class`` when
    ``targeted``. ``metrics``: success rate and perturbation norms measured on held-out data at the
    end of training (and, black-box, the target queries spent); ``lineage``: how to retrain it.
    """

    kind: Literal["advgan"] = "advgan"
    target_model: str = Field(description="name@version of the model it was trained against")
    input_shape: tuple[int, int, int]
    bounds: tuple[float, float] = (0.0, 1.0)
    classes: tuple[str, ...]
    eps: float = Field(gt=0, description="Linf bound of the perturbation, input units")
    targeted: bool = False
    target_class: int | None = Field(default=None, ge=0)
    mode: Literal["semi-white-box", "black-box"]
    generator_sha256: str = Field(pattern=_SHA256)
    discriminator_sha256: str = Field(pattern=_SHA256)
    metrics: dict[str, float] = Field(default_factory=dict)
    lineage: Lineage
    description: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> GeneratorCard:
        low, high = self.bounds
        if not low < high:
            raise ValueError(f"expected bounds lo < hi, got {self.bounds}")
        if self.eps > high - low:
            raise ValueError(f"expected eps <= {high - low:g} (the bounds' range), got {self.eps:g}")
        if len(self.classes) < 2:
            raise ValueError("expected at least two classes")
        if self.targeted != (self.target_class is not None):
            raise ValueError("expected a target_class exactly when targeted")
        if self.target_class is not None and self.target_class >= len(self.classes):
            raise ValueError(f"expected target_class < {len(self.classes)}, got {self.target_class}")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def files(self) -> dict[str, str]:
        """File name -> the sha256 it must have."""
        return {GENERATOR_FILE: self.generator_sha256, DISCRIMINATOR_FILE: self.discriminator_sha256}

    def stored_files(self) -> dict[str, str]:
        return self.files

    def fits(self, card: ModelCard) -> str | None:
        """Why this generator cannot attack ``card`` (None when it can): inputs and classes must match."""
        for what in ("input_shape", "bounds", "classes"):
            if getattr(self, what) != getattr(card, what):
                return (f"expected a model with the {what} of the generator's target {self.target_model} "
                        f"({getattr(self, what)}), got {getattr(card, what)} for {card.ref}")
        return None


class DetectorCard(BaseModel):
    """A calibrated detector, stored with the model it guards (``detector.json`` next to the card,
    or ``detectors/<team>.json`` for a team's own calibration of a model it does not own).

    Feature squeezing (Xu et al. 2018): the score of an input is the largest L1 distance between the
    model's softmax on it and on each squeezed version; an input is rejected when its score is
    above ``threshold``, chosen on clean data for the false-positive rate ``fpr``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["feature-squeezing"] = "feature-squeezing"
    model: str = Field(description="name@version of the guarded model")
    team: str | None = None
    squeezers: tuple[tuple[dict[str, Any], ...], ...]
    threshold: float
    fpr: float = Field(gt=0, lt=1, description="requested false-positive rate")
    metrics: dict[str, float] = Field(default_factory=dict)
    lineage: Lineage

    @classmethod
    def read(cls, path: Path) -> DetectorCard:
        return cls.model_validate(json.loads(path.read_text()))

    def write(self, path: Path) -> None:
        """Through a temporary file and a rename: a reader never sees half a detector."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        tmp.replace(path)


def team_file(team: str) -> str:
    """A file name for a team's detector (team names come from configuration)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", team)
    return f"{safe}.json" if safe == team and not team.startswith(".") else (
        f"team-{hashlib.sha256(team.encode()).hexdigest()[:16]}.json"
    )


def parse_ref(ref: str) -> tuple[str, int | None]:
    """Split ``name`` or ``name@version`` into its parts; ``None`` means the latest version."""
    name, sep, version = ref.partition("@")
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise ValueError(f"expected name@<positive integer>, got {ref!r}")
    return name, int(version)


CardT = TypeVar("CardT", bound=RegistryCard)


class VersionedIndex(Generic[CardT]):
    """Finds cards under one or more roots laid out as ``<root>/<name>/<version>/card.json``
    (the first root that has a version wins). Only directories named by a number and holding a
    card count: staging directories, trash and tombstones of deleted versions are invisible.

    With a ``mirror`` (``models.registry_store.StoreRegistry``, the registry in the S3 store), the
    root that is the mirror's cache lists what the store holds, and its cards and files are
    fetched into that directory on first use. New versions go to the writable root: the mirror's,
    else the last one.

    Torch-free: the gateway uses it to list entries and validate requests; the workers use it to
    find the weights next to the card.
    """

    card_type: type[CardT]

    def __init__(self, roots: list[Path], mirror: StoreRegistry | None = None) -> None:
        self.roots = roots
        self.mirror = mirror

    def _mirrored(self, root: Path) -> bool:
        return self.mirror is not None and root == self.mirror.cache

    @property
    def writable(self) -> Path:
        """The root new versions are published under."""
        return self.mirror.cache if self.mirror is not None else self.roots[-1]

    def _listed(self, root: Path, name: str) -> list[int]:
        if self.mirror is not None and self._mirrored(root):
            return self.mirror.versions(name)
        base = root / name
        if not base.is_dir():
            return []
        return [int(child.name) for child in base.iterdir()
                if child.name.isdigit() and (child / CARD_FILE).is_file()]

    def _versions(self, name: str) -> dict[int, Path]:
        found: dict[int, Path] = {}
        if not NAME_RE.match(name):
            return found
        for root in self.roots:
            if found and self._mirrored(root):  # a hosted name (no team may publish under it): no
                break  # store request, so hosted models answer while the store is down
            for version in self._listed(root, name):
                found.setdefault(version, root / name / str(version))
        return found

    def names(self) -> list[str]:
        names: set[str] = set()
        for root in self.roots:
            if self.mirror is not None and self._mirrored(root):
                names.update(self.mirror.names())
            elif root.is_dir():
                names.update(p.name for p in root.iterdir() if p.is_dir() and self._listed(root, p.name))
        return sorted(names)

    def versions(self, name: str) -> list[int]:
        return sorted(self._versions(name))

    def _card_file(self, name: str, version: int | None) -> Path | None:
        versions = self._versions(name)
        if not versions:
            return None
        chosen = max(versions) if version is None else version
        directory = versions.get(chosen)
        if directory is None:
            return None
        if self.mirror is not None and self._mirrored(directory.parent.parent):
            return self.mirror.card_file(name, chosen)
        return directory / CARD_FILE

    def directory(self, name: str, version: int | None = None) -> Path | None:
        """The local directory of ``name`` (latest) or ``name@version`` with its card and files;
        a mirrored version's files are fetched (and checked) first."""
        path = self._card_file(name, version)
        if path is None:
            return None
        directory = path.parent
        if self.mirror is not None and self._mirrored(directory.parent.parent):
            card = self.card_type.read(path)
            return self.mirror.fetch(card.name, card.version, card.stored_files())
        return directory

    def card(self, ref: str) -> CardT | None:
        """The card for ``name`` or ``name@version``, or None when there is none."""
        try:
            name, version = parse_ref(ref)
        except ValueError:
            return None
        path = self._card_file(name, version)
        if path is None:
            return None
        try:
            return self.card_type.read(path)
        except FileNotFoundError:  # deleted between the listing and the read
            return None

    def entries(self) -> Iterator[tuple[CardT, int]]:
        """Every version in the writable root, with the bytes of its files (quotas)."""
        if self.mirror is not None:
            for (name, version), size in sorted(self.mirror.sizes().items()):
                path = self.mirror.card_file(name, version)
                if path is not None:
                    yield self.card_type.read(path), size
            return
        root = self.writable
        if not root.is_dir():
            return
        for base in sorted(root.iterdir()):
            if not base.is_dir() or not NAME_RE.match(base.name):
                continue
            for version in sorted(self._listed(root, base.name)):
                directory = base / str(version)
                try:
                    card = self.card_type.read(directory / CARD_FILE)
                    size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
                except (OSError, ValueError):  # deleted while we walked, or unreadable
                    continue
                yield card, size

    def _taken(self, name: str, root: Path) -> set[int]:
        """Version numbers of ``name`` used under the roots other than ``root``."""
        from models.publish import used_versions

        taken: set[int] = set()
        for other in self.roots:
            if other == root:
                continue
            if self.mirror is not None and self._mirrored(other):
                taken |= self.mirror.claimed(name)
            else:
                taken |= used_versions(other / name)
        return taken

    def publish(self, card: CardT, files: Mapping[str, bytes], root: Path | None = None) -> CardT:
        """Add ``card`` and ``files`` (file name -> bytes) as the next free version of its name
        under ``root`` (default: the writable root; the mirror's goes to the store); returns the
        card with its version. Raises ``models.publish.PublishError`` when it cannot be written."""
        from models.publish import PublishError, publish_files

        root = self.writable if root is None else root
        taken = self._taken(card.name, root)
        if self.mirror is not None and self._mirrored(root):
            from models.registry_store import RegistryPublishError

            try:
                return self.mirror.publish(card, files, taken)
            except RegistryPublishError as exc:
                raise PublishError(str(exc)) from exc
        return publish_files(root, card, files, taken)

    def unpublish(self, name: str, version: int) -> bool:
        """Delete ``name@version`` from the writable root (its number is never reused); False when
        it is not there."""
        from models.publish import unpublish

        if self.mirror is not None:
            return self.mirror.unpublish(name, version)
        return unpublish(self.writable, name, version)


class CardIndex(VersionedIndex[ModelCard]):
    """The model registry: hosted models first, then registered ones."""

    card_type = ModelCard

    @classmethod
    def default(cls, extra_roots: list[Path] | None = None) -> CardIndex:
        """The hosted models first, then registered ones (``extra_roots``)."""
        return cls([HOSTED_DIR, *(extra_roots or [])])

    def detector_paths(self, card: ModelCard, team: str | None) -> list[Path]:
        """Where a detector for ``card`` may be on disk, the team's own first."""
        return [root / card.name / str(card.version) / relative
                for relative in self._detector_files(team) for root in self.roots]

    @staticmethod
    def _detector_files(team: str | None) -> list[str]:
        """Detector files of a version, relative to its directory, the team's own first."""
        return ([f"detectors/{team_file(team)}"] if team is not None else []) + [DETECTOR_FILE]

    def detector(self, card: ModelCard, team: str | None) -> DetectorCard | None:
        """The detector that guards ``card`` for ``team``: its own calibration, else the model's
        (the store's, when the registry is mirrored, before any on disk)."""
        for relative in self._detector_files(team):
            if self.mirror is not None:
                data = self.mirror.read_extra(card.name, card.version, relative)
                if data is not None:
                    return DetectorCard.model_validate_json(data)
            for root in self.roots:
                path = root / card.name / str(card.version) / relative
                if not self._mirrored(root) and path.is_file():
                    return DetectorCard.read(path)
        return None

    def write_detector(self, card: ModelCard, detector: DetectorCard, root: Path | None = None) -> None:
        """Store ``detector`` for ``card`` (a team's own calibration when it has a team) under
        ``root`` (default: the writable root; the mirror's goes to the store)."""
        relative = self._detector_files(detector.team)[0]
        root = self.writable if root is None else root
        if self.mirror is not None and self._mirrored(root):
            self.mirror.write_extra(card.name, card.version, relative,
                                    (detector.model_dump_json(indent=2) + "\n").encode())
            return
        detector.write(root / card.name / str(card.version) / relative)


class GeneratorIndex(VersionedIndex[GeneratorCard]):
    """The generator registry (``<var>/generators``)."""

    card_type = GeneratorCard


class Normalization(BaseModel):
    """Per-channel ``(x - mean) / std`` the model expects, in input units (folded into the model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: tuple[float, ...]
    std: tuple[float, ...]


class ModelUpload(BaseModel):
    """The ``card`` a team sends with ``POST /v1/models``; the service fills in everything else
    (sha256 of each file, parameter count, size, format, opset, throughput, team, version)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: RegistryName = Field(description="lowercase kebab-case; a new version if you already have this name")
    input_shape: tuple[int, int, int] = Field(description="(C, H, W) of one input")
    classes: tuple[str, ...] = Field(min_length=2, max_length=100_000,
                                     description="class names, in logit order")
    bounds: tuple[float, float] = Field(default=(0.0, 1.0), description="range of input values")
    normalization: Normalization | None = Field(
        default=None, description="mean and std per channel, in input units; default none")
    architecture: str | None = Field(default=None, description="catalog architecture (safetensors only)")
    description: str = Field(default="", max_length=4000)

    @model_validator(mode="after")
    def _consistent(self) -> ModelUpload:
        channels = self.input_shape[0]
        if any(d < 1 for d in self.input_shape):
            raise ValueError(f"input_shape: expected positive (C, H, W), got {list(self.input_shape)}")
        if not self.bounds[0] < self.bounds[1]:
            raise ValueError(f"bounds: expected lo < hi, got {list(self.bounds)}")
        if any(not c.strip() for c in self.classes) or len(set(self.classes)) != len(self.classes):
            raise ValueError("classes: expected distinct, non-empty names")
        if self.normalization is not None:
            norm = self.normalization
            if len(norm.mean) != channels or len(norm.std) != channels:
                raise ValueError(f"normalization: expected mean and std with {channels} entries (one per "
                                 f"channel), got {len(norm.mean)} and {len(norm.std)}")
            if any(not s > 0 for s in norm.std):
                raise ValueError("normalization.std: expected strictly positive values")
        return self

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        channels = self.input_shape[0]
        if self.normalization is None:
            return (0.0,) * channels, (1.0,) * channels
        return self.normalization.mean, self.normalization.std


class RegistrationJob(BaseModel):
    """Payload of a registration job (gateway -> worker): the upload, staged in the blob store
    under ``uploads/<job_id>/``, to validate, measure and publish."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    team: str
    upload: ModelUpload
    format: Literal["safetensors", "onnx"]
    file: str = Field(description="blob key of the staged file")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)
    parameters: int = Field(ge=0)
    opset: int | None = None
    static_batch: int | None = Field(default=None, ge=1)
