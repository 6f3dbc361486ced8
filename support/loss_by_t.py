"""
The loss by t, and the first step whose loss or gradient was not finite: what train.py watches between log lines.
"""

import torch
import torch.distributed as dist

from support import distributed
from support.cli import UserError

T_BINS = 10  # the loss is also logged by t in [0, 0.1), [0.1, 0.2), ...


class LossByT:
    """The mean loss, and the mean loss in T_BINS bins of t, over the micro-batches since the last log. Where the
    loss is high tells where the model struggles (minRF logs it the same way). Also remembers the first step
    whose loss or gradient was not finite, on the device: no synchronisation per step."""

    def __init__(self, device):
        self.sums = torch.zeros(1 + 2 * T_BINS, device=device)  # [loss, sum by bin, count by bin]
        self.first_nonfinite = torch.zeros((), dtype=torch.long, device=device)  # 0: every loss so far finite

    def flag(self, value, step):
        bad = (self.first_nonfinite == 0) & ~torch.isfinite(value.detach())
        self.first_nonfinite = torch.where(bad, step, self.first_nonfinite)

    def add(self, loss, per_sample, t, weight, step):
        """Add one micro-batch of step `step` (1-based)."""
        self.flag(loss, step)
        b = (t * T_BINS).long().clamp(max=T_BINS - 1)  # (B,) the bin of each sample's t
        self.sums[0] += loss.detach() * weight
        self.sums[1:1 + T_BINS].index_add_(0, b, per_sample.float())
        self.sums[1 + T_BINS:].index_add_(0, b, torch.ones_like(per_sample, dtype=torch.float))

    def reduce(self, steps, world):
        """(mean loss per step, [mean loss in each bin]) over every rank, and reset: the loop's one all-reduce,
        only when it logs."""
        stats = distributed.all_reduce_mean(self.sums.clone(), world)
        self.sums.zero_()
        by_t = stats[1:1 + T_BINS] / stats[1 + T_BINS:].clamp_min(1e-9)
        return stats[0].item() / steps, by_t.tolist()

    def check_finite(self, world, last_checkpoint):
        """UserError naming the first step, on any rank, whose loss or gradient was not finite. Called before every
        log line and checkpoint, so that neither ever holds a non-finite loss or the weights it produced."""
        first = self.first_nonfinite.clone()
        if world > 1:  # the earliest over ranks; 0 (all finite) counts as never
            first = torch.where(first == 0, torch.iinfo(torch.long).max, first)
            with distributed.peers():
                dist.all_reduce(first, op=dist.ReduceOp.MIN)
            first = torch.where(first == torch.iinfo(torch.long).max, 0, first)
        if first.item():
            kept = (f"the last checkpoint, of step {last_checkpoint}, is kept" if last_checkpoint else
                    "no checkpoint was written")
            raise UserError(f"step {first.item()}: the loss or its gradient is not a finite number; training stopped "
                            f"and {kept} (try a lower --lr)")
