"""What the embedded models' training scripts share (``scripts/train_fmnist.py``, ``scripts/train_fmnist_sd3.py``):
atomic checkpoint writes and the learning-rate schedule."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, then renamed over ``path``: a killed run never leaves half a checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def learning_rate(args, step: int) -> float:
    """Linear warm-up (``args.warmup_steps``), then ``args.lr``, then with ``args.decay_from`` a cosine tail to
    ``args.lr_final`` at ``args.max_steps``."""
    lr = args.lr * min(1.0, (step + 1) / args.warmup_steps)
    if args.decay_from is not None and step >= args.decay_from:
        done = min(1.0, (step - args.decay_from) / max(1, args.max_steps - args.decay_from))
        lr = args.lr_final + 0.5 * (args.lr - args.lr_final) * (1 + math.cos(math.pi * done))
    return float(lr)
