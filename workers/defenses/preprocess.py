"""Input-transformation defenses: bit-depth reduction, median filter, JPEG, Gaussian blur.

Each step is an ``nn.Module`` mapping a batch ``(N, C, H, W)`` in ``bounds`` to a batch of the same
shape, dtype and device; ``Preprocess`` chains them and ``Preprocessed`` puts the chain in front of a
classifier, so that every attack runs against the defended model unchanged.

Bit depth and the median filter are the squeezers of Xu, Evans & Qi, "Feature Squeezing: Detecting
Adversarial Examples in Deep Neural Networks" (NDSS 2018); JPEG compression is studied by Dziugaite
et al. (2016) and Guo et al., "Countering Adversarial Images using Input Transformations" (ICLR
2018). Two of them, bit depth and JPEG, have no usable gradient; such a step says so
(``differentiable = False``) and ``Preprocess.bpda`` then replaces its gradient by the identity, the
Backward Pass Differentiable Approximation of Athalye, Carlini & Wagner, "Obfuscated Gradients Give a
False Sense of Security" (ICML 2018), so that the audit can attack through it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

Bounds = tuple[float, float]


def _to_unit(x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """Map ``bounds`` onto [0, 1] (clamped: the steps below assume valid pixels)."""
    lo, hi = bounds
    return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)


def _from_unit(v: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    lo, hi = bounds
    return lo + v * (hi - lo)


class BitDepth(nn.Module):
    """Reduce each pixel to ``2**bits`` levels (Xu et al. 2018, "bit depth reduction").

    With ``v`` the pixel mapped to [0, 1]: ``round(v * (2**bits - 1)) / (2**bits - 1)``, mapped back
    to ``bounds``. The gradient is zero almost everywhere (``round`` is piecewise constant).
    """

    differentiable = False

    def __init__(self, bits: int, bounds: Bounds) -> None:
        super().__init__()
        self.bits, self.bounds = bits, bounds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2**self.bits - 1
        return _from_unit(torch.round(_to_unit(x, self.bounds) * levels) / levels, self.bounds)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class Median(nn.Module):
    """Per-channel median over a ``size x size`` window (Xu et al. 2018, "median smoothing").

    The output keeps ``H x W``: the input is padded by ``(size - 1) // 2`` pixels on the top and
    left and ``size // 2`` on the bottom and right (so an even window, like Xu et al.'s 2x2, reaches
    down and right), with *reflect* padding (mirrored without repeating the edge: ``c b | a b c``),
    which needs ``H, W > size // 2``. For an even window the median is the upper of the two middle
    values, as in ``scipy.ndimage.median_filter``. The gradient flows to the selected element.
    """

    differentiable = True

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.size
        before, after = (s - 1) // 2, s // 2
        padded = F.pad(x, (before, after, before, after), mode="reflect")
        windows = padded.unfold(2, s, 1).unfold(3, s, 1)  # (N, C, H, W, s, s)
        flat = windows.reshape(*x.shape, s * s)
        return flat.kthvalue(s * s // 2 + 1, dim=-1).values

    def extra_repr(self) -> str:
        return f"size={self.size}"


class JPEG(nn.Module):
    """A real JPEG round trip at ``quality`` (Guo et al. 2018), image by image, on the CPU.

    Pixels are mapped to [0, 1], rounded to 8 bits, encoded and decoded by torchvision (libjpeg;
    1 or 3 channels; colour images get libjpeg's default 4:2:0 chroma subsampling, so even quality
    100 blurs sharp colour detail) and mapped back to ``bounds`` on the input's device and dtype. The
    output does not depend on ``x`` through autograd: its gradient with respect to ``x`` is zero
    (``x * 0`` keeps the graph, so that a naive attacker gets zeros rather than an autograd error).
    """

    differentiable = False

    def __init__(self, quality: int, bounds: Bounds) -> None:
        super().__init__()
        self.quality, self.bounds = quality, bounds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if channels not in (1, 3):
            raise ValueError(f"expected 1 or 3 channels for JPEG, got {channels}")
        if not len(x):
            return x.clone()
        with torch.no_grad():
            pixels = torch.round(_to_unit(x, self.bounds) * 255).to(torch.uint8).cpu()
            encoded = encode_jpeg(list(pixels.unbind(0)), quality=self.quality)
            decoded = decode_jpeg(encoded, mode=ImageReadMode.UNCHANGED)
            v = torch.stack(decoded).to(device=x.device, dtype=x.dtype) / 255
            out = _from_unit(v, self.bounds)
        return x * 0 + out

    def extra_repr(self) -> str:
        return f"quality={self.quality}"


class GaussianBlur(nn.Module):
    """Depthwise convolution with a normalised Gaussian of std ``sigma`` pixels, reflect padding.

    The kernel is separable (a column pass, then a row pass). ``kernel_size`` None means
    ``2 * ceil(3 * sigma) + 1``, capped at the smaller image side (made odd).
    """

    differentiable = True

    def __init__(self, sigma: float, kernel_size: int | None) -> None:
        super().__init__()
        self.sigma, self.kernel_size = sigma, kernel_size

    def size_for(self, height: int, width: int) -> int:
        if self.kernel_size is not None:
            return self.kernel_size
        side = min(height, width)
        return min(2 * math.ceil(3 * self.sigma) + 1, side if side % 2 else side - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels, height, width = x.shape[1:]
        k = self.size_for(height, width)
        r = k // 2
        if r >= min(height, width):
            side = min(height, width)
            raise ValueError(f"expected kernel_size < {2 * side} for {height}x{width} images, got {k}")
        offsets = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-(offsets**2) / (2 * self.sigma**2))
        kernel = kernel / kernel.sum()
        padded = F.pad(x, (r, r, r, r), mode="reflect")
        out = F.conv2d(padded, kernel.view(1, 1, k, 1).repeat(channels, 1, 1, 1), groups=channels)
        return F.conv2d(out, kernel.view(1, 1, 1, k).repeat(channels, 1, 1, 1), groups=channels)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, kernel_size={self.kernel_size}"


DIFFERENTIABLE: dict[str, bool] = {"bit-depth": False, "median": True, "jpeg": False, "gaussian-blur": True}

_KEYS: dict[str, tuple[set[str], set[str]]] = {  # name -> (required, optional) keys besides "name"
    "bit-depth": ({"bits"}, set()),
    "median": ({"size"}, set()),
    "jpeg": ({"quality"}, set()),
    "gaussian-blur": ({"sigma"}, {"kernel_size"}),
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(params: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    value = params[key]
    if not _is_int(value) or not lo <= value <= hi:
        raise ValueError(f"expected {params['name']} {key} an integer in [{lo}, {hi}], got {value!r}")
    return value


def build_step(params: Mapping[str, Any], bounds: Bounds) -> nn.Module:
    """One preprocessing step from its dict, e.g. ``{"name": "median", "size": 2}``.

    Raises ``KeyError`` for a missing key and ``ValueError`` for an unknown name, an unknown key or
    a value out of range; both say "expected ..., got ...".
    """
    if "name" not in params:
        raise KeyError(f"expected a step with a 'name', got keys {sorted(params)}")
    name = params["name"]
    if name not in _KEYS:
        raise ValueError(f"expected a step name in {sorted(_KEYS)}, got {name!r}")
    required, optional = _KEYS[name]
    missing = sorted(required - set(params))
    if missing:
        raise KeyError(f"expected {name} keys {sorted(required | optional)}, got no {missing}")
    unknown = sorted(set(params) - required - optional - {"name"})
    if unknown:
        raise ValueError(f"expected {name} keys {sorted(required | optional)}, got unknown {unknown}")
    lo, hi = bounds
    if not lo < hi:
        raise ValueError(f"expected bounds lo < hi, got {bounds}")
    if name == "bit-depth":
        return BitDepth(_int_in(params, "bits", 1, 8), bounds)
    if name == "median":
        return Median(_int_in(params, "size", 2, 5))
    if name == "jpeg":
        return JPEG(_int_in(params, "quality", 1, 100), bounds)
    sigma = params["sigma"]
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not 0 < sigma < math.inf:
        raise ValueError(f"expected gaussian-blur sigma a finite number > 0, got {sigma!r}")
    kernel_size = params.get("kernel_size")
    if kernel_size is not None and (not _is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0):
        raise ValueError(f"expected gaussian-blur kernel_size an odd integer >= 1 or None, got {kernel_size!r}")
    return GaussianBlur(float(sigma), kernel_size)


class Preprocess(nn.Module):
    """A pipeline of steps applied in order to ``(N, C, H, W)`` inputs in ``bounds``.

    ``bpda`` (default False) chooses the gradient of the non-differentiable steps. False: the true
    one, zero (what a naive gradient attacker sees: masked gradients, never an autograd error).
    True: the identity, ``out = x + (f(x) - x).detach()`` (BPDA with ``g(x) = x``; Athalye, Carlini &
    Wagner 2018); differentiable steps keep their gradient either way.
    """

    def __init__(self, steps: Sequence[Mapping[str, Any]], bounds: Bounds) -> None:
        super().__init__()
        self.steps = nn.ModuleList([build_step(step, bounds) for step in steps])
        self.bounds = bounds
        self.bpda = False

    @property
    def differentiable(self) -> bool:
        """Whether every step has a usable true gradient."""
        return all(step.differentiable for step in self.steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4, f"expected x of shape (N, C, H, W), got {tuple(x.shape)}"
        for step in self.steps:
            if self.bpda and not step.differentiable:
                with torch.no_grad():
                    squeezed = step(x)
                x = x + (squeezed - x).detach()
            else:
                x = step(x)
        return x


class Preprocessed(nn.Module):
    """``model(preprocess(x))``: a classifier behind an input-transformation defense."""

    def __init__(self, preprocess: Preprocess, model: nn.Module) -> None:
        super().__init__()
        self.preprocess, self.model = preprocess, model

    @property
    def differentiable(self) -> bool:
        return self.preprocess.differentiable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(x))


@contextmanager
def bpda(module: nn.Module) -> Iterator[None]:
    """Within the block, every ``Preprocess`` inside ``module`` uses straight-through gradients."""
    pipelines = [m for m in module.modules() if isinstance(m, Preprocess)]
    saved = [p.bpda for p in pipelines]
    for p in pipelines:
        p.bpda = True
    try:
        yield
    finally:
        for p, flag in zip(pipelines, saved, strict=True):
            p.bpda = flag
