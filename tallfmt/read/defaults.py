"""The read side's defaults and choices in one place (light: header-only code imports it)."""

from tallfmt.errors import InputError

#: Worker threads of a decode or merge, at most (by default: the CPU count up to this).
MAX_THREADS = 4
#: Default budget of ``tallfmt.open(cache_bytes=...)``: 2 GiB, θ0 and τ_MTL of a ~250M-parameter
#: float32 model (GPT-2 small takes 1.0 GB).
DEFAULT_CACHE_BYTES = 2 << 30
#: iter_decode decodes ahead of what it has yielded up to this many output bytes (and at least one
#: tensor): enough work for every thread, bounded memory.
AHEAD_BYTES = 256 << 20
#: Elements per kernel job: large enough that a job's overhead is noise, small enough to share a
#: large tensor between the cores.
KERNEL_STEP = 1 << 20
#: Masked tensors with fewer elements decode in one job (planes one after the other): splitting them
#: costs more in job overhead than it gains.
SMALL_TENSOR = 1 << 16
#: ``kernel=`` choices: numba on the CPU and torch on other devices, numba everywhere, or torch
#: everywhere (the device-agnostic code CUDA runs).
KERNELS = ("auto", "numba", "torch")


def check_kernel(kernel: object) -> str:
    """``kernel`` if it is one of :data:`KERNELS`, else InputError."""
    if kernel not in KERNELS:
        raise InputError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    return kernel  # type: ignore[return-value]
