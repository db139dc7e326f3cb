"""Exponential moving average of a model's weights (``--model-ema``), as in torchvision's references.

The average is an :class:`torch.optim.swa_utils.AveragedModel` over parameters *and* buffers
(``use_buffers=True``): ``avg = decay * avg + (1 - decay) * current`` for every floating-point
tensor. The first update after construction (or after ``n_averaged`` is reset to 0, which the
training loop does during lr warm-up) copies the model instead.

Our mask parametrizations need nothing special: ``AveragedModel`` deep-copies the module, so
the copy has its own ``parametrizations.weight.original`` and its own Supermask ``scores``
(ordinary parameters of the copy, averaged like the weights), and its forward derives its own
masks from its own averaged scores. NMMask's ``perm`` (an integer buffer) is copied, not
averaged. ``copy.deepcopy`` drops tensor hooks, so a bidirectional NMMask in the copy has no
permutation-search hook: harmless, the copy is only evaluated (under ``no_grad``), never trained.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel


def adjusted_decay(decay: float, batch_size: int, world_size: int, steps: int, epochs: int) -> float:
    """The per-update decay that makes ``--model-ema-decay`` independent of the other settings.

    From the references (after pycls): the number of EMA updates in a run is
    ``dataset_size * epochs / (world_size * batch_size * steps)``; taking ``dataset_size`` as a
    constant and dropping it, ``1 - decay`` is scaled by ``adjust = world_size * batch_size *
    steps / epochs`` (capped so the decay stays >= 0)::

        decay_used = 1 - min(1, (1 - decay) * world_size * batch_size * steps / epochs)

    The recipe's 0.99998 with 8 x 512 images, steps 32, 300 epochs gives ~0.99126.
    """
    adjust = world_size * batch_size * steps / epochs
    return 1.0 - min(1.0, (1.0 - decay) * adjust)


class ExponentialMovingAverage(AveragedModel):
    """``AveragedModel`` whose average is exponential with a fixed ``decay``.

    ``state_dict()`` holds ``n_averaged`` and the copy's own state under ``module.``; the
    training script saves it as ``checkpoint["model_ema"]``. The copy's parameters do not
    require grad: it is evaluated, never trained.
    """

    def __init__(self, model: nn.Module, decay: float, device: torch.device | None = None):
        def ema_avg(avg: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
            if not avg.is_floating_point():  # counters, NMMask perm: averaging them is meaningless
                return current
            return decay * avg + (1.0 - decay) * current

        super().__init__(model, device=device, avg_fn=ema_avg, use_buffers=True)
        self.decay = decay
        self.module.requires_grad_(False)
