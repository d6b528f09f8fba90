"""leanlm's compiled kernels: the build (ISA levels, source-hash names, package data), the ops wrappers,
the fused-linear protocol, and the adaptive runtime's one-row products on the native kernel."""

import fnmatch
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from leanlm import native, ops
from leanlm.errors import LeanlmError

needs_native = pytest.mark.skipif(not ops.available(), reason="no C++ compiler / AVX2 for the native kernels")


def test_isa_levels_follow_the_cpu_flags():
    assert native.supported_levels(set()) == []
    assert native.supported_levels({"avx2", "fma", "f16c"}) == ["avx2"]
    assert native.supported_levels({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}) == []  # no AVX2: none
    zen4 = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}
    assert native.supported_levels(zen4) == ["avx2", "avx512", "avx512_vnni", "avx512_bf16"]
    assert native.supported_levels(zen4 - {"avx512_vnni"}) == ["avx2", "avx512"]  # levels are cumulative
    assert native.compile_flags("avx2") == ["-mavx2", "-mfma", "-mf16c"]
    assert native.compile_flags("avx512_vnni")[-1] == "-mavx512vnni" and "-mavx2" in native.compile_flags("avx512_vnni")
    with pytest.raises(LeanlmError, match="unknown ISA level"):
        native.compile_flags("sse2")


def test_leanlm_isa_must_name_a_level_this_cpu_runs(monkeypatch):
    monkeypatch.setenv("LEANLM_ISA", "neon")
    with pytest.raises(LeanlmError, match="not an ISA level"):
        native.wanted_level()
    monkeypatch.setattr(native, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    monkeypatch.setenv("LEANLM_ISA", "avx512")
    with pytest.raises(LeanlmError, match="lacks it"):
        native.wanted_level()
    monkeypatch.setenv("LEANLM_ISA", "avx2")
    assert native.wanted_level() == "avx2"
    monkeypatch.delenv("LEANLM_ISA")
    assert native.wanted_level() == "avx2"


def test_wider_levels_are_asked_for_not_default(monkeypatch):
    """AVX-512 builds compile the same 256-bit kernels and measured slower for bf16 decode: opt-in only."""
    zen4 = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}
    monkeypatch.setattr(native, "cpu_flags", lambda: zen4)
    monkeypatch.delenv("LEANLM_ISA", raising=False)
    assert native.wanted_level() == native.DEFAULT_LEVEL == "avx2"
    monkeypatch.setenv("LEANLM_ISA", "avx512_vnni")
    assert native.wanted_level() == "avx512_vnni"


def test_extension_name_is_keyed_by_the_sources_and_the_level(tmp_path, monkeypatch):
    copy = tmp_path / "csrc"
    shutil.copytree(native.CSRC, copy)
    monkeypatch.setattr(native, "CSRC", copy)
    a = native.extension_name("avx2")
    assert a == native.extension_name("avx2") and a != native.extension_name("avx512")
    (copy / "leanlm.h").write_text((copy / "leanlm.h").read_text() + "\n// edited\n")
    assert native.extension_name("avx2") != a  # an edited header builds afresh


def test_kernel_sources_ship_as_package_data():
    files = {p.name for p in native.source_files()}
    assert {"leanlm.h", "extension.cpp", "gemv_small.cpp", "qlinear.cpp", "sparse.cpp", "attention.cpp",
            "fused_block.cpp"} <= files  # fmt: skip
    root = Path(native.__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("installed without the source tree")
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["leanlm"]
    for p in native.source_files():
        rel = p.relative_to(native.CSRC.parent).as_posix()
        assert any(fnmatch.fnmatch(rel, pat) for pat in patterns), f"{rel} is not package data"
    included = {Path(line.split('"')[1]).name for src in native.source_files() for line in src.read_text().splitlines()
                if line.startswith('#include "')}  # fmt: skip
    assert files - {"extension.cpp"} <= included  # every kernel file is compiled (included by another)


def test_native_disabled_gives_none_and_a_reason(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("LEANLM_NATIVE", "0")
    assert native.extension() is None and not ops.available()
    assert "LEANLM_NATIVE=0" in native.status()["why"]
    assert ops.small_linear(torch.randn(1, 8), torch.randn(4, 8)) is None
    with pytest.raises(LeanlmError, match="unavailable"):
        ops.glu(torch.randn(1, 8), False)


@needs_native
def test_the_build_is_for_the_best_level_of_this_cpu():
    assert ops.isa() == native.wanted_level() == native.status()["level"]


@needs_native
def test_ops_wrappers_match_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g)
    w = torch.randn(40, 64, generator=g)
    assert torch.allclose(ops.small_linear(x, w), F.linear(x, w), atol=1e-4)
    wt = torch.randn(64, 40, generator=g)
    y, active = ops.sparse_linear(x, wt, 0.5)
    assert active == int((x.abs() > 0.5).sum())
    assert torch.allclose(y, (x * (x.abs() > 0.5)) @ wt, atol=1e-4)
    gu = torch.randn(2, 16, generator=g)
    assert torch.allclose(ops.glu(gu, False), F.silu(gu[:, :8]) * gu[:, 8:], atol=1e-6)
    h = torch.randn(2, 64, generator=g)
    ref = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(ops.rms_norm(h, torch.ones(64), 1e-6, False, False), ref, atol=1e-5)


@needs_native
def test_replaced_linears_answer_the_fused_protocol(tiny_dirs):
    from leanlm.model import fused, load_model
    from leanlm.quant import RTN, quantize

    model = load_model(tiny_dirs["llama"])
    lin = model.layers[0].attn.wqkv
    args = fused.fused_args(lin, torch.float32, ops.MAX_ROWS)
    assert args.kind is ops.LinearKind.DENSE and args.weight is lin.weight
    assert fused.fused_args(lin, torch.bfloat16, 1) is None  # weight not in the compute dtype
    handle = lin.register_forward_hook(lambda *a: None)
    assert fused.fused_args(lin, torch.float32, 1) is None  # a hooked module runs its own forward
    handle.remove()
    quantize(model, RTN(bits=4, group=32, dtype="float32"), progress=False)
    q = fused.fused_args(model.layers[0].attn.wqkv, torch.float32, ops.MAX_ROWS)
    assert q.kind is ops.LinearKind.QUANT and q.bits == 4 and q.group == 32
    assert q.meta() == [int(ops.LinearKind.QUANT), 4, 32]
    assert fused.fused_args(model.layers[0].attn.wqkv, torch.float32, ops.MAX_ROWS + 1) is None


@needs_native
def test_adaptive_one_row_products_run_on_the_runtime_native_kernel(tiny_dirs, monkeypatch):
    """adaptive.runtime.gemv (skipped layers' K/V projection, routed FFNs, dense input-sparse rows)
    runs on leanlm's small-row kernel, as the dense model's Linear does, and gives its results."""
    from leanlm.adaptive import runtime as adaptive_runtime
    from leanlm.model import load_model

    calls = []
    small_linear = ops.small_linear

    def counting(*args, **kwargs):
        calls.append(1)
        return small_linear(*args, **kwargs)

    monkeypatch.setattr(ops, "small_linear", counting)
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1, 48, generator=g), torch.randn(24, 48, generator=g), torch.randn(24, generator=g)
    with torch.inference_mode():
        y = adaptive_runtime.gemv(x, w, b)
    assert calls and torch.allclose(y, F.linear(x, w, b), atol=1e-5)
    model = load_model(tiny_dirs["llama"])
    calls.clear()
    h = torch.randn(1, 1, 48, generator=g)
    with torch.inference_mode():
        kv = adaptive_runtime.kv_projection(model.layers[0].attn, h)
    q_dim = model.layers[0].attn.split[0]
    assert calls and torch.allclose(kv, model.layers[0].attn.wqkv(h)[..., q_dim:], atol=1e-5)


@pytest.mark.skipif(not ops.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("bits,group,symmetric", [(8, 0, True), (4, 128, False), (4, 64, True)])
def test_q_linear_vnni_copy_equals_portable_path(bits, group, symmetric):
    """qlinear's VNNI copy (its own target attribute, used where the CPU has VNNI) and the portable path give
    the same integer sums, so the same outputs bit for bit, for 1 to 16 rows."""
    from leanlm.quant import RTN
    from leanlm.quant.packed import QuantLinear
    from leanlm.quant.pipeline import rtn_rows

    cpu = native.cpu_flags()
    if not {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= cpu:
        pytest.skip("this CPU has no AVX512-VNNI: only the portable path runs")
    torch.manual_seed(0)
    w = torch.randn(96, 256)
    lin = QuantLinear(rtn_rows(w, RTN(bits=bits, group=group, symmetric=symmetric).spec))
    if lin.backend != "native":
        pytest.skip("QuantLinear is not on the native backend here")
    lib = native.extension()
    for rows in (1, 3, 16):
        x = torch.randn(rows, 256)
        fast = lin(x)
        old = lib.set_q_linear_vnni(False)
        try:
            portable = lin(x)
        finally:
            lib.set_q_linear_vnni(old)
        assert torch.equal(fast, portable), (bits, group, rows)


@pytest.mark.skipif(not ops.available(), reason="native kernels unavailable")
def test_small_linear_bf16_dot_path_is_batch_invariant_and_close_to_widening():
    """bf16 x bf16 products on vdpbf16ps (where the CPU has AVX512-BF16, when turned on): a k-row call equals k one-row calls bit
    for bit (speculative verification stays exact), and the results match the fp32-widening path to fp32 rounding."""
    if "avx512_bf16" not in native.cpu_flags():
        pytest.skip("this CPU has no AVX512-BF16: only the widening path runs")
    lib = native.extension()
    default = lib.set_small_bf16(True)  # off by default (slower at batch 1 here); its arithmetic is tested on
    try:
        _check_bf16_dot_path(lib)
    finally:
        lib.set_small_bf16(default)


def _check_bf16_dot_path(lib):
    g = torch.Generator().manual_seed(0)
    for K in (896, 70):  # whole 32-column chunks, and a masked tail
        w = torch.randn(133, K, generator=g).to(torch.bfloat16)
        b = torch.randn(133, generator=g)
        x = torch.randn(16, K, generator=g).to(torch.bfloat16)
        for rows in (1, 2, 3, 5, 16):
            many = lib.small_linear(x[:rows], w, b)
            ones = torch.cat([lib.small_linear(x[i : i + 1], w, b) for i in range(rows)])
            assert torch.equal(many, ones), (K, rows)
        old = lib.set_small_bf16(False)
        try:
            widened = lib.small_linear(x, w, b)
        finally:
            lib.set_small_bf16(old)
        fast = lib.small_linear(x, w, b)
        ref = F.linear(x.float(), w.float(), b)
        assert torch.allclose(fast.float(), ref, atol=0.05, rtol=0.02) and torch.allclose(widened.float(), ref, atol=0.05, rtol=0.02)
