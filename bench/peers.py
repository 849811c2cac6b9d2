"""Peer implementations for the attack benchmark: ART, Foolbox, and the classic per-image DeepFool.

Each maker takes a fresh copy of the hosted module (inputs in [0, 1], logits out) and returns
``fn(x, y) -> x_adv`` on CPU tensors. The libraries are optional (the ``bench`` extra).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def art_makers(eps: float, pgd_steps: int, pgd_alpha: float, df_steps: int, overshoot: float,
               chunk: int) -> dict[str, tuple[Callable[[nn.Module], AttackFn], int | None]]:
    from art.attacks.evasion import DeepFool, FastGradientMethod, ProjectedGradientDescentPyTorch
    from art.estimators.classification import PyTorchClassifier

    def wrap(module: nn.Module) -> PyTorchClassifier:
        return PyTorchClassifier(model=module, loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28),
                                 nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")

    def run(attack: object) -> AttackFn:
        def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))  # type: ignore[attr-defined]
        return fn

    return {
        "FGSM": (lambda m: run(FastGradientMethod(wrap(m), norm=np.inf, eps=eps, batch_size=chunk)), 1),
        "PGD": (lambda m: run(ProjectedGradientDescentPyTorch(
            wrap(m), norm=np.inf, eps=eps, eps_step=pgd_alpha, max_iter=pgd_steps, num_random_init=1,
            batch_size=chunk, verbose=False)), pgd_steps),
        "DeepFool": (lambda m: _art_deepfool(DeepFool(wrap(m), max_iter=df_steps, epsilon=overshoot,
                                                      nb_grads=10, batch_size=chunk, verbose=False)), None),
    }


def _art_deepfool(attack: object) -> AttackFn:
    # ART's DeepFool ignores labels and attacks the model's own prediction.
    def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(attack.generate(x.numpy()))  # type: ignore[attr-defined]
    return fn


def foolbox_makers(eps: float, pgd_steps: int, pgd_alpha: float, df_steps: int, overshoot: float,
                   ) -> dict[str, tuple[Callable[[nn.Module], AttackFn], int | None]]:
    import foolbox as fb

    def run(attack: object, epsilon: float | None) -> Callable[[nn.Module], AttackFn]:
        def make(module: nn.Module) -> AttackFn:
            fmodel = fb.PyTorchModel(module.eval(), bounds=(0.0, 1.0))

            def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                _, clipped, _ = attack(fmodel, x, y, epsilons=epsilon)  # type: ignore[operator]
                return clipped.detach()
            return fn
        return make

    return {
        "FGSM": (run(fb.attacks.FGSM(), eps), 1),
        "PGD": (run(fb.attacks.LinfPGD(abs_stepsize=pgd_alpha, steps=pgd_steps, random_start=True), eps),
                pgd_steps),
        "DeepFool": (run(fb.attacks.L2DeepFoolAttack(steps=df_steps, candidates=10, overshoot=overshoot),
                         None), None),
    }


def reference_deepfool(module: nn.Module, x: torch.Tensor, y: torch.Tensor, *, overshoot: float,
                       max_iter: int, clip: bool, num_classes: int = 10) -> torch.Tensor:
    """The classic per-image DeepFool loop of the original reference code (L2), written here as a
    baseline: for each image, each iteration does one backward pass per candidate class. The
    reference never clips to valid pixels; ``clip=True`` clips every iterate to [0, 1]."""
    out = []
    for i in range(x.shape[0]):
        x0 = x[i:i + 1]
        with torch.no_grad():
            order = module(x0)[0].argsort(descending=True)[:num_classes]
        label = int(order[0])
        r_total = torch.zeros_like(x0)
        x_cur = x0.clone()
        for _ in range(max_iter):
            x_var = x_cur.detach().requires_grad_(True)
            logits = module(x_var)[0]
            if int(logits.argmax()) != label:
                break
            grad_orig = torch.autograd.grad(logits[label], x_var, retain_graph=True)[0]
            best, best_r = float("inf"), None
            for k in order[1:]:
                grad_k = torch.autograd.grad(logits[int(k)], x_var, retain_graph=True)[0]
                w_k = grad_k - grad_orig
                f_k = float(logits[int(k)] - logits[label])
                dist = abs(f_k) / (float(w_k.norm()) + 1e-8)
                if dist < best:
                    best, best_r = dist, (abs(f_k) + 1e-4) * w_k / (w_k.norm() ** 2 + 1e-8)
            assert best_r is not None
            r_total = r_total + best_r
            x_cur = x0 + (1 + overshoot) * r_total
            if clip:
                x_cur = x_cur.clamp(0.0, 1.0)
        out.append(x_cur.detach())
    return torch.cat(out)
