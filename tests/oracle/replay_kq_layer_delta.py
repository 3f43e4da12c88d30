#!/usr/bin/env python3
"""The fused kq layer's backward, first pass (delta), as a design replayed in float64 before any kernel
exists: delta_i = sum_j A[i, j] dA[i, j] per head, the row term that the main backward pass subtracts
(dC' = A (dA - delta)), computed the way src/attention/flash_kq_layer_fwd.cu computes the forward -- one
16-row query tile at a time, one warp per head, sliding windows over the keys -- and compared with the
semantics written with whole T x T matrices.

The chain, per head (docs/mta-semantics.md): A = softmax(mask(mix_pre(conv_pre(S0)))),
A2 = mask0(conv_post(A)), A3 = mix_post(A2), O = A3 V. With dO given: dA3 = dO V^T, dA2 = mask0(mix_post^T
dA3), dA = conv_post^T(dA2), delta = rowsum(A * dA). The adjoints conv^T and mix^T are checked here by
the dot-product identity <f(X), G> = <X, f^T(G)> before they are used.

The tile's windows, as the kernel would hold them:
  - S0: rows m0 - 8 .. m0 + 15, the ring of 64 keys rotated by o1 (pass 1's window), key
    tile kt + 1 computed while block kt is used (the pre convolution looks ahead ck1 - 1 - o1 keys);
  - dA2: rows m0 .. m0 + 31 (the transposed post convolution reads cq2 - 1 <= 7 rows BELOW each row: two
    16-row dO tiles, dA3 = dO V^T mixed with Mpost^T per 16-row part), the ring rotated by ck2 - 1 - o2,
    so that the 8 outputs from key x0 (a multiple of 8) read aligned columns x0 .. x0 + ck2 + 6 (float4
    loads, as the forward's stencils on branch kq-stencil-aligned); key tile kt + 1 computed ahead (the
    transposed convolution looks ahead o2 keys);
    tiles entirely in the future of row m0 + 31 are zero-filled.
Per block of 16 keys: dA from the dA2 window (flipped taps), A from the S0 window (the pre convolution,
Mpre, exp(C' - lse) with pass 1's lse), and the row partial sums of A dA.

Session 13 removed that pass: kernel P now gives delta from the per-row weight-gradient terms it keeps
anyway (replay_kq_layer_backward.py, kernel_p). This replay stays for its adjoint checks (conv_t and
mix_t, which the backward replay uses) and as the record of the dA2 window that kernel Q still holds."""
import math
import sys

import numpy as np

from replay_kq_layer import conv, mix, random_params, softmax_weights


def conv_t(G, w, cq, ck, o, T):
    """The adjoint of conv(., w, cq, ck, o, T): X[i, j] = sum_{a,c} w[a, c] G[i + cq - 1 - a, j + o - c]."""
    X = np.zeros((T, T))
    for a in range(cq):
        for c in range(ck):
            for i in range(T):
                ii = i + cq - 1 - a
                if not 0 <= ii < T:
                    continue
                for j in range(T):
                    jj = j + o - c
                    if 0 <= jj < T:
                        X[i, j] += w[a, c] * G[ii, jj]
    return X


def mix_t(X, m, g):
    """The adjoint of mix(., m, g): head y gets sum_x m[group, x, y] X_x over its group."""
    if not g:
        return X.copy()
    H = X.shape[0]
    return np.stack([sum(m[y // g, x, y % g] * X[y // g * g + x] for x in range(g)) for y in range(H)])


def check_adjoints(rng):
    T, cq, ck, o, H, g = 9, 3, 5, 2, 4, 2
    X, G = rng.standard_normal((T, T)), rng.standard_normal((T, T))
    w = rng.standard_normal((cq, ck))
    e1 = abs((conv(X, w, cq, ck, o, T) * G).sum() - (X * conv_t(G, w, cq, ck, o, T)).sum())
    Xh, Gh = rng.standard_normal((H, T, T)), rng.standard_normal((H, T, T))
    m = rng.standard_normal((H // g, g, g))
    e2 = abs((mix(Xh, m, g) * Gh).sum() - (Xh * mix_t(Gh, m, g)).sum())
    return max(e1, e2)


def reference_delta(q, k, v, dO, w1, m1, g1, w2, m2, g2, cq1, ck1, o1, cq2, ck2, o2):
    H, T, _ = q.shape
    A, lse, fut = softmax_weights(q, k, w1, m1, g1, cq1, ck1, o1)
    dA3 = np.stack([dO[h] @ v[h].T for h in range(H)])
    dA2 = np.where(fut, 0, mix_t(dA3, m2, g2))
    dA = np.stack([conv_t(dA2[h], w2[h], cq2, ck2, o2, T) for h in range(H)])
    return (A * dA).sum(-1), lse


def conv8(win, w, cq, ck, wrow, x0):  # the forward's stencil, as in replay_kq_layer.py
    assert x0 % 8 == 0
    return [sum(w[a, c] * win[wrow - (cq - 1) + a, (x0 + e + c) & 63] for a in range(cq) for c in range(ck))
            for e in range(8)]


def conv8_t(win, w, cq, ck, wrow, x0):
    """The transposed stencil: rows wrow .. wrow + cq - 1 (below), the taps flipped in both directions."""
    assert x0 % 8 == 0
    return [sum(w[cq - 1 - a, ck - 1 - c] * win[wrow + a, (x0 + e + c) & 63] for a in range(cq) for c in range(ck))
            for e in range(8)]


def kernel_delta(q, k, v, dO, lse, w1, m1, g1, w2, m2, g2, cq1, ck1, o1, cq2, ck2, o2):
    H, T, D = q.shape
    sc = 1 / math.sqrt(D)
    rot_t = ck2 - 1 - o2  # the dA2 ring: column = (key + rot_t) & 63
    delta = np.full((H, T), np.nan)

    def s0_tile(win, h, tile, m0):  # as replay_kq_layer.py's pass 1 (top = 8, rotation o1)
        key0 = 16 * tile
        if key0 > m0 + 15:
            win[:, [(key0 + j + o1) & 63 for j in range(16)]] = 0
            return
        for rr in range(-8, 16):
            row = m0 + rr
            qi = q[h, row] if 0 <= row < T else np.zeros(D)
            for jj in range(16):
                key = key0 + jj
                kj = k[h, key] if key < T else np.zeros(D)
                win[8 + rr, (key + o1) & 63] = 0 if key > row else (qi @ kj) * sc

    def da2_tile(win, tile, m0):  # dA3 of rows m0 .. m0 + 31, mixed with Mpost^T per 16-row part, masked
        key0 = 16 * tile
        cols = [(key0 + j + rot_t) & 63 for j in range(16)]
        if key0 > m0 + 31:
            win[:, :, cols] = 0
            return
        for part in range(2):
            d3 = np.zeros((H, 16, 16))
            for h in range(H):
                for r in range(16):
                    row = m0 + 16 * part + r
                    if row >= T:
                        continue
                    for jj in range(16):
                        key = key0 + jj
                        if key < T:
                            d3[h, r, jj] = dO[h, row] @ v[h, key]
            d2 = mix_t(d3, m2, g2)
            for h in range(H):
                for r in range(16):
                    row = m0 + 16 * part + r
                    for jj in range(16):
                        win[h, 16 * part + r, cols[jj]] = 0 if key0 + jj > row else d2[h, r, jj]

    for m0 in range(0, T, 16):
        s0w = np.zeros((H, 24, 68))
        dw = np.zeros((H, 32, 68))
        part = np.zeros((H, 16))
        for h in range(H):
            s0_tile(s0w[h], h, 0, m0)
        da2_tile(dw, 0, m0)
        for n0 in range(0, min(T, m0 + 16), 16):
            kt = n0 // 16
            for h in range(H):
                s0_tile(s0w[h], h, kt + 1, m0)
            da2_tile(dw, kt + 1, m0)
            C = np.stack([[conv8(s0w[h], w1[h], cq1, ck1, 8 + r, n0 + 8 * half) for r in range(16) for half in range(2)]
                          for h in range(H)]).reshape(H, 16, 16)
            C = mix(C, m1, g1)
            for h in range(H):
                for r in range(16):
                    row = m0 + r
                    if row >= T:
                        continue
                    dA = [x for half in range(2) for x in conv8_t(dw[h], w2[h], cq2, ck2, r, n0 + 8 * half)]
                    for jj in range(16):
                        key = n0 + jj
                        if key <= row:
                            part[h, r] += math.exp(C[h, r, jj] - lse[h, row]) * dA[jj]
        for h in range(H):
            for r in range(16):
                if m0 + r < T:
                    delta[h, m0 + r] = part[h, r]
    return delta


def main():
    rng = np.random.default_rng(2)
    e_adj = check_adjoints(rng)
    ok = e_adj < 1e-10
    print(f"{'ok  ' if ok else 'FAIL'} adjoints of conv and mix (dot-product identity): {e_adj:.1e}")
    cases = [  # H, T, D, (cq1, ck1, pad1), (cq2, ck2, pad2), g1, g2
        (2, 37, 4, (6, 11, "both"), (6, 11, "both"), 2, 2),  # the paper's layer, a partial third tile
        (2, 20, 4, (2, 9, "left"), (3, 5, "right"), 0, 1),
        (2, 40, 4, (8, 15, "right"), (8, 15, "left"), 1, 2),  # the largest kernels, rows below past T
        (2, 1, 4, (6, 11, "both"), (6, 11, "both"), 2, 2),  # T = 1
        (2, 18, 4, (3, 3, "both"), (1, 1, "right"), 2, 0),  # no kq_post: the identity 1 x 1
    ]
    for H, T, D, (cq1, ck1, p1), (cq2, ck2, p2), g1, g2 in cases:
        q, k, v, dO = (rng.standard_normal((H, T, D)) for _ in range(4))
        w1, m1, w2, m2, o1, o2 = random_params(rng, H, (cq1, ck1, p1), (cq2, ck2, p2), g1, g2)
        args = (w1, m1, g1, w2, m2, g2, cq1, ck1, o1, cq2, ck2, o2)
        want, lse = reference_delta(q, k, v, dO, *args)
        got = kernel_delta(q, k, v, dO, lse, *args)
        e = np.abs(got - want).max()
        good = bool(np.isfinite(got).all() and e < 1e-11)
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} T={T} pre {cq1}x{ck1} {p1}, post {cq2}x{ck2} {p2}, "
              f"head_pre {g1}, head_post {g2}: delta max difference {e:.1e}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
