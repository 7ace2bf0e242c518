"""numba kernels: mask bits (:mod:`~tallfmt.kernels.bits`), the fused decode
(:mod:`~tallfmt.kernels.decode`) and the encode-time kernels (:mod:`~tallfmt.kernels.encode`)."""

from tallfmt.kernels.bits import add_bits, pack_bits, pack_bits_into, padding_ok, popcount, unpack_bits
from tallfmt.kernels.core import DECODE_DTYPES
from tallfmt.kernels.decode import decode_into, decode_masked, residual_values, select_into
from tallfmt.kernels.encode import (HI_BINS, LO_BINS, EncodeOutputs, EncodeSpec, TensorInputs, describe_problems,
                                    encode_chunk, hist_hi_chunk, hist_lo_chunk, hist_window_chunk, mask_stats)

__all__ = ["pack_bits", "pack_bits_into", "unpack_bits", "padding_ok", "popcount", "add_bits", "decode_masked",
           "decode_into", "select_into", "residual_values", "mask_stats", "EncodeSpec", "TensorInputs", "EncodeOutputs", "encode_chunk",
           "hist_hi_chunk", "hist_lo_chunk", "hist_window_chunk", "describe_problems", "HI_BINS", "LO_BINS",
           "DECODE_DTYPES"]
