"""The masked decode in torch, on any device: unpack a mask, join byte planes, θ0 + τ_MTL rounded
once to the tensor's dtype, and the masked select — bit for bit what the numba kernels compute
(FORMAT.md §4.4), so CUDA decodes and switches give the same tensors as the CPU.

Every function works on the device of its inputs and uses only elementwise torch ops; the float
math is one float32 addition and one round-to-nearest-even conversion (torch's), as in the kernels.
The one thing that may differ is the payload of a NaN result (which takes NaN inputs: no encoder
writes them, FORMAT.md §4.1); it is a NaN on both paths.

    >>> import torch
    >>> packed = torch.tensor([0b101], dtype=torch.uint8)
    >>> decode(torch.zeros(3), torch.ones(3), packed).tolist()
    [1.0, 0.0, 1.0]
"""

from __future__ import annotations

import torch

from tallfmt.errors import InputError

_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _int_view(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float32/bfloat16/float16 tensor, as int32/int16 (a view)."""
    try:
        return t.view(_BITS[t.dtype])
    except KeyError:
        raise InputError(f"expected a float32, bfloat16 or float16 tensor, got {t.dtype}") from None


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bits of a packed mask (uint8, ⌈n/8⌉ bytes, FORMAT.md §3) as a bool tensor."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
        raise InputError(f"packed mask: expected {(n + 7) // 8} uint8 bytes for {n} bits, got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(-1)[:n].bool()


def join_planes(planes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elements of ``dtype`` from their byte planes, a (itemsize, n) uint8 tensor (row j: byte j of
    every element, FORMAT.md §5 byteplane-zstd)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if planes.dtype != torch.uint8 or planes.dim() != 2 or planes.shape[0] != itemsize:
        raise InputError(f"byte planes of {dtype}: expected a ({itemsize}, n) uint8 tensor, got "
                         f"{planes.dtype} {tuple(planes.shape)}")
    return planes.t().contiguous().reshape(-1).view(dtype)  # little-endian: plane 0 is the low byte


def add_rounded(theta0: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """round_dtype(float32(θ0) + τ): one float32 addition, one round to nearest even (overflow to
    inf). ``theta0`` float32/bfloat16/float16, ``tau`` float32 of the same shape, one device."""
    _int_view(theta0)
    if tau.dtype != torch.float32 or tau.shape != theta0.shape:
        raise InputError(f"tau: expected float32 of shape {tuple(theta0.shape)}, got {tau.dtype} {tuple(tau.shape)}")
    s = theta0.float() + tau
    return s if theta0.dtype == torch.float32 else s.to(theta0.dtype)


def select(bits: torch.Tensor, on: torch.Tensor, off: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``bits ? on : off`` bit for bit (on the integer views, so no value is ever rounded or
    canonicalised), into ``out`` when given (a tensor of ``off``'s dtype and shape)."""
    a, b = _int_view(on), _int_view(off)
    if on.dtype != off.dtype or on.shape != off.shape or bits.shape != off.shape:
        raise InputError("select: bits, on and off must have one shape (and on, off one dtype)")
    if out is None:
        return torch.where(bits, a, b).view(off.dtype)
    if out.dtype != off.dtype or out.shape != off.shape:
        raise InputError(f"select: out must be {off.dtype} of shape {tuple(off.shape)}")
    torch.where(bits, a, b, out=_int_view(out))
    return out


def decode(theta0: torch.Tensor, tau: torch.Tensor, packed: torch.Tensor, out: torch.Tensor | None = None
           ) -> torch.Tensor:
    """θ̂ = θ0 + m ∘ τ_MTL of one flat tensor (FORMAT.md §4.4) on their device: where bit i of ``packed``
    is set round_dtype(θ0_i + τ_i), elsewhere θ0_i bit for bit."""
    return select(unpack_bits(packed, theta0.numel()), add_rounded(theta0, tau), theta0, out)


def residual_values(theta0: torch.Tensor, tau: torch.Tensor, packed: torch.Tensor, pos: torch.Tensor,
                    vals: torch.Tensor) -> torch.Tensor:
    """The decoded values of residual entries (FORMAT.md §11) on the inputs' device: at flat positions
    ``pos`` (int64), round_dtype(a + r) with a = θ0_f + τ_MTL where the mask bit is set, θ0_f where it is
    clear, r = ``vals`` (float32) — one rounding, the numba kernel's bits. Reads only those entries.

        >>> residual_values(torch.zeros(3), torch.ones(3), torch.tensor([1], dtype=torch.uint8),
        ...                 torch.tensor([0, 2]), torch.tensor([0.5, 0.25])).tolist()
        [1.5, 0.25]
    """
    _int_view(theta0)
    bits = ((packed[pos >> 3] >> (pos & 7).to(torch.uint8)) & 1).bool()
    b = theta0[pos].float()
    s = torch.where(bits, b + tau[pos], b) + vals
    return s if theta0.dtype == torch.float32 else s.to(theta0.dtype)
