"""The random masks of the regularising variants, drawn outside the step loops so that every backend gets the same:
recurrent dropout's one mask per sequence, and zoneout's 0/1 mask per step and unit, expanded from ONE seed per
call by a counter-based hash (SplitMix64) that threads share, in the native library or the same bits in torch."""

from __future__ import annotations

import torch
from torch import Tensor


def recurrent_dropout_mask(like: Tensor, p: float) -> Tensor:
    """One inverted-dropout mask (B, H) like ``like``: 0 with probability p, else 1/(1-p)."""
    return like.new_empty(like.shape).bernoulli_(1 - p).div_(1 - p)


def zoneout_masks(like: Tensor, z: tuple[float, float], steps: int, training: bool, *,
                  generator: torch.Generator | None = None) -> Tensor:
    """(2, steps, B, H) weights of the previous (c, h) for a state ``like`` (B, H): z itself in eval; in training
    0/1 per plane, step, row and unit, 1 with probability z_c (first plane) or z_h (second). The training masks
    come from ONE seed per call drawn from torch's CPU generator (``generator``, else the default one, so
    ``torch.manual_seed`` fixes them), expanded by a counter-based hash (:func:`zoneout_mask_torch`) that threads
    share: far cheaper than a Bernoulli draw per element from torch's serial generator."""
    B, H = like.shape
    if training:
        # randint, not random_: TorchDynamo traces it
        seed = torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, generator=generator)
        if nothing_traces():  # skip the op's Python wrappers when nothing traces
            return _zoneout_mask(int(seed), z[0], z[1], steps, B, H, like.dtype, like.device)
        return zoneout_mask_op(seed, z[0], z[1], steps, B, H, like.dtype, like.device)
    return torch.tensor(z, dtype=like.dtype, device=like.device).view(2, 1, 1, 1).expand(2, steps, B, H)


def nothing_traces() -> bool:
    """Whether nothing traces or intercepts ops (torch.compile, export, jit.trace, dispatch and function modes)."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack()
                or torch._C._len_torch_function_stack())


def zoneout_thresholds(z_c: float, z_h: float) -> tuple[int, int]:
    """round(z * 2^32) per plane: a unit keeps its value when 32 bits of its hash lie below it (exact at 0 and 1)."""
    return round(z_c * 2**32), round(z_h * 2**32)


def _int64(u: int) -> int:
    """A uint64 constant as the int64 with its bits."""
    return u - 2**64 if u >= 2**63 else u


# SplitMix64 (Steele, Lea & Flood 2014): the increment and the two multipliers of its finaliser.
_GOLDEN, _MIX1, _MIX2 = (_int64(u) for u in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(t: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic: clear the copies of the sign bit)."""
    return (t >> k) & (2 ** (64 - k) - 1)


def zoneout_mask_torch(seed: int, z_c: float, z_h: float, steps: int, rows: int, units: int,
                       dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """The (2, steps, rows, units) zoneout mask of ``seed`` in torch's int64 arithmetic, the same bits as the
    native ``lstmlab_native::zoneout_mask``: element k of the flat mask is 1 iff the high 32 bits of
    SplitMix64's k-th output from ``seed``, mix(seed + (k + 1)·golden), are below its plane's threshold."""
    n = steps * rows * units
    x = torch.arange(1, 2 * n + 1, dtype=torch.int64, device=device)
    x.mul_(_GOLDEN).add_(_int64(seed % 2**64))  # int64 products wrap as uint64 ones do
    x = (x ^ _shr(x, 30)).mul_(_MIX1)
    x = (x ^ _shr(x, 27)).mul_(_MIX2)
    bits = _shr(x ^ _shr(x, 31), 32)
    thresholds = torch.tensor(zoneout_thresholds(z_c, z_h), dtype=torch.int64, device=device)
    return (bits.view(2, n) < thresholds.view(2, 1)).to(dtype).view(2, steps, rows, units)


def _zoneout_mask(seed: int, z_c: float, z_h: float, steps: int, rows: int, units: int, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """The mask on the native library when it is built and takes this device and dtype, else in torch."""
    from lstmlab.nn import _native  # on first use: see fused.choose._loader

    native = None
    if torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float64):
        native = _native.get()
    if native is not None:
        out = torch.empty((2, steps, rows, units), dtype=dtype)
        try:
            native.zoneout_mask(seed, *zoneout_thresholds(z_c, z_h), out)
            return out
        except Exception as e:  # noqa: BLE001 - the same bits in torch
            _native.fail("the zoneout mask", e)
    return zoneout_mask_torch(seed, z_c, z_h, steps, rows, units, dtype, device)


@torch.library.custom_op("lstmlab::zoneout_mask", mutates_args=())
def zoneout_mask_op(seed: Tensor, z_c: float, z_h: float, steps: int, rows: int, units: int, dtype: torch.dtype,
                    device: torch.device) -> Tensor:
    """:func:`zoneout_masks`' training draw as an op, for torch.compile and export: deterministic given ``seed``."""
    return _zoneout_mask(int(seed), z_c, z_h, steps, rows, units, dtype, device)


@zoneout_mask_op.register_fake
def _(seed: Tensor, z_c: float, z_h: float, steps: int, rows: int, units: int, dtype: torch.dtype,
      device: torch.device) -> Tensor:
    return torch.empty((2, steps, rows, units), dtype=dtype, device=device)
