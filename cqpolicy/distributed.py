"""Data-parallel sampling under ``torchrun``: the ranks split the batches one process would sample, and every
rank gets the merged result.

Batch ``b`` of a run (the same batches a single process makes, ``batch_size`` seeds each) goes to rank
``b mod world size``; images come back in seed order and MACs are summed, so a sharded run gives the single
process's images, MACs, FID and rows (the same batches run the same kernels). Outside ``torchrun`` (no
``WORLD_SIZE``, or 1) nothing here starts a process group and every function is the one-process case.

Rank 0 alone writes files and MLflow runs; the other ranks wait for it (``main_writes``), so every rank reads the
same output folder afterwards, which must lie on storage all ranks see (one machine, or a shared filesystem across
``--nnodes``). gloo on CPU, NCCL on GPU (each rank on ``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import atexit
import datetime
import fcntl
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TIMEOUT = datetime.timedelta(hours=3)  # a rank waits this long at a collective: rank 0 may time a method alone


class DistributedError(ValueError):
    """A launch that cannot run as asked (one line, exit status 2)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def batches(self, num_samples: int, batch_size: int) -> list[tuple[int, int]]:
        """This rank's ``(start, end)`` spans of the batches one process would sample."""
        spans = [(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]
        return spans[self.rank::self.size]


_alone = False  # inside ``main_alone`` on rank 0: this process works as if it were the only one


def world() -> World:
    """This process's place in a ``torchrun`` launch (the process group starts on the first call)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or _alone:
        return World()
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        atexit.register(_leave)
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def _leave() -> None:
    """Close the process group before the interpreter tears its threads down (else gloo may abort the exit)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(requested: str | None) -> str:
    """``requested`` (None: cuda where available, else cpu), with a bare ``cuda`` made this rank's own GPU."""
    import torch

    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return name


def _device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if world().size > 1:
        import torch.distributed as dist

        dist.barrier()


def all_sum(values: list[float], exact: bool = False) -> list:
    """Element-wise sums over the ranks (``exact``: as 64-bit integers, for counts such as MACs)."""
    return _all_reduce(values, "SUM", exact)


def all_max(values: list[float]) -> list[float]:
    return _all_reduce(values, "MAX", False)


def _all_reduce(values: list[float], op: str, exact: bool) -> list:
    if world().size == 1:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64 if exact else torch.float64, device=_device())
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.cpu().tolist()


def broadcast_text(text: str | None) -> str:
    """Rank 0's ``text`` on every rank (a folder name rank 0 chose)."""
    if world().size == 1:
        return text
    import torch
    import torch.distributed as dist

    data = torch.tensor(list((text or "").encode()) if world().main else [], dtype=torch.uint8)
    length = torch.tensor([len(data)], dtype=torch.long, device=_device())
    dist.broadcast(length, 0)
    buffer = torch.zeros(int(length), dtype=torch.uint8, device=_device())
    if world().main:
        buffer[:] = data.to(buffer.device)
    dist.broadcast(buffer, 0)
    return bytes(buffer.cpu().tolist()).decode()


def gather_rows(rows, index: list[int], total: int):
    """Every rank's ``rows`` (``[len(index), ...]``, the same trailing shape and dtype on all ranks) placed at
    positions ``index`` of one ``[total, ...]`` tensor, returned on every rank (on CPU)."""
    import torch

    if world().size == 1:
        out = rows.new_empty((total, *rows.shape[1:]))
        out[torch.as_tensor(index, dtype=torch.long)] = rows
        return out
    import torch.distributed as dist

    device, size = _device(), world().size
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([len(index)], device=device))
    counts = [int(c) for c in counts]
    width = max(counts)
    padded = torch.zeros((width, *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[:len(index)] = rows.to(device)
    places = torch.full((width,), -1, dtype=torch.long, device=device)
    places[:len(index)] = torch.as_tensor(index, dtype=torch.long, device=device)
    all_rows = [torch.empty_like(padded) for _ in range(size)]
    all_places = [torch.empty_like(places) for _ in range(size)]
    dist.all_gather(all_rows, padded)
    dist.all_gather(all_places, places)
    out = torch.empty((total, *rows.shape[1:]), dtype=rows.dtype)
    filled = 0
    for r, n in enumerate(counts):
        out[all_places[r][:n].cpu()] = all_rows[r][:n].cpu()
        filled += n
    if filled != total or sorted(torch.cat([p[:n].cpu() for p, n in zip(all_places, counts)]).tolist()) \
            != list(range(total)):
        raise RuntimeError(f"the ranks sampled {filled} of {total} rows, not each once")
    return out


@contextmanager
def main_alone():
    """Run the block on rank 0 as the only process (its sampling unsharded, its files and MLflow runs its own):
    ``with main_alone() as mine: if mine: ...``; the other ranks skip it and wait. For work that does not shard."""
    global _alone
    w = world()
    _alone = w.size > 1 and w.main
    ok = False
    try:
        yield w.main
        ok = True
    finally:
        _alone = False
        _end_together(ok)


@contextmanager
def main_writes():
    """Run the block on rank 0 only (files, MLflow runs): ``with main_writes() as mine: if mine: ...``; every
    rank waits at the end, so all see what rank 0 wrote."""
    w = world()
    ok = False
    try:
        yield w.main
        ok = True
    finally:
        _end_together(ok)


def _end_together(ok: bool) -> None:
    """Every rank waits here; when the block failed on some rank, the others stop too instead of waiting at their
    next collective until the timeout (the failed rank's own error goes on as it is)."""
    if world().size > 1 and all_sum([0.0 if ok else 1.0])[0] and ok:
        raise DistributedError("another rank failed in a step it ran for all ranks (its error is in its output)")


def agree(ok: bool, message: str, error: type[Exception] = DistributedError) -> None:
    """Raise ``error(message)`` on every rank when any rank's ``ok`` is false (a check one rank makes, such as a
    lock only rank 0 holds, ends every rank the same way instead of leaving them waiting)."""
    if all_sum([0.0 if ok else 1.0])[0] != 0:
        raise error(message)


class FolderLock:
    """An exclusive lock on an output folder for one launch (``fcntl.flock`` on ``FOLDER/.cqpolicy.lock``, taken
    by rank 0): a second launch writing the same folder stops with one line instead of interleaving rows. The
    lock goes with the process, so a killed launch never leaves a stale one."""

    def __init__(self, folder: str | os.PathLike, name: str = ".cqpolicy.lock"):
        self.path = Path(folder) / name
        self.handle = None

    def __enter__(self):
        ok = True
        if world().main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "a+")
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.handle.close()
                self.handle, ok = None, False
        agree(ok, f"{self.path.parent} is being written by another launch (it holds {self.path.name}): wait for "
                  f"it, or write to another folder")
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
        return False


def check_shared(folder: str | os.PathLike) -> None:
    """Every rank must see the files rank 0 writes into ``folder`` (one machine, or a shared filesystem)."""
    w = world()
    if w.size == 1:
        return
    token = Path(folder) / f".cqpolicy-shared-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    with main_writes() as mine:
        if mine:
            token.parent.mkdir(parents=True, exist_ok=True)
            token.write_text("rank 0\n")
    seen = token.is_file()
    agree(seen, f"{folder} is not on storage every rank sees: give all ranks a shared output folder")
    with main_writes() as mine:
        if mine:
            token.unlink(missing_ok=True)
