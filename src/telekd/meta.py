"""Running the study's code at full shapes on PyTorch's meta device: no memory, no compute, real autograd.

A meta tensor has a shape, a dtype and a device but no values, so two kinds of operation need a rule:

- Values that leave the device (`.item()`, `bool(t)`, `.cpu()`, `.tolist()`): on a GPU they are a
  host synchronisation; on meta there is nothing to read. `ValueBoundary` answers them with zeros
  (a scalar 0; a zero-filled CPU tensor of the right shape; False for a bool, or what `truth()` says: a
  generation loop asks "all finished?" and the dry run answers True after max_new_tokens forward passes,
  the worst case) and counts them, so the code runs on.
- Data-dependent shapes (`nonzero`, boolean-mask indexing): `ValueBoundary` takes the worst case, every
  element true, so FLOPs and memory are upper bounds.

Everything else runs unchanged, including PyTorch's device checks: a CPU tensor mixed into meta work
raises "Tensor on device cpu is not on the expected device meta", the fault that crashes on a GPU.
(FakeTensorMode with fake CUDA tensors would check the same, but its backward aborts on a CPU-only
torch build.)

`LiveBytes` estimates peak device memory: bytes of every storage created by an operation, tracked until
it is freed (weak references), on top of a baseline (weights, existing gradients and optimizer states).
"""

from __future__ import annotations

import math
import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _worst_case_indices(indices):
    """Boolean-mask indices as long index tensors with every element selected (values irrelevant on meta)."""
    out = []
    for idx in indices:
        if idx is not None and idx.dtype == torch.bool and idx.device.type == "meta":
            n = math.prod(idx.shape)
            out += [torch.empty(n, dtype=torch.long, device=idx.device) for _ in range(idx.dim())]
        else:
            out.append(idx)
    return out


class ValueBoundary(TorchDispatchMode):
    """Answers the value reads and data-dependent shapes of meta tensors (see the module docstring).
    `.counts` says how often each rule fired (a GPU run synchronises with the host as often)."""

    def __init__(self, truth=None):
        super().__init__()
        self.counts: Counter = Counter()
        self.truth = truth or (lambda: False)  # the answer to bool reads (generation: True once max_new_tokens ran)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        metas = [a for a in args if isinstance(a, torch.Tensor) and a.device.type == "meta"]
        if metas:
            if func is aten._local_scalar_dense.default:
                self.counts["item"] += 1
                return self.truth() if args[0].dtype == torch.bool else 0
            if func is aten.is_nonzero.default:
                self.counts["item"] += 1
                return self.truth()
            if func is aten.nonzero.default:
                self.counts["nonzero"] += 1
                t = args[0]
                return torch.empty(t.numel(), t.dim(), dtype=torch.long, device=t.device)
            if func is aten._to_copy.default and kwargs.get("device") is not None \
                    and torch.device(kwargs["device"]).type != "meta":
                self.counts["to_host"] += 1
                t = args[0]
                return torch.zeros(t.shape, dtype=kwargs.get("dtype") or t.dtype, device=kwargs["device"])
        if func in _INDEX_OPS and any(i is not None and i.dtype == torch.bool and i.device.type == "meta"
                                      for i in args[1]):
            self.counts["mask_index"] += 1
            args = (args[0], _worst_case_indices(args[1]), *args[2:])
        return func(*args, **kwargs)


def _aliases(func) -> bool:
    return any(r.alias_info is not None for r in func._schema.returns)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live storages on `device` created inside the mode, plus `baseline` bytes.

    Each non-aliasing operation's outputs are counted once per storage until the storage is freed.
    Not counted: allocator rounding and fragmentation, the CUDA context and library workspaces.
    """

    def __init__(self, device: str = "meta", baseline: int = 0):
        super().__init__()
        self.device, self.baseline = torch.device(device).type, baseline
        self.current = self.peak = baseline
        self._seen: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.current -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not _aliases(func):
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.device.type == self.device:
                    st = t.untyped_storage()
                    key = id(st)
                    if key not in self._seen:
                        self._seen[key] = st.nbytes()
                        self.current += st.nbytes()
                        self.peak = max(self.peak, self.current)
                        weakref.finalize(st, self._free, key)
        return out


def tensor_bytes(*modules_or_tensors) -> int:
    """Bytes of parameters, buffers and gradients of modules (each storage once), or of tensors."""
    seen, total = set(), 0
    for m in modules_or_tensors:
        ts = list(m.parameters()) + list(m.buffers()) if isinstance(m, torch.nn.Module) else [m]
        ts += [t.grad for t in ts if getattr(t, "grad", None) is not None]
        for t in ts:
            key = (t.device.type, id(t.untyped_storage()))
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total
