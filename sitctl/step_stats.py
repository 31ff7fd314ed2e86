"""A training step's statistics as named fields: loss by time bucket, and REPA's alignment loss.

They travel between ranks as one flat tensor (one all-reduce a step, with the stop votes), add up
over a log window, and are kept in a checkpoint so that a resume completes the window's row. This
class owns that packing; no other module reads offsets. Everything stays on the device until a
log line reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

TIME_BUCKETS = 10  # loss is also logged per t in [k/10, (k+1)/10)


@dataclass
class StepStats:
    loss_sums: Tensor  # (TIME_BUCKETS,) summed per-sample losses, by bucket of t
    counts: Tensor  # (TIME_BUCKETS,) samples per bucket
    align_sum: Tensor | None = None  # (1,) REPA's per-sample alignment losses summed; None without REPA

    @classmethod
    def of(cls, losses: Tensor, t: Tensor, aligns: Tensor | None = None) -> StepStats:
        """The statistics of per-sample `losses` (n,) at times `t` (n,), and REPA's `aligns` (n,)."""
        bucket = (t * TIME_BUCKETS).long().clamp(0, TIME_BUCKETS - 1)
        sums = torch.zeros(TIME_BUCKETS, device=t.device).index_add_(0, bucket, losses)
        counts = torch.zeros(TIME_BUCKETS, device=t.device).index_add_(0, bucket, torch.ones_like(losses))
        return cls(sums, counts, None if aligns is None else aligns.sum().reshape(1))

    def pack(self) -> Tensor:
        """[loss sums, counts, alignment sum if any]: one tensor for one collective, and the saved form."""
        return torch.cat([self.loss_sums, self.counts, *(() if self.align_sum is None else (self.align_sum,))])

    @classmethod
    def unpack(cls, flat: Tensor) -> StepStats:
        """The inverse of `pack` (its length says whether REPA's sum is there)."""
        align = flat[2 * TIME_BUCKETS :] if len(flat) > 2 * TIME_BUCKETS else None
        return cls(flat[:TIME_BUCKETS], flat[TIME_BUCKETS : 2 * TIME_BUCKETS], align)

    def __add__(self, other: StepStats) -> StepStats:
        return StepStats.unpack(self.pack() + other.pack())

    def record(self) -> list[float]:
        """As a checkpoint keeps it (the packed values: checkpoints written before this class read back alike)."""
        return self.pack().tolist()

    @classmethod
    def from_record(cls, values: list[float], device: Any) -> StepStats:
        return cls.unpack(torch.tensor(values, device=device))

    def losses(self) -> dict[str, Any]:
        """The metrics row's loss fields: the mean loss, and the mean per bucket (None when empty)."""
        return {"loss": float(self.loss_sums.sum() / self.counts.sum()),
                "loss_by_t": [float(s / c) if c > 0 else None for s, c in zip(self.loss_sums, self.counts)]}

    def align_loss(self) -> float:
        """REPA's mean alignment loss (minus the mean cosine); only with REPA."""
        return float(self.align_sum[0] / self.counts.sum())
