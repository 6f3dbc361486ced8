"""
The learning-rate schedule of every training loop in this repo (train.py, `tokenizer.py train`, toy/run.py).

    lr(step) = peak * w(step) * c(step)
    w = min(1, (step + 1) / warmup)                     linear warm-up (w = 1 without one)
    c = final + (1 - final) * (1 + cos(pi * p)) / 2     a half cosine from 1 down to `final`
    p = (step - decay_start) / (steps - decay_start), clipped to [0, 1]

`final = 1` holds the rate constant after warm-up; `final = 0` decays it to zero at the last step. The decay
starts at the end of warm-up unless `decay_start` says otherwise.
"""

import math


def learning_rate(step, steps, peak, warmup=0, final=1.0, decay_start=None):
    """The learning rate of step `step` (0-based) of a `steps`-step run."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    start = warmup if decay_start is None else decay_start
    progress = min(max((step - start) / max(1, steps - start), 0.0), 1.0)
    return peak * (warm * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))))
