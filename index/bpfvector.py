"""libpcap's ``bpf_filter()`` run over many packets at once with numpy (see index/libpcap.py).

A module of its own so that compiling a filter and matching single packets (index/libpcap.py)
never imports numpy: the host-query fast path (extract/postingsplan.py, records.py) starts
without it.
"""

from __future__ import annotations

import numpy as np

from .bpf import (
    BPF_A,
    BPF_ABS,
    BPF_ADD,
    BPF_ALU,
    BPF_AND,
    BPF_B,
    BPF_DIV,
    BPF_H,
    BPF_IMM,
    BPF_IND,
    BPF_JA,
    BPF_JEQ,
    BPF_JGE,
    BPF_JGT,
    BPF_JMP,
    BPF_JSET,
    BPF_K,
    BPF_LD,
    BPF_LDX,
    BPF_LEN,
    BPF_LSH,
    BPF_MEM,
    BPF_MEMWORDS,
    BPF_MISC,
    BPF_MOD,
    BPF_MSH,
    BPF_MUL,
    BPF_NEG,
    BPF_OR,
    BPF_RET,
    BPF_RSH,
    BPF_ST,
    BPF_STX,
    BPF_SUB,
    BPF_TXA,
    BPF_W,
    BPF_X,
    BPF_XOR,
)

INSN_DTYPE = np.dtype([("code", "<u2"), ("jt", "u1"), ("jf", "u1"), ("k", "<u4")])


class VectorBpf:
    """libpcap's ``bpf_filter()`` over many packets at once (see the module docstring)."""

    def __init__(self, insns: np.ndarray):
        self.code = [int(c) for c in insns["code"]]
        self.jt = [int(c) for c in insns["jt"]]
        self.jf = [int(c) for c in insns["jf"]]
        self.k = [int(c) for c in insns["k"]]
        # protochain compiles to a loop: BPF_JA with a k that wraps around to an earlier
        # instruction. libpcap's interpreter follows it; the one-pass vector run cannot.
        self.loops = any(
            (c & 7) == BPF_JMP and (c & 0xF0) == BPF_JA and ((i + 1 + k) & 0xFFFFFFFF) <= i
            for i, (c, k) in enumerate(zip(self.code, self.k, strict=True))
        )
        self.mem_used = any(
            (c & 7) in (BPF_ST, BPF_STX) or ((c & 7) in (BPF_LD, BPF_LDX) and c & 0xE0 == BPF_MEM)
            for c in self.code
        )

    @staticmethod
    def _load(
        arr: np.ndarray, start: np.ndarray, idx_off: np.ndarray, caps: np.ndarray, size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Big-endian load of `size` bytes at packet offset `idx_off`; (ok mask, values)."""
        ok = (idx_off >= 0) & (idx_off + size <= caps)
        pos = start[ok] + idx_off[ok]
        if size == 1:
            v = arr[pos].astype(np.uint32)
        elif size == 2:
            v = (arr[pos].astype(np.uint32) << 8) | arr[pos + 1]
        else:
            v = (
                (arr[pos].astype(np.uint32) << 24)
                | (arr[pos + 1].astype(np.uint32) << 16)
                | (arr[pos + 2].astype(np.uint32) << 8)
                | arr[pos + 3]
            )
        return ok, v

    def run(
        self, arr: np.ndarray, offs: np.ndarray, caps: np.ndarray, wires: np.ndarray
    ) -> np.ndarray:
        n = len(offs)
        nins = len(self.code)
        result = np.zeros(n, dtype=bool)
        if nins == 0:
            # libpcap treats an empty program as "accept everything".
            result[:] = True
            return result
        A = np.zeros(n, dtype=np.uint32)
        X = np.zeros(n, dtype=np.uint32)
        M = np.zeros((BPF_MEMWORDS, n), dtype=np.uint32) if self.mem_used else None
        wires32 = (wires & 0xFFFFFFFF).astype(np.uint32)
        pending: list[list[np.ndarray]] = [[] for _ in range(nins + 1)]
        pending[0].append(np.arange(n, dtype=np.int64))
        for pc in range(nins):
            parts = pending[pc]
            if not parts:
                continue
            idx = parts[0] if len(parts) == 1 else np.concatenate(parts)
            pending[pc] = []
            if len(idx) == 0:
                continue
            code, k = self.code[pc], self.k[pc]
            cls = code & 7
            nxt = pc + 1
            if cls == BPF_RET:
                rv = code & 0x18
                if rv == BPF_K:
                    result[idx] = k != 0
                elif rv == BPF_A:
                    result[idx] = A[idx] != 0
                else:
                    result[idx] = X[idx] != 0
                continue
            if cls == BPF_JMP:
                op = code & 0xF0
                if op == BPF_JA:
                    pending[nxt + k].append(idx)
                    continue
                a = A[idx]
                b = np.uint32(k) if code & BPF_X == 0 else X[idx]
                if op == BPF_JEQ:
                    c = a == b
                elif op == BPF_JGT:
                    c = a > b
                elif op == BPF_JGE:
                    c = a >= b
                elif op == BPF_JSET:
                    c = (a & b) != 0
                else:
                    result[idx] = False
                    continue
                jt, jf = nxt + self.jt[pc], nxt + self.jf[pc]
                if jt == jf:
                    pending[jt].append(idx)
                else:
                    pending[jt].append(idx[c])
                    pending[jf].append(idx[~c])
                continue
            if cls in (BPF_LD, BPF_LDX):
                mode = code & 0xE0
                size = {BPF_W: 4, BPF_H: 2, BPF_B: 1}.get(code & 0x18, 0)
                target = A if cls == BPF_LD else X
                if mode == BPF_IMM:
                    target[idx] = k
                elif mode == BPF_LEN:
                    target[idx] = wires32[idx]
                elif mode == BPF_MEM:
                    target[idx] = M[k][idx]
                elif mode in (BPF_ABS, BPF_IND, BPF_MSH):
                    if mode == BPF_IND:
                        # libpcap rejects when X + k overflows or passes caplen.
                        off = X[idx].astype(np.int64) + k
                    else:
                        off = np.full(len(idx), k, dtype=np.int64)
                    if mode == BPF_MSH:
                        size = 1
                    if not size:
                        result[idx] = False
                        continue
                    ok, v = self._load(arr, offs[idx], off, caps[idx], size)
                    if not ok.all():
                        result[idx[~ok]] = False
                        idx = idx[ok]
                    if mode == BPF_MSH:
                        v = (v & 0xF) << 2
                    target[idx] = v
                else:
                    result[idx] = False
                    continue
                pending[nxt].append(idx)
                continue
            if cls == BPF_ST:
                M[k][idx] = A[idx]
            elif cls == BPF_STX:
                M[k][idx] = X[idx]
            elif cls == BPF_MISC:
                if code & 0xF8 == BPF_TXA:
                    A[idx] = X[idx]
                else:
                    X[idx] = A[idx]
            elif cls == BPF_ALU:
                op = code & 0xF0
                a = A[idx]
                if op == BPF_NEG:
                    A[idx] = (np.uint32(0) - a).astype(np.uint32)
                    pending[nxt].append(idx)
                    continue
                b = np.full(len(idx), k, dtype=np.uint32) if code & BPF_X == 0 else X[idx]
                if op in (BPF_DIV, BPF_MOD):
                    zero = b == 0
                    if zero.any():
                        result[idx[zero]] = False
                        idx, a, b = idx[~zero], a[~zero], b[~zero]
                    r = a // b if op == BPF_DIV else a % b
                elif op == BPF_ADD:
                    r = a + b
                elif op == BPF_SUB:
                    r = a - b
                elif op == BPF_MUL:
                    r = a * b
                elif op == BPF_OR:
                    r = a | b
                elif op == BPF_AND:
                    r = a & b
                elif op == BPF_XOR:
                    r = a ^ b
                elif op in (BPF_LSH, BPF_RSH):
                    # libpcap 1.10: a shift by 32 or more gives 0.
                    big = b >= 32
                    sh = np.where(big, 0, b).astype(np.uint32)
                    r = (a << sh) if op == BPF_LSH else (a >> sh)
                    r = np.where(big, np.uint32(0), r)
                else:
                    result[idx] = False
                    continue
                A[idx] = r.astype(np.uint32)
            else:
                result[idx] = False
                continue
            pending[nxt].append(idx)
        return result
