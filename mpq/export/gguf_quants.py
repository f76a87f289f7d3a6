"""GGUF block types, written from mpq's values: byte layouts of llama.cpp's reference (``ggml-common.h``) in numpy.

Each type stores a row in blocks: the legacy types (``Q8_0``, ``Q5_0``, ``Q5_1``, ``Q4_0``, ``Q4_1``) blocks of 32
with one fp16 scale (and an fp16 minimum for ``_1``); the K-quants (``Q6_K``, ``Q5_K``, ``Q4_K``, ``Q3_K``,
``Q2_K``) super-blocks of 256 with one fp16 ``d`` (and ``dmin``) and per-sub-block integer scales (and minima)
relative to them. The ``gguf`` package quantizes only the legacy types and does so from floats by its own rule;
here every type is encoded from a target (mpq's dequantized weight) and, where the sub-blocks fall inside mpq's
groups, from mpq's own grid: a sub-block's step is mpq's scale and its lowest level mpq's, so legacy types hold
mpq's values exactly when the scale is an fp16 number, and K-quants differ only by the rounding of their integer
sub-scales. Values are then rounded to the nearest level of the written grid.

:func:`pack` builds the bytes from the integer fields (tests check it against the ``gguf`` package's
dequantizers), :func:`encode` chooses the fields, :func:`steps` reads each element's grid step back from the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK_K = 256


@dataclass(frozen=True)
class GgufType:
    """A block type: elements per block, bytes per block, integer bits, sub-block size, and whether its levels
    are symmetric (``d * (q - offset)``) or carry a minimum (``d * q - m`` / ``d * q + m``)."""

    name: str
    block: int
    type_size: int
    bits: int
    sub: int
    symmetric: bool
    kquant: bool
    scale_max: int = 0  # K-quants: largest integer sub-scale (and sub-minimum)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block

    @property
    def levels(self) -> tuple[int, int]:
        """Range of the signed (symmetric) or unsigned level ``q``."""
        if self.symmetric:
            half = 1 << (self.bits - 1)
            return -half, half - 1
        return 0, (1 << self.bits) - 1


TYPES: dict[str, GgufType] = {t.name: t for t in (
    GgufType("Q8_0", 32, 34, 8, 32, True, False),
    GgufType("Q5_0", 32, 22, 5, 32, True, False),
    GgufType("Q5_1", 32, 24, 5, 32, False, False),
    GgufType("Q4_0", 32, 18, 4, 32, True, False),
    GgufType("Q4_1", 32, 20, 4, 32, False, False),
    GgufType("Q6_K", QK_K, 210, 6, 16, True, True, 127),
    GgufType("Q5_K", QK_K, 176, 5, 32, False, True, 63),
    GgufType("Q4_K", QK_K, 144, 4, 32, False, True, 63),
    GgufType("Q3_K", QK_K, 110, 3, 16, True, True, 31),
    GgufType("Q2_K", QK_K, 84, 2, 16, False, True, 15),
)}


@dataclass(frozen=True)
class Grid:
    """mpq's grid of a weight ``[N, K]``: symmetric values ``k * step`` with ``|k| <= qmax``, or asymmetric
    ``low + k * step`` with ``0 <= k < levels``; ``step``/``low`` are ``[N, groups]`` for groups of ``group``."""

    step: np.ndarray
    low: np.ndarray | None
    group: int
    qmax: int = 0  # symmetric: largest |level|
    levels: int = 0  # asymmetric: number of levels


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _as_bytes(*parts: np.ndarray) -> np.ndarray:
    return np.concatenate([np.ascontiguousarray(p.reshape(p.shape[0], -1)).view(np.uint8) for p in parts], axis=1)


# --------------------------------------------------------------------------------------------------------------------
# Bytes <-> integer fields
# --------------------------------------------------------------------------------------------------------------------
def _nibbles(u: np.ndarray, rows_of: int) -> np.ndarray:
    """Blocks of ``2 * rows_of`` 4-bit values: byte ``i`` holds value ``i`` (low nibble) and ``i + rows_of``."""
    u = u.reshape(u.shape[0], -1, 2, rows_of).astype(np.uint8)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(u.shape[0], -1)


def _crumbs(u: np.ndarray) -> np.ndarray:
    """128 2-bit values per 32 bytes: value ``k*32 + i`` of a 128-value chunk in bits ``2k`` of byte ``i``."""
    u = u.reshape(u.shape[0], -1, 4, 32).astype(np.uint8)
    return (u[:, :, 0] | (u[:, :, 1] << 2) | (u[:, :, 2] << 4) | (u[:, :, 3] << 6)).reshape(u.shape[0], -1)


def _bits_of(u: np.ndarray, count: int) -> np.ndarray:
    """One bit of each of ``count * 32`` values: value ``k*32 + i`` in bit ``k`` of byte ``i``."""
    u = u.reshape(u.shape[0], count, 32).astype(np.uint8)
    return np.bitwise_or.reduce(u << np.arange(count, dtype=np.uint8).reshape(1, count, 1), axis=1)


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: eight 6-bit scales and minima in 12 bytes (``get_scale_min_k4``)."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return out


def _q3_scales(s6: np.ndarray) -> np.ndarray:
    """Q3_K: sixteen 6-bit scales (stored +32) in 12 bytes: low nibbles in bytes 0-7, high 2 bits in bytes 8-11."""
    s6 = s6.astype(np.uint8)
    out = np.zeros((s6.shape[0], 12), dtype=np.uint8)
    for j in range(16):
        out[:, j % 8] |= (s6[:, j] & 0xF) << (4 * (j // 8))
        out[:, 8 + j % 4] |= (s6[:, j] >> 4) << (2 * (j // 4))
    return out


def pack(t: GgufType, d: np.ndarray, u: np.ndarray, sc: np.ndarray | None = None, dmin: np.ndarray | None = None,
         mn: np.ndarray | None = None, m: np.ndarray | None = None) -> np.ndarray:
    """Blocks ``[n_blocks, type_size]`` from fields: ``d`` (fp16, per block), unsigned levels ``u`` ``[n_blocks,
    block]`` (symmetric types store ``q - qmin``), sub-scales ``sc`` / ``dmin`` and sub-minima ``mn`` (K-quants),
    ``m`` the fp16 minimum of ``Q4_1``/``Q5_1``."""
    d = _f16(d).reshape(-1, 1)
    if t.name == "Q8_0":
        return _as_bytes(d, (u.astype(np.int16) - 128).astype(np.int8))
    if t.name in ("Q4_0", "Q4_1"):
        head = (d,) if t.name == "Q4_0" else (d, _f16(m).reshape(-1, 1))
        return _as_bytes(*head, _nibbles(u & 0xF, 16))
    if t.name in ("Q5_0", "Q5_1"):
        head = (d,) if t.name == "Q5_0" else (d, _f16(m).reshape(-1, 1))
        qh = np.bitwise_or.reduce((u.astype(np.uint32) >> 4) << np.arange(32, dtype=np.uint32), axis=1)
        return _as_bytes(*head, qh.astype("<u4").reshape(-1, 1), _nibbles(u & 0xF, 16))
    dmin16 = None if dmin is None else _f16(dmin).reshape(-1, 1)
    if t.name == "Q2_K":
        scales = (sc.astype(np.uint8) & 0xF) | (mn.astype(np.uint8) << 4)
        return _as_bytes(scales, _crumbs(u), d, dmin16)
    if t.name == "Q3_K":
        return _as_bytes(_bits_of(u >> 2, 8), _crumbs(u & 3), _q3_scales(sc + 32), d)
    if t.name == "Q4_K":
        return _as_bytes(d, dmin16, _k_scales(sc, mn), _nibbles(u, 32))
    if t.name == "Q5_K":
        return _as_bytes(d, dmin16, _k_scales(sc, mn), _bits_of(u >> 4, 8), _nibbles(u & 0xF, 32))
    if t.name == "Q6_K":
        halves = u.reshape(u.shape[0], 2, 128)
        ql = np.concatenate([_nibbles(halves[:, h] & 0xF, 64) for h in range(2)], axis=1)
        qh = np.concatenate([_crumbs(halves[:, h] >> 4) for h in range(2)], axis=1)
        return _as_bytes(ql, qh, sc.astype(np.int8), d)
    raise ValueError(f"GGUF type {t.name} has no packer")


# --------------------------------------------------------------------------------------------------------------------
# Choosing the fields
# --------------------------------------------------------------------------------------------------------------------
def _targets(values: np.ndarray, grid: Grid | None, t: GgufType) -> tuple[np.ndarray, np.ndarray | None]:
    """Per sub-block the step and lowest value (asymmetric types) the written grid should have: mpq's where the
    sub-block lies in one of mpq's groups and mpq's levels fit the type's, else from the sub-block's range."""
    n, k = values.shape
    v = values.reshape(n, k // t.sub, t.sub)
    lo_v, hi_v = v.min(axis=-1), v.max(axis=-1)
    qmin, qmax = t.levels
    if t.symmetric:
        step = np.maximum(np.abs(lo_v), np.abs(hi_v)) / qmax
        low = None
    else:
        if t.kquant:  # K-quants subtract a non-negative minimum: level 0 is at or below zero
            lo_v = np.minimum(lo_v, 0.0)
        step, low = (hi_v - lo_v) / qmax, lo_v
    if grid is not None and grid.group % t.sub == 0:
        g = np.arange(k // t.sub) * t.sub // grid.group  # the mpq group of each sub-block
        gstep = grid.step[:, g]
        if t.symmetric and grid.low is None and grid.qmax <= min(-qmin, qmax):
            step = gstep
        elif not t.symmetric:
            if grid.low is None and 2 * grid.qmax + 1 <= qmax + 1:
                glow = -grid.qmax * gstep
            elif grid.low is not None and grid.levels <= qmax + 1:
                glow = grid.low[:, g]
            else:
                glow = None
            if glow is not None:
                ok = glow <= 0 if t.kquant else np.ones_like(glow, dtype=bool)
                step, low = np.where(ok, gstep, step), np.where(ok, glow, low)
    return step.astype(np.float32), None if low is None else low.astype(np.float32)


def _nearest(values: np.ndarray, step: np.ndarray, low: np.ndarray | None, t: GgufType) -> np.ndarray:
    """Unsigned stored levels of ``values`` ``[blocks, subs, sub]`` on the grid ``step`` (``[blocks, subs]``),
    ``low``: ``d * (u - offset)`` for symmetric types, ``step * u + low`` for the others."""
    qmin, qmax = t.levels
    s = step[..., None]
    safe = np.where(s > 0, s, 1.0)
    if low is None:
        q = np.where(s > 0, np.round(values / safe), 0.0)
        return (np.clip(q, qmin, qmax) - qmin).astype(np.uint8)
    q = np.where(s > 0, np.round((values - low[..., None]) / safe), 0.0)
    return np.clip(q, 0, qmax).astype(np.uint8)


def _f16_at_least(x: np.ndarray) -> np.ndarray:
    """The nearest fp16 numbers not below ``x``."""
    y = _f16(x)
    return np.where(y.astype(np.float32) < x, np.nextafter(y, np.float16(np.inf)), y)


def _f16_at_most(x: np.ndarray) -> np.ndarray:
    """The nearest fp16 numbers not above ``x``."""
    y = _f16(x)
    return np.where(y.astype(np.float32) > x, np.nextafter(y, np.float16(-np.inf)), y)


def _levels_and_error(v: np.ndarray, step: np.ndarray, low: np.ndarray | None, t: GgufType):
    """Stored levels of ``v`` ``[blocks, subs, sub]`` on a grid, and each sub-block's squared error."""
    u = _nearest(v, step, low, t)
    qmin = t.levels[0] if low is None else 0
    back = step[..., None] * (u.astype(np.float32) + qmin) + (0 if low is None else low[..., None])
    return u, ((back - v) ** 2).sum(axis=-1)


def _best(candidates: list[tuple]) -> tuple:
    """Per sub-block, the candidate ``(error, *fields)`` with the least error (fields ``[blocks, subs, ...]``)."""
    errors = np.stack([c[0] for c in candidates])
    pick = errors.argmin(axis=0)
    out = []
    for i in range(1, len(candidates[0])):
        stacked = np.stack([np.broadcast_to(c[i], candidates[0][i].shape) for c in candidates])
        idx = pick.reshape(pick.shape + (1,) * (stacked.ndim - 1 - pick.ndim))
        out.append(np.take_along_axis(stacked, idx[None], axis=0)[0])
    return tuple(out)


def encode(values: np.ndarray, type_name: str, grid: Grid | None = None) -> np.ndarray:
    """``[N, K]`` float32 values as GGUF blocks ``[N, K / block * type_size]`` (uint8); ``grid`` is mpq's.

    Steps and minima (fp16 numbers, integer sub-scales) are rounded to the nearest of mpq's, or outwards where
    that keeps every value of the block inside the grid, whichever leaves the smaller error in the block; then
    each value takes the nearest level. Where mpq's grid is the type's, that is mpq's grid exactly."""
    t = TYPES[type_name]
    n, k = values.shape
    if k % t.block:
        raise ValueError(f"a row of {k} values is not a whole number of {t.name} blocks of {t.block}")
    values = values.astype(np.float32)
    step, low = _targets(values, grid, t)
    nb = n * k // t.block
    per = t.block // t.sub
    step, low = step.reshape(nb, per), None if low is None else low.reshape(nb, per)
    v = values.reshape(nb, per, t.sub)
    vmax, vmin = v.max(axis=-1), v.min(axis=-1)
    qmin, qmax = t.levels
    f32 = np.float32
    if not t.kquant:  # one fp16 d (and m) per block: candidates nearest / outward
        lows = [None] if low is None else [_f16(low), np.minimum(_f16(low), _f16_at_most(vmin))]
        cands = []
        for m in lows:
            mlow = None if m is None else m.astype(f32)
            need = np.maximum(np.maximum(vmax, 0) / qmax, np.maximum(-vmin, 0) / -qmin) if m is None else \
                (vmax - mlow) / qmax
            for d in (_f16(step), np.maximum(_f16(step), _f16_at_least(need))):
                u, err = _levels_and_error(v, d.astype(f32), mlow, t)
                cands.append((err, d, u) if m is None else (err, d, u, m))
        fields = _best(cands)
        d, u = fields[0][:, 0], fields[1]
        m = None if low is None else fields[2][:, 0]
        return pack(t, d, u.reshape(nb, -1), m=m).reshape(n, -1)
    # K-quants: integer sub-scales (and sub-minima) relative to one fp16 d (and dmin) per super-block
    smax = t.scale_max
    d = _f16_at_least(step.max(axis=1) / smax)
    d32 = d.astype(f32)[:, None]
    dsafe = np.where(d32 > 0, d32, 1.0)

    def scale_candidates(need: np.ndarray) -> list[np.ndarray]:
        near = np.where(d32 > 0, np.clip(np.round(step / dsafe), 0, smax), 0)
        out = np.where(d32 > 0, np.clip(np.maximum(near, np.ceil(need / dsafe * (1 - 1e-6))), 0, smax), 0)
        return [near, out]

    if low is None:
        need = np.maximum(np.maximum(vmax, 0) / qmax, np.maximum(-vmin, 0) / -qmin)
        cands = []
        for sc in scale_candidates(need):
            u, err = _levels_and_error(v, d32 * sc.astype(f32), None, t)
            cands.append((err, sc, u))
        sc, u = _best(cands)
        return pack(t, d, u.reshape(nb, -1), sc=sc.astype(np.int16)).reshape(n, -1)
    dmin = _f16_at_least((-low).max(axis=1) / smax)
    dmin32 = dmin.astype(f32)[:, None]
    msafe = np.where(dmin32 > 0, dmin32, 1.0)
    near_mn = np.where(dmin32 > 0, np.clip(np.round(-low / msafe), 0, smax), 0)
    cands = []
    for mn in (near_mn, np.clip(near_mn + (-dmin32 * near_mn > vmin), 0, smax)):
        eff_low = -dmin32 * mn.astype(f32)
        for sc in scale_candidates((vmax - eff_low) / qmax):
            u, err = _levels_and_error(v, d32 * sc.astype(f32), eff_low, t)
            cands.append((err, sc, mn, u))
    sc, mn, u = _best(cands)
    return pack(t, d, u.reshape(nb, -1), sc=sc, dmin=dmin, mn=mn).reshape(n, -1)


def steps(blocks: np.ndarray, type_name: str) -> np.ndarray:
    """Per element, the step of the written grid there (``d`` or ``d * sc``): half of it bounds the rounding of a
    value inside the grid's range. Read back from the bytes (``[N, bytes]`` -> ``[N, K]``)."""
    t = TYPES[type_name]
    b = blocks.reshape(-1, t.type_size)
    if not t.kquant:
        d = b[:, :2].copy().view(np.float16).astype(np.float32)
        out = np.repeat(d, t.block, axis=1)
    else:
        offset = {"Q6_K": 208, "Q3_K": 108, "Q2_K": 80}.get(t.name, 0)
        d = b[:, offset:offset + 2].copy().view(np.float16).astype(np.float32)
        if t.name == "Q6_K":
            sc = b[:, 192:208].view(np.int8).astype(np.float32)
        elif t.name == "Q2_K":
            sc = (b[:, :16] & 0xF).astype(np.float32)
        elif t.name == "Q3_K":
            raw = b[:, 96:108]
            sc = np.stack([((raw[:, j % 8] >> (4 * (j // 8))) & 0xF) | (((raw[:, 8 + j % 4] >> (2 * (j // 4))) & 3)
                                                                        << 4) for j in range(16)], axis=1)
            sc = sc.astype(np.float32) - 32
        else:
            raw = b[:, 4:16]
            sc = np.concatenate([raw[:, 0:4] & 0x3F, (raw[:, 8:12] & 0xF) | ((raw[:, 0:4] >> 2) & 0x30)], axis=1)
            sc = sc.astype(np.float32)
        out = np.repeat(np.abs(d * sc), t.sub, axis=1)
    return out.reshape(blocks.shape[0], -1)
