"""Writing into memory the caller owns: GEMMs into or onto a given output, and a scratch of
temporaries reused by name.

On CPU a freshly allocated tensor of a few hundred KB or more costs page faults (glibc maps large
blocks fresh and returns them on free) and arrives cache-cold, while a reused one is warm; the
Titans scan's hand-written forward and backward (:mod:`ttt_core.ops.titans_scan`) run dozens of
such temporaries per block, so they write into buffers they own.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

__all__ = ["Scratch", "add_mm_", "mm_into", "sub_mm_"]


def add_mm_(out: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """``out += alpha a @ b`` in place for contiguous [B, H, ...] stacks (fresh outputs cost page
    faults on CPU; a strided ``out`` would make baddbmm_ copy, slower than a fresh product)."""
    out.view(-1, *out.shape[-2:]).baddbmm_(a.flatten(0, 1), b.flatten(0, 1), alpha=alpha)
    return out


def sub_mm_(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``out -= a @ b`` in place (:func:`add_mm_`)."""
    return add_mm_(out, a, b, alpha=-1.0)


def mm_into(a: Tensor, b: Tensor, out: Tensor, alpha: float = 1.0) -> Tensor:
    """``out = alpha a @ b`` for [B, H, ...] stacks, into the caller's contiguous ``out``."""
    o = out.view(-1, *out.shape[-2:])
    if alpha == 1.0:
        torch.bmm(a.flatten(0, 1), b.flatten(0, 1), out=o)
    else:  # beta = 0: out's old values are ignored (NaN included)
        torch.baddbmm(o, a.flatten(0, 1), b.flatten(0, 1), beta=0.0, alpha=alpha, out=o)
    return out


class Scratch:
    """Temporaries that a forward or backward call reuses across its blocks and segments, by name
    and shape: on CPU a fresh tensor costs page faults and cold cache lines, a reused one neither.
    A name holds one live value at a time, and nothing kept for the backward or returned lives in
    one. :meth:`of_thread` hands a CPU thread's call the buffers of its last call (up to
    ``KEEP_BYTES`` of them, kept by :meth:`close`)."""

    KEEP_BYTES = 32 * 2**20  # what a thread keeps between its calls, per kind (fwd, bwd)
    _threads = threading.local()

    def __init__(self) -> None:
        self.bufs: dict = {}
        self.prev: dict = {}  # the last call's buffers, taken over as they are asked for

    @classmethod
    def of_thread(cls, kind: str, like: Tensor) -> Scratch:
        """The calling thread's scratch for ``kind`` ("fwd" or "bwd"); a fresh one off the CPU
        (the caching allocator already reuses memory there), for tensor subclasses (fake tensors
        included) and while compiling."""
        if like.device.type != "cpu" or type(like) is not Tensor or torch.compiler.is_compiling():
            return cls()
        ws = getattr(cls._threads, kind, None)
        if ws is None:
            ws = cls()
            setattr(cls._threads, kind, ws)
        ws.prev, ws.bufs = ws.bufs, {}
        return ws

    def close(self) -> None:
        """The end of a call: its buffers stay for the thread's next call if they total at most
        ``KEEP_BYTES``; the last call's that this one did not take over go."""
        if sum(b.nbytes for b in self.bufs.values()) > self.KEEP_BYTES:
            self.bufs = {}
        self.prev = {}

    def __call__(self, name: str, like: Tensor, *shape: int) -> Tensor:
        key = (name, shape, like.dtype, like.device)
        buf = self.bufs.get(key)
        if buf is None:
            buf = self.prev.pop(key, None)
            self.bufs[key] = buf = like.new_empty(shape) if buf is None else buf
        return buf
