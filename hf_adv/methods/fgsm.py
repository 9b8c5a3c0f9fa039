"""FGSM: the fast gradient sign method (Goodfellow et al., "Explaining and Harnessing Adversarial Examples",
ICLR 2015), applied to word embeddings."""

from __future__ import annotations

import torch

from .base import register_method
from .fgm import FGM


@register_method
class FGSM(FGM):
    """Fast gradient sign method: r = epsilon * sign(g) for the embedding rows the batch looks up.

    In example scope the sign is taken of each position's gradient (padding stays 0). Everything else (added to the
    embedding output of each lookup of the row, no weight written, skipped steps,
    fp16) is as in `FGM`; sign(g) is invariant to the GradScaler's loss scale.

    Args:
        model (`nn.Module`): the model.
        epsilon (`float`, *optional*, defaults to `1.0`): L-infinity size of the perturbation. With hidden size 384
            a row moves by epsilon * sqrt(384) in L2, so useful values are much smaller than FGM's (around 1e-2).
    """

    name = "fgsm"
    own_flags = ("adv_scope", "adv_fraction")

    def step(self, grad: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        return self.epsilon * grad.sign()

    def example_step(self, direction: torch.Tensor) -> torch.Tensor:
        return self.epsilon * direction.sign()
