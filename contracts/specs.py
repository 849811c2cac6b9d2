"""Job specs and results shared by the gateway, the workers and the client: pydantic, torch-free.

The HTTP request bodies (``AttackRequest``, ``InferRequest``) and the job payloads the gateway puts
on the queue (``AttackJob``, ``PredictJob``) are defined here once; the worker validates the payload
again (the queue is a trust boundary too) and converts it to kernel dataclasses in ``workers/jobs.py``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

MAX_STEPS = 10_000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"


# --- attack parameters (discriminated on ``name``) -------------------------------------------


class Targeting(Strict):
    targeted: bool = Field(default=False, description="reach a chosen class instead of any wrong one")
    targets: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, description="one target class per input (targeted only)"
    )
    target_mode: Literal["random", "least-likely"] | None = Field(
        default=None, description="how to choose targets when none are given (targeted only)"
    )

    @model_validator(mode="after")
    def _targets(self) -> Targeting:
        if self.targeted and (self.targets is None) == (self.target_mode is None):
            raise ValueError("targeted attacks expect exactly one of targets or target_mode")
        if not self.targeted and (self.targets is not None or self.target_mode is not None):
            raise ValueError("targets and target_mode expect targeted=true")
        return self


class FGSMParams(Targeting):
    """Fast Gradient Sign Method (Goodfellow et al. 2015): one step of size ``eps``."""

    name: Literal["fgsm"]
    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(gt=0, description="perturbation budget in input units of `norm`")


class PGDParams(Targeting):
    """Projected gradient descent (Madry et al. 2018) with random start, restarts, early stop."""

    name: Literal["pgd"]
    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(gt=0, description="perturbation budget in input units of `norm`")
    steps: int = Field(default=20, ge=1, le=MAX_STEPS)
    step_size: float | None = Field(
        default=None, gt=0, description="input units; default 2.5 * eps / steps"
    )
    random_start: bool = True
    restarts: int = Field(default=1, ge=1, le=100)
    early_stop: bool = Field(default=True, description="keep the first successful iterate")


class DeepFoolParams(Strict):
    """DeepFool (Moosavi-Dezfooli et al. 2016): minimal perturbation, untargeted."""

    name: Literal["deepfool"]
    norm: Literal["l2", "linf"] = "l2"
    overshoot: float = Field(default=0.02, ge=0, le=1)
    max_iter: int = Field(default=50, ge=1, le=MAX_STEPS)
    candidates: int = Field(default=10, ge=2, description="classes considered, the true one included")
    refine_candidates: int | None = Field(
        default=1, ge=1, description="after the first iteration, follow only this many nearest "
                                     "boundaries (null: all candidates every iteration)")
    first_step_scale: float = Field(
        default=0.6, gt=0, le=1, description="fraction of the first linearised step taken (made "
                                             "farthest from the boundary, so damped by default)")
    step_scale: float = Field(
        default=1.0, gt=0, le=1, description="fraction of every later linearised step taken: below "
                                             "1, smaller perturbations for more iterations")


class MIFGSMParams(Targeting):
    """Momentum iterative FGSM (Dong et al. 2018)."""

    name: Literal["mi-fgsm"]
    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(gt=0, description="perturbation budget in input units of `norm`")
    steps: int = Field(default=10, ge=1, le=MAX_STEPS)
    step_size: float | None = Field(default=None, gt=0, description="input units; default eps / steps")
    decay: float = Field(default=1.0, ge=0, le=10, description="momentum decay factor mu")
    random_start: bool = False
    early_stop: bool = True


class CarliniWagnerL2Params(Targeting):
    """Carlini & Wagner L2 (2017) with a batched binary search over the constant c."""

    name: Literal["carlini-wagner-l2"]
    binary_search_steps: int = Field(default=9, ge=1, le=30)
    max_iter: int = Field(default=100, ge=1, le=MAX_STEPS, description="optimizer steps per search step")
    learning_rate: float = Field(default=0.01, gt=0, le=10)
    initial_const: float = Field(default=0.01, gt=0, le=1e6)
    confidence: float = Field(default=0.0, ge=0, le=1e4, description="margin kappa on the logits")
    abort_early: bool = Field(default=True, description="per sample: stop a search step whose loss "
                                                        "no longer falls (the authors' rule)")
    abort_hopeless: bool = Field(default=True, description="with abort_early: also stop a search step "
                                                           "whose margin trend cannot reach the goal")
    warm_start: bool = Field(default=True, description="start each search step from the best "
                                                       "adversarial example so far, or, while there is "
                                                       "none, from where the last search step stopped")


class JSMAParams(Targeting):
    """Jacobian-based saliency map attack (Papernot et al. 2016), L0."""

    name: Literal["jsma"]
    theta: float = Field(default=1.0, ge=-1, le=1, description="change per chosen feature, "
                                                               "as a fraction of the bounds' range")
    gamma: float = Field(default=0.1, gt=0, le=1, description="largest fraction of features changed")
    space: Literal["probabilities", "logits"] = "probabilities"

    @model_validator(mode="after")
    def _theta(self) -> JSMAParams:
        if self.theta == 0:
            raise ValueError("theta: expected a non-zero change per feature")
        return self


class APGDParams(Strict):
    """APGD with the cross-entropy loss (Croce & Hein 2020), untargeted."""

    name: Literal["apgd-ce"]
    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(gt=0, description="perturbation budget in input units of `norm`")
    steps: int = Field(default=100, ge=1, le=MAX_STEPS)
    restarts: int = Field(default=1, ge=1, le=100)
    rho: float = Field(default=0.75, gt=0, lt=1, description="step-size halving condition")
    early_stop: bool = True


class APGDTParams(Targeting):
    """APGD with the targeted DLR loss over the top wrong classes (Croce & Hein 2020)."""

    name: Literal["apgd-t"]
    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(gt=0, description="perturbation budget in input units of `norm`")
    steps: int = Field(default=100, ge=1, le=MAX_STEPS)
    restarts: int = Field(default=1, ge=1, le=100)
    n_target_classes: int = Field(default=9, ge=1, description="wrong classes tried, most likely first")
    rho: float = Field(default=0.75, gt=0, lt=1)
    early_stop: bool = True


class FABTParams(Targeting):
    """FAB-T (Croce & Hein 2020, AutoAttack's standard version): the fast adaptive boundary
    attack, one pass per target class (the highest wrong classes first); success within ``eps``."""

    name: Literal["fab-t"]
    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(gt=0, description="perturbation budget in input units of `norm`")
    steps: int = Field(default=100, ge=1, le=MAX_STEPS, description="iterations per target class")
    n_target_classes: int = Field(default=9, ge=1, description="wrong classes tried, most likely first")
    alpha_max: float = Field(default=0.1, ge=0, lt=1, description="largest weight of the step from the input")
    eta: float = Field(default=1.05, ge=1, le=2, description="overshoot of the linearised boundary")
    beta: float = Field(default=0.9, gt=0, lt=1, description="backward step after an adversarial iterate")
    early_stop: bool = True


class SquareParams(Targeting):
    """Square attack (Andriushchenko et al. 2020): score-based random search."""

    name: Literal["square"]
    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(gt=0, description="perturbation budget in input units of `norm`")
    max_queries: int = Field(default=5000, ge=1, description="model queries per image")
    p_init: float | None = Field(default=None, gt=0, le=1, description="initial square fraction")
    early_stop: bool = True


class HopSkipJumpParams(Targeting):
    """HopSkipJump (Chen et al. 2020): decision-based, minimal perturbation."""

    name: Literal["hop-skip-jump"]
    norm: Literal["l2", "linf"] = "l2"
    max_queries: int = Field(default=5000, ge=1, description="model queries per image")
    steps: int = Field(default=40, ge=1, le=MAX_STEPS)
    initial_num_evals: int = Field(default=100, ge=1, le=100_000)
    max_num_evals: int = Field(default=10_000, ge=1, le=1_000_000)
    gamma: float = Field(default=1.0, gt=0, le=1e3)


class AdvGANParams(Strict):
    """AdvGAN (Xiao et al. 2018): a generator trained by ``POST /v1/attacks/generators`` perturbs
    each input in one forward pass (Linf). ``eps`` and targeting come from the generator's card: a
    targeted generator aims every input at its one class (success = hitting it)."""

    name: Literal["advgan"]
    generator: str = Field(description="a trained generator, `name` or `name@version` "
                                       "(GET /v1/attacks/generators)")


AttackParams = Annotated[
    FGSMParams | PGDParams | DeepFoolParams | MIFGSMParams | CarliniWagnerL2Params | JSMAParams
    | APGDParams | APGDTParams | FABTParams | SquareParams | HopSkipJumpParams | AdvGANParams,
    Field(discriminator="name"),
]
# What else is known of each attack (norms, flags, budget rule, kernel): ``contracts.attacks``.


# --- inputs ----------------------------------------------------------------------------------


class DatasetInputs(Strict):
    dataset: str = Field(description="a data-set split: hosted (fashion-mnist:test, skimage-patches:test) "
                                     "or one of your sets as name[@version]:split (my-eval@2:all; the "
                                     "latest version without @), see GET /v1/datasets")
    offset: int = Field(default=0, ge=0)
    limit: int = Field(default=100, ge=1)


class ArrayInputs(Strict):
    array: str = Field(
        description="base64 of a .npy file: float32 NCHW in [0, 1], or uint8 NHWC (NHW for 1 channel)"
    )
    labels: list[Annotated[int, Field(ge=0)]] | None = None


class ImageInputs(Strict):
    images: list[str] = Field(min_length=1, description="base64 PNG or JPEG images")
    labels: list[Annotated[int, Field(ge=0)]] | None = None


def _inputs_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        for key in ("dataset", "array", "images"):
            if key in value:
                return key
    elif isinstance(value, BaseModel):
        return {DatasetInputs: "dataset", ArrayInputs: "array", ImageInputs: "images"}.get(
            type(value)
        )
    return None


Inputs = Annotated[
    Annotated[DatasetInputs, Tag("dataset")]
    | Annotated[ArrayInputs, Tag("array")]
    | Annotated[ImageInputs, Tag("images")],
    Discriminator(
        _inputs_kind,
        custom_error_type="inputs_kind",
        custom_error_message="expected an object with one of the keys dataset, array or images",
    ),
]


class AttackRequest(Strict):
    """``POST /v1/attacks`` body (multipart requests carry it as the ``spec`` field)."""

    model: str = Field(description="registry model, `name` or `name@version`")
    attack: AttackParams
    inputs: Inputs | None = Field(
        default=None, description="inline inputs; omit when uploading files as multipart"
    )
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    batch_size: int | None = Field(default=None, ge=1, le=4096, description="default: tuned per model")
    surrogate: str | None = Field(
        default=None,
        description="transfer attack: craft on this registry model (white-box attacks only), "
                    "score on `model`",
    )


# --- defenses (discriminated on ``name``) -----------------------------------------------------


class BitDepthStep(Strict):
    """Reduce each pixel to ``bits`` bits (non-differentiable: zero gradient)."""

    name: Literal["bit-depth"]
    bits: int = Field(ge=1, le=8)


class MedianStep(Strict):
    """Median filter over a ``size`` x ``size`` window, per channel."""

    name: Literal["median"]
    size: int = Field(default=2, ge=2, le=5)


class JPEGStep(Strict):
    """JPEG compression round trip (non-differentiable)."""

    name: Literal["jpeg"]
    quality: int = Field(default=75, ge=1, le=100)


class BlurStep(Strict):
    """Gaussian blur."""

    name: Literal["gaussian-blur"]
    sigma: float = Field(default=1.0, gt=0, le=10)
    kernel_size: int | None = Field(default=None, ge=1, le=31, description="odd; default 2*ceil(3 sigma)+1")

    @model_validator(mode="after")
    def _odd(self) -> BlurStep:
        if self.kernel_size is not None and self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd number, got {self.kernel_size}")
        return self


PreprocessStep = Annotated[BitDepthStep | MedianStep | JPEGStep | BlurStep, Field(discriminator="name")]
NON_DIFFERENTIABLE_STEPS = frozenset({"bit-depth", "jpeg"})


class TrainingParams(Strict):
    """What every training defense shares. Training starts from scratch with the base model's
    architecture and normalisation (``init="base"``: fine-tune from its weights)."""

    epochs: int = Field(default=6, ge=1, le=200)
    batch_size: int = Field(default=128, ge=8, le=4096)
    lr: float = Field(default=2e-3, gt=0, le=1, description="peak Adam learning rate (one-cycle)")
    data: str = Field(default="fashion-mnist:train", description="data set to train on: hosted "
                      "(fashion-mnist:train, skimage-patches:train) or yours (name[@version]:split); "
                      "default: the train split of the set the model was trained on (its card's "
                      "lineage.data); an uploaded model names none, so name yours")
    limit: int | None = Field(default=None, ge=100, description="train on the first `limit` samples")
    init: Literal["scratch", "base"] = "scratch"


class FGSMTrainingParams(TrainingParams):
    """Adversarial training with the FGSM objective of Goodfellow et al. (2015):
    alpha J(x, y) + (1 - alpha) J(x + eps sign(grad_x J(x, y)), y)."""

    name: Literal["fgsm-adversarial-training"]
    eps: float = Field(default=0.1, gt=0, description="Linf, input units")
    alpha: float = Field(default=0.5, ge=0, le=1, description="weight of the clean loss")


class PGDTrainingParams(TrainingParams):
    """PGD adversarial training (Madry et al. 2018): train on Linf PGD examples."""

    name: Literal["pgd-adversarial-training"]
    eps: float = Field(default=0.1, gt=0, description="Linf, input units")
    steps: int = Field(default=10, ge=1, le=100)
    step_size: float | None = Field(default=None, gt=0, description="default 2.5 * eps / steps")


class DistillationParams(TrainingParams):
    """Defensive distillation (Papernot et al. 2016): a teacher trained at temperature T labels the
    data; a student of the same architecture is trained on those soft labels at T and deployed
    at T = 1."""

    name: Literal["distillation"]
    temperature: float = Field(default=100.0, ge=1, le=100)
    teacher_epochs: int | None = Field(default=None, ge=1, le=200, description="default: epochs")


class PreprocessingParams(Strict):
    """Wrap the model with input transformations, applied in order."""

    name: Literal["preprocessing"]
    steps: list[PreprocessStep] = Field(min_length=1, max_length=8)


class EnsembleParams(Strict):
    """A model made of several registry models with the same inputs and classes."""

    name: Literal["ensemble"]
    members: list[str] = Field(min_length=2, max_length=8, description="name or name@version")
    combine: Literal["mean-probabilities", "majority-vote"] = "mean-probabilities"


DetectionAttack = Literal["fgsm", "pgd", "deepfool", "carlini-wagner-l2"]
DETECTION_ATTACKS: tuple[DetectionAttack, ...] = ("fgsm", "pgd", "deepfool", "carlini-wagner-l2")


def _default_squeezers() -> list[list[Any]]:
    # Xu et al. used 1-bit depth and a 2x2 median on MNIST; on Fashion-MNIST both destroy the
    # clothes' texture on clean images (thresholds near the maximum, few detections), while 2-
    # and 3-bit depth detect most iterative attacks at 5% false positives (docs/results).
    return [[BitDepthStep(name="bit-depth", bits=2)], [BitDepthStep(name="bit-depth", bits=3)]]


class FeatureSqueezingParams(Strict):
    """Calibrate a feature-squeezing detector (Xu et al. 2018) on the model, stored with it. Slices
    not given come from the model's own test split (``service.own_data.default_slices``: attack
    inputs from the first half, calibration on the third quarter, held-out on the fourth)."""

    name: Literal["feature-squeezing"]
    squeezers: list[list[PreprocessStep]] = Field(
        default_factory=_default_squeezers, min_length=1, max_length=8,
        description="each squeezer is a pipeline of steps; the score is the largest L1 distance "
                    "between the softmax on the input and on a squeezed input")
    fpr: float = Field(default=0.05, gt=0, lt=0.5, description="false-positive rate on clean data")
    calibration: DatasetInputs = Field(
        default_factory=lambda: DatasetInputs(dataset="fashion-mnist:test", offset=5000, limit=2500),
        description="clean data the threshold is chosen on")
    held_out: DatasetInputs = Field(
        default_factory=lambda: DatasetInputs(dataset="fashion-mnist:test", offset=7500, limit=2500),
        description="other clean data the false-positive rate is measured on")
    attack_inputs: DatasetInputs = Field(
        default_factory=lambda: DatasetInputs(dataset="fashion-mnist:test", offset=0, limit=500),
        description="inputs the detection rate is measured on, after each attack")
    attacks: list[DetectionAttack] = Field(default_factory=lambda: list(DETECTION_ATTACKS), max_length=4)
    eps: float = Field(default=0.1, gt=0, description="Linf budget of the FGSM and PGD evaluations")


DefenseParams = Annotated[
    FGSMTrainingParams | PGDTrainingParams | DistillationParams | PreprocessingParams
    | EnsembleParams | FeatureSqueezingParams,
    Field(discriminator="name"),
]
TRAINING_DEFENSES = frozenset({"fgsm-adversarial-training", "pgd-adversarial-training", "distillation"})
DEFENSE_SUFFIX = {
    "fgsm-adversarial-training": "fgsm-at", "pgd-adversarial-training": "pgd-at",
    "distillation": "distilled", "preprocessing": "preprocessed", "ensemble": "ensemble",
}


class Evaluation(Strict):
    """How a new model is measured before it is published (the card's metrics)."""

    data: str = Field(default="fashion-mnist:test", description="test data: hosted (fashion-mnist:test, "
                      "skimage-patches:test) or yours (name[@version]:split); default: the test split "
                      "of the set the model was trained on (its card's lineage.data)")
    clean_limit: int = Field(default=10_000, ge=1, description="test images for clean accuracy (at most: "
                                                             "a smaller set is measured whole)")
    robust_limit: int = Field(default=1000, ge=0, description="test images for PGD robust accuracy")
    eps: float = Field(default=0.1, gt=0, description="Linf budget of the PGD evaluation")
    steps: int = Field(default=20, ge=1, le=1000)


class DefenseRequest(Strict):
    """``POST /v1/defenses`` body."""

    model: str | None = Field(default=None, description="base model, `name` or `name@version` "
                                                        "(every defense but ensemble)")
    defense: DefenseParams
    output: str | None = Field(default=None, description="name of the new model (default "
                                                         "`<model>-<suffix>`); a new version if it exists")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    evaluation: Evaluation = Field(default_factory=Evaluation)


# --- AdvGAN generators ----------------------------------------------------------------------


def _generator_evaluation() -> DatasetInputs:
    return DatasetInputs(dataset="fashion-mnist:test", offset=0, limit=1000)


class AdvGANTraining(Strict):
    """How to train an AdvGAN generator (Xiao et al. 2018) against a registry model.

    The perturbation is ``eps * tanh(G(x))``, clipped to the input bounds: inside the Linf ball by
    construction. The generator's loss is ``adv_weight`` x the C&W margin on the target's logits
    (floored at ``-kappa``) + ``gan_weight`` x the least-squares GAN loss + ``hinge_weight`` x the
    hinge on the perturbation's L2 norm above ``hinge_bound``.
    """

    eps: float = Field(default=0.3, gt=0, description="Linf bound, input units (0.3: the paper's MNIST "
                                                      "setting)")
    targeted: bool = Field(default=False, description="aim at `target_class` instead of any wrong class")
    target_class: int | None = Field(default=None, ge=0, description="the one class a targeted generator "
                                                                     "aims at (targeted only)")
    adv_weight: float = Field(default=10.0, ge=0, le=1e4)
    gan_weight: float = Field(default=1.0, ge=0, le=1e4)
    hinge_weight: float = Field(default=1.0, ge=0, le=1e4)
    hinge_bound: float | None = Field(default=None, ge=0, description="L2, input units; default eps x "
                                      "sqrt(10% of the input's values): eps on a tenth of the pixels")
    kappa: float = Field(default=0.0, ge=0, le=1e4, description="margin floor of the adversarial loss")
    epochs: int = Field(default=10, ge=1, le=200)
    batch_size: int = Field(default=128, ge=8, le=4096)
    lr: float = Field(default=1e-3, gt=0, le=1, description="Adam (betas 0.5, 0.999) for G and D")
    data: str = Field(default="fashion-mnist:train", description="data set to train on: hosted "
                      "(fashion-mnist:train, skimage-patches:train) or yours (name[@version]:split); "
                      "default: the train split of the set the model was trained on (its card's "
                      "lineage.data); an uploaded model names none, so name yours")
    limit: int | None = Field(default=None, ge=1, description="train on the first `limit` samples")
    mode: Literal["semi-white-box", "black-box"] = Field(
        default="semi-white-box",
        description="semi-white-box: gradients through the target; black-box: the target only "
                    "answers scores, a small-cnn surrogate is distilled from them while G trains")
    distill_steps: int = Field(default=1, ge=1, le=20, description="black-box: surrogate steps per "
                                                                   "generator step")
    surrogate_lr: float = Field(default=1e-3, gt=0, le=1, description="black-box: the surrogate's Adam")
    evaluation: DatasetInputs = Field(default_factory=_generator_evaluation,
                                      description="held-out data the card's success rate is measured on "
                                                  "(default: the first 1000 of the target's own test split)")


class GeneratorRequest(AdvGANTraining):
    """``POST /v1/attacks/generators`` body."""

    model: str = Field(description="the target model, `name` or `name@version`")
    output: str | None = Field(default=None, description="name of the generator (default "
                                                         "`<model>-advgan`); a new version if it exists")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)


# --- job payloads (gateway -> worker) ---------------------------------------------------------


class InputRef(Strict):
    """Where a worker finds a job's inputs: a data-set slice (``dataset``: the reference the gateway
    resolved, a team set's version pinned; values in [0, 1], scaled to the model's bounds by the
    worker) or an ``.npz`` blob (``x`` float32 NCHW in the model's bounds, optional ``y`` int64)."""

    kind: Literal["dataset", "blob"]
    n: int = Field(ge=1)
    dataset: str | None = None
    offset: int = 0
    key: str | None = None
    has_labels: bool = True


class AttackJob(Strict):
    job_id: str
    team: str
    model: str = Field(description="resolved name@version")
    attack: AttackParams
    inputs: InputRef
    seed: int = Field(ge=0)
    batch_size: int | None = None
    surrogate: str | None = Field(default=None, description="resolved name@version")


# Where the gateway puts a prediction's input (raw float32 bytes, ``PredictJob.shape``) beside the job:
# RQ compresses a job's payload with zlib when it is queued and again when it finishes, which cost
# more than the forward pass of a batch of 64 Fashion-MNIST images carried as base64 in the payload.
PREDICT_INPUT_KEY = "adversa:predict-input:{}"


class PredictJob(Strict):
    job_id: str
    model: str
    array: str | None = Field(default=None, description="base64 .npy float32 NCHW in the model's bounds "
                                                        "(or the input at PREDICT_INPUT_KEY, with shape)")
    shape: list[Annotated[int, Field(ge=1)]] | None = Field(
        default=None, min_length=4, max_length=4,
        description="NCHW shape of the float32 input stored at PREDICT_INPUT_KEY (instead of array)")
    reject: bool = False
    team: str | None = Field(default=None, description="whose detector to use (reject only)")

    @model_validator(mode="after")
    def _one_input(self) -> PredictJob:
        if (self.array is None) == (self.shape is None):
            raise ValueError("expected either array or shape (the input stored beside the job), not both")
        return self


class DefenseJob(Strict):
    job_id: str
    team: str | None = Field(description="owner of the new model; null publishes a hosted model")
    model: str | None = Field(description="resolved name@version of the base model")
    defense: DefenseParams
    output: str | None = Field(description="name of the new model (null for a detector)")
    seed: int = Field(ge=0)
    evaluation: Evaluation = Field(default_factory=Evaluation)


class GeneratorJob(AdvGANTraining):
    job_id: str
    team: str | None = Field(description="owner of the generator")
    model: str = Field(description="resolved name@version of the target model")
    output: str
    seed: int = Field(ge=0)


# --- results ---------------------------------------------------------------------------------


class NormStats(BaseModel):
    mean: float | None
    median: float | None


class Scores(BaseModel):
    n: int
    labels: Literal["given", "predicted"]
    clean_accuracy: float | None
    robust_accuracy: float | None
    success_rate: float | None
    successes: int
    perturbation: dict[str, NormStats]
    rho: float | None
    confidence: float | None
    gradient_calls: float
    queries: float


class AttackResult(BaseModel):
    scores: dict[str, Any]
    artifacts: list[str]
    attack: dict[str, Any]
    model: str
    seed: int
    batch_size: int
    seconds: float


class JobError(BaseModel):
    code: str
    message: str


class JobView(BaseModel):
    """What ``GET /v1/jobs/{id}`` answers."""

    id: str
    kind: str
    status: JobState
    progress: float = Field(ge=0, le=1)
    stage: dict[str, Any] | None = Field(default=None, description="where a long job is: epoch, "
                                                                    "batch, loss, accuracy ...")
    model: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    result: dict[str, Any] | None = None
    error: JobError | None = None


# --- audits ------------------------------------------------------------------------------------

AuditNorm = Literal["linf", "l2"]
AUDIT_SUITES = ("quick", "standard", "autoattack", "minimal", "custom")
DEFAULT_GRIDS: dict[str, list[float]] = {
    "linf": [1 / 255, 2 / 255, 4 / 255, 8 / 255, 0.05, 0.1, 0.2, 0.3],
    "l2": [0.25, 0.5, 1.0, 1.5, 2.0, 3.0],
}
DEFAULT_CHECK_EPS = {"linf": 0.1, "l2": 1.0}


class AuditRequest(Strict):
    """``POST /v1/audits`` body."""

    model: str = Field(description="registry model, `name` or `name@version`")
    inputs: Inputs = Field(description="the sample: a hosted data-set slice, an array or images")
    suite: Literal["quick", "standard", "autoattack", "minimal", "custom"] | None = Field(
        default=None, description="quick: FGSM + PGD; standard: APGD-CE, APGD-T, Square (the AutoAttack "
                                  "cascade); autoattack: AutoAttack's standard version (APGD-CE, APGD-T, "
                                  "FAB-T, Square), each on the survivors of the previous ones; minimal: "
                                  "DeepFool and C&W L2; custom: `attacks`. Default "
                                  "standard, or custom when `attacks` is given")
    attacks: list[AttackParams] | None = Field(
        default=None, min_length=1, max_length=10,
        description="custom suite: attack specs; bounded attacks run over the eps grid of their norm")
    norms: list[AuditNorm] | None = Field(
        default=None, min_length=1, description="norms to sweep (default linf; minimal: l2)")
    eps: dict[AuditNorm, list[Annotated[float, Field(gt=0)]]] | None = Field(
        default=None, description="eps grid per norm (default linf 1/255 ... 0.3, l2 0.25 ... 3)")
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS,
                              description="iterations of PGD (quick, default 20), APGD and FAB-T "
                                          "(standard, autoattack: 100)")
    n_target_classes: int = Field(default=9, ge=1, description="APGD-T (and FAB-T) target classes")
    square_queries: int = Field(default=5000, ge=1, description="Square's query budget per image and eps")
    adaptive_steps: int = Field(
        default=50, ge=1, le=MAX_STEPS,
        description="models with a calibrated detector: steps of the adaptive attack on model and detector "
                    "jointly (squeeze-adaptive, per eps, on the samples the suite misclassified only with "
                    "examples the detector flags), behind `adaptive_detect_reject_accuracy`")
    per_attack_curves: bool = Field(
        default=False, description="standard and autoattack suites: run every attack on every sample "
                                   "for its own robust-accuracy curve (slower) instead of the cascade, "
                                   "where each attack runs only on the samples the earlier ones left standing")
    surrogates: list[str] = Field(default_factory=list, max_length=4,
                                  description="transfer: models to craft PGD examples on")
    transfer_eps: float | None = Field(default=None, gt=0, description="Linf eps of the transfer attack "
                                                                       "(default 0.1)")
    thresholds: list[str] = Field(default_factory=list, max_length=50,
                                  description="gate lines, e.g. `robust_accuracy@linf:8/255 >= 0.4`, or "
                                              "against `baseline`: `clean_accuracy >= baseline - 0.01`. "
                                              "Metrics: clean_accuracy, robust_accuracy@<norm>:<eps>, "
                                              "detect_reject_accuracy@<norm>:<eps> (with a detector, under "
                                              "the suite's oblivious attacks), "
                                              "adaptive_detect_reject_accuracy@<norm>:<eps> (under the "
                                              "adaptive attack on model and detector), "
                                              "median_perturbation@<norm>, transfer_success_rate@linf:<eps>, "
                                              "masking_checks")
    baseline: str | None = Field(
        default=None, min_length=1, max_length=300,
        description="what `baseline` in a gate line means: an earlier audit id of your team, or a model "
                    "version `name@version` whose latest succeeded audit on the same data, suite and eps "
                    "grid is used")
    chunk_size: int = Field(default=250, ge=8, le=10_000, description="samples per chunk job")
    seed: int | None = Field(default=None, ge=0, le=2**62)


class BaselineMetric(Strict):
    """One figure of the baseline audit that a gate line compares with: the value and, for a rate,
    its 95% Wilson interval ``{k, n, lower, upper}``."""

    value: float
    interval: dict[str, int | float] | None = None
    note: str = ""


class Baseline(Strict):
    """The baseline audit as the gateway resolved it: the figures the gate lines need, keyed by the
    line's left-hand side (``robust_accuracy@linf:8/255``), so that the merge needs no database."""

    audit: str
    model: str
    created_at: str | None = None
    metrics: dict[str, BaselineMetric]


class AuditSpec(Strict):
    """The resolved audit settings carried by every job of one audit."""

    suite: Literal["quick", "standard", "autoattack", "minimal", "custom"]
    attacks: list[AttackParams] | None = None
    grids: dict[str, list[float]]
    check_eps: dict[str, float] = Field(default_factory=dict)
    steps: int | None = None
    n_target_classes: int = 9
    square_queries: int = 5000
    adaptive_steps: int = Field(default=50, ge=1, le=MAX_STEPS)
    per_attack_curves: bool = False
    surrogates: list[str] = Field(default_factory=list)
    transfer_eps: float | None = None
    thresholds: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list, description="what the gateway changed and why")
    data: str | None = Field(default=None, description="the sample: `dataset[offset:stop]`, or `sha256:...` "
                                                       "of inline inputs (a baseline must match it)")
    baseline: Baseline | None = None


class AuditChunkJob(Strict):
    job_id: str
    audit_id: str
    team: str
    model: str
    inputs: InputRef
    start: int = Field(ge=0)
    stop: int = Field(ge=1)
    index: int = Field(ge=0)
    seed: int = Field(ge=0)
    audit: AuditSpec


class AuditMergeJob(Strict):
    job_id: str
    audit_id: str
    team: str
    model: str
    chunk_ids: list[str] = Field(min_length=1)
    seed: int = Field(ge=0)
    audit: AuditSpec
