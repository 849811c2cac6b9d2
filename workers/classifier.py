"""The ``Classifier`` handle every kernel attacks.

It wraps a frozen module that takes inputs in ``bounds`` (normalisation inside) and returns logits,
and counts what attacks spend: ``queries`` (images forwarded) and ``gradients`` (vector-Jacobian
products, one per image per backward pass). It never changes the module's mode or device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Classifier:
    """A model under attack: ``module(x) -> logits`` with ``x`` in ``bounds``, shape ``(N, *input_shape)``."""

    module: nn.Module
    num_classes: int
    input_shape: tuple[int, int, int]
    bounds: tuple[float, float] = (0.0, 1.0)
    name: str = "model"
    differentiable: bool = True  # false: some step's gradient is useless (BPDA or black box)
    queries: int = field(default=0, init=False)
    gradients: int = field(default=0, init=False)
    # Chunks whose logits ``predict(..., remember=True)`` computed, with the version of their data.
    _remembered: list[tuple[torch.Tensor, torch.Tensor, int]] = field(
        default_factory=list, init=False, repr=False)

    @property
    def device(self) -> torch.device:
        for parameter in self.module.parameters():
            return parameter.device
        for buffer in self.module.buffers():
            return buffer.device
        return torch.device("cpu")

    def reset_counters(self) -> None:
        self.queries = 0
        self.gradients = 0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits without gradient tracking (a remembered chunk's without a forward pass)."""
        self.queries += x.shape[0]
        for chunk, logits, version in self._remembered:
            # Same storage, place, layout and unmodified since (views share the version counter):
            # the same values. The remembered chunk holds its storage, so the address is not reused.
            if (x.data_ptr() == chunk.data_ptr() and x.shape == chunk.shape and x.stride() == chunk.stride()
                    and x.dtype == chunk.dtype and x.device == chunk.device
                    and x._version == version and chunk._version == version):
                return logits.clone()
        with torch.no_grad():
            return self.module(x)

    def predict(self, x: torch.Tensor, batch_size: int = 256, remember: bool = False) -> torch.Tensor:
        """Logits for a large batch, computed in chunks of ``batch_size``.

        ``remember``: until ``forget``, a ``logits`` call on one of these chunks (a kernel run on
        ``x[start:start + batch_size]``, as ``workers.jobs.craft`` does) gets the same logits without
        a forward pass: the job's clean predictions and the kernel's first forward are one pass.
        """
        if not len(x):
            return torch.empty(0, self.num_classes, device=x.device)
        chunks = x.split(batch_size)
        logits = [self.logits(chunk) for chunk in chunks]
        if remember:
            self._remembered = [(c, out, c._version) for c, out in zip(chunks, logits, strict=True)]
        return torch.cat(logits)

    def forget(self) -> None:
        """Drop what ``predict(..., remember=True)`` kept."""
        self._remembered = []

    def value_and_grad(
        self, x: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at ``x`` and the gradient of the scalar ``loss(logits)`` with respect to ``x``.

        ``loss`` should sum over the batch, so that one sample's gradient does not depend on the
        others.
        """
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.module(x)
            (grad,) = torch.autograd.grad(loss(logits), x)
        self.queries += x.shape[0]
        self.gradients += x.shape[0]
        return logits.detach(), grad.detach()

    def linearize(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor, bool], torch.Tensor]]:
        """Logits at ``x`` ``(N, K)`` and ``vjp(cotangent, last)``: the gradient of
        ``sum_n <cotangent[n], logits[n]>`` with respect to ``x``, one backward pass through the
        graph of this single forward pass (kept until a call with ``last=True``).

        The caller sees the logits before it decides which gradients it needs (DeepFool: none
        for the samples already fooled), and each gradient costs a backward pass only. A loop of
        backward passes is about twice as fast on CPU as one vmapped batched backward
        (``is_grads_batched``), measured on fmnist-cnn.
        """
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.module(xg)
        self.queries += x.shape[0]

        def vjp(cotangent: torch.Tensor, last: bool) -> torch.Tensor:
            (grad,) = torch.autograd.grad(logits, xg, grad_outputs=cotangent, retain_graph=not last)
            self.gradients += x.shape[0]
            return grad.detach()

        return logits.detach(), vjp

    def vjp_batch(
        self, x: torch.Tensor, cotangents: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at ``x`` ``(N, K)`` and one gradient per cotangent: ``(C, N, *x.shape[1:])``.

        ``cotangents`` has shape ``(C, N, K)``; row ``c`` gives the gradient of
        ``sum_n <cotangents[c, n], logits[n]>``: one forward pass, then C backward passes
        through its graph (see ``linearize``).
        """
        logits, vjp = self.linearize(x)
        count = cotangents.shape[0]
        if count == 0:
            return logits, x.new_zeros((0, *x.shape))
        grads = torch.stack([vjp(cotangents[c], c == count - 1) for c in range(count)])
        return logits, grads
