"""A CPU model of cuda/ecr_conv.cu's index arithmetic, block by block (tests only).

It follows the kernel's steps with the kernel's integers (tiles, conv regions, patches,
window-entry offsets, K chunks, split-K slots, the pooled epilogue), so a plan that would
read outside its patch, miss a window or pool over the wrong positions fails here without a
GPU. Arithmetic is float64; the GPU tests compare the real kernels with the reference ops.
"""
from __future__ import annotations

import torch

from sparsecnn.passes.ecr.reference import ConvGeometry, PoolGeometry
from sparsecnn.passes.ecr.reference import dense_conv_relu_pool as dense_reference


def emulate(plan, x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    p = plan.params
    v = plan.candidate.variant
    ct, rmax, warps = v.ct, v.rmax, v.warps
    gx, gy, gz = plan.grid
    x = x.double()
    wt = wt.double()
    bias = bias.double()
    out_h, out_w = (p["qh"], p["qw"])
    y = torch.full((p["n_img"], p["cout"], out_h, out_w), float("nan"), dtype=torch.float64)
    kc, cc, ph, pw = p["kc"], p["cc"], p["patch_h"], p["patch_w"]
    khw = p["kh"] * p["kw"]
    offs = []
    for e in range(kc):
        cl, rest = divmod(e, khw)
        i, j = divmod(rest, p["kw"])
        offs.append((cl * ph + i) * pw + j)
    offs = torch.tensor(offs)
    tiles = p["tiles_y"] * p["tiles_x"]
    R = p["cry"] * p["crx"]
    assert R <= rmax, "the conv region must fit the block's slots"
    assert gy == -(-p["cout"] // ct) and gy * ct <= p["cout_pad"] and gz == p["splits"] and gx == p["n_img"] * tiles
    for bx in range(gx):
        img, t_in = divmod(bx, tiles)
        ty, tx = divmod(t_in, p["tiles_x"])
        qy0, qx0 = ty * p["tqy"], tx * p["tqx"]
        ry0, rx0 = qy0 * p["psh"] - p["ppad_t"], qx0 * p["psw"] - p["ppad_l"]
        iy0, ix0 = ry0 * p["sh"] - p["pad_t"], rx0 * p["sw"] - p["pad_l"]
        # the slots of all warps: r = s*WARPS + warp for s < PPW, i.e. r in [0, RMAX)
        slots = []
        for r in range(rmax):
            ry, rx = divmod(r, p["crx"])
            cy, cx = ry0 + ry, rx0 + rx
            if r < R and 0 <= cy < p["oh"] and 0 <= cx < p["ow"]:
                slots.append((r, ry * p["sh"] * pw + rx * p["sw"]))
        for by in range(gy):
            c0 = by * ct
            parts = []
            for bz in range(gz):
                ch_begin = bz * p["chunks_per_split"]
                ch_end = min(p["chunks"], ch_begin + p["chunks_per_split"])
                assert ch_begin < ch_end, "every split must own at least one chunk"
                acc = torch.zeros(rmax, ct, dtype=torch.float64)
                for ch in range(ch_begin, ch_end):
                    patch = torch.zeros(cc, ph, pw, dtype=torch.float64)
                    for cl in range(cc):
                        c = ch * cc + cl
                        if c >= p["cin"]:
                            continue
                        for py in range(ph):
                            iy = iy0 + py
                            if not 0 <= iy < p["h"]:
                                continue
                            for px in range(pw):
                                ix = ix0 + px
                                if 0 <= ix < p["w"]:
                                    patch[cl, py, px] = x[img, c, iy, ix]
                    flat = patch.reshape(-1)
                    wc = wt[ch * kc:(ch + 1) * kc, c0:c0 + ct]
                    assert wc.shape == (kc, ct), "the transposed weight must be padded for every chunk"
                    if v.kind == "list":
                        _list_chunk(v, p, kc, flat, offs, slots, wc, acc)
                        continue
                    for r, base in slots:
                        idx = base + offs
                        assert int(idx.max()) < flat.numel(), "window entry outside the patch"
                        row = flat[idx]
                        nz = row != 0  # the compressed row: only non-zeros meet the weights
                        acc[r] += (row[nz, None] * wc[nz]).sum(0)
                parts.append(acc)
            acc = sum(parts)  # split order
            stage = acc + bias[c0:c0 + ct]
            if not p["pool"]:
                if p["relu"]:
                    stage = stage.clamp_min(0)
                for r, _ in slots:
                    ry, rx = divmod(r, p["crx"])
                    for cl in range(ct):
                        co = c0 + cl
                        if co < p["cout"]:
                            y[img, co, ry0 + ry, rx0 + rx] = stage[r, cl]
            else:
                valid_r = {r for r, _ in slots}
                for q in range(p["tqy"] * p["tqx"]):
                    qy, qx = qy0 + q // p["tqx"], qx0 + q % p["tqx"]
                    if qy >= p["qh"] or qx >= p["qw"]:
                        continue
                    m = torch.zeros(ct, dtype=torch.float64)
                    for a in range(p["pkh"]):
                        cy = qy * p["psh"] - p["ppad_t"] + a
                        if not 0 <= cy < p["oh"]:
                            continue
                        for b in range(p["pkw"]):
                            cx = qx * p["psw"] - p["ppad_l"] + b
                            if not 0 <= cx < p["ow"]:
                                continue
                            r = (cy - ry0) * p["crx"] + (cx - rx0)
                            assert r in valid_r, "pooling reads a conv position the block did not compute"
                            m = torch.maximum(m, stage[r])
                    n_real = min(ct, p["cout"] - c0)  # > 0: no block is all padding
                    y[img, c0:c0 + n_real, qy, qx] = m[:n_real]
    assert not torch.isnan(y).any(), "some outputs were never written"
    return y


def _list_chunk(v, p, kc, flat, offs, slots, wc, acc) -> None:
    """One K chunk of `ecr_list_conv_pool`: each warp's groups of G consecutive positions (group
    gi*WARPS + warp), each group's (union) compressed row written 32 window entries at a time
    (ballot rank order, i.e. ascending k) into the warp's list of at most kc entries, then
    walked: entry {values, k*CT} meets the weights of row k."""
    G, ct = v.group, v.ct
    bases = dict(slots)  # conv position r -> patch offset of its window (valid positions only)
    w_flat = wc.reshape(-1)
    for warp in range(v.warps):
        for gi in range(v.ppw // G):
            grp = gi * v.warps + warp
            members = [grp * G + q for q in range(G)]
            if not any(r in bases for r in members):
                continue
            lst = []
            for e0 in range(0, kc, 32):
                for lane in range(32):
                    e = e0 + lane
                    if e >= kc:
                        continue
                    vals = []
                    for r in members:
                        if r in bases:
                            i = bases[r] + int(offs[e])
                            assert i < flat.numel(), "window entry outside the patch"
                            vals.append(float(flat[i]))
                        else:
                            vals.append(0.0)
                    if any(x != 0 for x in vals):
                        lst.append((vals, e * ct))
            assert len(lst) <= kc, "a list holds at most kc entries"
            for vals, k in lst:
                w = w_flat[k:k + ct]
                for q, r in enumerate(members):
                    if r in bases:
                        acc[r] += vals[q] * w


class EmuEcrKernels:
    """cuda/ecr_conv.cu itself, compiled as host C++ against tests/cuda_emu.h and launched like
    `runtimes.ecr.KernelSet.launch` on CPU tensors: every CUDA thread a host thread (small layers)."""

    def __init__(self, variants):
        import ctypes

        from cuda_emu import compile_library
        from sparsecnn.runtimes.ecr.runtime import KERNEL_SOURCE

        self.variants = tuple(variants)
        lines = ["#define SPARSECNN_EMU 1", f'#include "{KERNEL_SOURCE}"']
        self.symbols = {}
        for i, v in enumerate(self.variants):
            for half in (False, True):
                t = "__half" if half else "float"
                sym = f"emu_ecr_{i}_{int(half)}"
                self.symbols[(v, half)] = sym
                lines.append(
                    f'extern "C" void {sym}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned smem, '
                    f'const void* x, const float* wt, const float* bias, void* y, float* ws, int* tickets, '
                    f'const void* p) {{ emu::launch(&{v.expr(half)}, dim3(gx, gy, gz), dim3(bx), smem, '
                    f'static_cast<const {t}*>(x), wt, bias, static_cast<{t}*>(y), ws, tickets, '
                    f'*static_cast<const EcrParams*>(p)); }}')
        self.lib = compile_library(KERNEL_SOURCE, "\n".join(lines) + "\n")
        self._c = ctypes

    def launch(self, plan, x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor, y: torch.Tensor,
               ws: torch.Tensor, tickets: torch.Tensor) -> None:
        c = self._c
        v = plan.candidate.variant
        fn = getattr(self.lib, self.symbols[(v, x.dtype == torch.float16)])
        fn.argtypes = [c.c_uint] * 5 + [c.c_void_p] * 7
        fn(*plan.grid, v.threads, plan.smem, x.data_ptr(), wt.data_ptr(), bias.data_ptr(), y.data_ptr(),
           ws.data_ptr(), tickets.data_ptr(), c.addressof(plan.cparams))


class ReferenceEcrKernels:
    """Stands in for KernelSet on CPU: each launch computes its plan's layer with the dense oracle
    (from the plan's own integers); the variants in `wrong` return a wrong result."""

    sm_count, max_smem, registers = 132, 227 * 1024, {}

    def __init__(self, wrong=lambda name: False):
        self.wrong = wrong

    def launch(self, plan, x, wt, bias, y, scratch):
        p = plan.params
        pads = (p["pad_t"], p["pad_l"], max(0, (p["oh"] - 1) * p["sh"] + p["kh"] - p["h"] - p["pad_t"]),
                max(0, (p["ow"] - 1) * p["sw"] + p["kw"] - p["w"] - p["pad_l"]))
        g = ConvGeometry(p["n_img"], p["cin"], p["h"], p["w"], p["kh"], p["kw"], p["sh"], p["sw"], pads)
        pool = None
        if p["pool"]:
            pool = PoolGeometry(p["pkh"], p["pkw"], p["psh"], p["psw"], (p["ppad_t"], p["ppad_l"],
                                max(0, (p["qh"] - 1) * p["psh"] + p["pkh"] - p["oh"] - p["ppad_t"]),
                                max(0, (p["qw"] - 1) * p["psw"] + p["pkw"] - p["ow"] - p["ppad_l"])))
        w = wt[:p["cin"] * p["kh"] * p["kw"], :p["cout"]].t().reshape(p["cout"], p["cin"], p["kh"], p["kw"])
        out = dense_reference(x.float(), w, bias[:p["cout"]], g, bool(p["relu"]), pool)
        y.copy_(out * (1.5 if self.wrong(plan.candidate.name) else 1.0))
