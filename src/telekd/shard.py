"""Share per-sample work between the processes of `accelerate launch` and gather it back in order.

Under a multi-process launcher, accelerate's `PartialState` joins the process group (and binds the
process to its GPU), `split_between_processes` hands each process a contiguous share, and
`gather_object` concatenates the shares in process order, i.e. the original order. With one process
(`python stages/...`) every helper is a no-op and accelerate (hence torch) is never imported.
"""

from __future__ import annotations

import os
from typing import Callable

# The variables accelerate's PartialState reads to decide that it runs on several processes.
WORLD_SIZE_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def world_size() -> int:
    return max(int(os.environ.get(k, 1)) for k in WORLD_SIZE_ENV)


def state():
    from accelerate import PartialState

    return PartialState()


def is_main() -> bool:
    """True on the process that writes the outputs (the only one without a launcher)."""
    return world_size() == 1 or state().is_main_process


def device() -> str:
    """This process's device: its own GPU under a launcher, else cuda if there is one, else cpu."""
    return str(state().device)


def map_sharded(fn: Callable[[list], list], items: list) -> list:
    """fn(share) -> one result per item of the share, run on this process's share of `items`;
    every process gets all the results, in the order of `items`."""
    if world_size() == 1:
        return fn(items)
    from accelerate.utils import gather_object

    with state().split_between_processes(items) as share:
        out = list(fn(share)) if share else []
    if len(out) != len(share):
        raise ValueError(f"map_sharded: {fn.__name__} gave {len(out)} results for {len(share)} items (must be one each)")
    return gather_object(out)
