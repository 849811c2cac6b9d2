"""AdvGAN: a generator network trained to produce adversarial perturbations in one forward pass.

Xiao, Li, Zhu, He, Liu, Song, "Generating Adversarial Examples with Adversarial Networks", IJCAI
2018. A generator ``G`` maps an input ``x`` to a perturbation; a discriminator ``D`` tells clean
inputs from perturbed ones (the GAN loss keeps the perturbed inputs looking like data); an
adversarial loss pushes the target model's prediction on ``x + G(x)`` away from the true class
(or towards the target class); a hinge loss on the perturbation's L2 norm keeps it small.

What this implementation fixes, and why:

* The perturbation is ``eps * tanh(G(x))``, clipped to the input box, so every output is inside the
  Linf ``eps`` ball by construction (the paper bounds it only softly, with the hinge loss).
* The adversarial loss is the C&W margin on the target's logits, as in the paper:
  ``max(Z_y - max_{i != y} Z_i, -kappa)`` untargeted, ``max(max_{i != t} Z_i - Z_t, -kappa)``
  targeted (one generator per target class).
* The GAN loss is least squares (LSGAN, Mao et al. 2017), as the paper uses: ``D`` is fitted to
  output 1 on clean inputs and 0 on perturbed ones, ``G`` to make ``D`` output 1 on its outputs.
* Losses are means over the batch, so the learning rate does not depend on the batch size.
* Semi-white-box (the paper's main setting): gradients of the adversarial loss come through the
  frozen target model. Black-box (the paper's section 3.3, dynamic distillation): the target is
  only asked for scores; ``G`` is trained against a surrogate that is first distilled on the
  training inputs, then, after every generator step, fitted again to the target's softmax on both
  the clean inputs and the perturbed ones. The target's scores on the clean inputs are queried
  once, in the first pass, and reused (the target is a fixed function); the scores on the
  perturbed inputs are queried at every step.

Training code only: nothing here knows about queues or HTTP, logs or touches the global RNG.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from workers.attacks.base import flat_norm, goal_reached
from workers.classifier import Classifier

# The encoder halves the resolution twice; inputs are zero-padded to a multiple of this, and to at
# least ``MIN_SIDE`` so that the smallest feature map still has several pixels to normalise over.
GRID = 4
MIN_SIDE = 8
# The default hinge bound is the L2 norm of an eps perturbation of this fraction of the input's values.
HINGE_FRACTION = 0.1


def default_hinge_bound(eps: float, input_shape: tuple[int, ...]) -> float:
    """``eps * sqrt(0.1 * C * H * W)``: the L2 norm (input units) of a Linf-``eps`` perturbation that
    moves a tenth of the input's values by ``eps``. ~2.66 for eps 0.3 on 1x28x28 (the constant this
    default used to be); it grows with the image, so that a 3x224x224 generator is not held to a
    budget that suits 784 pixels, and with ``eps``, which is in the model's input units."""
    return eps * math.sqrt(HINGE_FRACTION * math.prod(input_shape))


def _pad_to_grid(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``(N, C, H, W)`` on the bottom and right to sides that are multiples of ``GRID``."""
    height, width = x.shape[-2:]
    pad_h = max(MIN_SIDE, -(-height // GRID) * GRID) - height
    pad_w = max(MIN_SIDE, -(-width // GRID) * GRID) - width
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


class _Residual(nn.Module):
    """Two 3x3 convolutions with instance norm and a skip connection (the paper's ``r32``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.InstanceNorm2d(channels, affine=True),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.InstanceNorm2d(channels, affine=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class AdvGANGenerator(nn.Module):
    """Encoder ``c8-d16-d32``, four residual blocks ``r32``, decoder ``u16-u8-c{C}``.

    Instance norm (no running statistics) keeps every sample independent of the others in the
    batch, in training and in eval mode alike. Maps ``(N, C, H, W) -> (N, C, H, W)``, unbounded:
    ``perturb`` squashes it into the ``eps`` ball.
    """

    def __init__(self, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        channels = input_shape[0]
        self.input_shape = input_shape
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.InstanceNorm2d(8, affine=True),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.InstanceNorm2d(16, affine=True),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.InstanceNorm2d(32, affine=True),
            nn.ReLU(),
        )
        self.blocks = nn.Sequential(*(_Residual(32) for _ in range(4)))
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(16, affine=True),
            nn.ReLU(),
            nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(8, affine=True),
            nn.ReLU(),
            nn.Conv2d(8, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        out = self.decoder(self.blocks(self.encoder(_pad_to_grid(x))))
        return out[..., :height, :width]


class AdvGANDiscriminator(nn.Module):
    """``C8-C16-C32`` (4x4 stride-2 convolutions, then a 3x3 one), LeakyReLU 0.2, global average
    pooling and a linear layer: ``(N, C, H, W) -> (N,)`` logits, high for clean inputs."""

    def __init__(self, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        channels = input_shape[0]
        self.input_shape = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(8, 16, 4, stride=2, padding=1),
            nn.InstanceNorm2d(16, affine=True),
            nn.LeakyReLU(0.2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.InstanceNorm2d(32, affine=True),
            nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(_pad_to_grid(x))).squeeze(1)


def _check_shape(input_shape: tuple[int, int, int]) -> None:
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"expected an input shape (C, H, W) of positive sizes, got {input_shape}")


def build_generator(input_shape: tuple[int, int, int]) -> nn.Module:
    """The AdvGAN generator for inputs of shape ``(C, H, W)`` (any H and W: inputs are padded to a
    multiple of 4 inside and the output cropped back). Weights from the global RNG, like any
    ``nn.Module``; ``train_advgan`` re-initialises them from its own generator."""
    _check_shape(input_shape)
    return AdvGANGenerator(input_shape)


def build_discriminator(input_shape: tuple[int, int, int]) -> nn.Module:
    """The AdvGAN discriminator for inputs of shape ``(C, H, W)``: ``(N, C, H, W) -> (N,)`` logits."""
    _check_shape(input_shape)
    return AdvGANDiscriminator(input_shape)


def _dtype_of(module: nn.Module, default: torch.dtype) -> torch.dtype:
    for parameter in module.parameters():
        return parameter.dtype
    return default


def perturb(gen: nn.Module, x: torch.Tensor, eps: float, bounds: tuple[float, float]) -> torch.Tensor:
    """``clamp(x + eps * tanh(gen(x)), bounds)``: inside the Linf ``eps`` ball and the box whatever
    ``gen`` outputs (clipping to the box only moves a coordinate back towards ``x``, which is in
    the box). Differentiable in ``gen``'s weights when gradients are enabled.

    Args:
        gen: maps ``(N, C, H, W) -> (N, C, H, W)``; run in its own dtype, on ``x``'s device.
        x: inputs ``(N, C, H, W)`` inside ``bounds``.
        eps: the Linf bound, in input units.
        bounds: the input box ``(low, high)``.
    """
    raw = gen(x.to(_dtype_of(gen, x.dtype))).to(x.dtype)
    return (x + eps * torch.tanh(raw)).clamp(bounds[0], bounds[1])


@dataclass(frozen=True)
class AdvGANSpec:
    """How to train an AdvGAN generator.

    ``eps``: the Linf bound of the perturbation, in input units. ``target``: the one class a
    targeted generator aims at. ``lr``: Adam's for the generator and the discriminator (betas 0.5,
    0.999, as usual for GANs). ``adv_weight``, ``gan_weight``, ``hinge_weight``: the weights of the
    adversarial (C&W margin with margin ``kappa``, on logits), least-squares GAN and hinge losses.
    ``hinge_bound``: the L2 norm (input units) above which the hinge loss penalises the
    perturbation; None (the default) means ``default_hinge_bound(eps, input shape)``, that of an
    ``eps`` perturbation on 10% of the input's values (~2.66 for eps 0.3 on 28x28). ``mode``:
    ``"semi-white-box"`` back-propagates through the target; ``"black-box"`` only queries its scores
    and trains a surrogate (``distill_steps`` Adam steps at ``surrogate_lr`` per generator step).
    """

    eps: float
    targeted: bool = False
    target: int | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    adv_weight: float = 10.0
    gan_weight: float = 1.0
    hinge_weight: float = 1.0
    hinge_bound: float | None = None
    kappa: float = 0.0
    mode: Literal["semi-white-box", "black-box"] = "semi-white-box"
    distill_steps: int = 1
    surrogate_lr: float = 1e-3

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"expected eps > 0, got {self.eps}")
        if self.targeted != (self.target is not None):
            raise ValueError(f"expected a target class exactly when targeted, got targeted={self.targeted} "
                             f"and target={self.target}")
        for name in ("epochs", "batch_size", "distill_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        for name in ("lr", "surrogate_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"expected {name} > 0, got {getattr(self, name)}")
        for name in ("adv_weight", "gan_weight", "hinge_weight", "hinge_bound", "kappa"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"expected {name} >= 0, got {getattr(self, name)}")
        if self.mode not in ("semi-white-box", "black-box"):
            raise ValueError(f"expected mode 'semi-white-box' or 'black-box', got {self.mode!r}")


@dataclass
class Progress:
    """Where training stands after a generator step. ``epoch`` and ``batch`` count from 1. The
    losses and ``success`` (the fraction of perturbed inputs that reached the goal, judged by the
    target model: on its logits in semi-white-box mode, on the scores it returned in black-box
    mode) are means over the epoch so far. ``queries``: images forwarded through the target so far.
    """

    epoch: int
    epochs: int
    batch: int
    batches: int
    loss_g: float
    loss_d: float
    loss_adv: float
    success: float
    queries: int


@dataclass
class AdvGANResult:
    """The trained ``generator`` (eval mode, ``requires_grad`` off), the ``discriminator`` and, in
    black-box mode, the ``surrogate`` (both also eval mode, frozen). ``queries``: images forwarded
    through the target (in semi-white-box mode each also cost a gradient); ``steps``: generator
    updates; ``seconds``: wall-clock time of training."""

    generator: nn.Module
    discriminator: nn.Module
    surrogate: nn.Module | None
    queries: int
    seconds: float
    steps: int


def margin_loss(logits: torch.Tensor, labels: torch.Tensor, targeted: bool, kappa: float) -> torch.Tensor:
    """The C&W margin per sample ``(N,)``: untargeted ``max(Z_y - max_{i != y} Z_i, -kappa)`` with
    ``labels = y``; targeted ``max(max_{i != t} Z_i - Z_t, -kappa)`` with ``labels = t``."""
    chosen = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    mask = F.one_hot(labels, logits.shape[1]).bool()
    others = logits.masked_fill(mask, torch.finfo(logits.dtype).min).amax(dim=1)
    gap = others - chosen if targeted else chosen - others
    return gap.clamp_min(-kappa)


def _init_weights(module: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default initialisation of convolutions and linear layers (Kaiming-uniform with
    ``a = sqrt(5)``, bias uniform in ``+-1/sqrt(fan_in)``), drawn from ``generator``."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            if layer.bias is not None:
                fan_in = layer.weight[0].numel()  # dim 1 times the kernel, as PyTorch counts it
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
        elif isinstance(layer, nn.InstanceNorm2d) and layer.affine:
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


def _seeded_networks(
    input_shape: tuple[int, int, int], generator: torch.Generator
) -> tuple[nn.Module, nn.Module]:
    """G and D built on the CPU and initialised from a seed drawn from ``generator``, so the same
    seed gives the same bits whatever device they train on. Built inside ``fork_rng`` so that the
    default initialisation, overwritten at once, leaves the global RNG as it was."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    init = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        gen, disc = build_generator(input_shape), build_discriminator(input_shape)
    _init_weights(gen, init)
    _init_weights(disc, init)
    return gen, disc


def _update(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], loss: torch.Tensor) -> None:
    """One optimiser step on ``params`` only: the gradients are taken with ``autograd.grad`` so
    that nothing else in the graph (the target's weights, the discriminator's during the generator
    step) accumulates a ``.grad``."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad
    optimizer.step()


def _fit_surrogate(surrogate: nn.Module, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                   x: torch.Tensor, probs: torch.Tensor, steps: int) -> None:
    """``steps`` Adam steps on ``KL(target's softmax || surrogate's softmax)``, batch mean."""
    for _ in range(steps):
        loss = F.kl_div(F.log_softmax(surrogate(x), dim=1), probs, reduction="batchmean")
        _update(optimizer, params, loss)


def _least_squares(scores: torch.Tensor, label: float) -> torch.Tensor:
    """LSGAN's loss: the mean of ``(D(.) - label)^2``."""
    return (scores - label).square().mean()


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def _check_inputs(target: Classifier, x: torch.Tensor, y: torch.Tensor, spec: AdvGANSpec,
                  surrogate: nn.Module | None, every: int) -> None:
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"expected training inputs (N, C, H, W) with N >= 1, got {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"expected labels of shape ({x.shape[0]},), got {tuple(y.shape)}")
    if spec.target is not None and not 0 <= spec.target < target.num_classes:
        raise ValueError(f"expected a target class in [0, {target.num_classes}), got {spec.target}")
    if (spec.mode == "black-box") != (surrogate is not None):
        raise ValueError(f"expected a surrogate module exactly in black-box mode, got mode={spec.mode!r} "
                         f"and surrogate={'a module' if surrogate is not None else None}")
    if every < 1:
        raise ValueError(f"expected every >= 1, got {every}")


def _params(module: nn.Module) -> list[nn.Parameter]:
    return [param for param in module.parameters() if param.requires_grad]


def _adam(params: Iterable[nn.Parameter], lr: float, gan: bool) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999) if gan else (0.9, 0.999))


def train_advgan(
    target: Classifier,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: AdvGANSpec,
    *,
    generator: torch.Generator,
    surrogate: nn.Module | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    every: int = 50,
) -> AdvGANResult:
    """Train an AdvGAN generator against ``target`` on ``(x, y)``.

    Args:
        target: the model to fool. Its module's mode and ``requires_grad`` are left alone; every
            image forwarded counts in ``target.queries`` and, in semi-white-box mode, also in
            ``target.gradients``. Black-box mode calls only ``target.logits``.
        x: training inputs ``(N, C, H, W)`` inside ``target.bounds``, on the device to train on;
            G and D take ``x``'s device and dtype.
        y: their true labels ``(N,)`` (what an untargeted generator moves away from).
        spec: see ``AdvGANSpec``.
        generator: the source of the initial weights of G and D and of the per-epoch shuffles.
        surrogate: black-box only, and required there: a fresh trainable module mapping inputs in
            bounds to ``target.num_classes`` logits. It is moved to ``x``'s device and dtype and
            trained in place.
        on_progress: called every ``every`` generator steps and after the last step of each epoch;
            whatever it raises (a cancellation) propagates.
        every: see ``on_progress``.

    Returns:
        ``AdvGANResult``; attack with ``perturb(result.generator, x, spec.eps, target.bounds)``.

    Example:
        >>> result = train_advgan(model, x, y, AdvGANSpec(eps=0.3), generator=torch.Generator().manual_seed(0))
    """
    _check_inputs(target, x, y, spec, surrogate, every)
    started = time.perf_counter()
    count = x.shape[0]
    batches = -(-count // spec.batch_size)
    gen, disc = _seeded_networks((x.shape[1], x.shape[2], x.shape[3]), generator)
    gen.to(device=x.device, dtype=x.dtype).train()
    disc.to(device=x.device, dtype=x.dtype).train()
    gen_params, disc_params = _params(gen), _params(disc)
    opt_g, opt_d = _adam(gen_params, spec.lr, gan=True), _adam(disc_params, spec.lr, gan=True)
    goal = torch.full_like(y, spec.target) if spec.target is not None else y
    hinge = spec.hinge_bound if spec.hinge_bound is not None else default_hinge_bound(spec.eps, x.shape[1:])
    queries_before = target.queries
    steps = 0

    def shuffled() -> torch.Tensor:
        return torch.randperm(count, generator=generator, device=generator.device).to(x.device)

    with torch.enable_grad():
        clean_probs: torch.Tensor | None = None
        if surrogate is not None:
            surrogate.to(device=x.device, dtype=x.dtype).train()
            surrogate.requires_grad_(True)
            surrogate_params = _params(surrogate)
            opt_s = _adam(surrogate_params, spec.surrogate_lr, gan=False)
            # The first distillation pass, which also records the target's scores on the clean inputs.
            clean_probs = torch.empty(count, target.num_classes, device=x.device, dtype=x.dtype)
            for idx in shuffled().split(spec.batch_size):
                probs = F.softmax(target.logits(x[idx]).to(x.dtype), dim=1)
                clean_probs[idx] = probs
                _fit_surrogate(surrogate, opt_s, surrogate_params, x[idx], probs, 1)

        for epoch in range(1, spec.epochs + 1):
            totals = torch.zeros(4, device=x.device, dtype=torch.float64)  # loss_g, loss_d, loss_adv, hits
            seen = 0
            for batch, idx in enumerate(shuffled().split(spec.batch_size), start=1):
                xb, goal_b = x[idx], goal[idx]
                x_adv = perturb(gen, xb, spec.eps, target.bounds)

                # Discriminator: 1 on clean inputs, 0 on perturbed ones (least squares).
                loss_d = 0.5 * (_least_squares(disc(xb), 1.0) + _least_squares(disc(x_adv.detach()), 0.0))
                _update(opt_d, disc_params, loss_d)

                # Generator: fool the target (or the surrogate), look clean to D, stay small in L2.
                if surrogate is not None:
                    logits = surrogate(x_adv)
                else:
                    # The frozen target itself, so that its input gradient reaches G; counted by hand.
                    logits = target.module(x_adv)
                    target.queries += xb.shape[0]
                    target.gradients += xb.shape[0]
                loss_adv = margin_loss(logits, goal_b, spec.targeted, spec.kappa).mean()
                loss_gan = _least_squares(disc(x_adv), 1.0)
                loss_hinge = (flat_norm(x_adv - xb, "l2") - hinge).clamp_min(0).mean()
                loss_g = (spec.adv_weight * loss_adv + spec.gan_weight * loss_gan
                          + spec.hinge_weight * loss_hinge)
                _update(opt_g, gen_params, loss_g)
                steps += 1

                if surrogate is not None:
                    assert clean_probs is not None
                    # Dynamic distillation: the target's scores on the perturbed inputs, then the
                    # surrogate fitted to them and to the clean scores.
                    oracle = target.logits(x_adv.detach())
                    hits = goal_reached(oracle, y[idx], goal_b, spec.targeted)
                    probs = torch.cat([clean_probs[idx], F.softmax(oracle.to(x.dtype), dim=1)])
                    _fit_surrogate(surrogate, opt_s, surrogate_params, torch.cat([xb, x_adv.detach()]),
                                   probs, spec.distill_steps)
                else:
                    hits = goal_reached(logits.detach(), y[idx], goal_b, spec.targeted)

                size = xb.shape[0]
                seen += size
                totals += torch.stack([loss_g.detach().double() * size, loss_d.detach().double() * size,
                                       loss_adv.detach().double() * size, hits.sum().double()])
                if on_progress is not None and (steps % every == 0 or batch == batches):
                    means = (totals / seen).tolist()
                    on_progress(Progress(epoch, spec.epochs, batch, batches, means[0], means[1], means[2],
                                         means[3], target.queries - queries_before))

    return AdvGANResult(
        generator=_frozen(gen),
        discriminator=_frozen(disc),
        surrogate=_frozen(surrogate) if surrogate is not None else None,
        queries=target.queries - queries_before,
        seconds=time.perf_counter() - started,
        steps=steps,
    )
