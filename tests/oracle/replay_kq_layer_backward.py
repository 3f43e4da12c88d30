#!/usr/bin/env python3
"""The fused kq layer's main backward pass, as a design replayed in float64 before any kernel exists,
against PyTorch autograd (tests/oracle/mta_torch.py) on the whole layer core (steps 1-7).

Two kernels share the work, because the windows of one would not fit a CTA's shared memory at 8
coupled heads (docs/flash-mta.md, "the main backward pass"). Both own a 16-row query tile (m0 ..),
one warp per head, and slide windows whose key axis is a ring over the key blocks, as the forward
(replay_kq_layer.py, rings of 64) and the former delta pass (replay_kq_layer_delta.py) do:

Kernel P, the post side (pass 2's windows on rings of 48 keys since session 18: S0 rows m0 - 16 .. m0 + 15
rotated by o1, A rows m0 - 8 .. m0 + 15 rotated by o2, key tile kt + 2 of S0 and kt + 1 of A computed
while block kt is used; pass 2's rings of 64 are replayed too). Per
block: A2 and A3 on the tile's rows (as pass 2), then with the tile's dO rows:
  dV[block keys] += A3^T dO           (atomics: every query tile adds to the block's keys)
  dA3 = dO V^T;  dMpost += dA3_x A2_y  (per-CTA partials)
  dA2 = mask0(Mpost^T dA3);  dWpost[a, c] += dA2[i, j] A[i - (cq2 - 1) + a, j - o2 + c]  (the A window)
and, at the end, delta (session 13; before, a pass of its own, replay_kq_layer_delta.py). delta_i' =
sum_j A[i', j] dA[i', j] with dA = conv_post^T(dA2) is, substituting i = i' + cq2 - 1 - a,
  delta_i' = sum_a sum_c Wpost[a, c] (sum_j dA2[i, j] A[i', j - o2 + c]),
and the bracket is row i's own term of dWpost[a, c]: the per-lane accumulators the kernel keeps anyway
(a lane owns one row). So row i (of this tile) adds sum_c Wpost[a, c] dW_i[a, c] to row i - (cq2 - 1) + a,
for a < cq2: rows m0 - 7 .. m0 + 15. The kernel adds each row's sum to delta (zeroed first) with an
atomic addition; a row gets terms from its own tile and, for its tile's last cq2 - 1 rows, from the next
tile: at most two additions to 0, so the result does not depend on their order.

Kernel Q, the pre side, with rings of 48 keys (three key tiles; 64 would not fit 8 heads' windows in
227 KB). Windows: S0 rows m0 - 8 .. m0 + 23 (two Q tiles at m0 - 8 and m0 + 8) rotated by o1; dA2 rows
m0 .. m0 + 31 (two dO tiles, Mpost^T mixed, masked) rotated by ck2 - 1 - o2 (as the delta replay's); dC rows
m0 .. m0 + 23 rotated by ck1 - 1 - o1 (read by the transposed pre convolution). Before block 0: S0 and
dA2 tiles 0 and 1, dC tile 0. Per block kt:
  dWpre[a, c] += dC[i, j] S0[i - (cq1 - 1) + a, j - o1 + c]  (own rows i; S0 tiles kt - 1 .. kt + 1);
  S0 tile kt + 2, dA2 tile kt + 2 (each replacing tile kt - 1), then dC tile kt + 1 on rows m0 ..
  m0 + 23, in two 16-row parts:
    C = conv_pre(S0), C' = Mpre C, A = exp(C' - lse), dA = conv_post^T(dA2),
    dC' = A (dA - delta), dMpre += dC'_x C_y (the tile's own rows, part 0), dC = Mpre^T dC';
  dS0 on the tile's rows at block kt = mask0(conv_pre^T(dC));
  dQ += dS0 K (the tile's own rows: no atomics);  dK[block keys] += dS0^T Q (atomics).
That is `kernel_q`, the kernel of sessions 8-16. Since session 17 the kernel follows `kernel_q_own_rows`
(below): dC on the own 16 rows only, dS0 scattered to rows m0 - 8 .. m0 + 15; both are checked here.
Look-ahead and ring occupancy (ck <= 15, so a convolution reads at most 14 keys on either side):
  - dWpre at block kt reads S0 at keys 16 kt - 14 .. 16 kt + 29: tiles kt - 1 .. kt + 1, before
    tile kt + 2 replaces kt - 1;
  - dC tile kt + 1 reads S0 and dA2 at keys 16 kt + 2 .. 16 kt + 45: tiles kt .. kt + 2;
  - dS0 at block kt reads dC at keys 16 kt - 14 .. 16 kt + 29: tiles kt - 1 .. kt + 1 (dC tile kt + 1
    replaced kt - 2).
Each ring records which key tile every column holds, and every read asserts that it finds the tile
of the key it wants; every stencil read asserts the alignment the kernels' float4 loads need.

The parameter gradients are summed over the tiles here; the kernels write per-CTA partials, reduced in
a fixed order (as FlashMix's mixing-weight gradients). delta comes from kernel P's parts, checked here
against delta from whole matrices (as lse is computed)."""
import math
import sys

import numpy as np
import torch

import mta_torch
from replay_kq_layer import KEY_OFFSET, conv, mix, random_params, softmax_weights
from replay_kq_layer_delta import conv_t, mix_t


def add_mix_grad(dm, d, x, g):
    """dm[group, i, j] += sum over positions of d_h x_y, for each head h (i = h % g) and each head y of
    its group (j = y % g): a mixing weight's gradient terms over one tile."""
    for h in range(d.shape[0]):
        for y in range(h // g * g, h // g * g + g):
            dm[h // g, h % g, y % g] += (d[h] * x[y]).sum()


class Ring:
    """A window of `rows` rows whose key axis is a ring of 64 columns rotated by `rot`; it records
    which key tile each column holds, so that a read of a column holding another tile fails."""

    def __init__(self, H, rows, rot, size=64):
        self.v = np.zeros((H, rows, size))
        self.tile = np.full(size, -1)  # every column starts as tile -1: the zero padding left of key 0
        self.rot, self.size = rot, size

    def col(self, key):
        return (key + self.rot) % self.size

    def put(self, tile):  # marks tile's columns (the caller writes their values)
        for j in range(16):
            self.tile[self.col(16 * tile + j)] = tile

    def get(self, h, wrow, key):
        c = self.col(key)
        assert self.tile[c] == key // 16, f"ring read of key {key} finds tile {self.tile[c]}"
        return self.v[h, wrow, c]


def conv8(ring, h, w, cq, ck, wrow, x0, o):
    """Forward stencil: out[e] = sum w[a, c] win[wrow - (cq - 1) + a, key x0 + e - o + c]. The kernel
    reads columns x0 .. x0 + ck + 6 (float4 loads from a multiple of 8): the ring's rotation must put
    the first key read, x0 - o, at column x0."""
    assert x0 % 8 == 0 and ring.col(x0 - o) == x0 % ring.size, "misaligned stencil read"
    return [sum(w[a, c] * ring.get(h, wrow - (cq - 1) + a, x0 + e - o + c) for a in range(cq) for c in range(ck))
            for e in range(8)]


def conv8_t(ring, h, w, cq, ck, wrow, x0, o):
    """Transposed stencil: out[e] = sum w[a, c] win[wrow + cq - 1 - a, key x0 + e + o - c]; its first
    key read, x0 + o - (ck - 1), must sit at column x0 (as conv8's)."""
    assert x0 % 8 == 0 and ring.col(x0 + o - (ck - 1)) == x0 % ring.size, "misaligned transposed stencil read"
    return [sum(w[a, c] * ring.get(h, wrow + cq - 1 - a, x0 + e + o - c) for a in range(cq) for c in range(ck))
            for e in range(8)]


def s0_tile(ring, q, k, tile, top, m0, sc):
    """S0 of key tile `tile` on the window's rows (query rows m0 - top ..), the future 0."""
    H, T, D = q.shape
    ring.put(tile)
    for h in range(H):
        for wr in range(ring.v.shape[1]):
            row = m0 - top + wr
            for jj in range(16):
                key = 16 * tile + jj
                ok = 0 <= row < T and key < T and key <= row
                ring.v[h, wr, ring.col(key)] = q[h, row] @ k[h, key] * sc if ok else 0.0


def da2_tile(ring, dO, v, m2, g2, tile, m0):
    """dA2 = mask0(Mpost^T (dO V^T)) of key tile `tile` on rows m0 .. m0 + 31 (the window's rows of them)."""
    H, T, D = v.shape
    ring.put(tile)
    d3 = np.zeros((H, 32, 16))
    for h in range(H):
        for rr in range(32):
            row = m0 + rr
            for jj in range(16):
                key = 16 * tile + jj
                if row < T and key < T:
                    d3[h, rr, jj] = dO[h, row] @ v[h, key]
    d2 = mix_t(d3, m2, g2)
    for h in range(H):
        for rr in range(ring.v.shape[1]):  # the window keeps its first 24 or all 32 rows
            for jj in range(16):
                key = 16 * tile + jj
                ring.v[h, rr, ring.col(key)] = 0.0 if key > m0 + rr else d2[h, rr, jj]


def c_and_da(s0, da2, P, key0, rows, s0_row, da2_row):
    """C and dA of key tile key0 / 16 on 16 window rows: row r (< rows) reads the S0 window at row
    s0_row + r and the dA2 window at da2_row + r (kernel Q's stencils)."""
    (w1, _, _, cq1, ck1, o1), (w2, _, _, cq2, ck2, o2) = P
    H = s0.v.shape[0]
    C, dA = np.zeros((H, 16, 16)), np.zeros((H, 16, 16))
    for h in range(H):
        for r in range(rows):
            for half in range(2):
                x0 = key0 + 8 * half
                C[h, r, 8 * half:8 * half + 8] = conv8(s0, h, w1[h], cq1, ck1, s0_row + r, x0, o1)
                dA[h, r, 8 * half:8 * half + 8] = conv8_t(da2, h, w2[h], cq2, ck2, da2_row + r, x0, o2)
    return C, dA


def dc_prime(Cm, dA, lse, delta, key0, row0, rows):
    """dC' = A (dA - delta), A = exp(C' - lse), on query rows row0 .. row0 + rows - 1 (< T), the future 0."""
    H, T = lse.shape
    dCp = np.zeros((H, 16, 16))
    for h in range(H):
        for r in range(rows):
            row = row0 + r
            for jj in range(16):
                if row < T and key0 + jj <= row:
                    dCp[h, r, jj] = math.exp(Cm[h, r, jj] - lse[h, row]) * (dA[h, r, jj] - delta[h, row])
    return dCp


def add_dw1(dw1, dc, s0, P, n0, dc_row0):
    """dWpre of block n0 / 16 over the tile's own rows (dC window rows dc_row0 .., S0 window rows 8 .. for
    query row m0), before S0 tile kt + 2 replaces kt - 1."""
    (w1, _, _, cq1, ck1, o1), _ = P
    for h in range(dw1.shape[0]):
        for r in range(16):
            for half in range(2):
                x0 = n0 + 8 * half
                for a in range(cq1):
                    for c in range(ck1):
                        dw1[h, a, c] += sum(dc.get(h, dc_row0 + r, x0 + e) *
                                            s0.get(h, r + 8 - (cq1 - 1) + a, x0 + e - o1 + c) for e in range(8))


def add_dq_dk(dq, dk, q, k, h, dS0, row0, n0, sc):
    """dq (rows row0 .., those in [0, T)) += dS0 K and dk (the block's keys) += dS0^T Q."""
    T = q.shape[1]
    idx = [i for i in range(dS0.shape[0]) if 0 <= row0 + i < T]
    rows = [row0 + i for i in idx]
    keys = [n0 + j for j in range(16) if n0 + j < T]
    dq[h, rows] += dS0[idx][:, :len(keys)] @ k[h, keys] * sc
    dk[h, keys] += dS0[idx][:, :len(keys)].T @ q[h, rows] * sc


def kernel_q(q, k, dO, v, lse, delta, P):
    """dq, dk, dWpre, dMpre."""
    H, T, D = q.shape
    sc = 1 / math.sqrt(D)
    (w1, m1, g1, cq1, ck1, o1), (w2, m2, g2, cq2, ck2, o2) = P
    dq, dk = np.zeros_like(q), np.zeros_like(k)
    dw1, dm1 = np.zeros_like(w1), np.zeros_like(m1)
    for m0 in range(0, T, 16):
        s0 = Ring(H, 32, o1, 48)             # rows m0 - 8 .. m0 + 23
        da2 = Ring(H, 32, ck2 - 1 - o2, 48)  # rows m0 .. m0 + 31
        dc = Ring(H, 24, ck1 - 1 - o1, 48)   # rows m0 .. m0 + 23

        def dc_tile(tile):
            dc.put(tile)
            key0 = 16 * tile
            for part in range(2):
                rows = 16 if part == 0 else 8  # window rows 16 .. 23 in part 1
                C, dA = c_and_da(s0, da2, P, key0, rows, 16 * part + 8, 16 * part)
                dCp = dc_prime(mix(C, m1, g1), dA, lse, delta, key0, m0 + 16 * part, rows)
                if part == 0 and g1:  # dMpre[G, x, y] += dC'_x C_y over the tile's own rows
                    add_mix_grad(dm1, dCp, C, g1)
                dC = mix_t(dCp, m1, g1)
                for h in range(H):
                    for r in range(16):
                        if 16 * part + r < 24:
                            for jj in range(16):
                                dc.v[h, 16 * part + r, dc.col(key0 + jj)] = dC[h, r, jj]

        s0_tile(s0, q, k, 0, 8, m0, sc)
        s0_tile(s0, q, k, 1, 8, m0, sc)
        da2_tile(da2, dO, v, m2, g2, 0, m0)
        da2_tile(da2, dO, v, m2, g2, 1, m0)
        dc_tile(0)
        for n0 in range(0, min(T, m0 + 16), 16):
            kt = n0 // 16
            add_dw1(dw1, dc, s0, P, n0, 0)  # first: it reads S0 tiles kt - 1 .. kt + 1
            s0_tile(s0, q, k, kt + 2, 8, m0, sc)
            da2_tile(da2, dO, v, m2, g2, kt + 2, m0)
            dc_tile(kt + 1)
            for h in range(H):
                dS0 = np.zeros((16, 16))
                for r in range(16):
                    row = m0 + r
                    for half in range(2):
                        x0 = n0 + 8 * half
                        d = conv8_t(dc, h, w1[h], cq1, ck1, r, x0, o1)
                        for e in range(8):
                            if x0 + e <= row < T:
                                dS0[r, 8 * half + e] = d[e]
                add_dq_dk(dq, dk, q, k, h, dS0, m0, n0, sc)
    return dq, dk, dw1, dm1


def kernel_q_own_rows(q, k, dO, v, lse, delta, P):
    """Kernel Q with dC on the tile's own 16 rows only: the kernel since session 17 (designed in session
    13, docs/flash-mta.md, and replayed here before it existed). kernel_q computes dC on 24 rows (C, A and
    dA on two 16-row parts, each with two mixes) because dS0 = conv_pre^T(dC) on its rows reads cq1 - 1
    rows below. dS0 is linear in dC, so each tile can instead scatter its own rows' dC into dS0 rows
    m0 - 7 .. m0 + 15 (the transposed stencil on 24 output rows over a dC window that is zero outside rows
    m0 .. m0 + 15); the rows above the tile then get a second contribution (the kernel adds both into dq
    with bf16x2 atomics: two additions onto zero, in either order the same sum), and dK takes 24 rows of
    dS0^T Q (Q rows m0 - 8 .. m0 + 15, the S0 window's). Windows: S0 rows m0 - 8 .. m0 + 15 (24: C on the
    own rows reads 7 above), dA2 rows m0 .. m0 + 23 (dA on the own rows reads cq2 - 1 <= 7 below), dC rows
    m0 - 8 .. m0 + 23 (32, only m0 .. m0 + 15 written). Per block: C, A and dA on 16 rows (one pre mix and
    one Mpre^T mix instead of two each), dS0 on 24."""
    H, T, D = q.shape
    sc = 1 / math.sqrt(D)
    (w1, m1, g1, cq1, ck1, o1), (w2, m2, g2, cq2, ck2, o2) = P
    dq, dk = np.zeros_like(q), np.zeros_like(k)
    dw1, dm1 = np.zeros_like(w1), np.zeros_like(m1)
    for m0 in range(0, T, 16):
        s0 = Ring(H, 24, o1, 48)             # rows m0 - 8 .. m0 + 15
        da2 = Ring(H, 24, ck2 - 1 - o2, 48)  # rows m0 .. m0 + 23
        dc = Ring(H, 32, ck1 - 1 - o1, 48)   # rows m0 - 8 .. m0 + 23; rows m0 .. m0 + 15 at 8 ..

        def dc_tile(tile):
            dc.put(tile)
            key0 = 16 * tile
            C, dA = c_and_da(s0, da2, P, key0, 16, 8, 0)
            dCp = dc_prime(mix(C, m1, g1), dA, lse, delta, key0, m0, 16)
            if g1:
                add_mix_grad(dm1, dCp, C, g1)
            dC = mix_t(dCp, m1, g1)
            for h in range(H):
                for r in range(16):
                    for jj in range(16):
                        dc.v[h, 8 + r, dc.col(key0 + jj)] = dC[h, r, jj]

        s0_tile(s0, q, k, 0, 8, m0, sc)
        s0_tile(s0, q, k, 1, 8, m0, sc)
        da2_tile(da2, dO, v, m2, g2, 0, m0)
        da2_tile(da2, dO, v, m2, g2, 1, m0)
        dc_tile(0)
        for n0 in range(0, min(T, m0 + 16), 16):
            kt = n0 // 16
            add_dw1(dw1, dc, s0, P, n0, 8)
            s0_tile(s0, q, k, kt + 2, 8, m0, sc)
            da2_tile(da2, dO, v, m2, g2, kt + 2, m0)
            dc_tile(kt + 1)
            for h in range(H):
                dS0 = np.zeros((24, 16))  # rows m0 - 8 .. m0 + 15: this tile's dC terms
                for rr in range(24):
                    row = m0 - 8 + rr
                    for half in range(2):
                        x0 = n0 + 8 * half
                        d = conv8_t(dc, h, w1[h], cq1, ck1, rr, x0, o1)
                        for e in range(8):
                            if 0 <= row < T and x0 + e <= row:
                                dS0[rr, 8 * half + e] = d[e]
                assert not dS0[:8 - (cq1 - 1)].any(), "dS0 reaches more than cq1 - 1 rows above the tile"
                add_dq_dk(dq, dk, q, k, h, dS0, m0 - 8, n0, sc)
    return dq, dk, dw1, dm1


def kernel_p(q, k, dO, v, lse, P, ring=48):
    """dv, dWpost, dMpost, delta (see the module's docstring). ring: the windows' key rings (the kernel's
    48 since session 18, which freed shared memory for its pre mix's second part; 64, pass 2's, is
    replayed too; 32 fails: a read finds a tile already replaced)."""
    H, T, D = q.shape
    sc = 1 / math.sqrt(D)
    (w1, m1, g1, cq1, ck1, o1), (w2, m2, g2, cq2, ck2, o2) = P
    dv = np.zeros_like(v)
    dw2, dm2 = np.zeros_like(w2), np.zeros_like(m2)
    delta = np.zeros((H, T))
    adds = np.zeros(T, dtype=int)  # the tiles that add to each row
    for m0 in range(0, T, 16):
        lane_dw = np.zeros((H, 16, cq2, ck2))  # a row's own dWpost terms (the kernel's per-lane accw)
        s0 = Ring(H, 32, o1, ring)  # rows m0 - 16 .. m0 + 15
        aw = Ring(H, 24, o2, ring)  # rows m0 - 8 .. m0 + 15

        def a_tile(tile):  # as pass 2 (replay_kq_layer.py)
            aw.put(tile)
            key0 = 16 * tile
            for part in range(2):
                C = np.zeros((H, 16, 16))
                for h in range(H):
                    for r in range(16):
                        rr = 16 * part + r
                        if rr < 24 and key0 <= m0 + 15:
                            for half in range(2):
                                C[h, r, 8 * half:8 * half + 8] = conv8(s0, h, w1[h], cq1, ck1, rr + 8,
                                                                       key0 + 8 * half, o1)
                Cm = mix(C, m1, g1)
                for h in range(H):
                    for r in range(16):
                        rr = 16 * part + r
                        row = m0 - 8 + rr
                        if rr >= 24:
                            continue
                        for jj in range(16):
                            key = key0 + jj
                            ok = 0 <= row < T and key <= row
                            aw.v[h, rr, aw.col(key)] = math.exp(Cm[h, r, jj] - lse[h, row]) if ok else 0.0

        s0_tile(s0, q, k, 0, 16, m0, sc)
        s0_tile(s0, q, k, 1, 16, m0, sc)
        a_tile(0)
        for n0 in range(0, min(T, m0 + 16), 16):
            kt = n0 // 16
            s0_tile(s0, q, k, kt + 2, 16, m0, sc)
            a_tile(kt + 1)
            A2 = np.zeros((H, 16, 16))
            for h in range(H):
                for r in range(16):
                    for half in range(2):
                        x0 = n0 + 8 * half
                        a2 = conv8(aw, h, w2[h], cq2, ck2, 8 + r, x0, o2)
                        A2[h, r, 8 * half:8 * half + 8] = [0.0 if x0 + e > m0 + r else a2[e] for e in range(8)]
            A3 = mix(A2, m2, g2)
            rows = [m0 + r for r in range(16) if m0 + r < T]
            keys = [n0 + j for j in range(16) if n0 + j < T]
            nr, nk = len(rows), len(keys)
            dA3 = np.zeros((H, 16, 16))
            for h in range(H):
                dv[h, keys] += A3[h, :nr, :nk].T @ dO[h, rows]
                dA3[h, :nr, :nk] = dO[h, rows] @ v[h, keys].T
            if g2:
                add_mix_grad(dm2, dA3, A2, g2)
            dA2 = mix_t(dA3, m2, g2)
            for h in range(H):
                for r in range(16):
                    for half in range(2):
                        x0 = n0 + 8 * half
                        for a in range(cq2):
                            for c in range(ck2):
                                lane_dw[h, r, a, c] += sum((0.0 if x0 + e > m0 + r else dA2[h, r, 8 * half + e]) *
                                                           aw.get(h, 8 + r - (cq2 - 1) + a, x0 + e - o2 + c)
                                                           for e in range(8))
        dw2 += lane_dw.sum(1)
        # delta's terms from this tile's dA2 rows: row m0 + r gives row m0 + r - (cq2 - 1) + a the sum over
        # c of w2[a, c] times its dWpost terms; the rows above m0 go to the tile above's `below`.
        part = np.zeros((H, 24))  # rows m0 - 8 .. m0 + 15
        for h in range(H):
            for r in range(16):
                for a in range(cq2):
                    part[h, 8 + r - (cq2 - 1) + a] += (w2[h, a] * lane_dw[h, r, a]).sum()
        for rr in range(8 - (cq2 - 1), 24):  # the rows this tile's rows reach
            if 0 <= m0 - 8 + rr < T:
                delta[:, m0 - 8 + rr] += part[:, rr]
                adds[m0 - 8 + rr] += 1
    assert adds.max(initial=0) <= 2, "a row of delta gets terms from more than two tiles"
    return dv, dw2, dm2, delta


def reference(q, k, v, dO, w1, m1, g1, w2, m2, g2, conv1, conv2, post):
    """PyTorch autograd of steps 1-7 (mta_torch), plus lse and delta from whole matrices."""
    H, T, D = q.shape
    spec = {"heads": H, "head_dim": D, "kq_pre": {"q": conv1[0], "k": conv1[1], "pad_key": conv1[2]}}
    tensors = {"q": q[None], "k": k[None], "v": v[None], "dout": dO[None], "kq_pre": w1}
    if g1:
        spec["head_pre"], tensors["head_pre"] = {"group": g1}, m1
    if post:
        spec["kq_post"], tensors["kq_post"] = {"q": conv2[0], "k": conv2[1], "pad_key": conv2[2]}, w2
    if g2:
        spec["head_post"], tensors["head_post"] = {"group": g2}, m2
    _, grads = mta_torch.forward_backward(spec, tensors, torch.float64)
    cq1, ck1, o1 = conv1[0], conv1[1], KEY_OFFSET[conv1[2]](conv1[1])
    cq2, ck2, o2 = conv2[0], conv2[1], KEY_OFFSET[conv2[2]](conv2[1])
    A, lse, fut = softmax_weights(q, k, w1, m1, g1, cq1, ck1, o1)
    dA3 = np.stack([dO[h] @ v[h].T for h in range(H)])
    dA2 = np.where(fut, 0, mix_t(dA3, m2, g2))
    dA = np.stack([conv_t(dA2[h], w2[h], cq2, ck2, o2, T) for h in range(H)])
    return {n: g.numpy()[0] if n in ("grad_q", "grad_k", "grad_v") else g.numpy() for n, g in grads.items()}, \
        lse, (A * dA).sum(-1)


def main():
    rng = np.random.default_rng(3)
    cases = [  # H, T, D, (cq1, ck1, pad1), (cq2, ck2, pad2) or None, g1, g2
        (2, 37, 4, (6, 11, "both"), (6, 11, "both"), 2, 2),  # the paper's layer, a partial third tile
        (2, 20, 4, (2, 9, "left"), (3, 5, "right"), 0, 1),
        (2, 40, 4, (8, 15, "right"), (8, 15, "left"), 1, 2),  # the largest kernels
        (2, 33, 4, (8, 15, "left"), (8, 15, "right"), 2, 0),  # the other extreme offsets
        (2, 1, 4, (6, 11, "both"), (6, 11, "both"), 2, 2),  # T = 1
        (2, 18, 4, (3, 3, "both"), None, 2, 0),  # no kq_post: the identity 1 x 1
    ]
    ok = True
    for H, T, D, conv1, conv2, g1, g2 in cases:
        post = conv2 is not None
        conv2 = conv2 or (1, 1, "right")
        q, k, v, dO = (rng.standard_normal((H, T, D)) for _ in range(4))
        w1, m1, w2, m2, o1, o2 = random_params(rng, H, conv1, conv2, g1, g2)
        if not post:
            w2 = np.ones((H, 1, 1))
        want, lse, delta = reference(q, k, v, dO, w1, m1, g1, w2, m2, g2, conv1, conv2, post)
        P = ((w1, m1, g1, conv1[0], conv1[1], o1), (w2, m2, g2, conv2[0], conv2[1], o2))
        dv, dw2, dm2, delta_p = kernel_p(q, k, dO, v, lse, P)
        e_delta = np.abs(delta_p - delta).max() / max(1.0, np.abs(delta).max())
        # Kernel P on pass 2's rings of 64 keys gives the same results.
        p64 = kernel_p(q, k, dO, v, lse, P, ring=64)
        e_p64 = max(np.abs(x - y).max() / max(1.0, np.abs(y).max()) for x, y in zip(p64, (dv, dw2, dm2, delta_p)))
        dq, dk, dw1, dm1 = kernel_q(q, k, dO, v, lse, delta_p, P)
        # The own-rows design gives the same gradients (to float64 rounding).
        own = kernel_q_own_rows(q, k, dO, v, lse, delta_p, P)
        e_own = max(np.abs(x - y).max() / max(1.0, np.abs(y).max()) for x, y in zip(own, (dq, dk, dw1, dm1)))
        got = {"grad_q": dq, "grad_k": dk, "grad_v": dv, "grad_kq_pre": dw1}
        if g1:
            got["grad_head_pre"] = dm1
        if post:
            got["grad_kq_post"] = dw2
        if g2:
            got["grad_head_post"] = dm2
        assert set(got) == set(want), (sorted(got), sorted(want))
        errs = {n: np.abs(got[n] - want[n]).max() / max(1.0, np.abs(want[n]).max()) for n in want}
        errs["delta"], errs["kernel Q on own rows"], errs["kernel P on rings of 64"] = e_delta, e_own, e_p64
        good = all(np.isfinite(got[n]).all() and errs[n] < 1e-10 for n in got) and max(e_delta, e_own, e_p64) < 1e-10
        ok &= good
        worst = max(errs, key=errs.get)
        print(f"{'ok  ' if good else 'FAIL'} T={T} pre {conv1}, post {conv2 if post else None}, head_pre {g1}, "
              f"head_post {g2}: largest relative difference {errs[worst]:.1e} ({worst})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
