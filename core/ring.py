"""An in-memory checkpoint ring: snapshots of weights (and optimizer state) in host memory, for instant roll-backs.

mSFT (train/msft/) keeps the weights at each task's best evaluation so far and rolls back to one of them; a disk
checkpoint per evaluation would cost seconds to minutes each (torch.save reaches ~0.5 GB/s), a copy to pinned host
memory costs milliseconds (~50 GB/s on an H100 host link) and overlaps training.

    ring = CheckpointRing(capacity_bytes=8 << 30)
    ring.snapshot("best/reverse", model, optimizer, meta={"epoch": 1.25})   # returns at once on CUDA
    ...                                                                     # training goes on
    meta = ring.restore("best/reverse", model, optimizer)                  # weights and optimizer as they were

Contract:
  - One arena per slot: a key's tensors are views of one buffer of exactly their bytes (each view starts 256-byte
    aligned; `snapshot_bytes` says how many), allocated on the key's first snapshot and reused: a new snapshot of an
    existing key overwrites it, and a dropped key's arena serves the next new key of the same layout. Total bytes
    never exceed `capacity_bytes`: a snapshot that does not fit raises RingFull (capacity, held, needed); nothing is
    ever evicted silently: the caller `drop`s what it no longer needs. `clear()` frees every arena.
  - On CUDA the arena is ordinary host memory page-locked in place (cudaHostRegister), not a block of PyTorch's
    caching host allocator, which rounds every allocation up to a power of two (a 116.7 MB shard would pin 128 MB)
    and keeps freed blocks for itself: `clear()` unregisters the arenas and their memory goes back to the OS. A
    registration the driver refuses raises (no silent fallback: a failed CUDA call leaves an error behind that the
    next kernel launch would report as its own).
  - Copies are asynchronous on CUDA (or device="cuda" buffers): a snapshot waits (on the GPU, no host sync) for the
    work queued so far, copies on a side stream and records an event. A snapshot must be complete before anything
    writes what it copies, whoever took it: every optimizer step (any torch.optim optimizer, through torch's global
    step pre-hook, installed at the first asynchronous snapshot) and every restore (of any ring) first make the
    current stream wait for every copy in flight, on the GPU; other writers call `fence()` first. A restore waits
    for the snapshot it reads, and the current stream waits for the restore, so what follows sees its weights.
  - Under FSDP2 every rank copies its own shards (DTensor local tensors), with no communication: call snapshot and
    restore on every rank, with the same keys. Under HSDP the replicas hold equal shards and the ring still keeps
    one copy per rank, not one per replica: a restore then stays a local copy on every rank (one kept per replica
    would have to be broadcast across nodes at each roll-back, the traffic HSDP exists to avoid), and the host memory
    it costs is per node, where the ranks of one replica group together hold exactly one copy of the model.
  - Exact: restore gives back bit-identical parameters and optimizer state (every tensor in `optimizer.state`, and
    the param groups' hyperparameters).

Why a global fence rather than a hook on the optimizer the caller passes: the caller that snapshots weights alone
(mSFT's evaluation points) has no optimizer to pass, and the next stage makes a new one; a fence that depended on
the caller would let the next fused AdamW step write the parameters while the copy still reads them, and the "best"
snapshot would hold weights that were never evaluated.

Not here: files on disk (core/distributed.Checkpointer), which snapshot to keep (the caller's policy).
"""

from __future__ import annotations

import copy
import mmap
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from posttrain.core.distributed import reshard


class RingFull(RuntimeError):
    """A snapshot would exceed the ring's capacity."""


_ALIGN = 256  # each tensor of an arena starts at a multiple of this: a view of any dtype, copies start aligned


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


def _offsets(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """Each tensor's byte offset in an arena, and the arena's size."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return offsets, end


def snapshot_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes a snapshot of this rank's part of `model` (and `optimizer`'s state as it is now) takes in a ring: size
    rings with it (capacity_bytes = k * snapshot_bytes(model) holds k weight snapshots)."""
    return _offsets(_sources(model, optimizer))[1]


def format_bytes(n: float) -> str:
    """A byte count with a readable unit: '96 B', '1.5 KiB', '116.7 MiB'; never a non-zero size shown as 0."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


# -------------------------------------------------------------------------------------- asynchronous copies


class CudaCopies:
    """What the ring's asynchronous path needs from CUDA: a side stream, events, page-locking. The ring uses it only
    through these methods, so a test can put a stand-in in its place (tests/test_ring.py: copies that finish late,
    registrations counted)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device=device)

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], after: Any = None) -> torch.cuda.Event:
        """Queue dst.copy_(src) for each (dst, src) on the side stream, behind the work queued so far on the current
        stream and behind event `after`; returns the event that marks them done. Device tensors are kept from reuse
        until then (record_stream); a CPU tensor, such as a non-fused Adam's step count, has no stream to record
        (record_stream raises on it) and is copied at once."""
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        if after is not None:
            self.side.wait_event(after)
        with torch.cuda.stream(self.side):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
                for t in (dst, src):
                    if t.is_cuda:
                        t.record_stream(self.side)
            event = torch.cuda.Event()
            event.record(self.side)
        return event

    def wait(self, event: torch.cuda.Event) -> None:
        """The current stream waits for `event`, on the GPU."""
        torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize(self, event: torch.cuda.Event) -> None:
        """The host waits for `event`."""
        event.synchronize()

    def pin(self, nbytes: int) -> tuple[torch.Tensor, int]:
        """A page-locked host arena of `nbytes` and the handle `unpin` takes (see `pin_host`)."""
        return pin_host(nbytes)

    def unpin(self, handle: int) -> None:
        unpin_host(handle)


def _cuda_check(err: Any, what: str) -> None:
    if int(err) != 0:
        raise RuntimeError(f"CheckpointRing: {what} failed: {torch.cuda.cudart().cudaGetErrorString(err)} "
                           f"(cudaError {int(err)})")


def pin_host(nbytes: int) -> tuple[torch.Tensor, int]:
    """uint8 [nbytes] of ordinary host memory, page-locked in place with cudaHostRegister; returns it and the
    registered address (for `unpin_host`). The registered range is whole pages that belong to this allocation alone,
    so no other registration can overlap it: less than two pages more than `nbytes` are allocated."""
    page = mmap.PAGESIZE
    size = -(-max(nbytes, 1) // page) * page
    raw = torch.empty(size + page, dtype=torch.uint8)
    start = -raw.data_ptr() % page
    address = raw.data_ptr() + start
    _cuda_check(torch.cuda.cudart().cudaHostRegister(address, size, 0),
                f"page-locking {format_bytes(size)} of host memory (cudaHostRegister)")
    return raw[start: start + nbytes], address


def unpin_host(address: int) -> None:
    """Undo `pin_host`; the memory is then ordinary host memory, freed with its tensor."""
    _cuda_check(torch.cuda.cudart().cudaHostUnregister(address), "cudaHostUnregister")


def _async_copies(device: torch.device) -> CudaCopies | None:
    """The engine for asynchronous copies of tensors on `device`; None: copy synchronously (CPU)."""
    return CudaCopies(device) if device.type == "cuda" else None


# Snapshot copies the current stream has not yet been made to wait for, of every ring: (copier, event).
_IN_FLIGHT: list[tuple[Any, Any]] = []
_STEP_HOOK: Any = None  # torch.optim's global step pre-hook handle, installed at the first asynchronous snapshot


def fence() -> None:
    """Make the current stream wait (on the GPU, no host sync) for every snapshot copy in flight, of every ring; call
    before writing parameters any other way than an optimizer step or a restore (those fence by themselves).
    A no-op when nothing is in flight (always on CPU)."""
    while _IN_FLIGHT:
        copier, event = _IN_FLIGHT.pop(0)
        copier.wait(event)


def _fence_before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    fence()


def _track(copier: Any, event: Any) -> None:
    global _STEP_HOOK
    if _STEP_HOOK is None:
        _STEP_HOOK = register_optimizer_step_pre_hook(_fence_before_step)
    _IN_FLIGHT.append((copier, event))


# ------------------------------------------------------------------------------------------------------ slots


@dataclass
class _Slot:
    layout: tuple
    arena: torch.Tensor  # uint8 [nbytes]: the one allocation behind `buffers`
    buffers: list[torch.Tensor]  # views of the arena, one per source tensor
    nbytes: int
    pinned: int | None = None  # the copier's handle when the arena is page-locked; unpinned when released
    meta: Any = None
    optim_keys: list[tuple[int, str]] = field(default_factory=list)  # (param index, state name) per state buffer
    groups: list[dict] = field(default_factory=list)  # optimizer param-group hyperparameters
    event: Any = None  # the last copy into or out of this slot is done (asynchronous path)


class CheckpointRing:
    """Named in-memory snapshots of a model (and optimizer); see the module docstring."""

    def __init__(self, capacity_bytes: int, *, device: str | torch.device = "cpu") -> None:
        self.capacity = int(capacity_bytes)
        self.device = torch.device(device)
        self._slots: dict[str, _Slot] = {}
        self._free: list[_Slot] = []  # dropped slots, arenas kept for reuse
        self._copies: Any = None  # CudaCopies (or a test's stand-in) once a copy runs asynchronously

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self._slots)

    def __contains__(self, key: str) -> bool:
        return key in self._slots

    @property
    def nbytes(self) -> int:
        """Bytes held by live snapshots and by free arenas kept for reuse."""
        return sum(s.nbytes for s in self._slots.values()) + sum(s.nbytes for s in self._free)

    def meta(self, key: str) -> Any:
        return self._slot(key).meta

    def drop(self, key: str) -> None:
        """Forget `key`; its arena is kept for the next snapshot of the same layout."""
        self._free.append(self._slots.pop(self._check(key)))

    def clear(self) -> None:
        """Drop every snapshot and free every arena (unpinned first: the memory goes back to the OS)."""
        fence()
        for slot in [*self._slots.values(), *self._free]:
            self._release(slot)
        self._slots.clear()
        self._free.clear()

    def _release(self, slot: _Slot) -> None:
        if slot.event is not None:
            self._copies.synchronize(slot.event)  # no copy may still touch memory about to be freed
        if slot.pinned is not None:
            self._copies.unpin(slot.pinned)
        slot.arena, slot.buffers, slot.pinned, slot.event = torch.empty(0, dtype=torch.uint8), [], None, None

    def _check(self, key: str) -> str:
        if key not in self._slots:
            raise KeyError(f"CheckpointRing: no snapshot {key!r}; held: {sorted(self._slots) or 'none'}")
        return key

    def _slot(self, key: str) -> _Slot:
        return self._slots[self._check(key)]

    # -- copies ----------------------------------------------------------------------------------------------

    def _copier(self, tensors: list[torch.Tensor]) -> Any:
        """The asynchronous copy engine for these tensors, or None to copy synchronously."""
        if self._copies is None and tensors:
            device = tensors[0].device if tensors[0].device.type != "cpu" else self.device
            self._copies = _async_copies(device)
        return self._copies

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
        offsets, need = _offsets(tensors)
        held = self.nbytes
        if held + need > self.capacity:
            # Free arenas of another layout are not reused, but they do count: release them before refusing.
            for slot in self._free:
                self._release(slot)
            self._free.clear()
            held = self.nbytes
            if held + need > self.capacity:
                raise RingFull(f"CheckpointRing: snapshot {key!r} needs {format_bytes(need)}, but "
                               f"{format_bytes(held)} of {format_bytes(self.capacity)} are held by "
                               f"{sorted(self._slots)}; drop a snapshot or raise capacity_bytes")
        copies = self._copier(tensors)
        pinned = None
        if self.device.type != "cpu":
            arena = torch.empty(need, dtype=torch.uint8, device=self.device)
        elif copies is not None:
            arena, pinned = copies.pin(need)
        else:
            arena = torch.empty(need, dtype=torch.uint8)
        buffers = [arena[o: o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                   for o, t in zip(offsets, tensors)]
        return _Slot(layout, arena, buffers, need, pinned)

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
        copies = self._copier(tensors)
        if copies is not None:
            # Behind the previous copy of this slot (a restore may still read it; the same stream orders them).
            slot.event = copies.copy(list(zip(slot.buffers, tensors)), after=slot.event)
            _track(copies, slot.event)
        else:
            for buf, t in zip(slot.buffers, tensors):
                buf.copy_(t)
        self._slots[key] = slot

    def fence(self) -> None:
        """The module's `fence()`: the current stream waits for every snapshot copy in flight (every ring's)."""
        fence()

    def wait(self) -> None:
        """Block the host until every copy in flight is done (benchmarks, tests)."""
        for slot in self._slots.values():
            if slot.event is not None:
                self._copies.synchronize(slot.event)

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
        fence()  # no snapshot in flight (of any ring) may still be reading what this overwrites
        copies = self._copier(targets)
        if copies is not None:
            slot.event = copies.copy(list(zip(targets, slot.buffers)), after=slot.event)
            copies.wait(slot.event)
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
