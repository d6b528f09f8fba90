"""Training-free activation sparsity (TEAL / CATS style): drop small inputs of a matmul.

Per layer and per matrix, a magnitude threshold t is calibrated on calibration text so that a
`sparsity` fraction of that matrix's inputs fall below it; at inference inputs with |x| <= t
are treated as zero. At batch-1 decode the matmul then only has to read the weight rows of
the active inputs: with the weight stored transposed ([in, out], one contiguous row per input)
`F.embedding_bag(active, W^T, per_sample_weights=x[active], mode="sum")` is exactly
sum_i x_i W^T[i] over the active inputs, reading nothing else and copying nothing.

Whether that beats a dense GEMV depends on the shape, the sparsity and the machine, so each
shape is timed once at apply time (dense F.linear, dense x @ W^T, embedding_bag, and leanlm's
native kernel, ops.sparse_linear - threshold, index list and row sweep in one call - when it builds)
and the fastest is kept (`kernel="auto"`); the timings are in the report. Multi-row inputs
(prefill, scoring) use a dense product of the masked input, so quality is the same as at decode.

int8 weights (leanlm.quant's int8 per-output-channel grid, e.g. RTN(bits=8, group=0, symmetric=True)) compose
with it: an int8 QuantLinear becomes a `SparseInputQuantLinear` whose codes are stored transposed (int8 [in, out])
with fp32 scales [out], and ops.sparse_linear sweeps the active codes' rows in fp32, scaling once at the end
(y = s * (x_active @ q) + b), at a quarter of the fp32 bytes per row. `kernel="auto"` times it against the int8
dense product (q_linear, which reads every weight) per shape. It runs inside the fused decode step like the
float kernel. Other grids (int4, grouped int8) are refused.

`criterion="wina"` (WINA, Chen et al. 2025): rank inputs by |x_i| * ||W[:, i]|| instead of |x_i|,
i.e. by how much each dropped input would move the output. Implemented by a reparametrization
that leaves the model's function unchanged: each input channel's column norm c_i is folded into
whatever produces that input (the RMSNorm weight before wqkv / w_gate_up, the `up` rows before
w_down, the value rows before wo) and divided out of the weight's column, so the plain magnitude
threshold and the same kernels then apply WINA's criterion at no run-time cost.

`head` (a fraction; None = off, 0 = the layout alone, nothing dropped) also sparsifies the LM head's
input, the final normed hidden state: the head is the biggest GEMV of a small model's decode step
(SmolLM2: 28M of 135M weights, Gemma 3 270M: 168M of 268M) and its input is the one least hurt by
dropping small entries. The head then keeps its table transposed ([hidden, vocab], one row per input); a tied embedding looks
its rows up in that same table (`HeadTableEmbedding`), so no second copy is held.

`allocation="greedy"` (TEAL's idea, per FFN): the bytes skipped in an FFN are split between the
w_gate_up and w_down inputs by the pair that minimises the FFN's output error on calibration.
`allocation="layers"` also moves sparsity between layers: each layer alone is sparsified at a few
levels around the target and the model's KL to the dense model measured; a small dynamic
program then picks one level per layer, averaging the target, that minimises the summed KL
(first-order additivity), and each FFN is split greedily at its layer's level.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import LeanlmError
from ..model.runtime import upcast_for_matmul
from ..calibration import get_module, set_module
from ..ops import FusedLinear, LinearKind

TARGETS = {"mlp": ("mlp.w_gate_up", "mlp.w_down"), "gate_up": ("mlp.w_gate_up",), "down": ("mlp.w_down",),
           "attn": ("attn.wqkv", "attn.wo")}  # fmt: skip
KERNELS = ("auto", "native", "bag", "dense", "dense_t")
ALLOCATIONS = ("uniform", "greedy", "layers")
LAYER_STEPS = (-0.1, -0.05, 0.0, 0.05, 0.1)  # allocation="layers": levels tried around the target


@dataclass
class ActivationSparsity:
    """sparsity: fraction of inputs zeroed per matrix; targets: 'mlp' (inputs of w_gate_up and
    w_down; or 'gate_up' / 'down' alone: the FFN intermediate is the more heavy-tailed one) and/or
    'attn' (inputs of wqkv and wo); kernel: auto (timed per shape), native (ops.sparse_linear), bag,
    dense (F.linear on the original layout) or dense_t (x @ W^T)."""

    sparsity: float = 0.5
    targets: tuple[str, ...] = ("mlp",)
    kernel: str = "auto"
    allocation: str = "uniform"  # "greedy": split each FFN's skipped bytes between its matrices; "layers": also layers
    calib_samples: int = 4
    calib_seq_len: int = 512
    criterion: str = "magnitude"  # or "wina": |x_i| * (column norm of the weight), see the module docstring
    head: float | None = None  # fraction of the LM head's inputs dropped (0: transposed head, nothing dropped)

    saved_apart = True  # what calibration learned is kept in adaptive.safetensors (state.py), not in the weights
    needs_calibration = True  # thresholds are quantiles of calibration activations

    def price(self, plan) -> None:
        plan.activation_sparsity = self.sparsity

    def __post_init__(self):
        if self.head is not None and not 0.0 <= self.head < 1.0:
            raise LeanlmError(f"head sparsity must be in [0, 1), got {self.head}")
        if self.criterion not in ("magnitude", "wina"):
            raise LeanlmError(f"criterion must be magnitude or wina, got {self.criterion!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise LeanlmError(f"activation sparsity must be in [0, 1), got {self.sparsity}")
        self.targets = tuple(self.targets)
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not (self.targets or self.head is not None):
            raise LeanlmError(f"activation-sparsity targets must be among {', '.join(TARGETS)}, got {self.targets}")
        if self.allocation not in ALLOCATIONS:
            raise LeanlmError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.kernel not in KERNELS:
            raise LeanlmError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")


class SparseInputLinear(nn.Module):
    """y = (x * (|x| > threshold)) W^T + b, with the decode kernel chosen per shape.

    `last_flops` is the weight-matmul FLOPs of the last call per row (active inputs only). With the
    native kernel it implements the fused decode step's protocol (leanlm.ops) as a SPARSE_INPUT linear."""

    fused_state = ("threshold", "kernel")  # the protocol's answer depends on these besides the weights

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, threshold: float, kernel: str):
        super().__init__()
        if kernel == "native":
            if not ops.sparse_usable(torch.empty(1, weight.shape[0], dtype=weight.dtype, device=weight.device)):
                raise LeanlmError("the native sparse GEMV is not available here (needs AVX2/FMA, a C++ compiler, "
                                  "fp32/bf16 weights, out_features % 8 == 0); use kernel=bag or auto")  # fmt: skip
        self.out_features, self.in_features = weight.shape
        self.threshold, self.kernel = float(threshold), kernel
        w = weight.detach()
        # one layout only (no second copy): [out, in] for F.linear, [in, out] for the others
        self.weight = nn.Parameter(w if kernel == "dense" else w.t().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # embedding_bag runs its bags in parallel, not one bag: with n threads the output columns are
        # cut into n bags over a [K*n, N/n] view of W^T (row r of W^T = rows r*n .. r*n+n-1 of the view)
        threads = torch.get_num_threads()
        self.splits = threads if kernel == "bag" and threads > 1 and self.out_features % threads == 0 else 1
        self.register_buffer("part", torch.arange(self.splits, dtype=torch.int32), persistent=False)
        self.last_flops = None

    def dense_weight(self) -> torch.Tensor:
        """[out, in], as nn.Linear stores it."""
        return self.weight if self.kernel == "dense" else self.weight.t()

    def fused_linear_args(self, dtype: torch.dtype, rows: int) -> FusedLinear | None:
        """SPARSE_INPUT with the native kernel (each row swept sparse), else None (its own forward)."""
        if self.kernel != "native":
            return None
        return FusedLinear(LinearKind.SPARSE_INPUT, self.weight, self.bias, threshold=self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] == 1 and self.kernel == "native":  # one call: threshold, index and row sweep
            y, n = ops.sparse_linear(x2, self.weight, self.threshold)
            self.last_flops = 2.0 * n * self.out_features
            y = y if y.dtype == x.dtype else y.to(x.dtype)
        elif x2.shape[0] == 1 and self.kernel == "bag":
            xv = x2[0]
            idx = (xv.abs() > self.threshold).nonzero().view(-1)
            n, s = idx.numel(), self.splits
            self.last_flops = 2.0 * n * self.out_features
            w = xv[idx]
            if s == 1:
                offsets = torch.tensor([0, n], dtype=torch.int32)
                y = F.embedding_bag(idx.int(), self.weight, offsets, per_sample_weights=w, mode="sum",
                                    include_last_offset=True)  # fmt: skip
            else:
                rows = (idx.int() * s).unsqueeze(0) + self.part.unsqueeze(1)  # [s, n]: bag j takes part j of each row
                offsets = torch.arange(0, s * n + 1, n, dtype=torch.int32)
                y = F.embedding_bag(rows.view(-1), self.weight.view(-1, self.out_features // s), offsets,
                                    per_sample_weights=w.repeat(s), mode="sum",
                                    include_last_offset=True).view(1, -1)  # fmt: skip
        else:
            if self.threshold < 0:  # sparsity 0: nothing to drop, no masking ops
                xm, self.last_flops = x2, None
            else:
                mask = x2.abs() > self.threshold
                self.last_flops = mask.sum(-1) * (2.0 * self.out_features)
                xm = x2 * mask
            w = self.dense_weight()
            if upcast_for_matmul(x2):  # same rule as the runtime's Linear: bf16 GEMMs are slow on CPU
                y = F.linear(xm.float(), w.float()).to(x.dtype)
            elif self.kernel == "dense_t":
                y = xm @ self.weight
            elif xm.shape[0] == 1:
                from .runtime import gemv

                y = gemv(xm, w)  # the runtime's decode GEMV, as the dense model uses
            else:
                y = F.linear(xm, w)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, threshold={self.threshold:.4g}, kernel={self.kernel}"


def int8_channel(mod) -> bool:
    """Is `mod` a leanlm.quant int8 linear with one scale per output channel (the grid SparseInputQuantLinear takes)?"""
    from ..quant.packed import QuantLinear

    return (isinstance(mod, QuantLinear) and mod.spec.bits == 8 and not mod.spec.codebook
            and mod.scales is not None and mod.scales.shape[1] == 1)  # fmt: skip


class SparseInputQuantLinear(SparseInputLinear):
    """SparseInputLinear over an int8 per-output-channel weight (`int8_channel`): y = s * ((x * (|x| > t)) q^T)
    (+ z * sum of the kept x when asymmetric) + b. kernel "native": the codes transposed, `weight` int8 [in, out]
    (one contiguous row per input), `scales` / `zeros` fp32 [out], run by ops.sparse_linear's int8 sweep (the fused
    decode step's SPARSE_INPUT); multi-row inputs take the dequantized product of the masked input. kernel "dense":
    the QuantLinear kept as it is (`inner`) and fed the masked input: its q_linear reads every weight."""

    def __init__(self, qlin, threshold: float, kernel: str):
        nn.Module.__init__(self)
        if not int8_channel(qlin):
            raise LeanlmError(f"int8 activation sparsity needs an int8 per-channel QuantLinear, got {qlin!r}")
        if kernel not in ("native", "dense"):
            raise LeanlmError(f"int8 weights take kernel native, dense or auto, got {kernel!r}")
        self.out_features, self.in_features = qlin.out_features, qlin.in_features
        self.threshold, self.kernel, self.last_flops = float(threshold), kernel, None
        if kernel == "dense":
            self.inner = qlin
            return
        N, K = self.out_features, self.in_features
        codes = qlin._codes(0, N)[:, :K]  # int8 as stored: code - 128
        if not ops.sparse_usable(torch.empty(K, N, dtype=torch.int8)):
            raise LeanlmError("the native sparse GEMV is not available here (needs AVX2/FMA, a C++ compiler, "
                              "out_features % 8 == 0); use kernel=dense or auto")  # fmt: skip
        self.register_buffer("weight", codes.t().contiguous())
        self.register_buffer("scales", qlin.scales.float().view(-1).contiguous())
        self.register_buffer("zeros", None if qlin.zeros is None else qlin.zeros.float().view(-1).contiguous())
        self.register_buffer("bias", None if qlin.bias is None else qlin.bias.float())

    def _apply(self, fn, recurse=True):
        """model.to(dtype) moves devices but keeps the format: int8 codes, fp32 scales, zeros and bias."""
        super()._apply(fn, recurse)
        for name in ("scales", "zeros", "bias"):
            b = self._buffers.get(name)
            if b is not None and b.dtype != torch.float32:
                self._buffers[name] = b.float()
        return self

    def dense_weight(self) -> torch.Tensor:
        """[out, in] float32, dequantized (a new tensor; the multi-row path and inspection)."""
        if self.kernel == "dense":
            return self.inner.dequantize()
        w = self.weight.t().float() * self.scales[:, None]
        return w if self.zeros is None else w + self.zeros[:, None]

    def fused_linear_args(self, dtype: torch.dtype, rows: int) -> FusedLinear | None:
        if self.kernel != "native":
            return None
        return FusedLinear(LinearKind.SPARSE_INPUT, self.weight, self.bias, self.scales, self.zeros,
                           threshold=self.threshold)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.kernel == "native" and x2.shape[0] == 1:
            y, n = ops.sparse_linear(x2, self.weight, self.threshold, self.scales, self.zeros)
            self.last_flops = 2.0 * n * self.out_features
            if self.bias is not None:
                y = y + self.bias
            return y.to(x.dtype).view(*shape[:-1], self.out_features)
        mask = x2.abs() > self.threshold
        self.last_flops = mask.sum(-1) * (2.0 * self.out_features)
        xm = x2 * mask
        if self.kernel == "dense":
            return self.inner(xm.view(shape))
        xf = xm.float()
        y = (xf @ self.weight.float()) * self.scales  # the sweep's arithmetic, in one GEMM
        if self.zeros is not None:
            y = y + xf.sum(-1, keepdim=True) * self.zeros
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", int8 per channel"


def sparse_module(mod, threshold: float, kernel: str) -> SparseInputLinear:
    """The input-sparse replacement of a plain Linear or an int8 per-channel QuantLinear."""
    if int8_channel(mod):
        return SparseInputQuantLinear(mod, threshold, kernel)
    return SparseInputLinear(mod.weight, mod.bias, threshold, kernel)


class HeadTableEmbedding(nn.Module):
    """Token embeddings read from an input-sparse LM head's table (tied embeddings): `weight` is a
    [vocab, hidden] view of the head's [hidden, vocab] weight, so one copy serves both."""

    def __init__(self, head: SparseInputLinear):
        super().__init__()
        self.head = head
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    @property
    def weight(self) -> torch.Tensor:
        return self.head.dense_weight()

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


# ---- kernel choice ------------------------------------------------------------------------
def time_kernels(K: int, N: int, sparsity: float, dtype=torch.float32, copies: int = 8, reps: int = 30) -> dict:
    """Median microseconds per batch-1 call of each kernel at this shape and sparsity.

    Several weight copies are cycled so that the weights come from memory, as at decode (a
    weight far bigger than the caches needs fewer)."""
    g = torch.Generator().manual_seed(0)
    copies = max(1, min(copies, (64 << 20) // (K * N * 4)))
    reps = max(3, min(reps, (1 << 29) // (K * N)))
    kinds = ("dense", "dense_t", "bag") + (("native",) if ops.sparse_usable(torch.empty(K, N, dtype=dtype)) else ())
    mods = {k: [SparseInputLinear(torch.randn(N, K, generator=g).to(dtype), None, 0.0, k) for _ in range(copies)]
            for k in kinds}  # fmt: skip
    x = torch.randn(1, 1, K, generator=g).to(dtype)
    thr = float(x.abs().float().quantile(sparsity)) if sparsity > 0 else -1.0
    out = {}
    for k, ms in mods.items():
        for m in ms:
            m.threshold = thr
        out[k] = _median_call_us(ms, x, reps)
    return out


def _median_call_us(mods: list, x: torch.Tensor, reps: int) -> float:
    """Median of 5 rounds of microseconds per call, cycling through copies of a module (distinct weights, so a
    call reads its weight from memory as decode does rather than from cache)."""
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(reps):
            mods[i % len(mods)](x)
        times.append((time.perf_counter() - t0) / reps * 1e6)
    return sorted(times)[2]


def time_kernels_int8(K: int, N: int, sparsity: float, copies: int = 8, reps: int = 30) -> dict:
    """time_kernels for an int8 per-channel weight: "dense" (the QuantLinear's q_linear on the masked input) and
    "native" (ops.sparse_linear's int8 sweep), median microseconds per batch-1 call."""
    from ..quant.packed import QuantLinear
    from ..quant.rtn import QSpec, rtn

    g = torch.Generator().manual_seed(0)
    copies = max(1, min(copies, (64 << 20) // (K * N)))
    reps = max(3, min(reps, (1 << 30) // (K * N)))
    spec = QSpec(8, 0, True)
    qls = [QuantLinear(rtn(torch.randn(N, K, generator=g), spec)) for _ in range(copies)]
    kinds = ("dense",) + (("native",) if ops.sparse_usable(torch.empty(K, N, dtype=torch.int8)) else ())
    x = torch.randn(1, 1, K, generator=g).to(torch.bfloat16)
    thr = float(x.abs().float().quantile(sparsity)) if sparsity > 0 else -1.0
    out = {}
    for k in kinds:
        ms = [SparseInputQuantLinear(q, thr, k) for q in qls]
        out[k] = _median_call_us(ms, x, reps)
        del ms
    return out


def choose_kernels(model, names: list[str], sparsity: float, head: float | None = None) -> dict:
    """(K, N) -> {"kernel": fastest, "us": {kernel: microseconds}} for the decoder's shapes (and
    the LM head's, at its own sparsity, when `head` is set)."""
    shapes = {}
    for layer in model.layers:
        for n in names:
            shapes.setdefault(shape_key(get_module(layer, n)), None)
    out = {}
    if head is not None:
        V, D = model.output_weight().shape
        us = time_kernels(D, V, head, model.dtype)
        out[("head", D, V)] = {"kernel": min(us, key=us.get), "us": us}
    for key in shapes:
        K, N = key[:2]
        try:
            us = time_kernels_int8(K, N, sparsity) if len(key) > 2 else time_kernels(K, N, sparsity, model.dtype)
        except RuntimeError:  # e.g. a dtype embedding_bag lacks
            us = {"dense": 0.0}
        out[key] = {"kernel": min(us, key=us.get), "us": us}
    return out


def shape_key(mod) -> tuple:
    """choose_kernels' key of a linear: (in, out), and "int8" for an int8 per-channel weight."""
    return (mod.in_features, mod.out_features) + (("int8",) if int8_channel(mod) else ())


# ---- WINA: fold column norms into the producers of the inputs -----------------------------
@torch.no_grad()
def _fold_into_norm(norm, c: torch.Tensor) -> None:
    w = norm.weight.float()
    eff = (1.0 + w) if norm.plus_one else w
    eff = eff * c
    norm.weight.copy_((eff - 1.0 if norm.plus_one else eff).to(norm.weight.dtype))


@torch.no_grad()
def _scale_columns(lin, c: torch.Tensor) -> None:
    lin.weight.copy_((lin.weight.float() / c).to(lin.weight.dtype))


@torch.no_grad()
def fold_column_norms(model, names: list[str]) -> None:
    """Reparametrize so that |input| of each matrix in `names` is WINA's |x_i| * ||W[:, i]||:
    the model computes the same function (up to rounding). wo's inputs come from values shared by
    a group of query heads (GQA), so their scale is the group's mean column norm per dimension."""
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        if "attn.wo" in names:
            nh, nkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
            c = attn.wo.weight.float().norm(dim=0).clamp_min(1e-6).view(nkv, nh // nkv, hd).mean(1)  # [nkv, hd]
            v0 = (nh + nkv) * hd
            w = attn.wqkv.weight
            w[v0:] = (w[v0:].float() * c.reshape(-1, 1)).to(w.dtype)
            if attn.wqkv.bias is not None:
                attn.wqkv.bias[v0:] *= c.reshape(-1).to(attn.wqkv.bias.dtype)
            _scale_columns(attn.wo, c.repeat_interleave(nh // nkv, dim=0).reshape(-1))
        if "mlp.w_down" in names:
            c = mlp.w_down.weight.float().norm(dim=0).clamp_min(1e-6)
            f, w = mlp.ffn_dim, mlp.w_gate_up.weight
            w[f:] = (w[f:].float() * c[:, None]).to(w.dtype)  # act(gate) * (up * c) = (act(gate) * up) * c
            _scale_columns(mlp.w_down, c)
        # after the folds above, which rescale rows of these two matrices
        if "attn.wqkv" in names and layer.attn_norm is not None:
            c = attn.wqkv.weight.float().norm(dim=0).clamp_min(1e-6)
            _fold_into_norm(layer.attn_norm, c)
            _scale_columns(attn.wqkv, c)
        if "mlp.w_gate_up" in names:
            c = mlp.w_gate_up.weight.float().norm(dim=0).clamp_min(1e-6)
            _fold_into_norm(layer.mlp_norm, c)
            _scale_columns(mlp.w_gate_up, c)


# ---- calibration --------------------------------------------------------------------------


def quantile_abs(chunks: list[torch.Tensor], q: float, max_values: int = 1 << 24) -> float:
    """q-quantile of |x| over the rows of `chunks` (subsampled to at most max_values numbers)."""
    x = torch.cat([c.reshape(-1) for c in chunks]).abs()
    if x.numel() > max_values:
        g = torch.Generator().manual_seed(0)
        x = x[torch.randint(0, x.numel(), (max_values,), generator=g)]
    if q <= 0:
        return -1.0  # nothing dropped (|x| > -1 always)
    k = max(1, min(x.numel(), int(round(q * x.numel()))))
    return float(x.kthvalue(k).values)


@torch.no_grad()
def split_mlp_sparsity(mlp, X: torch.Tensor, sparsity: float, grid: int = 10) -> tuple[float, float, float]:
    """TEAL-style allocation inside one FFN: the (s_gate_up, s_down) pair with the same weight bytes
    skipped as `sparsity` on both (gate_up holds 2/3 of the FFN's bytes) that minimises the FFN's
    relative output error on calibration inputs X [n, D]. Returns (threshold_gate_up, threshold_down, error)."""
    f = mlp.ffn_dim
    w1, w2 = mlp.w_gate_up.weight.float(), mlp.w_down.weight.float()
    bytes1, bytes2 = w1.numel(), w2.numel()
    total = sparsity * (bytes1 + bytes2)

    def ffn(x):
        h = x @ w1.T
        return mlp.act(h[:, :f]) * h[:, f:]

    dense = ffn(X) @ w2.T
    ref = dense.pow(2).sum()
    best = None
    for k in range(grid + 1):
        s1 = min(0.95, k / grid)
        s2 = (total - s1 * bytes1) / bytes2
        if not 0 <= s2 <= 0.95:
            continue
        t1 = quantile_abs([X], s1)
        a = ffn(X * (X.abs() > t1))
        t2 = quantile_abs([a], s2)
        err = float((((a * (a.abs() > t2)) @ w2.T) - dense).pow(2).sum() / ref)
        if best is None or err < best[2]:
            best = (t1, t2, err)
    if best is None:  # sparsity too high to split: uniform
        t1 = quantile_abs([X], sparsity)
        return t1, quantile_abs([ffn(X * (X.abs() > t1))], sparsity), float("nan")
    return best


@torch.no_grad()
def layer_sensitivity(model, tokens: torch.Tensor, names: list[str], levels: list[float],
                      progress: bool = True) -> list[list[float]]:  # fmt: skip
    """KL(dense || model with only layer i sparsified at level s) per layer i and level s, on
    `tokens`; thresholds are the level's quantile of that matrix's inputs in the dense model."""
    from tqdm.auto import tqdm

    seen: dict = {}
    hooks = []
    for i, layer in enumerate(model.layers):
        for n in names:
            def grab(m, args, key=(i, n)):
                x = args[0].detach().reshape(-1, m.in_features).float()
                seen.setdefault(key, []).append(x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:256]])

            hooks.append(get_module(layer, n).register_forward_pre_hook(grab))
    hidden = []  # each layer's dense input: a layer's trial runs from there, not from the embedding
    try:
        h = model.embed(tokens)
        for i in range(len(model.layers)):
            hidden.append(h)
            h = model.run_layers(h, 0, i, i + 1)
        ref = F.log_softmax(model.logits(h), -1).flatten(0, 1)
    finally:
        for hk in hooks:
            hk.remove()
    out = []
    for i, layer in enumerate(tqdm(model.layers, desc="layer sensitivity", disable=not progress, leave=False)):
        row = []
        for s in levels:
            hooks = []
            for n in names:
                t = quantile_abs(seen[(i, n)], s)
                hooks.append(get_module(layer, n).register_forward_pre_hook(
                    lambda m, args, t=t: (args[0] * (args[0].abs() > t),)))  # fmt: skip
            try:
                lp = F.log_softmax(model.logits(model.run_layers(hidden[i], 0, i)), -1).flatten(0, 1)
            finally:
                for hk in hooks:
                    hk.remove()
            row.append(float(F.kl_div(lp, ref, log_target=True, reduction="batchmean")))
        out.append(row)
    return out


def allocate_layers(kl: list[list[float]], levels: list[float]) -> list[float]:
    """One level per layer (equal-size layers), averaging the middle level (levels are evenly
    spaced around it), minimising the summed KL: a dynamic program over the running
    sum of level offsets, which must end at 0."""
    mid, L = len(levels) // 2, len(kl)
    best = {0: (0.0, [])}  # running offset sum -> (cost, choices)
    for row in kl:
        nxt: dict = {}
        for total, (cost, picks) in best.items():
            for k, v in enumerate(row):
                key, c = total + k - mid, cost + v
                if key not in nxt or c < nxt[key][0]:
                    nxt[key] = (c, picks + [k])
        best = nxt
    picks = best[0][1]
    assert len(picks) == L
    return [levels[k] for k in picks]


def calibrate_and_replace(model, tokens: torch.Tensor, sparsity: float | list[float], names: list[str], kernel_of,
                          progress: bool = True, allocation: str = "uniform") -> list[dict]:  # fmt: skip
    """Per layer and matrix in `names` (in forward order), the |x| threshold below which `sparsity`
    of its calibration inputs lie; each matrix is replaced as soon as its threshold is known, so
    the next one is calibrated on the inputs it will really see (the sparsified model's, as
    true-sequential GPTQ does). Layer-sequential through the quantization calibrator's driver:
    one block's activations are held at a time, and each capture stops the block early."""
    from ..calibration import LINEARS, StopForward, run_sequential

    out: list[dict] = []
    order = [n for n in LINEARS if n in names]

    def per_block(i, layer, xs, rope, dtype):
        th = {}
        s_i = sparsity[i] if isinstance(sparsity, list) else sparsity
        for n in order:
            mod = get_module(layer, n)
            seen = []

            def grab(m, args):
                seen.append(args[0].detach().reshape(-1, m.in_features).float())
                raise StopForward

            if n in th:  # already set by the FFN split below
                set_module(layer, n, sparse_module(mod, th[n], kernel_of(mod)))
                continue
            handle = mod.register_forward_pre_hook(grab)
            try:
                for x in xs:
                    try:
                        layer(x, rope, 0, dtype)
                    except StopForward:
                        pass
            finally:
                handle.remove()
            if allocation != "uniform" and n == "mlp.w_gate_up" and "mlp.w_down" in names:
                X = torch.cat(seen)
                X = X[torch.randperm(len(X), generator=torch.Generator().manual_seed(i))[:512]]
                th[n], th["mlp.w_down"], th["ffn_error"] = split_mlp_sparsity(layer.mlp, X, s_i)
            else:
                th[n] = quantile_abs(seen, s_i)
            set_module(layer, n, sparse_module(mod, th[n], kernel_of(mod)))
        if isinstance(sparsity, list):
            th["sparsity"] = s_i
        out.append(th)
        return [layer(x, rope, 0, dtype) for x in xs]

    run_sequential(model, tokens, per_block, batch_size=4, progress=progress, desc="activation thresholds")
    return out


@torch.no_grad()
def sparsify_head(model, sparsity: float, calib: torch.Tensor | None, kernel: str, threshold: float | None = None) -> float:
    """Make the LM head input-sparse: threshold = the `sparsity` quantile of |final normed hidden|
    on `calib` (through the already sparsified layers) unless given. Returns the threshold."""
    if model.lm_head is not None and type(model.lm_head).__name__ != "Linear":
        raise LeanlmError(f"head sparsity needs a plain LM head; this one is {type(model.lm_head).__name__} "
                          "(apply activation sparsity before quantizing the head)")  # fmt: skip
    if threshold is None:
        hs = [model.norm(model.hidden(calib[i : i + 1]), model.dtype).float() for i in range(calib.shape[0])]
        threshold = quantile_abs(hs, sparsity)
    tied = model.lm_head is None
    bias = None if tied else model.lm_head.bias
    w = model.output_weight()
    if kernel == "native":
        if not ops.sparse_usable(torch.empty(1, w.shape[0], dtype=w.dtype, device=w.device)):
            kernel = "bag"  # e.g. a vocabulary that is not a multiple of 8
    model.lm_head = SparseInputLinear(w, bias, threshold, kernel)
    if tied:  # one table: the embedding lookups read the head's transposed copy
        model.tok_embeddings = HeadTableEmbedding(model.lm_head)
    return threshold


def apply_activation_sparsity(model, cfg: ActivationSparsity, calib: torch.Tensor | None = None, tokenizer=None,
                              thresholds: list[dict] | None = None, progress: bool = True,
                              head_threshold: float | None = None) -> dict:  # fmt: skip
    """Calibrate thresholds (unless given) and replace the target matrices in place. Returns a report."""
    from .runtime import make_adaptive

    names = list(dict.fromkeys(n for t in cfg.targets for n in TARGETS[t]))
    for layer in model.layers:
        for n in names:
            mod = get_module(layer, n)
            if isinstance(mod, SparseInputLinear):
                raise LeanlmError("activation sparsity is already applied to this model")
            if int8_channel(mod):
                if cfg.criterion == "wina":
                    raise LeanlmError("criterion=wina rescales weight columns: apply it before quantization")
                if cfg.kernel not in ("auto", "native", "dense"):
                    raise LeanlmError(f"int8 weights take kernel auto, native or dense, got {cfg.kernel!r}")
                continue
            if type(mod).__name__ != "Linear" or mod.weight.dim() != 2:
                raise LeanlmError(f"activation sparsity needs plain Linear layers or int8 per-channel ones; {n} is "
                                  f"{type(mod).__name__} {getattr(mod, 'spec', '')} (apply it before other "
                                  "quantization, packing or neuron routing)")  # fmt: skip
    kernels = choose_kernels(model, names, cfg.sparsity, cfg.head) if cfg.kernel == "auto" else {}

    def kernel_of(mod):
        return kernels[shape_key(mod)]["kernel"] if kernels else cfg.kernel

    make_adaptive(model)
    layer_report = None
    if cfg.criterion == "wina":  # deterministic from the weights, so saved thresholds still apply
        fold_column_norms(model, names)
    if thresholds is None:
        if calib is None:
            if tokenizer is None:
                raise LeanlmError("activation sparsity needs calibration tokens (or a tokenizer to cut them)")
            from ..calibration import calibration_tokens

            calib = calibration_tokens(tokenizer, "wikitext2-valid", cfg.calib_samples, cfg.calib_seq_len)
        sparsity: float | list[float] = cfg.sparsity
        if cfg.allocation == "layers" and cfg.sparsity > 0 and names:
            levels = [min(max(cfg.sparsity + d, 0.0), 0.95) for d in LAYER_STEPS]
            if len(set(levels)) < len(levels):
                raise LeanlmError(f"allocation=layers needs sparsity in [0.1, 0.85], got {cfg.sparsity}")
            kl = layer_sensitivity(model, calib[:1], names, levels, progress)
            sparsity = allocate_layers(kl, levels)
            layer_report = {"levels": levels, "kl": kl, "per_layer": sparsity}
        thresholds = calibrate_and_replace(model, calib, sparsity, names, kernel_of, progress, cfg.allocation) \
            if names else [{} for _ in model.layers]  # fmt: skip
    else:
        for layer, th in zip(model.layers, thresholds):
            for n in names:
                mod = get_module(layer, n)
                set_module(layer, n, sparse_module(mod, th[n], kernel_of(mod)))
    if cfg.head is not None:
        V, D = model.output_weight().shape
        head_kernel = kernels[("head", D, V)]["kernel"] if kernels else cfg.kernel
        if head_threshold is None and calib is None:
            raise LeanlmError("head sparsity needs calibration tokens (or a saved head threshold)")
        head_threshold = sparsify_head(model, cfg.head, calib, head_kernel, head_threshold)
    from ..apply import record

    record(model, cfg)
    rep = {"sparsity": cfg.sparsity, "targets": list(cfg.targets), "thresholds": thresholds,
           "kernels": {"x".join(map(str, k)): v for k, v in kernels.items()}}  # fmt: skip
    if cfg.head is not None:
        rep["head_threshold"] = head_threshold
    if layer_report:
        rep["layer_allocation"] = layer_report
    return rep


def measured_sparsity(model, tokens: torch.Tensor) -> dict:
    """Fraction of inputs actually dropped per matrix name on `tokens` (checks the calibration)."""
    zero: dict[str, list] = {}
    hooks = []
    for i, layer in enumerate(model.layers):
        for n in ("attn.wqkv", "attn.wo", "mlp.w_gate_up", "mlp.w_down"):
            mod = get_module(layer, n)
            if isinstance(mod, SparseInputLinear):
                def h(m, args, key=f"{i}.{n}"):
                    x = args[0]
                    zero.setdefault(key, []).append(float((x.abs() <= m.threshold).float().mean()))

                hooks.append(mod.register_forward_pre_hook(h))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for hd in hooks:
            hd.remove()
    return {k: sum(v) / len(v) for k, v in zero.items()}
