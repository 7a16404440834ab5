"""Distributed training setup: process group, FSDP2 sharding, sharded HF loading, resumable checkpoints.

One process or many, the training code runs the same path: without torchrun we start a one-rank process group, so
the model is always an FSDP2 module and nothing branches on "distributed or not".

  init_distributed()       torchrun's env -> process group (nccl on CUDA, gloo on CPU), device mesh, seeds
  parallelize()            activation checkpointing -> per-block compile -> fully_shard per block ->
                           final norm + lm-head as one group -> root, in that order (torchtitan's order)
  build_model()            meta-device construction, parallelize, then each rank fills only its own shards, from
                           HF safetensors slices (`safe_open(...).get_slice`) or a reproducible from-scratch init
  clip_grad_norm_()        gradient clipping on DTensor gradients (one all-reduce for the total norm)
  build_optimizer()        AdamW (fused on CUDA), no weight decay on norms and biases
  Checkpointer             resumable sharded checkpoints with torch.distributed.checkpoint: model, optimizer,
                           scheduler, data position, per-rank RNG, step; a COMPLETE marker written last; keep-last-k
  export_hf()              a consolidated Hugging Face checkpoint (core/checkpoint.save_hf) from the sharded model
  close_distributed()      tear the process group down so the process can exit cleanly
  full_weights()           gather every shard once for a whole rollout (the sampler's), then reshard
  forget_forwards()        drop FSDP2's records of forwards no backward follows (rollouts, evaluations)
  reshard()                put every module back in its sharded state, so parameters() are the shards again

The mesh: FSDP (1-D, `("shard",)`, every rank holds 1/world of each tensor) by default; HSDP with
`parallel.replicate` = R > 1: a 2-D mesh `("replicate", "shard")` of R groups of S = world / R consecutive ranks. Each
group holds one whole copy of the model sharded S ways; the all-gathers and reduce-scatters of every block stay
inside a group, and only one gradient all-reduce per step crosses groups. torchrun numbers a node's ranks
consecutively, so S = ranks per node keeps the per-block traffic on the node's fast links (torchtitan's
data_parallel_replicate_degree). Every rank is a data-parallel rank either way: rank r takes the r-th micro-batch of
the global batch, so replica groups see disjoint data, and FSDP2 averages gradients over all world ranks (mean over
the group's reduce-scatter, then over the replicas' all-reduce). Quantities summed over shards (a norm, a weights
digest) are summed over the "shard" dimension only (`Dist.shard_group`): the replicas hold the same shards.

This is the only module that imports FSDP2 (an import-linter contract, .importlinter); `fsdp_modules` and
`fsdp_param_groups` are the rest of the library's view of it, and the private state they read is read defensively.

Not here: the training loop (train/), the rollout replica and decode engine (core/sampler.py).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import re
import shutil
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from safetensors import safe_open

from posttrain.core.checkpoint import DTYPES, CheckpointError, check_tensor_names, hf_weight_map, read_hf_config, save_hf
from posttrain.core.model import ModelConfig, Transformer



@dataclass
class ParallelConfig:
    param_dtype: str = "bfloat16"  # dtype of gathered parameters in forward/backward ("float32": no mixed precision)
    reduce_dtype: str = "float32"  # dtype of the gradient reduce-scatter
    reshard_after_forward: bool = True  # False trades memory for one all-gather less per block in backward
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block
    replicate: int = 1  # HSDP: whole copies of the model (one per node, typically); 1: plain FSDP over all ranks
    shard: int = 0  # ranks each copy is sharded over (ranks per node, typically); 0: world size / replicate

    def __post_init__(self) -> None:
        for key in ("param_dtype", "reduce_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ValueError(f"parallel.{key}: {getattr(self, key)!r} is not one of {', '.join(DTYPES)}")
        if self.replicate < 1 or self.shard < 0:
            raise ValueError(f"parallel.replicate={self.replicate} must be >= 1 and parallel.shard={self.shard} >= 0 "
                             f"(0: the world size / parallel.replicate)")

    def mesh_shape(self, world_size: int) -> tuple[int, int]:
        """(replicate, shard) degrees for `world_size` ranks; an error names both numbers when they do not fit."""
        r = self.replicate
        if world_size % r:
            raise ValueError(f"parallel.replicate={r} does not divide the world size {world_size}: HSDP needs "
                             f"world size = replicate x shard (e.g. replicate = the number of nodes)")
        s = self.shard or world_size // r
        if r * s != world_size:
            raise ValueError(f"parallel.replicate={r} x parallel.shard={self.shard} = {r * s} ranks, but the world "
                             f"size is {world_size}; set parallel.shard={world_size // r} or leave it 0")
        return r, s


@dataclass
class Dist:
    rank: int  # global rank, also the data-parallel rank (every rank takes its own micro-batch)
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh  # what FSDP2 shards over: ("shard",), or ("replicate", "shard") for HSDP
    replicate: int = 1  # HSDP degree: whole copies of the model, each sharded over world_size // replicate ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> int:
        """Ranks one copy of the model is sharded over."""
        return self.world_size // self.replicate

    @property
    def shard_group(self) -> dist.ProcessGroup | None:
        """The ranks holding the other shards of this rank's copy (all ranks without HSDP): sum over it what is
        summed over shards, once per copy."""
        return self.mesh.get_group("shard") if self.mesh is not None else None


def check_cpu_fsdp() -> None:
    """Refuse to train on CPU where FSDP2 cannot: torch 2.6's `fully_shard` all-gathers on CPU through stream events
    that torch 2.7 added (pytorch#145935: AttributeError 'Stream' object has no attribute 'record_event'), and with
    those added by hand its backward still fails on a plain two-layer model ("modified by an inplace operation"),
    seen 2026-12-06. Neither is in FSDP2's CUDA path (CUDA streams have events), which torch 2.6 should run: not
    run here, for lack of a GPU."""
    if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) < (2, 7):
        raise RuntimeError(f"training on CPU needs torch >= 2.7 (this is torch {torch.__version__}): torch 2.6's FSDP2 "
                           f"cannot all-gather on CPU")


def init_distributed(seed: int = 0, *, device: str | None = None, timeout_s: float = 600.0,
                     parallel: ParallelConfig | None = None) -> Dist:
    """Start (or join) the process group from torchrun's environment; a one-rank group without torchrun. The device
    mesh follows `parallel.replicate` and `parallel.shard` (see the module docstring).

    Seeds python, numpy and torch identically on every rank: model init and data order are global decisions, so
    every rank must draw the same numbers. Per-rank randomness (none in SFT) would derive its own generator.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        backend = "cuda:nccl,cpu:gloo"  # gloo for the few CPU-side collectives (e.g. checkpoint metadata)
    else:
        check_cpu_fsdp()
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        else:  # plain `python -m ...`: a one-rank group over an in-memory store, same code path as torchrun
            if world_size != 1:
                raise RuntimeError("WORLD_SIZE > 1 without MASTER_ADDR: launch with torchrun")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    replicate, shard = (parallel or ParallelConfig()).mesh_shape(world_size)
    if replicate == 1:  # plain FSDP: the 1-D mesh, no all-reduce over a one-rank replicate group
        mesh = init_device_mesh(dev.type, (shard,), mesh_dim_names=("shard",))
    else:  # row-major: replica group k is ranks k*shard .. (k+1)*shard - 1, a node's ranks under torchrun
        mesh = init_device_mesh(dev.type, (replicate, shard), mesh_dim_names=("replicate", "shard"))
    if dev.type == "cpu" and world_size > 1:
        check_gradient_average(mesh)
    seed_everything(seed)
    return Dist(rank, world_size, local_rank, dev, mesh, replicate)


def check_gradient_average(mesh: DeviceMesh) -> None:
    """Refuse a multi-rank run whose FSDP2 does not average gradients over ranks: every loss here is scaled for the
    average (train/sft.py), so a sum would multiply every gradient by the world size. Seen: torch 2.7.1 over gloo sums
    (its reduce-scatter asks gloo for AVG); torch 2.11 and 2.13 average. One backward of a one-weight-per-rank layer,
    whose gradient is 1 on every rank."""
    got = _reduced_gradient(mesh)
    if abs(got - 1.0) > 1e-6:
        raise RuntimeError(f"torch {torch.__version__}'s FSDP2 over {dist.get_backend()} reduces gradients to {got:g} "
                           f"times their mean on {mesh.size()} ranks, not their mean: multi-rank training on CPU needs "
                           f"a torch whose FSDP2 averages over gloo (2.11 and 2.13 seen to)")


def _reduced_gradient(mesh: DeviceMesh) -> float:
    """FSDP2's reduction over `mesh` of a gradient that is 1 on every rank (1 for a mean, the world size for a sum;
    under HSDP both the reduce-scatter within a group and the all-reduce across groups count)."""
    probe = nn.Linear(1, mesh.size(), bias=False)
    fully_shard(probe, mesh=mesh)
    probe(torch.ones(1, 1)).sum().backward()
    return float(probe.weight.grad.to_local().mean())


def close_distributed() -> None:
    """Destroy the process group (if any) and give gloo's worker threads the GIL for a moment before exit.

    A gloo worker thread frees a finished collective's work object after the caller's wait() has returned; when the
    work holds the last reference to a tensor made in Python (FSDP2's all-gather buffers), freeing it takes the GIL.
    If the interpreter is already finalizing by then, the thread is killed inside a noexcept destructor and the
    process dies in SIGABRT ("terminate called without an active exception"; core dump, torch 2.13, 2026-12-06:
    ~AsyncAllgatherCoalescedWork -> decref_pyobject -> take_gil -> pthread_exit). destroy_process_group() does not
    join those threads. Seen in 8 of 80 two-rank runs that exit right after their last collective; with this
    50 ms sleep (the GIL is released, the waiting thread frees its work) in 0 of 150."""
    if dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(0.05)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def parallelize(model: Transformer, mesh: DeviceMesh, cfg: ParallelConfig) -> Transformer:
    """Apply, in this order: activation checkpointing per block, torch.compile per block, fully_shard per block,
    the final norm + lm-head as one group (when not tied to the embedding), then the root."""
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.param_dtype], reduce_dtype=DTYPES[cfg.reduce_dtype])
    for block in model.layers:
        block.activation_checkpointing = cfg.activation_checkpointing
        if cfg.compile:
            block.compile()  # in place: parameter names stay those of the checkpoint
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward and i < n - 1)
    if not model.config.tie_word_embeddings:
        # A tied lm-head is the embedding's parameter, which the root owns; one parameter cannot be in two groups.
        fully_shard([model.norm, model.lm_head], mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    # The root's parameters (embedding, tied lm-head) are needed again at once by backward. Passing no value keeps
    # them gathered on every torch: 2.6-2.7 ignore the root's value, 2.8+ honour an explicit True and reshard.
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


# --------------------------------------------------------------------------------------- building and loading


def _local_rows(param: torch.Tensor) -> tuple[int, int]:
    """Rows [start, end) of dim 0 of the full tensor that this rank's FSDP2 shard holds (torch.chunk layout over
    the mesh's "shard" dimension; HSDP's replicas hold the same rows)."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0]
    placements = param.placements
    shards = [i for i, p in enumerate(placements) if not p.is_replicate()]
    if len(shards) != 1 or not isinstance(placements[shards[0]], Shard) or placements[shards[0]].dim != 0:
        raise NotImplementedError(f"only FSDP/HSDP sharding on dim 0 (Shard(0), with Replicate() for HSDP) is "
                                  f"supported, got {placements}")
    n, world = param.shape[0], param.device_mesh.size(shards[0])
    chunk = -(-n // world)
    start = min(param.device_mesh.get_local_rank(shards[0]) * chunk, n)
    return start, min(start + chunk, n)


@torch.no_grad()
def fill_sharded(model: nn.Module, fetch: Callable[[str, int, int], torch.Tensor]) -> None:
    """For every parameter, copy `fetch(name, start, end)` (rows start:end of the full tensor) into this rank's
    shard. Nothing larger than one rank's rows of one tensor is ever materialised."""
    for name, param in model.named_parameters():
        start, end = _local_rows(param)
        local = param.to_local() if isinstance(param, DTensor) else param
        if local.shape[0] != end - start:
            raise RuntimeError(f"{name}: local shard has {local.shape[0]} rows, expected {end - start}")
        if end > start:
            local.copy_(fetch(name, start, end))


def shard_model(cfg: ModelConfig, d: Dist, pcfg: ParallelConfig,
                fetch: Callable[[str, int, int], torch.Tensor]) -> Transformer:
    """Construct on the meta device, parallelize, allocate only this rank's shards, fill them from `fetch(name, start,
    end)` (rows start:end of the full tensor named `name`, our parameter names)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    parallelize(model, d.mesh, pcfg)
    model.to_empty(device=d.device)  # fp32 masters, local shards only
    fill_sharded(model, fetch)
    return model


def build_model(
    cfg: ModelConfig,
    d: Dist,
    pcfg: ParallelConfig,
    *,
    init_from: str | os.PathLike | None = None,
    seed: int = 0,
) -> Transformer:
    """A sharded Transformer: from an HF checkpoint directory (`init_from`, whose config wins over `cfg`) or
    initialised from scratch so that any world size gets exactly the weights of `Transformer(cfg).init_weights(seed)`.
    """
    if not init_from:
        # Deterministic per tensor: generate each full tensor on CPU with the same generator sequence as
        # Transformer.init_weights and keep this rank's rows (one full tensor at a time).
        reference = _init_reference(cfg, seed)
        return shard_model(cfg, d, pcfg, lambda name, s, e: reference[name][s:e])
    cfg, _ = read_hf_config(init_from)
    with torch.device("meta"):  # check names and shapes before anything is allocated or sharded
        model = Transformer(cfg)
    files = hf_weight_map(init_from)
    names = check_tensor_names(model, files, str(init_from))
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    handles: dict[Path, Any] = {}
    for ours, hf in names.items():
        if files[hf] not in handles:
            handles[files[hf]] = safe_open(files[hf], framework="pt", device="cpu")
        got = list(handles[files[hf]].get_slice(hf).get_shape())
        if got != shapes[ours]:
            raise CheckpointError(f"{files[hf]}: tensor {hf} has shape {got}, the config implies {shapes[ours]}")
    try:
        return shard_model(cfg, d, pcfg, lambda name, s, e: handles[files[names[name]]].get_slice(names[name])[s:e])
    finally:
        handles.clear()


def _init_reference(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    full = Transformer(cfg)  # from-scratch models are small; large ones start from a checkpoint
    full.init_weights(seed=seed)
    return dict(full.named_parameters())


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip DTensor (or plain) gradients in place; returns the total norm before clipping as a plain tensor.
    A non-finite norm is returned and nothing is scaled: the caller skips the step. No host read: the norm and the
    choice stay on the device, so the caller can read them with the rest of its step's metrics."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()  # the all-reduce of the per-shard partial norms
    if max_norm > 0:
        coef = torch.where(torch.isfinite(norm), torch.clamp(max_norm / (norm + 1e-6), max=1.0), 1.0)
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef)
    return norm


def build_optimizer(model: nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float,
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (embeddings included), none on norms and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=on_cuda or None)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gathered full tensors on CPU, on rank 0 only (other ranks get {}); every rank must call it."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def export_hf(model: Transformer, path: str | os.PathLike, d: Dist, *, tokenizer_dir: str | os.PathLike | None = None,
              dtype: torch.dtype | None = None) -> None:
    """Write a consolidated HF checkpoint of a sharded model (collective; rank 0 writes)."""
    sd = full_state_dict(model)
    if d.is_main:
        save_hf(model, path, tokenizer_dir=tokenizer_dir, state_dict=sd, dtype=dtype)
    dist.barrier()


# --------------------------------------------------------------------------------------- resumable checkpoints


class Checkpointer:
    """Sharded, resumable checkpoints under `root/step_{N:08d}/`.

    Layout: DCP shards of {"model", "optim"} written by all ranks; `trainer.json` (step, scheduler, data position and
    any other JSON state) written by rank 0; `rng_rank{r}.pt` per rank; `COMPLETE` written by rank 0 last, after a
    barrier. A directory without COMPLETE (a crash mid-write) is ignored by `latest()` and removed by the next save.
    Across nodes the directory must be on a shared filesystem (checked at each save); only global rank 0 creates,
    removes or marks directories. DCP stores each tensor once whatever the layout (HSDP's replicas write one copy)
    and reshards on load, so a checkpoint resumes on any world size and replicate x shard layout.
    """

    MARKER = "COMPLETE"

    def __init__(self, root: str | os.PathLike, d: Dist, *, keep_last: int = 2) -> None:
        self.root, self.d, self.keep_last = Path(root), d, keep_last

    def _dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def steps(self, *, complete: bool = True) -> list[int]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = re.fullmatch(r"step_(\d{8})", p.name)
            if m and ((p / self.MARKER).is_file() == complete):
                out.append(int(m.group(1)))
        return sorted(out)

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
        """Collective. `state` must be JSON-serialisable and identical on all ranks (scheduler, data position...)."""
        path = self._dir(step)
        if self.d.is_main:
            for s in self.steps(complete=False):  # leftovers of an interrupted save
                shutil.rmtree(self._dir(s), ignore_errors=True)
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
        dist.barrier()
        self._check_shared(path)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        torch.save(_rng_state(), path / f"rng_rank{self.d.rank}.pt")
        if self.d.is_main:
            (path / "trainer.json").write_text(json.dumps({"step": step, **state}, indent=1))
        dist.barrier()
        if self.d.is_main:
            (path / self.MARKER).write_text(datetime.datetime.now().isoformat() + "\n")
            for s in self.steps()[: -self.keep_last] if self.keep_last > 0 else []:
                shutil.rmtree(self._dir(s), ignore_errors=True)
        dist.barrier()
        return path

    def _check_shared(self, path: Path) -> None:
        """Every rank must see the directory rank 0 made: each writes its own shards into it, and on another node's
        local disk they would be lost to a resume (found only then). Collective; every rank raises alike."""
        seen = path.is_dir()
        blind = torch.tensor([0.0 if seen else 1.0])
        dist.all_reduce(blind)
        if blind.item():
            raise RuntimeError(f"{path}: {blind.item():.0f} of {self.d.world_size} ranks do not see the checkpoint "
                               f"directory rank 0 created (rank {self.d.rank} {'does' if seen else 'does not'}); "
                               f"checkpoint.dir must be on a filesystem shared by every node")

    def load(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model, optimizer and this rank's RNG in place; returns the JSON state saved with them."""
        path = self._dir(step)
        if not (path / self.MARKER).is_file():
            raise FileNotFoundError(f"{path}: not a complete checkpoint (no {self.MARKER} marker)")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng = path / f"rng_rank{self.d.rank}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        return json.loads((path / "trainer.json").read_text())


# ------------------------------------------------------------------------------------------------ FSDP2 state

_UNSHARDED: weakref.WeakSet = weakref.WeakSet()  # models inside full_weights(), so generate does not nest it


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """Every FSDP2 module of `model` (each `fully_shard`-ed block and the root), in `modules()` order."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def fsdp_param_groups(module: nn.Module) -> list[Any]:
    """An FSDP2 module's parameter groups (private state, read defensively: the attribute differs by version)."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)  # a list in torch 2.13 (several groups per module)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)  # one group (torch 2.6 and 2.11 seen)
        groups = [] if group is None else [group]
    return list(groups)


def forget_forwards(model: nn.Module) -> None:
    """Drop what FSDP2 recorded of the forwards since the last backward. FSDP2 notes every forward's modules in
    order (`post_forward_order`, and each group's `_post_forward_indices`) so that the next backward can prefetch
    the module before each one, and only a backward clears those notes. Forwards that no backward follows (a
    rollout's decode steps, a held-out loss pass) leave theirs behind: the next backward then gathers modules it
    does not need, and when ranks ran different forwards (decode steps differ per rank) it prefetched different
    modules on different ranks: an all-gather on one against a reduce-scatter on the other, a hang (seen on torch
    2.11 in mSFT's two-rank test). Call it after no-grad forwards (full_weights does, after a rollout). Harmless at
    any time: a backward whose notes were dropped only loses its prefetches (each module still gathers its own
    weights before its backward). A no-op for an unsharded model; private state, read defensively."""
    for m in fsdp_modules(model):
        for g in fsdp_param_groups(m):
            indices = getattr(g, "_post_forward_indices", None)
            if indices is not None:
                indices.clear()
            order = getattr(getattr(g, "comm_ctx", None), "post_forward_order", None)
            if order is not None:
                order.clear()


@contextlib.contextmanager
def full_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Make an FSDP2-sharded model's weights whole for a whole rollout; a no-op for an unsharded model.

    Every FSDP module (each `fully_shard`-ed block and the root) all-gathers its parameters once on entry
    (`unshard`, issued asynchronously for all modules, then waited), resharding after forward is switched off so
    the T forwards of a rollout reuse the gathered weights, and on exit every module reshards and gets its former
    reshard-after-forward setting back. Peak memory: one full copy of the weights in param_dtype per rank.
    Collective: every rank must enter and leave together (as for any FSDP forward).
    """
    modules = fsdp_modules(model)
    if not modules or model in _UNSHARDED:
        yield model
        return
    if modules[0] is model:
        # The root decides at its lazy init (first forward or backward) to keep its parameters gathered after forward;
        # take that decision now, or a rollout before the first training forward would save the undecided setting
        # and restore it afterwards, and the root would reshard after every training forward.
        model._get_fsdp_state()._lazy_init()
    # Set and restore each param group's post-forward mesh (None = keep unsharded after forward) directly: the public
    # setter `set_reshard_after_forward` is newer than torch 2.6, has no getter, and on torch >= 2.8 it also switches
    # off the root's lazy decision above for good.
    saved = [(g, g.post_forward_mesh_info) for m in modules for g in fsdp_param_groups(m)]
    try:
        for g, _ in saved:
            g.post_forward_mesh_info = None
        handles = [m.unshard(async_op=True) for m in modules]
        for h in handles:
            if h is not None:
                h.wait()
        _UNSHARDED.add(model)
        yield model
    finally:
        _UNSHARDED.discard(model)
        for m in modules:
            m.reshard()
        for g, info in saved:
            g.post_forward_mesh_info = info
        forget_forwards(model)  # the rollout's forwards are followed by no backward


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module back in its sharded state (no communication): after a forward without backward (an
    evaluation) FSDP keeps the root's parameters gathered, and a module's `parameters()` are then the gathered
    copies, not the shards that the optimizer updates."""
    for m in fsdp_modules(model):
        # A group of several modules (the final norm + lm-head) whose last module was run outside its module call
        # (the sampler reads the lm-head weight) stays in its FORWARD state, where reshard() is a no-op for a group
        # that keeps its parameters gathered after forward: end that forward first (private state, read defensively).
        for group in fsdp_param_groups(m):
            if getattr(group, "_training_state", None) is not None and group._training_state.name == "FORWARD":
                group._training_state = type(group._training_state).IDLE
        m.reshard()


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
