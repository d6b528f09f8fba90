"""csrc/attention.cpp's decode attention against a float64 reference, across its key blocks, and its batch
invariance (a T-token call equals T one-token calls, and a batch equals each sequence alone, bit for bit)."""

from __future__ import annotations

import pytest
import torch

from leanlm import native, ops

pytestmark = pytest.mark.skipif(native.extension() is None, reason="needs the native kernels")

NH, NKV, HD = 6, 2, 20  # GQA groups of 3; a head size that is not a multiple of 8 (the scalar tails)


def _inputs(B, L, T, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ck = torch.randn(B, NKV, L, HD, generator=g).to(dtype)
    cv = torch.randn(B, NKV, L, HD, generator=g).to(dtype)
    qkv = (torch.randn(B, T, (NH + 2 * NKV) * HD, generator=g) * 2).to(dtype)
    return qkv, ck, cv


def _call(qkv, ck, cv, pos, window):
    T = qkv.size(1)
    cos, sin = torch.ones(T, HD, dtype=qkv.dtype), torch.zeros(T, HD, dtype=qkv.dtype)  # RoPE as identity
    return ops.attend(qkv, None, None, ck, cv, cos, sin, pos, NH, NKV, window, 1e-6, False, HD**-0.5)


def _reference(qkv, ck, cv, pos, window):
    """softmax(q k^T / sqrt(hd)) v in float64 over the cache with the new keys written at pos.."""
    B, T, _ = qkv.shape
    x = qkv.double().view(B, T, NH + 2 * NKV, HD)
    k, v = ck.double().clone(), cv.double().clone()
    k[:, :, pos : pos + T] = x[:, :, NH : NH + NKV].transpose(1, 2)
    v[:, :, pos : pos + T] = x[:, :, NH + NKV :].transpose(1, 2)
    out = torch.empty(B, T, NH, HD, dtype=torch.float64)
    for t in range(T):
        qpos = pos + t
        lo = max(0, qpos - window + 1) if window > 0 else 0
        for h in range(NH):
            kk, vv = k[:, h // (NH // NKV), lo : qpos + 1], v[:, h // (NH // NKV), lo : qpos + 1]
            p = torch.softmax(torch.einsum("bd,bjd->bj", x[:, t, h], kk) * HD**-0.5, -1)
            out[:, t, h] = torch.einsum("bj,bjd->bd", p, vv)
    return out.reshape(B * T, NH * HD)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("pos,T,window", [(0, 1, 0), (250, 5, 0), (700, 1, 0), (1030, 3, 300), (511, 2, 0)])
def test_matches_reference_across_key_blocks(dtype, tol, pos, T, window):
    L = pos + T + 7
    qkv, ck, cv = _inputs(2, L, T, dtype)
    want = _reference(qkv, ck, cv, pos, window)
    got = _call(qkv, ck.clone(), cv.clone(), pos, window).double()
    assert (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 200])
def test_a_chunk_equals_its_steps_and_a_batch_equals_each_row(dtype, window):
    pos, T = 253, 6  # the chunk crosses the 256-key block boundary
    qkv, ck, cv = _inputs(2, 300, T, dtype, seed=3)
    chunk = _call(qkv, ck.clone(), cv.clone(), pos, window).view(2, T, -1)
    k1, v1 = ck.clone(), cv.clone()
    steps = torch.stack([_call(qkv[:, t : t + 1], k1, v1, pos + t, window) for t in range(T)], 1)
    assert torch.equal(chunk, steps.view(2, T, -1))
    for b in range(2):
        alone = _call(qkv[b : b + 1], ck[b : b + 1].clone(), cv[b : b + 1].clone(), pos, window).view(1, T, -1)
        assert torch.equal(alone[0], chunk[b])
