#!/usr/bin/env python3
"""The fused kq layer's forward (src/attention/flash_kq_layer_fwd.cu) replayed in float64 with the kernel's
window arithmetic: per 16-row query tile, the S0 and A windows (rows above the tile, keys in a ring of
64 rotated by the key offset o of the convolution that reads it: column = (key + o) & 63, so that the
8 outputs from key x0 read columns x0 .. x0 + ck + 6, x0 a multiple of 8 -- aligned for the kernel's
float4 loads), the key tiles computed one block ahead (all-future tiles zero-filled), the
convolutions read through the ring at x0 + e + c, the pre mix in two 16-row parts, the masks and the
online softmax. Compared with the semantics written directly (whole T x T matrices): pass 1's lse and
pass 2's output must agree to rounding (1e-12) for the paper's sizes and for every pad mode. This is
where the kernel's index arithmetic was checked before any GPU run."""
import math
import sys

import numpy as np


def conv(X, w, cq, ck, o, T):
    Y = np.zeros((T, T))
    for a in range(cq):
        for c in range(ck):
            sh = np.zeros((T, T))
            for i in range(T):
                ii = i - (cq - 1) + a
                if not 0 <= ii < T:
                    continue
                for j in range(T):
                    jj = j - o + c
                    if 0 <= jj < T:
                        sh[i, j] = X[ii, jj]
            Y += w[a, c] * sh
    return Y


def mix(X, m, g):
    if not g:
        return X.copy()
    H = X.shape[0]
    return np.stack([sum(m[x // g, x % g, y] * X[x // g * g + y] for y in range(g)) for x in range(H)])


KEY_OFFSET = {"both": lambda ck: (ck - 1) // 2, "left": lambda ck: ck - 1, "right": lambda ck: 0}


def random_params(rng, H, conv1, conv2, g1, g2):
    """Both convolutions' taps (identity plus noise) and both mixes (identity plus noise) of a case:
    (w1, m1, w2, m2, o1, o2) for conv = (cq, ck, pad)."""
    (cq1, ck1, p1), (cq2, ck2, p2) = conv1, conv2
    o1, o2 = KEY_OFFSET[p1](ck1), KEY_OFFSET[p2](ck2)
    w1 = rng.uniform(-.5, .5, (H, cq1, ck1))
    w1[:, cq1 - 1, o1] += 1
    w2 = rng.uniform(-.5, .5, (H, cq2, ck2))
    w2[:, cq2 - 1, o2] += 1
    m1 = rng.uniform(-.3, .3, (H // (g1 or 1), g1 or 1, g1 or 1))
    m2 = rng.uniform(-.3, .3, (H // (g2 or 1), g2 or 1, g2 or 1))
    return w1, m1, w2, m2, o1, o2


def softmax_weights(q, k, w1, m1, g1, cq1, ck1, o1):
    """A = softmax(mask(mix_pre(conv_pre(S0)))), lse and the future mask, from whole T x T matrices."""
    H, T, D = q.shape
    fut = np.triu(np.ones((T, T)), 1) > 0
    C = np.stack([conv(np.where(fut, 0, q[h] @ k[h].T / math.sqrt(D)), w1[h], cq1, ck1, o1, T) for h in range(H)])
    Cm = np.where(fut, -np.inf, mix(C, m1, g1))
    mx = Cm.max(-1, keepdims=True)
    lse = (np.log(np.exp(Cm - mx).sum(-1, keepdims=True)) + mx)[..., 0]
    return np.exp(Cm - lse[..., None]), lse, fut


def reference(q, k, v, w1, m1, g1, w2, m2, g2, cq1, ck1, o1, cq2, ck2, o2):
    H, T, _ = q.shape
    A, lse, fut = softmax_weights(q, k, w1, m1, g1, cq1, ck1, o1)
    A2 = np.stack([np.where(fut, 0, conv(A[h], w2[h], cq2, ck2, o2, T)) for h in range(H)])
    A3 = mix(A2, m2, g2)
    return np.stack([A3[h] @ v[h] for h in range(H)]), lse


def conv8(win, w, cq, ck, wrow, x0):
    assert x0 % 8 == 0, "the kernel's float4 loads need an aligned first column"
    return [sum(w[a, c] * win[wrow - (cq - 1) + a, (x0 + e + c) & 63] for a in range(cq) for c in range(ck))
            for e in range(8)]


def kernel(q, k, v, w1, m1, g1, w2, m2, g2, cq1, ck1, o1, cq2, ck2, o2):
    H, T, D = q.shape
    sc = 1 / math.sqrt(D)
    lse = np.full((H, T), np.nan)
    out = np.full((H, T, D), np.nan)

    def s0_tile(win, top, h, tile, m0):  # s0_tile_to_window<D, S, top>, the ring rotated by o1
        key0 = 16 * tile
        if key0 > m0 + 15:
            for i in range((top + 16) * 16):
                win[i // 16, (key0 + i % 16 + o1) & 63] = 0
            return
        for rr in range(-16, 16):
            row, wr = m0 + rr, top + rr
            if wr < 0:
                continue
            qi = q[h, row] if 0 <= row < T else np.zeros(D)
            for jj in range(16):
                key = key0 + jj
                kj = k[h, key] if key < T else np.zeros(D)
                win[wr, (key + o1) & 63] = 0 if key > row else (qi @ kj) * sc

    for m0 in range(0, T, 16):  # pass 1
        win = np.zeros((H, 24, 68))
        rmax = np.full((H, 16), -np.inf)
        rsum = np.zeros((H, 16))
        for h in range(H):
            s0_tile(win[h], 8, h, 0, m0)
        for n0 in range(0, min(T, m0 + 16), 16):
            for h in range(H):
                s0_tile(win[h], 8, h, n0 // 16 + 1, m0)
            C = np.stack([[conv8(win[h], w1[h], cq1, ck1, 8 + r, n0 + 8 * half)
                           for r in range(16) for half in range(2)] for h in range(H)]).reshape(H, 16, 16)
            C = mix(C, m1, g1)
            for h in range(H):
                for r in range(16):
                    vals = [C[h, r, j] if n0 + j <= m0 + r and n0 + j < T else -np.inf for j in range(16)]
                    mnew = max(max(vals), rmax[h, r])
                    rsum[h, r] = rsum[h, r] * math.exp(rmax[h, r] - mnew) + sum(math.exp(x - mnew) for x in vals)
                    rmax[h, r] = mnew
        for h in range(H):
            for r in range(16):
                if m0 + r < T:
                    lse[h, m0 + r] = rmax[h, r] + math.log(rsum[h, r])

    for m0 in range(0, T, 16):  # pass 2
        s0w = np.zeros((H, 32, 68))
        aw = np.zeros((H, 24, 68))
        acc = np.zeros((H, 16, D))

        def a_tile(tile):  # a_tile_to_window
            key0 = 16 * tile
            for part in range(2):
                Cb = np.zeros((H, 16, 16))
                for h in range(H):
                    for r in range(16):
                        rr = 16 * part + r
                        if rr < 24 and key0 <= m0 + 15:
                            for half in range(2):
                                Cb[h, r, 8 * half:8 * half + 8] = conv8(s0w[h], w1[h], cq1, ck1, rr + 8,
                                                                        key0 + 8 * half)
                Cb = mix(Cb, m1, g1)
                for h in range(H):
                    for r in range(16):
                        rr = 16 * part + r
                        row = m0 - 8 + rr
                        if rr >= 24:
                            continue
                        for jj in range(16):
                            key = key0 + jj
                            ok = 0 <= row < T and key <= row
                            aw[h, rr, (key + o2) & 63] = math.exp(Cb[h, r, jj] - lse[h, row]) if ok else 0

        for h in range(H):
            s0_tile(s0w[h], 16, h, 0, m0)
            s0_tile(s0w[h], 16, h, 1, m0)
        a_tile(0)
        for n0 in range(0, min(T, m0 + 16), 16):
            kt = n0 // 16
            for h in range(H):
                s0_tile(s0w[h], 16, h, kt + 2, m0)
            a_tile(kt + 1)
            A2 = np.zeros((H, 16, 16))
            for h in range(H):
                for r in range(16):
                    for half in range(2):
                        a2 = conv8(aw[h], w2[h], cq2, ck2, 8 + r, n0 + 8 * half)
                        A2[h, r, 8 * half:8 * half + 8] = [0 if n0 + 8 * half + e > m0 + r else a2[e]
                                                           for e in range(8)]
            A3 = mix(A2, m2, g2)
            for h in range(H):
                vt = np.stack([v[h, n0 + j] if n0 + j < T else np.zeros(D) for j in range(16)])
                acc[h] += A3[h] @ vt
        for h in range(H):
            for r in range(16):
                if m0 + r < T:
                    out[h, m0 + r] = acc[h, r]
    return out, lse


def main():
    rng = np.random.default_rng(1)
    cases = [  # H, T, D, (cq1, ck1, pad1), (cq2, ck2, pad2), g1, g2
        (2, 37, 4, (6, 11, "both"), (6, 11, "both"), 2, 2),  # the paper's layer, a partial second tile
        (2, 20, 4, (2, 9, "left"), (3, 5, "right"), 0, 1),
        (2, 33, 4, (8, 15, "right"), (8, 15, "left"), 1, 0),  # the largest kernels
        (2, 1, 4, (6, 11, "both"), (6, 11, "both"), 2, 2),  # T = 1
        (2, 18, 4, (3, 3, "both"), (1, 1, "right"), 2, 0),  # no kq_post: the identity 1 x 1
    ]
    ok = True
    for H, T, D, (cq1, ck1, p1), (cq2, ck2, p2), g1, g2 in cases:
        q, k, v = (rng.standard_normal((H, T, D)) for _ in range(3))
        w1, m1, w2, m2, o1, o2 = random_params(rng, H, (cq1, ck1, p1), (cq2, ck2, p2), g1, g2)
        want_o, want_lse = reference(q, k, v, w1, m1, g1, w2, m2, g2, cq1, ck1, o1, cq2, ck2, o2)
        got_o, got_lse = kernel(q, k, v, w1, m1, g1, w2, m2, g2, cq1, ck1, o1, cq2, ck2, o2)
        e = max(np.abs(got_o - want_o).max(), np.abs(got_lse - want_lse).max())
        good = np.isfinite(got_o).all() and np.isfinite(got_lse).all() and e < 1e-12
        ok &= bool(good)
        print(f"{'ok  ' if good else 'FAIL'} T={T} pre {cq1}x{ck1} {p1}, post {cq2}x{ck2} {p2}, "
              f"head_pre {g1}, head_post {g2}: max difference {e:.1e}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
