"""Which training samples a step spends its backward pass on: selective backprop with stale losses.

Jiang et al. 2019, "Accelerating Deep Learning by Focusing on the Biggest Losers", as a data order: the first
``warmup_epochs`` train on every sample; after that each epoch keeps sample k with probability

    q_k = max(floor, r_k ** beta)

where r_k in [0, 1] is the percentile of the loss sample k had the last time it was trained (0 = the smallest
recorded loss, 1 = the largest). Skipped samples cost nothing: no forward, no backward. Every trained step records
its own forward losses as the samples' new ones, so the record is "stale" by at most the epochs a sample sat out.
A sample never trained yet is always kept. The draw comes from the run's data generator, so a run with selection
is as reproducible (and resumable, with ``state``/``load``) as one without.
"""

from __future__ import annotations

import torch
from torch import Tensor


class StaleLossSelection:
    """The loss record of every training sample and the epoch orders drawn from it."""

    def __init__(self, n: int, beta: float, floor: float = 0.0, warmup_epochs: int = 1) -> None:
        if n <= 0 or beta < 0 or not 0.0 <= floor <= 1.0 or warmup_epochs < 0:
            raise ValueError(f"StaleLossSelection: bad arguments n={n}, beta={beta}, floor={floor}, "
                             f"warmup_epochs={warmup_epochs}")
        self.beta, self.floor, self.warmup_epochs = beta, floor, warmup_epochs
        self.losses = torch.full((n,), float("nan"))  # the last trained loss of each sample; NaN = never trained

    def probabilities(self) -> Tensor:
        """(n,) the chance each sample is kept in a selective epoch."""
        q = torch.ones_like(self.losses)
        known = ~torch.isnan(self.losses)
        count = int(known.sum())
        if count < 2:
            return q
        ranks = torch.empty(count)
        ranks[self.losses[known].argsort()] = torch.arange(count, dtype=torch.float32)
        q[known] = (ranks / (count - 1)).pow(self.beta).clamp(min=self.floor)
        return q

    def epoch_order(self, epoch: int, generator: torch.Generator) -> Tensor:
        """The sample indices epoch ``epoch`` (from 0) trains on, in order: a permutation of all samples during the
        warm-up, of the kept ones after it."""
        order = torch.randperm(len(self.losses), generator=generator)
        if epoch < self.warmup_epochs:
            return order
        keep = torch.rand(len(order), generator=generator) < self.probabilities()[order]
        return order[keep]

    def record(self, idx: Tensor, losses: Tensor) -> None:
        """The per-sample losses of a trained batch become those samples' record."""
        self.losses[idx.cpu()] = losses.detach().float().cpu()

    def state(self) -> dict[str, Tensor]:
        """What ``--resume`` needs (tensors for the run's state file)."""
        return {"selection.losses": self.losses.clone()}

    def load(self, tensors: dict[str, Tensor]) -> None:
        """Undo ``state``."""
        saved = tensors["selection.losses"]
        if saved.shape != self.losses.shape:
            raise ValueError(f"the saved loss record has {saved.numel()} samples, the training split "
                             f"{self.losses.numel()}")
        self.losses = saved.clone().float()
