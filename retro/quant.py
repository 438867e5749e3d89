"""The CPU decoder on the GGUF's own quantized blocks (`DecoderOptions(weights="q4")`, `--weights q4`).

SmolLM2-135M-Instruct ships as a GGUF whose layer matrices are Q4_1 and whose tied embedding / LM head is Q8_0;
`weights.load_model` dequantises it to float32, so the float decoder reads 540 MB a token. Running the
matrices from their blocks is the same model with ~6x fewer weight bytes (as llama.cpp does):

- Q4_1 (32 weights a block, 20 bytes: fp16 d, fp16 m, 16 bytes of nibbles; low nibbles are elements 0..15,
  high nibbles 16..31): w = d * q + m. `Q4Linear` keeps q as nibbles, d and m as float32 (0.75 bytes a weight).
- Q8_0 (32 weights, 34 bytes: fp16 d, 32 int8): w = d * q. `Q8Linear` is the LM head from the same blocks the
  float embedding was dequantised from (the embedding lookup stays float32: it reads one row).

The kernels (numba, `parallel=True` over output rows, fp32 activations and accumulation) compute exactly
x @ W.T of the dequantised W up to summation order (~1e-6 relative): a row's dot product with x is an LLVM-IR
loop over its blocks (nibbles -> floats in registers, each block's sum scaled by its d once); the m term is
one multiply a block against x's block sums. A decode step of a quantized model runs torch's own ops on one
thread (see _torch_on_one_thread_when_small).
For more than SMALL_BATCH rows of x (prefill) the matrix is dequantised once, bit for bit as gguf/transformers
do, and multiplied by torch's sgemm.

llama.cpp's converter permutes the rows of attn_q / attn_k for its RoPE layout; transformers undoes it when it
dequantises (`rope_unpermute`), and so do we, on whole rows of blocks.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic
from torch import nn

QK = 32              # weights a block (Q4_1 and Q8_0)
Q4_1_BYTES = 20      # fp16 d, fp16 m, 16 bytes of nibbles
Q8_0_BYTES = 34      # fp16 d, 32 int8
SMALL_BATCH = 8      # rows of x up to which the block kernels run; above, dequantise + sgemm


# ---- block decoding (numpy) ----------------------------------------------------------------------------------

def _f16(raw: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of every block of raw [N, B, bytes] -> float32 [N, B]."""
    return np.ascontiguousarray(raw[:, :, at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def q4_1_decode(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 rows raw [N, B*20] uint8 -> d [N, B] float32, m [N, B] float32, q [N, B*32] uint8 in 0..15."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(raw.shape[0], -1, Q4_1_BYTES)   # [N, B, 20]
    nib = blocks[:, :, 4:]                                                           # [N, B, 16]
    q = np.concatenate([nib & 15, nib >> 4], axis=-1)                                # [N, B, 32]
    return _f16(blocks, 0), _f16(blocks, 2), q.reshape(raw.shape[0], -1)


def q4_1_dequantize(raw: np.ndarray) -> np.ndarray:
    """Q4_1 rows [N, B*20] -> float32 [N, B*32], d * q + m in float32 as gguf's `dequantize`."""
    d, m, q = q4_1_decode(raw)
    N, B = d.shape
    return (d[:, :, None] * q.reshape(N, B, QK).astype(np.float32) + m[:, :, None]).reshape(N, -1)


def q8_0_decode(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 rows raw [N, B*34] uint8 -> d [N, B] float32, q [N, B*32] int8."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(raw.shape[0], -1, Q8_0_BYTES)   # [N, B, 34]
    return _f16(blocks, 0), np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(raw.shape[0], -1)


def rope_unpermute(rows: int, n_head: int) -> np.ndarray:
    """Row order [rows] that undoes llama.cpp's q/k permutation: new row i is old row perm[i] (transformers'
    `_reverse_permute_weights`: per head, interleaved pairs back to halves)."""
    return np.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1)


# ---- kernels ---------------------------------------------------------------------------------------------------
# One row's dot product with x is written in LLVM IR (numba @intrinsic): a loop over blocks on <8 x float>
# vectors (AVX2), each block's 32 products summed in registers and then scaled by its d once. numba's own
# loops over 16 or 32 nibbles get unrolled and then vectorised across blocks, with gathers (2-5 GMAC/s a core
# here, against ~8 for this loop).

W = 8                                                     # float32 lanes of an AVX2 register
_I8, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V8B, _V8I, _V8F = ir.VectorType(_I8, W), ir.VectorType(_I32, W), ir.VectorType(_F32, W)


def _splat(builder, value):
    v = builder.insert_element(ir.Constant(_V8F, ir.Undefined), value, _I32(0))
    return builder.shuffle_vector(v, v, ir.Constant(_V8I, [0] * W))


def _fma(builder, a, b, c):
    name = f"llvm.fma.v{W}f32"
    fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(_V8F, [_V8F] * 3), name)
    return builder.call(fn, [a, b, c])


def _load(builder, addr, offset: int, ty):
    """A ty loaded from byte address addr + offset."""
    return builder.load(builder.inttoptr(builder.add(addr, _I64(offset)), ty.as_pointer()), align=1)


def _block_loop(builder, n, n_acc: int, body):
    """accs (n_acc <8 x float>, from 0) = body(i, accs) for i in [0, n); returns the sum of all their lanes."""
    entry = builder.block
    head, loop, end = (builder.append_basic_block(s) for s in ("blocks.head", "blocks.body", "blocks.end"))
    builder.branch(head)
    builder.position_at_end(head)
    i = builder.phi(_I64)
    i.add_incoming(_I64(0), entry)
    accs = [builder.phi(_V8F) for _ in range(n_acc)]
    for acc in accs:
        acc.add_incoming(ir.Constant(_V8F, [0.0] * W), entry)
    builder.cbranch(builder.icmp_signed("<", i, n), loop, end)
    builder.position_at_end(loop)
    new = body(i, accs)
    i.add_incoming(builder.add(i, _I64(1)), builder.block)
    for acc, v in zip(accs, new):
        acc.add_incoming(v, builder.block)
    builder.branch(head)
    builder.position_at_end(end)
    v = accs[0]
    for acc in accs[1:]:
        v = builder.fadd(v, acc)
    width = W
    while width > 1:   # halves added
        half = width // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half, width))))
        v, width = builder.fadd(lo, hi), half
    return builder.extract_element(v, _I32(0))


@intrinsic
def _q4_dot(typingctx, q_addr, d_addr, x_addr, pairs):
    """sum over block pairs p < pairs, j < 32: d[2p] lo(q[p, j]) x[64p + j] + d[2p+1] hi(q[p, j]) x[64p + 32 + j]
    (q uint8 [pairs, 32], d float32 [2 pairs], x float32 [64 pairs], by address)."""
    sig = types.float32(types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        qa, da, xa, n = args

        def body(p, accs):
            q = builder.add(qa, builder.mul(p, _I64(QK)))             # pair p's 32 bytes
            x = builder.add(xa, builder.mul(p, _I64(8 * QK)))         # its 64 floats of x
            dd = builder.add(da, builder.mul(p, _I64(8)))             # its two d
            sums = [None, None]                                       # block 2p (low nibbles), 2p+1 (high)
            for g in range(QK // W):                                  # 8 bytes -> 8 + 8 weights
                v = builder.zext(_load(builder, q, W * g, _V8B), _V8I)
                nibbles = builder.and_(v, ir.Constant(_V8I, [15] * W)), builder.lshr(v, ir.Constant(_V8I, [4] * W))
                for h, nib in enumerate(nibbles):
                    w, xs = builder.sitofp(nib, _V8F), _load(builder, x, 4 * (h * QK + W * g), _V8F)
                    sums[h] = builder.fmul(w, xs) if g == 0 else _fma(builder, w, xs, sums[h])
            return [_fma(builder, sums[h], _splat(builder, _load(builder, dd, 4 * h, _F32)), accs[h]) for h in (0, 1)]

        return _block_loop(builder, n, 2, body)

    return sig, codegen


@intrinsic
def _q8_dot(typingctx, q_addr, d_addr, x_addr, blocks):
    """sum over blocks b, j < 32: d[b] q[b, j] x[32b + j] (q int8 [blocks, 32], d, x float32, by address)."""
    sig = types.float32(types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        qa, da, xa, n = args

        def body(b, accs):
            q = builder.add(qa, builder.mul(b, _I64(QK)))
            x = builder.add(xa, builder.mul(b, _I64(4 * QK)))
            s = None
            for g in range(QK // W):
                w = builder.sitofp(builder.sext(_load(builder, q, W * g, _V8B), _V8I), _V8F)
                xs = _load(builder, x, 4 * W * g, _V8F)
                s = builder.fmul(w, xs) if g == 0 else _fma(builder, w, xs, s)
            d = _load(builder, builder.add(da, builder.mul(b, _I64(4))), 0, _F32)
            return [_fma(builder, s, _splat(builder, d), accs[0])]

        return _block_loop(builder, n, 1, body)

    return sig, codegen


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _q4_matmul(x, qp, d, m):
    """x [T, 2P*32] @ W.T -> [T, N], W[n, k] = d[n, k // 32] * q[n, k] + m[n, k // 32]: the d * q part from the
    nibbles, the m part against x's block sums. qp [N, P*32] uint8: block pair p's byte j holds q of block 2p
    (low nibble) and 2p+1 (high), element j; d [N, 2P] (a zero block pads an odd B); m [N, B]."""
    T = x.shape[0]
    N, B = m.shape
    P = qp.shape[1] // QK
    xsum = np.zeros((T, B), np.float32)                   # [T, B]
    for t in range(T):
        for k in range(B * QK):
            xsum[t, k // QK] += x[t, k]
    out = np.empty((T, N), np.float32)
    qa, da, xa = np.int64(qp.ctypes.data), np.int64(d.ctypes.data), np.int64(x.ctypes.data)
    for n in prange(N):
        for t in range(T):
            s = _q4_dot(qa + n * (P * QK), da + n * (8 * P), xa + t * (4 * x.shape[1]), np.int64(P))
            for b in range(B):
                s += m[n, b] * xsum[t, b]
            out[t, n] = s
    return out


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _q8_matmul(x, q, d):
    """x [T, K] @ W.T -> [T, N], W[n, k] = d[n, k // 32] * q[n, k]; q [N, K] int8, d [N, B]."""
    T, K = x.shape
    N, B = d.shape
    out = np.empty((T, N), np.float32)
    qa, da, xa = np.int64(q.ctypes.data), np.int64(d.ctypes.data), np.int64(x.ctypes.data)
    for n in prange(N):
        for t in range(T):
            out[t, n] = _q8_dot(qa + n * K, da + n * (4 * B), xa + t * (4 * K), np.int64(B))
    return out


@njit(parallel=True, nogil=True, cache=True)
def _q4_dequantize(qp, d, m, out):
    """out [N, K] float32 = d * q + m (no fastmath: no fused multiply-add, bit for bit gguf's)."""
    N, K = out.shape
    B = m.shape[1]
    for n in prange(N):
        for b in range(B):
            p, hi = b // 2, b % 2
            for j in range(QK):
                k = b * QK + j
                if k < K:
                    out[n, k] = d[n, b] * np.float32((np.int32(qp[n, p * QK + j]) >> (4 * hi)) & 15) + m[n, b]


@njit(parallel=True, nogil=True, cache=True)
def _q8_dequantize(q, d, out):
    N, K = out.shape
    for n in prange(N):
        for k in range(K):
            out[n, k] = d[n, k // QK] * np.float32(q[n, k])


_pool = [0, False]   # the width last given to numba; whether a small forward holds it (torch on one thread)


def _threads() -> None:
    """numba's pool as wide as torch's intra-op threads (set_cpu_threads), never wider than it was started."""
    n = torch.get_num_threads()
    if n != _pool[0] and not _pool[1]:
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
        _pool[0] = n


def _torch_on_one_thread_when_small(forward):
    """A quantized model's forward where a step of at most SMALL_BATCH tokens (decode) runs torch's own ops on
    one thread, the numba kernels on as many as torch had: those ops are small there, and torch's OpenMP
    workers, spinning after each, took the core the kernels' second thread needed (measured on 2 cores:
    33 -> 26 ms a token). torch's thread count is process-wide: one such forward at a time."""
    @functools.wraps(forward)
    def run(tokens, *args, **kwargs):
        if tokens.numel() > SMALL_BATCH or _pool[1]:
            return forward(tokens, *args, **kwargs)
        n = torch.get_num_threads()
        _threads()
        _pool[1] = True
        torch.set_num_threads(1)
        try:
            return forward(tokens, *args, **kwargs)
        finally:
            torch.set_num_threads(n)
            _pool[1] = False

    return run


# ---- modules ---------------------------------------------------------------------------------------------------

def _check_input(layer: nn.Module, x: torch.Tensor) -> None:
    if x.dtype != torch.float32 or not x.is_cpu:
        raise ValueError(f"{type(layer).__name__}: float32 CPU input expected, got {x.dtype} on {x.device}")


class Q4Linear(nn.Module):
    """y = x @ W.T (+ bias) with W [N, K] held as Q4_1 blocks; float32 in and out, CPU only (not movable)."""

    def __init__(self, d: np.ndarray, m: np.ndarray, q: np.ndarray, bias: torch.Tensor | None = None):
        """d, m [N, B] float32; q [N, B*32] values 0..15 (as q4_1_decode returns)."""
        super().__init__()
        N, B = d.shape
        self.in_features, self.out_features = q.shape[1], N
        if self.in_features != B * QK or m.shape != d.shape:
            raise ValueError(f"Q4Linear: d {d.shape}, m {m.shape}, q {q.shape} do not agree")
        P = (B + 1) // 2
        qb = np.zeros((N, 2 * P, QK), np.uint8)
        qb[:, :B] = q.reshape(N, B, QK)
        qp = qb[:, 0::2] | (qb[:, 1::2] << 4)                                         # [N, P, 32]
        dp = np.zeros((N, 2 * P), np.float32)
        dp[:, :B] = d
        # the kernels read numpy arrays: kept as plain attributes (a module attribute lookup of a buffer costs
        # microseconds, 121 calls a token), the buffers share their memory (state_dict)
        self._arrays = (np.ascontiguousarray(qp.reshape(N, -1)), dp, np.ascontiguousarray(m, dtype=np.float32))
        self._width = 2 * P * QK
        for name, a in zip(("qp", "d", "m"), self._arrays):   # [N, P*32] uint8, [N, 2P], [N, B] float32
            self.register_buffer(name, torch.from_numpy(a))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @classmethod
    def from_raw(cls, raw: np.ndarray, bias: torch.Tensor | None = None) -> Q4Linear:
        """From Q4_1 rows [N, B*20] uint8 (a GGUF tensor's data)."""
        return cls(*q4_1_decode(raw), bias=bias)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """W [N, K] float32 (its rows `rows` only, when given)."""
        qp, d, m = (t if rows is None else t[rows] for t in (self.qp, self.d, self.m))
        out = torch.empty(qp.shape[0], self.in_features)
        _q4_dequantize(qp.numpy(), d.numpy(), m.numpy(), out.numpy())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], -1)
        # x [T, K]; this runs 121 times a token: no more Python than needed
        if x.shape[0] > SMALL_BATCH or x.dtype != torch.float32 or not x.is_cpu:
            _check_input(self, x)
            return nn.functional.linear(x, self.dequantize(), self.bias)
        if self._width != self.in_features:                                           # an odd B: a zero block
            x = nn.functional.pad(x, (0, self._width - self.in_features))
        _threads()
        out = torch.from_numpy(_q4_matmul(x.contiguous().numpy(), *self._arrays))     # [T, N]
        return out if self.bias is None else out.add_(self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q4_1"


class Q8Linear(nn.Module):
    """y = x @ W.T with W [N, K] held as Q8_0 blocks (the LM head); float32 in and out, CPU only (not movable)."""

    def __init__(self, d: np.ndarray, q: np.ndarray):
        """d [N, B] float32; q [N, B*32] int8 (as q8_0_decode returns)."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        if self.in_features != d.shape[1] * QK or d.shape[0] != q.shape[0]:
            raise ValueError(f"Q8Linear: d {d.shape}, q {q.shape} do not agree")
        self._arrays = (np.ascontiguousarray(q, dtype=np.int8), np.ascontiguousarray(d, dtype=np.float32))
        self.register_buffer("q", torch.from_numpy(self._arrays[0]))                  # [N, K] int8
        self.register_buffer("d", torch.from_numpy(self._arrays[1]))                  # [N, B] float32

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """W [N, K] float32 (its rows `rows` only, when given)."""
        q, d = (t if rows is None else t[rows] for t in (self.q, self.d))
        out = torch.empty(q.shape[0], self.in_features)
        _q8_dequantize(q.numpy(), d.numpy(), out.numpy())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], -1)
        if x.shape[0] > SMALL_BATCH or x.dtype != torch.float32 or not x.is_cpu:     # x [T, K]
            _check_input(self, x)
            return nn.functional.linear(x, self.dequantize())
        _threads()
        return torch.from_numpy(_q8_matmul(x.contiguous().numpy(), *self._arrays))  # [T, N]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0"


# ---- a loaded Transformer -> quantized ---------------------------------------------------------------------

_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_tensors(gguf: Path | str) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (ggml type name, its data as rows [ne1 * ..., row bytes] uint8, memory-mapped) of a GGUF file.
    The header is walked here (gguf's GGUFReader decodes every metadata string: seconds for a vocabulary)."""
    import struct

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    buf = np.memmap(gguf, dtype=np.uint8, mode="r")
    mv = memoryview(buf)
    if bytes(mv[:4]) != b"GGUF":
        raise ValueError(f"{gguf}: not a GGUF file")
    _, n_tensors, n_kv = struct.unpack_from("<IQQ", mv, 4)
    at = 24
    alignment = 32

    def string(at):
        (n,) = struct.unpack_from("<Q", mv, at)
        return bytes(mv[at + 8:at + 8 + n]).decode("utf-8", "replace"), at + 8 + n

    def skip(vtype, at):
        if vtype == _GGUF_STRING:
            return at + 8 + struct.unpack_from("<Q", mv, at)[0]
        if vtype == _GGUF_ARRAY:
            itype, count = struct.unpack_from("<IQ", mv, at)
            at += 12
            if itype in _GGUF_SCALAR:
                return at + count * struct.calcsize("<" + _GGUF_SCALAR[itype])
            for _ in range(count):
                at = skip(itype, at)
            return at
        return at + struct.calcsize("<" + _GGUF_SCALAR[vtype])

    for _ in range(n_kv):
        key, at = string(at)
        (vtype,) = struct.unpack_from("<I", mv, at)
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", mv, at + 4)[0]
        at = skip(vtype, at + 4)
    infos = []
    for _ in range(n_tensors):
        name, at = string(at)
        (n_dims,) = struct.unpack_from("<I", mv, at)
        dims = struct.unpack_from(f"<{n_dims}Q", mv, at + 4)
        ttype, offset = struct.unpack_from("<IQ", mv, at + 4 + 8 * n_dims)
        at += 4 + 8 * n_dims + 12
        infos.append((name, dims, GGMLQuantizationType(ttype), offset))
    start = -(-at // alignment) * alignment
    out = {}
    for name, dims, qtype, offset in infos:
        block, nbytes = GGML_QUANT_SIZES[qtype]
        row = dims[0] // block * nbytes
        rows = int(np.prod(dims[1:], dtype=np.int64))
        out[name] = (qtype.name, buf[start + offset:start + offset + rows * row].reshape(rows, row))
    return out


def _rows(tensors: dict, name: str, qtype: str, perm: np.ndarray | None = None) -> np.ndarray:
    from ..index.errors import UserError

    have = tensors.get(name, ("nothing", None))
    if have[0] != qtype:
        raise UserError(f"GGUF tensor {name}: expected {qtype}, found {have[0]}")
    return have[1] if perm is None else have[1][perm]                              # [rows, row bytes]


def _check_rows(layer: nn.Module, w: torch.Tensor, where: str) -> None:
    """The quantized layer's rows (a sample) equal the float weights it replaces, exactly."""
    from .weights import WeightsError

    rows = torch.arange(0, w.shape[0], 17)
    if not torch.equal(layer.dequantize(rows), w[rows]):
        raise WeightsError(f"{where}: the GGUF's blocks do not dequantise to the loaded float weights")


def quantize_model(model, gguf: Path | str, check: bool = True):
    """Swap the layer matrices of a loaded float32 CPU Transformer (wqkv, wo, w13, w2) for Q4Linear from the
    GGUF's Q4_1 blocks and, with tied embeddings and a Q8_0 token_embd, the LM head for a Q8Linear. check:
    compare every 17th row of each against the float weights it replaces (a wrong GGUF, a wrong permutation).
    Returns the model, changed in place."""
    c = model.config
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(f"quantize_model: a float32 CPU model expected, got {model.dtype} on {model.device}")
    T = read_gguf_tensors(gguf)
    perm_q, perm_k = rope_unpermute(c.q_size, c.n_heads), rope_unpermute(c.kv_size, c.n_kv_heads)
    for i, block in enumerate(model.layers):
        a, f = block.attention, block.feed_forward
        p = f"blk.{i}."
        new = {
            (a, "wqkv"): np.concatenate([_rows(T, p + "attn_q.weight", "Q4_1", perm_q),
                                         _rows(T, p + "attn_k.weight", "Q4_1", perm_k),
                                         _rows(T, p + "attn_v.weight", "Q4_1")]),
            (a, "wo"): _rows(T, p + "attn_output.weight", "Q4_1"),
            (f, "w13"): np.concatenate([_rows(T, p + "ffn_gate.weight", "Q4_1"), _rows(T, p + "ffn_up.weight", "Q4_1")]),
            (f, "w2"): _rows(T, p + "ffn_down.weight", "Q4_1"),
        }
        for (mod, name), raw in new.items():
            old = getattr(mod, name)
            q4 = Q4Linear.from_raw(raw, old.bias)
            if check:
                _check_rows(q4, old.weight, f"layer {i} {name}")
            setattr(mod, name, q4)
    emb_type, emb = T.get("token_embd.weight", ("nothing", None))
    if c.tie_word_embeddings and emb_type == "Q8_0":
        head = Q8Linear(*q8_0_decode(emb))
        if check:
            _check_rows(head, model.tok_embeddings.weight, "LM head")
        model.output = head
    model.forward = _torch_on_one_thread_when_small(model.forward)
    return model
