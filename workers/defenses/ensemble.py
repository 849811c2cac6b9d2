"""Prediction ensembles: several classifiers, one decision.

Strauss et al., "Ensemble Methods as a Defense to Adversarial Perturbations Against Deep Neural
Networks" (2017) average or vote over members; He et al., "Adversarial Example Defenses: Ensembles
of Weak Defenses are not Strong" (WOOT 2017) show why an audit must attack the ensemble as a whole,
which is what this module allows: it is one classifier, returning ``(N, K)`` logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Combine = Literal["mean-probabilities", "majority-vote"]
COMBINES: tuple[Combine, ...] = ("mean-probabilities", "majority-vote")


class Ensemble(nn.Module):
    """``members`` (same input shape, same ``K`` classes, same device) combined into one classifier.

    ``forward(x)`` returns ``(N, K)`` "logits" whose argmax is the ensemble's decision and whose
    softmax is the ensemble's probabilities:

    - ``"mean-probabilities"``: ``log(mean_m softmax(member_m(x)))``, computed as
      ``logsumexp_m(log_softmax(member_m(x))) - log(M)``, which is finite for finite member logits
      (no clamp needed) and differentiable.
    - ``"majority-vote"``: each member votes for its argmax; the output is the log of the vote
      shares plus ``1e-3 / M`` times the mean probability (renormalised), which breaks ties by mean
      probability yet can never outweigh one vote (a vote is worth ``1 / M``). Shares are clamped
      below by the dtype's ``tiny`` before the log. ``differentiable`` is False: the vote is
      piecewise constant, so the output's gradient with respect to ``x`` is zero (``0 * logits``
      keeps the graph, so that a naive attacker gets zeros rather than an autograd error).
    """

    def __init__(self, members: Sequence[nn.Module], combine: Combine) -> None:
        super().__init__()
        if not members:
            raise ValueError("expected at least one ensemble member, got none")
        if combine not in COMBINES:
            raise ValueError(f"expected combine in {list(COMBINES)}, got {combine!r}")
        self.members = nn.ModuleList(members)
        self.combine = combine
        self.differentiable = combine == "mean-probabilities"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([member(x) for member in self.members])  # (M, N, K)
        assert logits.ndim == 3, f"expected member logits of shape (N, K), got {tuple(logits.shape[1:])}"
        count = logits.shape[0]
        log_probs = F.log_softmax(logits, dim=-1)
        if self.combine == "mean-probabilities":
            return torch.logsumexp(log_probs, dim=0) - math.log(count)
        with torch.no_grad():
            votes = F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).sum(dim=0).to(logits.dtype)
            scores = votes / count + (1e-3 / count) * log_probs.exp().mean(dim=0)
            scores = scores / scores.sum(dim=1, keepdim=True)
            out = scores.clamp_min(torch.finfo(scores.dtype).tiny).log()
        return out + 0 * logits.mean(dim=0)
