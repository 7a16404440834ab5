"""An in-memory checkpoint ring: snapshots of weights (and optimizer state) in host memory, for instant roll-backs.

mSFT (train/msft.py) keeps the weights at each task's best evaluation so far and rolls back to one of them; a disk
checkpoint per evaluation would cost seconds to minutes each (torch.save reaches ~0.5 GB/s), a copy to pinned host
memory costs milliseconds (~50 GB/s on an H100 host link) and overlaps training.

    ring = CheckpointRing(capacity_bytes=8 << 30)
    ring.snapshot("best/reverse", model, optimizer, meta={"epoch": 1.25})   # returns at once on CUDA
    ...                                                                     # training goes on
    meta = ring.restore("best/reverse", model, optimizer)                  # weights and optimizer as they were

Contract:
  - Buffers are allocated on a key's first snapshot and reused: a new snapshot of an existing key overwrites its
    buffers, and a dropped key's buffers serve the next new key of the same layout. Total bytes never exceed
    `capacity_bytes`: a snapshot that does not fit raises RingFull (capacity, held, needed); nothing is ever
    evicted silently: the caller `drop`s what it no longer needs.
  - On CUDA, buffers are pinned host memory (or device memory with device="cuda") and copies run on a side stream:
    a snapshot waits (on the GPU, no host sync) for the work queued so far, copies, and records an event. Until that
    event, the parameters must not be written: an optimizer passed to `snapshot` gets a one-shot pre-step hook that
    makes the compute stream wait for the event (again on the GPU); other writers call `fence()` first. A restore
    waits for the snapshot it reads, and the compute stream waits for the restore, so what follows sees the
    restored weights.
  - Under FSDP2 every rank copies its own shards (DTensor local tensors), with no communication: call snapshot and
    restore on every rank, with the same keys. Under HSDP the replicas hold equal shards and the ring still keeps
    one copy per rank, not one per replica: a restore then stays a local copy on every rank (one kept per replica
    would have to be broadcast across nodes at each roll-back, the traffic HSDP exists to avoid), and the host memory
    it costs is per node, where the ranks of one replica group together hold exactly one copy of the model.
  - Exact: restore gives back bit-identical parameters and optimizer state (every tensor in `optimizer.state`, and
    the param groups' hyperparameters).

Not here: files on disk (core/distributed.Checkpointer), which snapshot to keep (the caller's policy).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from posttrain.core.distributed import reshard


class RingFull(RuntimeError):
    """A snapshot would exceed the ring's capacity."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _sources(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """The tensors a snapshot copies, in a fixed order: parameters, then each parameter's optimizer state."""
    reshard(model)
    out = [_local(p.detach()) for p in model.parameters()]
    if optimizer is not None:
        for p in model.parameters():
            state = optimizer.state.get(p, {})
            for name in sorted(state):
                if isinstance(state[name], torch.Tensor):
                    out.append(_local(state[name]))
    return out


def _layout(tensors: list[torch.Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


@dataclass
class _Slot:
    layout: tuple
    buffers: list[torch.Tensor]
    nbytes: int
    meta: Any = None
    optim_keys: list[tuple[int, str]] = field(default_factory=list)  # (param index, state name) per state buffer
    groups: list[dict] = field(default_factory=list)  # optimizer param-group hyperparameters
    event: Any = None  # CUDA event: the copy into this slot is done


class CheckpointRing:
    """Named in-memory snapshots of a model (and optimizer); see the module docstring."""

    def __init__(self, capacity_bytes: int, *, device: str | torch.device = "cpu") -> None:
        self.capacity = int(capacity_bytes)
        self.device = torch.device(device)
        self._slots: dict[str, _Slot] = {}
        self._free: list[_Slot] = []  # dropped slots, buffers kept for reuse
        self._stream = None
        self._pending: list[Any] = []  # events the compute stream must wait for before parameters change

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._slots)

    def __contains__(self, key: str) -> bool:
        return key in self._slots

    @property
    def nbytes(self) -> int:
        """Bytes held by live snapshots and by free buffers kept for reuse."""
        return sum(s.nbytes for s in self._slots.values()) + sum(s.nbytes for s in self._free)

    def meta(self, key: str) -> Any:
        return self._slot(key).meta

    def drop(self, key: str) -> None:
        """Forget `key`; its buffers are kept for the next snapshot of the same layout."""
        self._free.append(self._slots.pop(self._check(key)))

    def clear(self) -> None:
        """Drop every snapshot and release all buffers."""
        self.fence()
        self._slots.clear()
        self._free.clear()

    def _check(self, key: str) -> str:
        if key not in self._slots:
            raise KeyError(f"CheckpointRing: no snapshot {key!r}; held: {sorted(self._slots) or 'none'}")
        return key

    def _slot(self, key: str) -> _Slot:
        return self._slots[self._check(key)]

    # -- copies ----------------------------------------------------------------------------------------------

    def _cuda(self, tensors: list[torch.Tensor]) -> bool:
        return bool(tensors) and tensors[0].device.type == "cuda"

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        return self._stream

    def _allocate(self, key: str, tensors: list[torch.Tensor]) -> _Slot:
        layout = _layout(tensors)
        old = self._slots.pop(key, None)
        if old is not None and old.layout == layout:
            return old
        if old is not None:
            self._free.append(old)
        reuse = next((s for s in self._free if s.layout == layout), None)
        if reuse is not None:
            self._free.remove(reuse)
            return reuse
        need = sum(t.numel() * t.element_size() for t in tensors)
        held = self.nbytes
        if held + need > self.capacity:
            # Free buffers of another layout are not reused, but they do count: release them before refusing.
            self._free.clear()
            held = self.nbytes
            if held + need > self.capacity:
                raise RingFull(f"CheckpointRing: snapshot {key!r} needs {need / 2**20:.1f} MiB, but "
                               f"{held / 2**20:.1f} MiB of {self.capacity / 2**20:.1f} MiB are held by "
                               f"{sorted(self._slots)}; drop a snapshot or raise capacity_bytes")
        on_cuda = self._cuda(tensors)
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        pin = on_cuda and device.type == "cpu"
        buffers = [torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pin) for t in tensors]
        return _Slot(layout, buffers, need)

    def snapshot(self, key: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 meta: Any = None) -> None:
        """Copy this rank's parameters (and optimizer state) into slot `key` (made or overwritten). Asynchronous
        on CUDA (see the module docstring); `meta` is kept by value (deep-copied) and returned by restore."""
        tensors = _sources(model, optimizer)
        slot = self._allocate(key, tensors)
        slot.meta = copy.deepcopy(meta)
        slot.optim_keys, slot.groups = [], []
        if optimizer is not None:
            for i, p in enumerate(model.parameters()):
                state = optimizer.state.get(p, {})
                slot.optim_keys += [(i, n) for n in sorted(state) if isinstance(state[n], torch.Tensor)]
            slot.groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        if self._cuda(tensors):
            compute = torch.cuda.current_stream(tensors[0].device)
            side = self._side_stream(tensors[0].device)
            side.wait_stream(compute)  # copy the weights as of now, not before the queued work
            with torch.cuda.stream(side):
                for buf, t in zip(slot.buffers, tensors):
                    buf.copy_(t, non_blocking=True)
                    t.record_stream(side)
                slot.event = torch.cuda.Event()
                slot.event.record(side)
            self._pending.append(slot.event)
            if optimizer is not None:
                self._fence_before_step(optimizer)
        else:
            for buf, t in zip(slot.buffers, tensors):
                buf.copy_(t)
            slot.event = None
        self._slots[key] = slot

    def _fence_before_step(self, optimizer: torch.optim.Optimizer) -> None:
        handle = None

        def hook(*_: Any) -> None:
            self.fence()
            handle.remove()

        handle = optimizer.register_step_pre_hook(hook)

    def fence(self) -> None:
        """Make the current CUDA stream wait (on the GPU) for every snapshot copy in flight; call before writing
        parameters some other way than through an optimizer passed to `snapshot`. A no-op on CPU."""
        for event in self._pending:
            torch.cuda.current_stream().wait_event(event)
        self._pending.clear()

    def wait(self) -> None:
        """Block the host until every copy in flight is done (benchmarks, tests)."""
        for slot in self._slots.values():
            if slot.event is not None:
                slot.event.synchronize()

    def restore(self, key: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """Copy slot `key` back into the model (and the optimizer, which must be the kind snapshotted, or a fresh
        one of that kind: its missing state is created). Returns the snapshot's meta."""
        slot = self._slot(key)
        reshard(model)
        params = list(model.parameters())
        targets = [_local(p.detach()) for p in params]
        if optimizer is not None and slot.optim_keys:
            self._make_state(optimizer, params, slot, key)
            targets += [_local(optimizer.state[params[i]][n]) for i, n in slot.optim_keys]
        elif optimizer is not None and not slot.optim_keys:
            raise ValueError(f"CheckpointRing: snapshot {key!r} holds no optimizer state; restore without one")
        if _layout(targets) != slot.layout:
            raise ValueError(f"CheckpointRing: snapshot {key!r} was taken of another model or optimizer layout")
        if self._cuda(targets):
            compute = torch.cuda.current_stream(targets[0].device)
            side = self._side_stream(targets[0].device)
            side.wait_stream(compute)  # nothing queued may still read or write the weights we overwrite
            if slot.event is not None:
                side.wait_event(slot.event)
            with torch.cuda.stream(side):
                for buf, t in zip(slot.buffers, targets):
                    t.copy_(buf, non_blocking=True)
            compute.wait_stream(side)
        else:
            for buf, t in zip(slot.buffers, targets):
                t.copy_(buf)
        if optimizer is not None:
            for group, saved in zip(optimizer.param_groups, slot.groups):
                group.update(copy.deepcopy(saved))
        return copy.deepcopy(slot.meta)

    @staticmethod
    def _make_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], slot: _Slot, key: str) -> None:
        """A fresh optimizer has no state yet: create it with the snapshot's shapes so it can be filled."""
        for (i, name), (shape, dtype) in zip(slot.optim_keys, slot.layout[len(params):]):
            state = optimizer.state[params[i]]
            if name not in state:
                ref = params[i].detach()
                if tuple(_local(ref).shape) == shape:
                    state[name] = torch.zeros_like(ref, dtype=dtype)
                elif shape == ():  # Adam's step count: on the parameter's device only for fused/capturable
                    on_device = optimizer.defaults.get("fused") or optimizer.defaults.get("capturable")
                    state[name] = torch.zeros((), dtype=dtype, device=_local(ref).device if on_device else "cpu")
                else:
                    raise ValueError(f"CheckpointRing: snapshot {key!r}: cannot create optimizer state {name!r} "
                                     f"of shape {shape} for parameter {i}")
