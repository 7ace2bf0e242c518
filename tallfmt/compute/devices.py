"""Torch devices named by users (``device="cuda:0"``): checked once, up front, so that a device this
torch cannot use is one clear InputError instead of a failure deep inside the math."""

from __future__ import annotations

from typing import Any

import torch

from tallfmt.errors import InputError


def check_device(device: Any) -> torch.device:
    """``device`` as a torch.device this process can compute on; InputError naming it otherwise
    (an unknown name, CUDA on a CPU-only build, an index past the visible devices, ``meta``).

        >>> check_device("cpu")
        device(type='cpu')
        >>> check_device("foo")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        tallfmt.errors.InputError: device 'foo' is not a torch device (...)
    """
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InputError(f"device {device!r} is not a torch device ({_first_line(exc)})") from None
    if d.type == "meta":
        raise InputError(f"device {device!r}: the meta device holds no data; use cpu or an accelerator")
    if d.type != "cpu":
        try:
            torch.zeros(1, device=d)
        except Exception as exc:  # torch raises AssertionError, RuntimeError, ... for unusable devices
            raise InputError(f"device {device!r} is not usable by this torch {torch.__version__} "
                             f"({_first_line(exc)})") from None
    return d


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 160 else line[:160] + "…"
