"""Share per-sample work between the processes of `accelerate launch` and gather it back in order.

Under a multi-process launcher, accelerate's `PartialState` joins the process group (and binds the
process to its GPU), `split_between_processes` hands each process a contiguous share, and
`gather_object` concatenates the shares in process order, i.e. the original order. With one process
(`python stages/...`) `map_sharded` and `is_main` are no-ops that import nothing (eval_ngram never
loads torch). Under accelerate 1.15, `accelerate launch --cpu` starts one process whatever
`--num_processes` says (several CPU processes need mpirun); `--multi_gpu` (torchrun) starts N.
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext
from typing import Callable

# The variables accelerate's PartialState reads to decide that it runs on several processes.
WORLD_SIZE_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def world_size() -> int:
    """How many processes the launcher started (1 without one), read from the environment: imports nothing."""
    return max(int(os.environ.get(k, 1)) for k in WORLD_SIZE_ENV)


def state():
    """accelerate's PartialState. Without CUDA it is asked for CPU processes joined over gloo (under
    `accelerate launch --multi_gpu`, i.e. torchrun, it would otherwise leave N unconnected processes)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    s = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    if s.num_processes != world_size():
        raise RuntimeError(f"{world_size()} processes were launched but accelerate joined {s.num_processes} "
                           "(see README: Scale beyond one process)")
    if s.num_processes > 1:
        _leave_group_at_exit()
    return s


@functools.cache
def _leave_group_at_exit() -> None:
    """Destroy the process group when the interpreter exits. Without it a process that leaves while another
    still runs (a non-main process after its last collective, while the main one writes) can die in gloo's
    teardown, "terminate called without an active exception" (SIGABRT), and torchrun then kills the launch:
    2 of 10 two-process CPU launches did so on torch 2.13, 0 of 20 with this hook. No barrier: a process that
    raised must still exit at once."""
    import atexit

    import torch.distributed as dist

    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


def is_main() -> bool:
    """True on the process that writes the outputs (the only one without a launcher)."""
    return world_size() == 1 or state().is_main_process


def device() -> str:
    """This process's device: its own GPU under a launcher, else cuda if there is one, else cpu."""
    return str(state().device)


def map_sharded(fn: Callable[[list], list], items: list) -> list:
    """fn(share) -> one result per item of the share, run on this process's share of `items`;
    every process gets all the results, in the order of `items`."""
    one = world_size() == 1
    with nullcontext(items) if one else state().split_between_processes(items) as share:
        out = list(fn(share)) if share else []
    if len(out) != len(share):
        raise ValueError(f"map_sharded: {fn.__name__} gave {len(out)} results for {len(share)} items (one each)")
    if one:
        return out
    from accelerate.utils import gather_object

    return gather_object(out)


def check_processes(proc, grad_accum: int, batch_size: int, desc: str) -> None:
    """Refuse, in one line, a launch the loops cannot serve: FSDP (not implemented: every process holds the
    whole model, as data parallel) and a process count that does not divide grad_accum (the global batch
    batch_size x grad_accum is split into whole micro-batches, grad_accum / N per process and step)."""
    from accelerate.utils import DistributedType

    if proc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise SystemExit(f"{desc}: {proc.distributed_type.value} is not supported (the sft and kd loops run data "
                         "parallel, each process holding the whole model): launch with configs/accelerate/ddp.yaml "
                         "or torchrun (docs/gpu.md)")
    world = proc.num_processes
    if grad_accum % world:
        raise SystemExit(f"{desc}: {world} processes do not divide profiles.<profile>.train.grad_accum {grad_accum}: "
                         f"the global batch {batch_size} x {grad_accum} is split into whole micro-batches of "
                         f"{batch_size}, grad_accum / processes per process; launch a divisor of {grad_accum} processes "
                         "(--num_processes / --nproc-per-node)")
