"""Do rotations (QuaRot / SpinQuant style incoherence processing) help int4 g128 on SmolLM2? An experiment.

An orthogonal change of basis leaves the float model's outputs unchanged but changes what the
quantizer sees: outlier channels are spread over all channels, so weights and the calibration
Hessian become more uniform. Variants, each applied to a fresh float32 copy before quantizing:

- res: the residual stream is rotated by a random orthogonal Q (576 x 576). The RMSNorm weights
  are folded into the Linears they feed, so the norms commute with Q. Q is folded into wqkv /
  gate_up (inputs) and wo / down (outputs). The tied embedding table stays as it is, so the
  model applies Q after the lookup and Q^T before the final norm (two small products per token).
- vo: each KV head's values are rotated by its own 64 x 64 orthogonal matrix, folded into wqkv's
  V rows and the wo columns of the query heads sharing that KV head (free at run time).
- down128: the FFN activations entering w_down are rotated by a block-diagonal Hadamard (blocks
  of 128, i.e. within each quantization group, random signs), applied online (an extra product).

The rotations live in this script only: the runtime does not carry them (patched forwards), and
leanlm's quantizers are used unchanged. They are measured against the same methods on the
unrotated model, same calibration, same test windows.

    LEANLM_DATA=../shared/data python benchmarks/bench_quant_rotation.py
Writes benchmarks/results/<--out>.json.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from common import QualityRef, add_result_args, machine, write_result

from leanlm import load
from leanlm.evaluate.data import wikitext2_test
from leanlm.evaluate.perplexity import make_windows
from leanlm.quant import AWQ, GPTQ, RTN, quantize, read_calibration

METHODS = {
    "rtn": lambda: RTN(bits=4, group=128),
    "gptq-actorder": lambda: GPTQ(bits=4, group=128, act_order=True),
    "awq-gptq": lambda: AWQ(bits=4, group=128, gptq=True),
}
DEFAULT = ("plain:gptq-actorder,res:gptq-actorder,res+vo:gptq-actorder,res+vo+down128:gptq-actorder,"
           "plain:awq-gptq,res+vo:awq-gptq,res+vo+down128:awq-gptq")  # fmt: skip


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def block_hadamard(n: int, block: int, seed: int) -> torch.Tensor:
    """Block-diagonal normalised Hadamard (block a power of two) with random signs on the rows."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    return torch.block_diag(*[h / math.sqrt(block)] * (n // block)) * signs[:, None]


def rotate_residual(m, seed: int) -> None:
    q = random_orthogonal(m.config.hidden_size, seed)
    for layer in m.layers:
        for norm, lin in ((layer.attn_norm, layer.attn.wqkv), (layer.mlp_norm, layer.mlp.w_gate_up)):
            lin.weight.data = ((lin.weight.data.double() * norm.weight.data.double()) @ q).float()
            norm.weight.data.fill_(1.0)  # folded: the norm now commutes with q
        for lin in (layer.attn.wo, layer.mlp.w_down):
            lin.weight.data = (q.T @ lin.weight.data.double()).float()
    qf = q.float()
    embed, final_norm = m.embed, m.norm.forward
    m.embed = lambda tokens: embed(tokens) @ qf
    m.norm.forward = lambda x, out_dtype=None: final_norm(x @ qf.T, out_dtype)


def rotate_values(m, seed: int) -> None:
    for layer in m.layers:
        a = layer.attn
        nh, nkv, hd = a.n_heads, a.n_kv_heads, a.head_dim
        w, wo = a.wqkv.weight.data.double(), a.wo.weight.data.double()
        for j in range(nkv):
            r = random_orthogonal(hd, seed + 100 + j)
            rows = slice((nh + nkv + j) * hd, (nh + nkv + j + 1) * hd)
            w[rows] = r.T @ w[rows]  # v -> v r
            for h in range(j * (nh // nkv), (j + 1) * (nh // nkv)):
                wo[:, h * hd : (h + 1) * hd] = wo[:, h * hd : (h + 1) * hd] @ r
        a.wqkv.weight.data, a.wo.weight.data = w.float(), wo.float()


def rotate_ffn(m, block: int, seed: int) -> None:
    for i, layer in enumerate(m.layers):
        mlp = layer.mlp
        r = block_hadamard(mlp.ffn_dim, block, seed + 7 + i)
        mlp.w_down.weight.data = (mlp.w_down.weight.data.double() @ r).float()
        rf = r.float()

        def forward(x, mlp=mlp, rf=rf):  # MLP.forward with the online rotation
            gu = mlp.w_gate_up(x)
            f = gu.shape[-1] // 2
            return mlp.w_down((mlp.act(gu[..., :f]) * gu[..., f:]) @ rf.to(gu.dtype))

        mlp.forward = forward


def rotated(base, parts: list[str], seed: int):
    m = copy.deepcopy(base)
    for p in parts:
        if p == "res":
            rotate_residual(m, seed)
        elif p == "vo":
            rotate_values(m, seed)
        elif p.startswith("down"):
            rotate_ffn(m, int(p[4:]), seed)
        elif p != "plain":
            raise SystemExit(f"unknown rotation {p!r}: use plain, res, vo, down128")
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variants", default=DEFAULT, help="comma list of ROTATIONS:METHOD, rotations joined by +")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="quant_rotation")
    add_result_args(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = load(args.model, "float32")
    calib = read_calibration("wikitext2-valid", tok, args.samples, 512)
    ref = QualityRef(base, make_windows(tok, wikitext2_test(), 512, args.windows))
    result = {"machine": machine(), "settings": vars(args), "variants": {}}
    check = rotated(base, ["res", "vo", "down128"], args.seed)  # the rotations alone must not change the model
    result["rotated_fp32"] = ref(check)
    del check
    variants = args.variants.split(",")
    for v in variants:
        parts, method = v.split(":")
        m = rotated(base, parts.split("+"), args.seed)
        t = time.perf_counter()
        quantize(m, METHODS[method](), calib, progress=False)
        r = ref(m)
        r["quantize_s"] = time.perf_counter() - t
        r["ppl_change"] = r["ppl"] / r["ppl_base"] - 1
        result["variants"][v] = r
        print(f"{v:32s} ppl {r['ppl']:.2f} ({100 * r['ppl_change']:+.1f}%) KL {r['kl']:.4f} "
              f"top-1 {r['top1_agreement']:.3f}  ({r['quantize_s']:.0f} s)", flush=True)  # fmt: skip
        write_result(args.out, result, checkpoint=v != variants[-1], partial=args.variants != DEFAULT,
                     archive=args.archive, machine_shared=args.machine_shared)
        del m


if __name__ == "__main__":
    main()
