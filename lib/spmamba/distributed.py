"""Data-parallel work across processes and machines with PyTorch's own engine (``torch.distributed``, launched by
``torchrun``). All the rank-aware plumbing of the library is here; the training loop calls it through a
:class:`Ranks` object that, in a single process (no ``torchrun``), does nothing at all, so that path stays what it
always was.

* :func:`setup`: the process group of the processes ``torchrun`` started, initialised from the launcher's
  environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...; gloo on CPU, NCCL for CUDA tensors), or the one the
  caller initialised, or a single process. :func:`current` gives its :class:`Ranks`.
* :class:`Ranks`: what data-parallel training needs: running a one-time preparation on rank 0 and sharing the result
  (``once``), spreading per-volume work over the ranks and gathering it in order (``map``), agreeing on stop
  decisions (``agree``), averaging a loss, checking that all ranks computed the same thing (``check_same``) and
  the loss of a model whose gradients are those of the whole batch (``parallel``: ``DistributedDataParallel``
  with synchronised BatchNorm, which torch has for GPUs only and this module adds for gloo).
* :func:`launched`: this process's rank and the number of processes torchrun started (what ``spmamba detect``
  takes as its default shard, ``spmamba.results.Shard``).

Shapes of the data do not matter here: objects are pickled (``torch.distributed.*_object``), model tensors are
broadcast or all-reduced in place.
"""
from __future__ import annotations

import atexit
import datetime
import hashlib
import logging
import os
import pickle
import warnings
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, TypeVar

import torch
import torch.nn as nn

__all__ = ["Ranks", "DataParallelLoss", "SINGLE", "current", "setup", "launched", "is_main_process", "local_device",
           "TIMEOUT_ENV", "DEFAULT_TIMEOUT_S", "finish"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: environment variable: seconds a rank waits in a collective (e.g. for rank 0's teacher pretraining) before the
#: run fails; default ``DEFAULT_TIMEOUT_S``
TIMEOUT_ENV = "SPMAMBA_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 7200.0


def launched() -> tuple[int, int]:
    """(rank, world size) of this process as set by ``torchrun`` (``RANK``, ``WORLD_SIZE``); (0, 1) otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0, 1
    return (rank, world) if world > 1 and 0 <= rank < world else (0, 1)


def is_main_process() -> bool:
    """True unless ``torchrun`` started this process as a rank other than 0 (the one that writes files and prints)."""
    return launched()[0] == 0


def local_device(device: torch.device) -> torch.device:
    """A bare CUDA device under ``torchrun`` -> this process's own GPU (``cuda:LOCAL_RANK``); others unchanged."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % max(1, torch.cuda.device_count()))
    return device


class _Gathered(NamedTuple):
    index: int
    value: Any
    error: Optional[BaseException]


class _SyncBatchNormFn(torch.autograd.Function):
    """Batch normalisation over the samples of all ranks (forward and backward), with gloo or NCCL all-reduces:
    ``torch.nn.SyncBatchNorm``'s arithmetic, which torch only implements for GPUs. x: (B, C, ...) -> same."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float):  # noqa: D401
        dims = [0] + list(range(2, x.dim()))
        c = x.shape[1]
        xd = x.double()  # sums in float64: E[x^2] - E[x]^2 loses nothing worth having
        stats = torch.cat([xd.sum(dims), (xd * xd).sum(dims), xd.new_tensor([x.numel() // c])])
        torch.distributed.all_reduce(stats)
        count = stats[-1]
        mean = stats[:c] / count
        var = (stats[c:2 * c] / count - mean * mean).clamp_min(0)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_((momentum * mean).to(running_mean.dtype))
                running_var.mul_(1 - momentum).add_((momentum * var * count / (count - 1).clamp_min(1))
                                                    .to(running_var.dtype))
        shape = [1, c] + [1] * (x.dim() - 2)
        invstd = torch.rsqrt(var + eps).to(x.dtype).view(shape)
        xhat = (x - mean.to(x.dtype).view(shape)) * invstd
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.count = float(count)
        out = xhat
        if weight is not None:
            out = out * weight.view(shape) + bias.view(shape)
        return out

    @staticmethod
    def backward(ctx, dy):
        xhat, weight, invstd = ctx.saved_tensors
        dims = [0] + list(range(2, dy.dim()))
        c = dy.shape[1]
        sum_dy, sum_dy_xhat = dy.sum(dims), (dy * xhat).sum(dims)  # this rank's: its weight and bias gradients
        both = torch.cat([sum_dy, sum_dy_xhat]).double()
        torch.distributed.all_reduce(both)
        shape = [1, c] + [1] * (dy.dim() - 2)
        mean_dy = (both[:c] / ctx.count).to(dy.dtype).view(shape)
        mean_dy_xhat = (both[c:] / ctx.count).to(dy.dtype).view(shape)
        scale = invstd if weight is None else invstd * weight.view(shape)
        dx = (dy - mean_dy - xhat * mean_dy_xhat) * scale
        if weight is None:
            return dx, None, None, None, None, None, None
        return dx, sum_dy_xhat, sum_dy, None, None, None, None


class _SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm layer that, in training mode in a process group of several ranks, normalises with the statistics
    of the whole batch of all ranks (``_SyncBatchNormFn``); otherwise a plain BatchNorm. For CPU tensors (gloo),
    where ``torch.nn.SyncBatchNorm`` refuses to run."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
            return super().forward(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as BatchNorm does
                momentum = 1.0 / float(self.num_batches_tracked)
        tracked = self.track_running_stats and self.running_mean is not None
        return _SyncBatchNormFn.apply(x, self.weight, self.bias, self.running_mean if tracked else None,
                                      self.running_var if tracked else None, momentum, self.eps)


class _TrainingLoss(nn.Module):
    """``model.training_loss`` as a forward, so that ``DistributedDataParallel`` hooks the gradient all-reduce."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> torch.Tensor:
        return self.model.training_loss(batch)


def _synchronised(bn: nn.modules.batchnorm._BatchNorm, cls: type) -> nn.Module:
    """A synchronised BatchNorm layer of class ``cls`` sharing ``bn``'s parameters and buffers."""
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new.weight, new.bias = bn.weight, bn.bias
    new.running_mean, new.running_var, new.num_batches_tracked = (bn.running_mean, bn.running_var,
                                                                  bn.num_batches_tracked)
    new.train(bn.training)
    return new


class DataParallelLoss:
    """batch -> ``model.training_loss(batch)`` of this rank's share of a step's batch, such that after the backward
    pass every rank holds the gradients one process would compute on the whole batch: the model's BatchNorm layers
    normalise with the statistics of the whole batch (synchronised BatchNorm, the same parameters and buffers) and
    ``DistributedDataParallel`` averages the gradients over the ranks. ``close`` puts the model's own BatchNorm
    layers back. One process: ``model.training_loss`` itself."""

    def __init__(self, model: nn.Module, world: int):
        self.model = model
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []
        if world == 1:
            self._loss: Callable[[Any], torch.Tensor] = model.training_loss
            return
        # 1x1 convolutions' gradients come with other (equivalent) strides than DDP's buckets: harmless, but DDP
        # warns at every training
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        dev = next(model.parameters()).device
        synced = torch.nn.SyncBatchNorm if dev.type == "cuda" else _SyncBatchNorm
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, synced):
                    self._swapped.append((parent, name, child))
                    setattr(parent, name, _synchronised(child, synced))
        self._loss = torch.nn.parallel.DistributedDataParallel(
            _TrainingLoss(model), device_ids=[dev.index] if dev.type == "cuda" else None,
            forward_sync_buffers=False,  # synced once here; then every rank computes the same statistics
            gradient_as_bucket_view=True)  # no copy of the gradients into the all-reduce buckets

    def __call__(self, batch: Any) -> torch.Tensor:
        return self._loss(batch)

    def close(self) -> None:
        for parent, name, bn in reversed(self._swapped):
            setattr(parent, name, bn)
        self._swapped.clear()
        self._loss = self.model.training_loss


class Ranks:
    """The processes of one data-parallel run (``world`` of them; this one is ``rank``, rank 0 the main one). Every
    method is collective: all ranks call it, in the same order. With ``world == 1`` each is a plain local call."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = int(rank), int(world)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world={self.world})"

    # ------------------------------------------------------------------ objects
    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def once(self, fn: Callable[[], T], module: Optional[nn.Module] = None) -> T:
        """Run ``fn`` on rank 0 only (a one-time preparation: teacher pretraining, encoder norm adaptation, a
        reference ...) and return its result on every rank; then, when given, ``module``'s parameters and buffers
        are rank 0's everywhere. An exception on rank 0 is raised on every rank (each ends with the same error)."""
        if self.world == 1:
            return fn()
        outcome: tuple = (None, None)
        if self.main:
            try:
                outcome = (fn(), None)
            except Exception as e:  # noqa: BLE001 - raised again below, on every rank
                outcome = (None, e)
        value, error = self.broadcast(outcome)
        if error is not None:
            raise error
        if module is not None:
            self.sync_module(module)
        return value

    def map(self, fn: Callable[[int, Any], T], items: Sequence[Any]) -> Iterator[T]:
        """``fn(i, items[i])`` for every item, in order. One process: lazily, one after the other. Several: rank r
        computes items r, r + world, ... and every rank gets all the results, in order. An exception is raised (on
        every rank) where the item that raised it comes in the order; a rank stops its share at its first one."""
        if self.world == 1:
            return (fn(i, item) for i, item in enumerate(items))
        local: list[_Gathered] = []
        for i in range(self.rank, len(items), self.world):
            try:
                local.append(_Gathered(i, fn(i, items[i]), None))
            except Exception as e:  # noqa: BLE001 - raised again in order, on every rank
                local.append(_Gathered(i, None, e))
                break
        shares: list = [None] * self.world
        torch.distributed.all_gather_object(shares, local)
        merged = sorted((g for share in shares for g in share), key=lambda g: g.index)

        def in_order() -> Iterator[T]:
            for g in merged:
                if g.error is not None:
                    raise g.error
                yield g.value
        return in_order()

    def check_same(self, obj: Any, what: str) -> None:
        """RuntimeError naming ``what`` unless every rank holds an equal ``obj`` (compared by a hash of its
        pickle; a callable is called first, and only with several ranks): for what each rank computes itself and
        must agree on (intensity landmarks, thresholds, the trained weights)."""
        if self.world == 1:
            return
        if callable(obj):
            obj = obj()
        digest = hashlib.sha1(pickle.dumps(obj, protocol=4)).hexdigest()
        digests: list = [None] * self.world
        torch.distributed.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            raise RuntimeError(f"the {self.world} training processes disagree on {what}; run every rank with the "
                               "same software versions and the same input files")

    # ------------------------------------------------------------------ tensors
    def sync_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers in ``module`` on every rank."""
        if self.world == 1:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                torch.distributed.broadcast(t.data, src=0)

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag True on every rank when it is True on any (stop requests, time limits, the time-limit
        learning-rate drop), so that every rank takes the same decision at the same step."""
        if self.world == 1:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def barrier(self) -> None:
        """Wait until every rank is here: at the end of a run, so that no rank ends its process (closing its
        connections) while rank 0 still writes the model; gloo can abort a process whose peer went away."""
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks (e.g. a step's loss: the loss of the whole batch)."""
        if self.world == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def parallel(self, model: nn.Module) -> DataParallelLoss:
        """The training loss of ``model`` for this rank's share of each batch, with gradients (and BatchNorm
        statistics) of the whole batch: see :class:`DataParallelLoss`. Call its ``close`` after training."""
        return DataParallelLoss(model, self.world)


SINGLE = Ranks(0, 1)


def current() -> Ranks:
    """The ranks of the initialised default process group, or ``SINGLE`` (one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return SINGLE


def _timeout() -> datetime.timedelta:
    try:
        seconds = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r}: give seconds") from None
    return datetime.timedelta(seconds=seconds)


def setup(device: torch.device) -> tuple[Ranks, torch.device]:
    """The data-parallel context of a training in this process: ``(ranks, device)``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the first call initialises the process group from
    the launcher's environment (``env://``): gloo for CPU tensors, and NCCL for CUDA ones when ``device`` is a GPU
    (each process then uses its own, ``cuda:LOCAL_RANK``); it lives until the process ends. A process group the
    caller initialised is used as it is. Otherwise (no torchrun): ``(SINGLE, device)``, nothing initialised."""
    if launched()[1] > 1 and torch.distributed.is_available() and not torch.distributed.is_initialized():
        device = local_device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, timeout=_timeout())
        atexit.register(_destroy)
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        device = local_device(device)
    ranks = current()
    if ranks.world > 1:
        log.info("data-parallel training: rank %d of %d on %s", ranks.rank, ranks.world, device)
    return ranks, device


def finish() -> None:
    """End this process's part of a data-parallel run: wait for every rank (:meth:`Ranks.barrier`), then leave the
    process group. Nothing with one process. Call it once the run's files are written, before the process exits."""
    current().barrier()
    _destroy()


def _destroy() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
