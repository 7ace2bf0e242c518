"""The ``tau-rans`` mask codec (FORMAT.md §5.1): one task's packed mask of one tensor, coded with
adaptive binary rANS whose contexts are the magnitude of τ_MTL at each position and the previous 8
bits of the same mask. Decoding reads the stored bytes and τ_MTL of that tensor, nothing of any other
task. The stored layout is normative in FORMAT.md §5.1; this module is one implementation of it.

numba is imported with this module, which :mod:`tallfmt.format.codecs` imports only when a
``tau-rans`` segment is first encoded or decoded, so header-only commands stay light.

    >>> import numpy as np
    >>> tau = np.linspace(-1, 1, 1000, dtype=np.float32)
    >>> bits = np.packbits(np.abs(tau) > 0.5, bitorder="little")
    >>> stored = encode_mask(bits, tau)
    >>> len(stored) < 125
    True
    >>> out = np.empty(125, np.uint8); decode_mask(stored, tau, out)
    >>> bool((out == bits).all())
    True

Speed notes (numba): one interleaved 4-lane kernel (about 1.5× a single lane); the shift register
is both the history and the output word (bit-reversed once per 64 bits); branchy renormalisation
with 32-bit words; and no array arguments to inlined helpers that branch — numba then leaves
reference-count calls inside the loop (about 30 % slower), so the 4-lane kernel is written out per
lane with scalar-only helpers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from tallfmt.errors import FormatError, InputError

__all__ = ["encode_mask", "decode_mask", "MAGIC", "MAX_LANES", "MAX_REF"]

MAGIC = 0xA1
MODE_RAW, MODE_RANS = 0, 1
MAX_LANES = 16
MAX_REF = 511             # largest reference key R (the biased exponent and first fraction bit of |τ|)
LANES = 4                 # what the encoder writes for tensors of at least MIN_BITS_FOR_LANES bits
MIN_BITS_FOR_LANES = 16384
HDR = 5                   # bytes before the lane states
NCTX = 160                # ctx = q + 16*g, q < 16, g < 10
P_LO, P_HI = 31, 65505    # adaptation targets
T_MAX = 32
ENTRY0 = 32768 | (1 << 16)    # a model entry is p | t << 16
QB = 2048                 # decoder super-block: steps per lane whose buckets are computed at once

_U64 = np.uint64
_U32 = np.uint32
_LOW = _U64(1 << 32)      # rANS lower bound L = 2^32


def _history_classes() -> np.ndarray:
    """16·g for every value u of the last 8 bits, u = Σ_d b[i-d]·2^(d-1) (bit 0 = the previous bit)."""
    lut = np.empty(256, np.uint32)
    for u in range(256):
        m = bin(u).count("1")
        level = 0 if m == 0 else 1 if m <= 2 else 2 if m <= 5 else 3 if m <= 7 else 4
        lut[u] = 16 * (5 * (u & 1) + level)
    return lut


HIST16 = _history_classes()


# --- intrinsics --------------------------------------------------------------------------------------
@intrinsic
def _load_u32(typingctx: Any, arr: Any, idx: Any) -> Any:
    """Bytes arr[idx:idx+4] as a little-endian u32, widened to u64 (caller checks bounds)."""
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(32).as_pointer())
        return builder.zext(builder.load(ptr, align=1), ir.IntType(64))
    return types.uint64(arr, types.uint64), codegen


@intrinsic
def _bitrev64(typingctx: Any, x: Any) -> Any:
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        fn = builder.module.declare_intrinsic("llvm.bitreverse", [ir.IntType(64)])
        return builder.call(fn, [args[0]])
    return types.uint64(types.uint64), codegen


@intrinsic
def _clz32(typingctx: Any, x: Any) -> Any:
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))
    return types.uint32(types.uint32), codegen


# --- the model (shared by encoder and decoder) --------------------------------------------------------
@njit(inline="always")
def _context(q, w, hist):
    """Model slot of the next bit of a lane: q + 16*g. w: the lane's shift register (the newest bit
    enters at bit 0, so w & 255 holds the last 8 bits with the previous bit as bit 0)."""
    return _U64(q) | _U64(hist[w & _U64(255)])


@njit(inline="always")
def _update(e, bit):
    """Entry e = p | t << 16 after coding `bit`: p += (T - p) >> bitlen(t); t = min(t + 1, 32)."""
    p = np.int32(e & _U32(0xFFFF))
    t = e >> _U32(16)
    s = np.int32(_U32(32) - _clz32(t))
    p = p + (((np.int32(P_HI) if bit else np.int32(P_LO)) - p) >> s)
    t = t + _U32(t < _U32(T_MAX))
    return _U32(p) | (t << _U32(16))


# --- context buckets ---------------------------------------------------------------------------------
@njit(inline="always")
def _bucket(t, r8):
    """Magnitude bucket of the float32 bits t (r8 = R - 8): 0 for ±0, else clamp((|t| >> 22) - r8, 1, 15)."""
    a = np.int32(t & _U32(0x7FFFFFFF))
    b = min(max((a >> np.int32(22)) - r8, np.int32(1)), np.int32(15))
    return np.uint8(b if a != 0 else 0)


def _tau_at(tau, i):
    """The bit pattern of τ_i as a u32, from τ's u32 view (1-D) or its 4 byte planes (4 × n, the
    decoded form of a byteplane-zstd segment: no merge needed)."""


@overload(_tau_at, inline="always")
def _tau_at_impl(tau, i):  # noqa: ANN001, ANN202 (numba typing hook)
    if tau.ndim == 1:
        return lambda tau, i: tau[i]
    return lambda tau, i: (_U32(tau[0, i]) | (_U32(tau[1, i]) << _U32(8)) | (_U32(tau[2, i]) << _U32(16))
                           | (_U32(tau[3, i]) << _U32(24)))


@njit(cache=True, nogil=True)
def _qpass(tau, ref, q):
    """q[i] = magnitude bucket of tau_i (0..15) for i < len(q) (vectorises)."""
    r8 = np.int32(ref) - np.int32(8)
    for i in range(q.size):
        q[i] = _bucket(_tau_at(tau, i), r8)


@njit(cache=True, nogil=True)
def _median_key(tau_u32):
    """Lower median of (|tau| bits) >> 22 over the nonzero tau; 0 if all are zero."""
    hist = np.zeros(512, np.int64)
    for i in range(tau_u32.size):
        a = tau_u32[i] & _U32(0x7FFFFFFF)
        hist[a >> _U32(22)] += 1 if a != 0 else 0
    total = hist.sum()
    if total == 0:
        return 0
    need = (total + 1) // 2
    acc = 0
    for k in range(512):
        acc += hist[k]
        if acc >= need:
            return k
    return 511


def _lane_len(n: int, K: int) -> int:
    return 64 * -(-(-(-n // 64)) // K)


def _contexts(tu: np.ndarray, n: int, ref: int, K: int, c: int) -> np.ndarray:
    """Bucket of every bit in natural order, zero beyond n (length K*c)."""
    q = np.empty(K * c, np.uint8)
    q[n:] = 0
    _qpass(tu, ref, q[:n])
    return q


# --- encoder -----------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _encode_kernel(packed, n, q, K, c, prob, words, x):
    """rANS-encode; returns the number of u32 words, written at the end of `words` (the stream is
    words[len - count:]), or -1 when len(words) words do not suffice. Final states go to x."""
    hist = HIST16
    P = np.empty(NCTX, np.uint32)
    for k in range(K):                       # forward model pass: prob[i] = p used for bit i
        P[:] = ENTRY0
        w = _U64(0)
        for i in range(k * c, min(n, k * c + c)):
            b = (packed[i >> 3] >> (i & 7)) & 1
            ctx = _context(q[i], w, hist)
            e = P[ctx]
            prob[i] = np.uint16(e & _U32(0xFFFF))
            P[ctx] = _update(e, b != 0)
            w = (w << _U64(1)) | _U64(b)
    for k in range(K):
        x[k] = _LOW
    cap = words.size
    top = cap
    for j in range(c - 1, -1, -1):           # reverse of the decoding order
        for k in range(K - 1, -1, -1):
            i = k * c + j
            if i >= n:
                continue
            b = (packed[i >> 3] >> (i & 7)) & 1
            p = _U64(prob[i])
            if b:
                f = p
                start = _U64(0)
            else:
                f = _U64(65536) - p
                start = p
            xx = x[k]
            if xx >= (f << _U64(48)):
                if top == 0:
                    return -1
                top -= 1
                words[top] = _U32(xx & _U64(0xFFFFFFFF))
                xx >>= _U64(32)
            x[k] = ((xx // f) << _U64(16)) + (xx % f) + start
    return cap - top


# --- decoder -----------------------------------------------------------------------------------------
@njit(inline="always")
def _core(x, e):
    """rANS decode of one bit with model entry e: returns (x before renormalisation, new e, bit)."""
    p = _U64(e & _U32(0xFFFF))
    Q = x >> _U64(16)
    r = x & _U64(0xFFFF)
    pq = p * Q
    bit = r < p
    x = (pq + r) if bit else (x - pq - p)
    return x, _update(e, bit), bit


@njit(inline="always")
def _step(P, off, q, x, w, buf, pos, lim, hist):
    """One checked bit of one lane, branch-free (numba prunes the reference counts of the array
    arguments only without branches): returns (x, w, pos, bad). Never moves pos past lim; a read that
    does not fit is reported (bad) and the segment refused. buf has 8 readable bytes past lim."""
    ctx = off + _context(q, w, hist)
    x, e, bit = _core(x, P[ctx])
    P[ctx] = e
    w = (w << _U64(1)) | _U64(bit)
    need = _U64(x < _LOW)
    v = _load_u32(buf, pos)
    x = (x << (need << _U64(5))) | (v & (_U64(0) - need))
    ok = _U64(pos + _U64(4) <= lim)
    pos += (need & ok) << _U64(2)
    return x, w, pos, (need & (ok ^ _U64(1))) != 0


@njit(cache=True, nogil=True)
def _decode4(buf, lim, X, n, c, tau, ref, words, xs):
    """K == 4, lanes 0..2 full, lane 3 not empty (n > 3c). Returns (pos, bad); final states to xs.

    Works in super-blocks of QB steps per lane: the buckets of the 4 lanes' next QB bits go to a
    small cache-resident buffer (one vectorised pass per lane), then blocks of 64 steps x 4 lanes are
    decoded; a block that cannot run past the stream (at most 256 word reads) takes the unchecked
    path. The renormalisation is a branch (about once per 32 output bits, well predicted on easy
    data). Written out per lane because numba's reference-count pruning fails on array arguments of
    inlined helpers that branch, so the helpers take scalars only."""
    hist = HIST16
    P = np.full(4 * NCTX, ENTRY0, np.uint32)
    qb = np.empty(4 * QB, np.uint8)
    r8 = np.int32(ref) - np.int32(8)
    x0 = X[0]; x1 = X[1]; x2 = X[2]; x3 = X[3]
    w0 = _U64(0); w1 = _U64(0); w2 = _U64(0); w3 = _U64(0)
    pos = _U64(0)
    bad = False
    ulim = _U64(lim)
    n3 = n - 3 * c
    full3 = _U64(n3 >> 6)
    nw3 = _U64((n3 + 63) >> 6)
    o1 = _U64(c >> 6)
    o2 = o1 + o1
    o3 = o2 + o1
    for sb in range(0, c, QB):
        blen = min(QB, c - sb)
        for k in range(4):
            cnt = blen if k < 3 else min(max(n3 - sb, 0), blen)
            src = k * c + sb
            for t in range(cnt):
                qb[k * QB + t] = _bucket(_tau_at(tau, src + t), r8)
        for wi in range(sb >> 6, (sb + blen) >> 6):
            wi = _U64(wi)
            j0 = (wi << _U64(6)) - _U64(sb)
            if wi < full3 and pos + _U64(1024) <= ulim:
                for j in range(64):
                    jj = j0 + _U64(j)
                    ctx = _U64(0) + _context(qb[jj], w0, hist)
                    x0, e, bit = _core(x0, P[ctx])
                    P[ctx] = e
                    w0 = (w0 << _U64(1)) | _U64(bit)
                    if x0 < _LOW:
                        x0 = (x0 << _U64(32)) | _load_u32(buf, pos)
                        pos += _U64(4)
                    ctx = _U64(NCTX) + _context(qb[jj + _U64(1 * QB)], w1, hist)
                    x1, e, bit = _core(x1, P[ctx])
                    P[ctx] = e
                    w1 = (w1 << _U64(1)) | _U64(bit)
                    if x1 < _LOW:
                        x1 = (x1 << _U64(32)) | _load_u32(buf, pos)
                        pos += _U64(4)
                    ctx = _U64(2 * NCTX) + _context(qb[jj + _U64(2 * QB)], w2, hist)
                    x2, e, bit = _core(x2, P[ctx])
                    P[ctx] = e
                    w2 = (w2 << _U64(1)) | _U64(bit)
                    if x2 < _LOW:
                        x2 = (x2 << _U64(32)) | _load_u32(buf, pos)
                        pos += _U64(4)
                    ctx = _U64(3 * NCTX) + _context(qb[jj + _U64(3 * QB)], w3, hist)
                    x3, e, bit = _core(x3, P[ctx])
                    P[ctx] = e
                    w3 = (w3 << _U64(1)) | _U64(bit)
                    if x3 < _LOW:
                        x3 = (x3 << _U64(32)) | _load_u32(buf, pos)
                        pos += _U64(4)
            else:
                j3 = np.int64(wi << _U64(6))
                for j in range(64):
                    jj = j0 + _U64(j)
                    ctx = _U64(0) + _context(qb[jj], w0, hist)
                    x0, e, bit = _core(x0, P[ctx])
                    P[ctx] = e
                    w0 = (w0 << _U64(1)) | _U64(bit)
                    if x0 < _LOW:
                        if pos + _U64(4) > ulim:
                            bad = True
                            x0 = x0 << _U64(32)
                        else:
                            x0 = (x0 << _U64(32)) | _load_u32(buf, pos)
                            pos += _U64(4)
                    ctx = _U64(NCTX) + _context(qb[jj + _U64(1 * QB)], w1, hist)
                    x1, e, bit = _core(x1, P[ctx])
                    P[ctx] = e
                    w1 = (w1 << _U64(1)) | _U64(bit)
                    if x1 < _LOW:
                        if pos + _U64(4) > ulim:
                            bad = True
                            x1 = x1 << _U64(32)
                        else:
                            x1 = (x1 << _U64(32)) | _load_u32(buf, pos)
                            pos += _U64(4)
                    ctx = _U64(2 * NCTX) + _context(qb[jj + _U64(2 * QB)], w2, hist)
                    x2, e, bit = _core(x2, P[ctx])
                    P[ctx] = e
                    w2 = (w2 << _U64(1)) | _U64(bit)
                    if x2 < _LOW:
                        if pos + _U64(4) > ulim:
                            bad = True
                            x2 = x2 << _U64(32)
                        else:
                            x2 = (x2 << _U64(32)) | _load_u32(buf, pos)
                            pos += _U64(4)
                    if j3 + j < n3:
                        ctx = _U64(3 * NCTX) + _context(qb[jj + _U64(3 * QB)], w3, hist)
                        x3, e, bit = _core(x3, P[ctx])
                        P[ctx] = e
                        w3 = (w3 << _U64(1)) | _U64(bit)
                        if x3 < _LOW:
                            if pos + _U64(4) > ulim:
                                bad = True
                                x3 = x3 << _U64(32)
                            else:
                                x3 = (x3 << _U64(32)) | _load_u32(buf, pos)
                                pos += _U64(4)
            words[wi] = _bitrev64(w0)
            words[o1 + wi] = _bitrev64(w1)
            words[o2 + wi] = _bitrev64(w2)
            if wi < full3:
                words[o3 + wi] = _bitrev64(w3)
            elif wi < nw3:
                words[o3 + wi] = _bitrev64(w3) >> _U64(64 - (n3 & 63))
    xs[0] = x0; xs[1] = x1; xs[2] = x2; xs[3] = x3
    return pos, bad


@njit(cache=True, nogil=True)
def _decode_any(buf, lim, X, n, K, c, q, words, xs):
    """Any K (1..16), any lane lengths, buckets in natural order. Returns (pos, bad)."""
    hist = HIST16
    P = np.full(K * NCTX, ENTRY0, np.uint32)
    x = X.copy()
    w = np.zeros(K, np.uint64)
    pos = _U64(0)
    bad = False
    ulim = _U64(lim)
    for j in range(c):
        for k in range(K):
            i = k * c + j
            if i >= n:
                continue
            xk, wk, pos, e = _step(P, _U64(k * NCTX), q[i], x[k], w[k], buf, pos, ulim, hist)
            x[k] = xk
            w[k] = wk
            bad |= e
            if (j & 63) == 63:
                words[i >> 6] = _bitrev64(wk)
            elif i == n - 1:
                words[i >> 6] = _bitrev64(wk) >> _U64(63 - (j & 63))
    for k in range(K):
        xs[k] = x[k]
    return pos, bad


# --- public API ----------------------------------------------------------------------------------------
def _tau_bits(tau: Any, planes_ok: bool = False) -> tuple[np.ndarray, int]:
    """(τ as the kernels read it, n): a float32 array's u32 view, flat; or, for the decoder, the 4 × n
    uint8 byte planes of τ as a byteplane-zstd segment decodes (plane j = byte j of every element)."""
    if planes_ok and isinstance(tau, np.ndarray) and tau.dtype == np.uint8 and tau.ndim == 2 and tau.shape[0] == 4:
        return np.ascontiguousarray(tau), tau.shape[1]
    if not isinstance(tau, np.ndarray) or tau.dtype != np.float32:
        raise InputError(f"tau-rans: the context must be τ_MTL as a float32 array{' or its 4 byte planes' if planes_ok else ''}, "
                         f"got {type(tau).__name__} {getattr(tau, 'dtype', '')}")
    tu = np.ascontiguousarray(tau).reshape(-1).view(np.uint32)
    return tu, tu.size


def encode_mask(bits_packed: np.ndarray, tau: np.ndarray, *, lanes: int | None = None) -> bytes:
    """The stored bytes of one mask (FORMAT.md §5.1) of n = ``tau.size`` bits. ``bits_packed``: uint8,
    ⌈n/8⌉ bytes, little-endian bit order, padding bits 0; ``tau``: τ_MTL of the tensor, float32;
    ``lanes``: K (default 4 for n ≥ 16384, else 1). InputError on bad arguments."""
    tu, n = _tau_bits(tau)
    packed = np.ascontiguousarray(np.asarray(bits_packed)).reshape(-1)
    nbytes = (n + 7) // 8
    if packed.dtype != np.uint8 or packed.size != nbytes:
        raise InputError(f"tau-rans: the mask must be uint8 with {nbytes} bytes, got {packed.dtype} with {packed.size}")
    if n % 8 and packed[-1] >> (n % 8):
        raise InputError("tau-rans: padding bits of the mask's last byte are not zero")
    raw = bytes([MAGIC, MODE_RAW]) + packed.tobytes()
    if n == 0:
        return raw
    K = lanes if lanes is not None else (LANES if n >= MIN_BITS_FOR_LANES else 1)
    if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or not 1 <= K <= MAX_LANES:
        raise InputError(f"tau-rans: lanes must be an integer in 1..{MAX_LANES}, got {lanes!r}")
    K = int(K)
    c = _lane_len(n, K)
    ref = int(_median_key(tu))
    q = _contexts(tu, n, ref, K, c)
    prob = np.empty(K * c, np.uint16)
    room = (len(raw) - HDR - 8 * K) // 4          # more words than this: raw is not longer
    if room < 0:
        return raw
    words = np.empty(room, np.uint32)
    x = np.empty(K, np.uint64)
    count = _encode_kernel(packed, n, q, K, c, prob, words, x)
    if count < 0:
        return raw
    head = bytes([MAGIC, MODE_RANS, K]) + ref.to_bytes(2, "little") + x.astype("<u8").tobytes()
    return head + words[room - count:].astype("<u4").tobytes()


def decode_mask(stored: Any, tau: np.ndarray, out: np.ndarray) -> None:
    """Decode ``stored`` into ``out`` (uint8, ⌈n/8⌉ bytes, writable, contiguous): the packed mask with
    zero padding bits. ``tau``: τ_MTL of the tensor, float32 (n elements) or its byte planes (uint8,
    4 × n, as a byteplane-zstd segment decodes). FormatError for any malformed segment (``out`` may then hold
    anything); InputError for bad arguments."""
    tu, n = _tau_bits(tau, planes_ok=True)
    nbytes = (n + 7) // 8
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 1 or out.size != nbytes \
            or not out.flags.writeable or not out.flags.c_contiguous:
        raise InputError(f"tau-rans: out must be a writable contiguous 1-D uint8 array of {nbytes} bytes")
    view = memoryview(stored).cast("B")
    if len(view) < 2 or view[0] != MAGIC:
        shown = f"0x{view[0]:02x}" if len(view) else "none (empty segment)"
        raise FormatError(f"byte 0 (magic): {shown}, expected 0x{MAGIC:02x}")
    mode = view[1]
    if mode == MODE_RAW:
        if len(view) != 2 + nbytes:
            raise FormatError(f"raw mode holds {len(view) - 2} mask bytes, expected {nbytes}")
        data = np.frombuffer(view, np.uint8, offset=2)
        if n % 8 and data[-1] >> (n % 8):
            raise FormatError("raw mode: mask padding bits are not zero")
        out[:] = data
        return
    if mode != MODE_RANS:
        raise FormatError(f"byte 1 (mode): {mode}, expected 0 (raw) or 1 (rANS)")
    if n == 0:
        raise FormatError("rANS mode for an empty mask (n = 0 must be raw)")
    if len(view) < HDR:
        raise FormatError(f"truncated header: {len(view)} bytes, rANS mode needs at least {HDR}")
    K = view[2]
    ref = view[3] | view[4] << 8
    if not 1 <= K <= MAX_LANES:
        raise FormatError(f"byte 2 (lanes K): {K}, expected 1..{MAX_LANES}")
    if ref > MAX_REF:
        raise FormatError(f"bytes 3-4 (reference key R): {ref}, expected 0..{MAX_REF}")
    body = len(view) - HDR - 8 * K
    if body < 0:
        raise FormatError(f"truncated lane states: {len(view)} bytes cannot hold the {K} states")
    if body % 4:
        raise FormatError(f"word stream of {body} bytes is not a whole number of 4-byte words")
    if body // 4 > n:
        raise FormatError(f"{body // 4} stream words for {n} bits (each bit reads at most one word)")
    X = np.frombuffer(view, "<u8", count=K, offset=HDR).astype(np.uint64)
    if (X < _LOW).any():
        k = int(np.argmax(X < _LOW))
        raise FormatError(f"initial state X_{k} = {int(X[k])} is below 2^32")
    c = _lane_len(n, K)
    buf = np.zeros(body + 8, np.uint8)              # 8 spare bytes: a refused read may still load
    buf[:body] = np.frombuffer(view, np.uint8, count=body, offset=HDR + 8 * K)
    words = np.empty((n + 63) // 64, np.uint64)
    xs = np.empty(K, np.uint64)
    if K == 4 and n > 3 * c:
        pos, bad = _decode4(buf, body, X, n, c, tu, ref, words, xs)
    else:
        q = _contexts(tu, n, ref, K, c)
        pos, bad = _decode_any(buf, body, X, n, K, c, q, words, xs)
    if bad:
        raise FormatError("the word stream ends before the last bit (truncated or corrupt stream)")
    if pos != body:
        raise FormatError(f"{(body - int(pos)) // 4} stream words left unread (trailing bytes or corrupt stream)")
    if (xs != _LOW).any():
        raise FormatError("a final lane state is not 2^32 (corrupt stream)")
    out[:] = words.view(np.uint8)[:nbytes]
