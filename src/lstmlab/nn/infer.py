"""The fused backend's forward-only path: a call that keeps nothing for backward (``torch.no_grad``,
``torch.inference_mode``, or inputs and weights that need no gradient) of the plain cell runs the compiled
``lstmlab_native::infer`` loop (``csrc/lstm_infer.cpp``) instead of the training forward.

What that saves at small batches, where the training forward is 2-3x slower than ``nn.LSTM``: a per-step at::mm
for a matrix-vector product (MKL's GEMV on this CPU reads ``[W_hh | W_ih | b]`` at a fraction of the cache's speed),
ATen's per-step dispatch and view overhead, the (4H, K) stacked weights built and zero-filled on every call, the
xh, gates, c_t and tanh(c_t) buffers a backward would read. The infer loop reads weights packed once per parameter
version (kept here, keyed by the parameters themselves), projects x for all steps in one GEMM and runs each step as
a register-tiled product fused with the cell's pointwise math.

:func:`infer_layer` returns None whenever the loop does not apply (no compiled library, a projection, a dtype or
device it does not cover): the caller then runs its own path, which gives the same numbers. An error from the op is
the caller's guard's to handle (one warning line, the Python loops for the rest of the process).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

_MAX_ENTRIES = 64  # packed weight sets kept (one per layer and direction of the models in use)


class _PackedWeights:
    """Packed (W_ih, W_hh, b_ih + b_hh) per layer and direction, reused while the parameters are unchanged.

    An entry is keyed by the identity of the parameter tensors and valid while each of them is the same live
    object with the same storage, shape and version counter (an in-place change such as ``load_state_dict``
    bumps the version) and no optimizer has stepped since it was packed: fused optimizers (``Adam(fused=True)``,
    lstmlab's default) write the parameters without bumping their version, so every ``optimizer.step()`` in the
    process empties the cache. Writes through ``.data`` bypass both; call :func:`release_packed_weights` after
    them. Inference tensors have no version counter: they are packed anew on every call. Holds weak references
    only, so a model that is dropped frees its entries' weights too.
    """

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[int, ...], tuple[Any, ...]] = OrderedDict()
        self._lock = threading.RLock()  # re-entrant: a weakref callback may run inside a locked block (gc)
        self._hook: Any = None  # the optimizer-step hook, registered with the first entry

    def _watch_optimizers(self) -> None:
        if self._hook is None:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            self._hook = register_optimizer_step_post_hook(lambda *_: self.clear())

    @staticmethod
    def _stamp(tensors: tuple[Tensor | None, ...]) -> tuple | None:
        stamp = []
        for t in tensors:
            if t is None:
                stamp.append(None)
                continue
            if t.is_inference():
                return None
            stamp.append((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t._version))
        return tuple(stamp)

    def get(self, native: Any, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None,
            bias_hh: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        tensors = (weight_ih, weight_hh, bias_ih, bias_hh)
        stamp = self._stamp(tensors)
        key = tuple(id(t) for t in tensors)
        if stamp is not None:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    refs, old_stamp, packed = entry
                    if old_stamp == stamp and all((r() if r is not None else None) is t
                                                  for r, t in zip(refs, tensors, strict=True)):
                        self._entries.move_to_end(key)
                        return packed
        bias = bias_ih if bias_hh is None else bias_hh if bias_ih is None else bias_ih + bias_hh
        packed = pack_layer(native, weight_ih, weight_hh, bias)
        if stamp is not None:
            self._watch_optimizers()
            drop = functools.partial(self._drop, key)  # a parameter freed: its entry goes with it
            refs = tuple(None if t is None else weakref.ref(t, drop) for t in tensors)
            with self._lock:
                self._entries[key] = (refs, stamp, packed)
                self._entries.move_to_end(key)
                while len(self._entries) > _MAX_ENTRIES:
                    self._entries.popitem(last=False)
        return packed

    def _drop(self, key: tuple[int, ...], dead: weakref.ref) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and any(r is dead for r in entry[0]):  # not a newer entry under a reused id
                del self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def pack_layer(native: Any, weight_ih: Tensor, weight_hh: Tensor,
               bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer and direction's (W_ih, W_hh, b = b_ih + b_hh) in the panel layout lstm_infer.cpp's loops read
    (``lstmlab_native::pack_weights``), uncached: the training step loops pack anew on every call."""
    with torch.no_grad():
        w_ih = native.pack_weights(weight_ih.detach())
        w_hh = native.pack_weights(weight_hh.detach())
        b = None if bias is None else native.pack_weights(bias.detach().unsqueeze(1))
    return w_ih, w_hh, b


_PACKED = _PackedWeights()


def release_packed_weights() -> None:
    """Drop the packed weights kept for the forward-only loop."""
    _PACKED.clear()


def applies(native: Any, x: Tensor, tensors: tuple[Tensor | None, ...], weight_hr: Tensor | None) -> bool:
    """Whether the forward-only loop covers this call: compiled loops loaded, no projection, CPU, float32 or
    float64 throughout, a non-empty sequence and batch."""
    if native is None or weight_hr is not None or x.device.type != "cpu" or x.dtype not in (torch.float32,
                                                                                              torch.float64):
        return False
    return x.shape[0] > 0 and x.shape[1] > 0 and all(t is None or t.dtype == x.dtype for t in tensors)


def infer_layer(native: Any, x: Tensor, h0: Tensor, c0: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                bias_ih: Tensor | None, bias_hh: Tensor | None, weight_hr: Tensor | None,
                batch_sizes: Tensor | None, threads: int = 0, split: int = 0) -> tuple[Tensor, Tensor, Tensor] | None:
    """(out (T, B, H), h_T, c_T) of one plain layer and direction on the forward-only compiled loop, or None when it
    does not apply here (:func:`applies`; the caller then runs its own loops). ``threads`` and ``split`` are the
    op's tuning knobs (0: let it decide; see csrc/lstm_infer.cpp). An error of the op propagates: the caller's guard
    (``fused.choose._guarded``) reports it once and recomputes the call on the Python loops."""
    if not applies(native, x, (h0, c0, weight_ih, weight_hh, bias_ih, bias_hh), weight_hr):
        return None
    w_ih, w_hh, b = _PACKED.get(native, weight_ih, weight_hh, bias_ih, bias_hh)
    if x.stride(2) != 1:
        x = x.contiguous()
    sizes = None if batch_sizes is None else batch_sizes.to(torch.int64).contiguous()
    return native.infer(x, h0.contiguous(), c0.contiguous(), w_ih, w_hh, b, sizes, threads, split)
