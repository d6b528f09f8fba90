"""`quantize(model, config, calib_tokens)`: the one entry point for every method.

Steps: pick the Linears to quantize (decoder-layer wqkv / wo / gate_up / down minus `skip`),
optionally assign per-layer bits from measured sensitivity, quantize the decoder blocks
(RTN: each weight alone; GPTQ / AWQ: layer-sequentially on calibration activations, each block
optionally reconstructed right after: reconstruct.py), quantize
the LM head and embeddings (RTN) unless kept, and cast what stays unquantized (norms, kept
tables) to the compute dtype. The model is modified in place and returned; the config is recorded
in `model.applied`, and `model.quantization` describes the packed storage (what save.py writes).
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import LeanlmError
from ..model.load import parse_dtype
from ..model.runtime import RotaryTable
from .awq import awq_block, search_clip
from ..apply import record, register
from ..calibration import LINEARS, InputStats, StopForward, collect, get_module, run_sequential, set_module
from .calibrate import sequential_block
from .config import AWQ, GPTQ, QSpec, QuantConfig
from .gptq import gptq
from .mixed import assign_bits, layer_sensitivity
from .codebook import CodebookLinear, codebook_rtn
from .packed import QuantEmbedding, QuantLinear, RowDequantized
from .reconstruct import reconstruct_block
from .rtn import QuantizedWeight, rtn
from .tune import tune_grids


def quantizable(model, skip: list[str] = ()) -> list[str]:
    """Names of the decoder-layer Linear modules that are still full precision."""
    names = []
    for i, layer in enumerate(model.layers):
        for lin in LINEARS:
            name = f"layers.{i}.{lin}"
            if isinstance(get_module(layer, lin), nn.Linear) and not any(s in name for s in skip):
                names.append(name)
    return names


def by_rows(w: torch.Tensor, quantize_rows, chunk: int = 16384) -> QuantizedWeight:
    """quantize_rows(rows) -> QuantizedWeight over a tall matrix (embedding tables, the LM head) in row chunks, to
    bound the fp32 working copies; every method used here rounds rows independently (a fixed table for tables), so
    the result equals one call."""
    parts = [quantize_rows(w[i : i + chunk]) for i in range(0, w.shape[0], chunk)]
    if len(parts) == 1:
        return parts[0]
    zero = None if parts[0].zero is None else torch.cat([p.zero for p in parts])
    return QuantizedWeight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), zero, parts[0].spec,
                           w.shape[1], table=parts[0].table)  # fmt: skip


def rtn_rows(w: torch.Tensor, spec: QSpec) -> QuantizedWeight:
    """RTN of a tall matrix in row chunks (by_rows)."""
    return by_rows(w, lambda rows: rtn(rows, spec))


def head_spec(bits: int, config: QuantConfig) -> QSpec:
    """The (uniform) spec of the LM head / embeddings at `bits` (QuantConfig.head_group says which group)."""
    if bits == 8:
        group = config.head_group if config.head_group is not None else config.group if config.bits == 8 else 0
        return QSpec(8, group, True)
    group = config.head_group if config.head_group is not None else config.group or 128
    return QSpec(4, group, config.symmetric)


def untied_head_spec(config: QuantConfig) -> QSpec:
    """The untied LM head's spec: head_spec, on IQ4_NL's table at 4 bits when the decoder is on a table grid (a
    fixed table: the head is rounded in row chunks, which one learned table cannot span); at 5 or 6 bits the signed
    integer table (g32 unless head_group says otherwise)."""
    if config.head_bits in (5, 6):
        return QSpec(config.head_bits, config.head_group or 32, True, "signed")
    spec = head_spec(config.head_bits, config)
    if spec.bits == 4 and config.spec.codebook:
        return QSpec(4, spec.group, True, "iq4nl")
    return spec


def head_hessian(model, hidden: list[torch.Tensor]) -> torch.Tensor:
    """Mean x x^T of the LM head's inputs (the final norm of the calibration windows' last hidden states)."""
    stats = InputStats(model.lm_head, stop=True)
    try:
        with torch.no_grad():
            for h in hidden:
                try:
                    model.logits(h)
                except StopForward:
                    pass
    finally:
        stats.remove()
    return stats.hessian()


def make_linear(qw: QuantizedWeight, bias=None) -> QuantLinear | CodebookLinear:
    """The packed module of a quantized weight: CodebookLinear for table grids, QuantLinear otherwise."""
    return CodebookLinear(qw, bias) if qw.table is not None else QuantLinear(qw, bias)


def _meta(m: QuantLinear | CodebookLinear) -> dict:
    meta = {"bits": m.spec.bits, "group": m.spec.group, "symmetric": m.spec.symmetric,
            "in_features": m.in_features, "out_features": m.out_features}  # fmt: skip
    if m.spec.codebook:
        meta["levels"] = m.spec.levels
    return meta


def average_bits(layers: dict) -> float:
    """Storage bits per weight (codes, scales, zeros, padding) over the given layer metadata."""
    total = bits = 0.0
    for m in layers.values():
        if "bits" in m:
            n = m["in_features"] * m["out_features"]
            bits += QSpec(m["bits"], m["group"], m["symmetric"]).bits_per_weight(m["in_features"]) * n
            total += n
    return bits / max(total, 1)


def quantize_head(model, config: QuantConfig, dtype: torch.dtype, layers: dict, hidden=None) -> None:
    """LM head and embeddings; hidden: the calibration windows' final hidden states (GPTQ rounds a 4-bit untied
    head on them)."""
    emb = model.tok_embeddings
    if model.lm_head is None:  # tied: one table for lookup and head
        if config.head_bits and isinstance(emb, nn.Embedding):
            table = QuantLinear(rtn_rows(emb.weight.data, head_spec(config.head_bits, config)))
            model.lm_head = table
            model.tok_embeddings = QuantEmbedding(table, dtype)
            layers["lm_head"] = _meta(table)
            layers["tok_embeddings"] = {"shared_with": "lm_head"}
        return
    if config.head_bits and isinstance(model.lm_head, nn.Linear):
        head, spec = model.lm_head, untied_head_spec(config)
        if hidden is not None and spec.bits in (4, 5, 6) and getattr(config, "head_gptq", False):
            H = head_hessian(model, hidden)
            qw = by_rows(head.weight.data, lambda rows: gptq(rows, H, spec, config.damp, config.block_size,
                                                             config.act_order))  # fmt: skip
        elif spec.codebook:
            qw = by_rows(head.weight.data, lambda rows: codebook_rtn(rows.float(), spec))
        else:
            qw = rtn_rows(head.weight.data, spec)
        model.lm_head = make_linear(qw, head.bias)
        layers["lm_head"] = _meta(model.lm_head)
    if config.embed_bits and isinstance(emb, nn.Embedding):
        table = QuantLinear(rtn_rows(emb.weight.data, head_spec(config.embed_bits, config)))
        model.tok_embeddings = QuantEmbedding(table, dtype)
        layers["tok_embeddings"] = _meta(table)


def cast_unquantized(model, dtype: torch.dtype) -> None:
    """Cast float parameters/buffers outside the packed modules (and rotary tables) to dtype."""
    for m in model.modules():
        if isinstance(m, (QuantLinear, CodebookLinear, RotaryTable)):
            continue
        for _, p in m.named_parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point():
                setattr(m, name, b.to(dtype))


def quantize(model, config: QuantConfig, calib_tokens: torch.Tensor | None = None, progress: bool = True,
             batch_size: int = 4, tune_tokens: torch.Tensor | None = None):  # fmt: skip
    """Quantize `model` in place with `config` (RTN, GPTQ or AWQ); returns the model.

    calib_tokens: [n, seq_len] token ids (see calibration_tokens); required by GPTQ, AWQ,
    mixed precision and grid tuning. Calibration runs in float32 whatever the model's dtype.
    tune_tokens: windows for grid tuning (config.tune_steps > 0); default calib_tokens.
    batch_size: calibration windows per block forward. 4 x 512 tokens keeps the MLP's widest intermediate small
    (the 1.5B's gate/up output for 16 windows is 587 MB in fp32) at the same GEMM efficiency.
    """
    model.set_decode_layout(False)  # row-major weights: the rows this code slices and views
    config.validate()
    if getattr(model, "quantization", None):
        raise LeanlmError("this model is already quantized; load the original checkpoint to quantize it again")
    if model.lm_head is None and config.head_bits in (5, 6):  # (checked before the decoder's minutes of work)
        raise LeanlmError(f"head_bits={config.head_bits} exists for untied LM heads only (the embedding lookup of a "
                          "tied table reads int8 or int4 tables); use head_bits 8 or 4 on this model")  # fmt: skip
    needs_calib = (isinstance(config, (GPTQ, AWQ)) or config.mixed is not None
                   or (config.tune_steps and tune_tokens is None))  # fmt: skip
    if needs_calib and (calib_tokens is None or calib_tokens.numel() == 0):
        raise LeanlmError(f"{config.method} needs calibration tokens (e.g. --calib wikitext2-valid)")
    dtype = parse_dtype(config.dtype)
    t0 = time.perf_counter()
    # A bf16 model is not copied to fp32 as a whole: GPTQ / AWQ cast one block at a time (run_sequential's
    # block_dtype) and RTN widens one weight at a time, so the peak holds the bf16 model plus one fp32 block (the
    # 1.5B: 3.1 GB, not 6.2 GB) and the codes equal those of an fp32 load of the same weights. The embedding lookup
    # stays in the model's dtype (its output is widened). Mixed precision and grid tuning need the whole fp32 model.
    per_block_fp32 = model.dtype != torch.float32 and config.mixed is None and not config.tune_steps
    if model.dtype != torch.float32 and not per_block_fp32:
        cast_unquantized(model, torch.float32)
    names = quantizable(model, config.skip)
    if not names:
        raise LeanlmError("nothing to quantize: no full-precision Linear left (check --skip)")
    teacher = copy.deepcopy(model) if config.tune_steps else None  # grid tuning distils towards this
    shapes = {n: (get_module(model, n).out_features, get_module(model, n).in_features) for n in names}
    specs = {n: config.spec for n in names}
    for n in names:
        config.spec.validate(shapes[n][1], config.pad, n)
    report: dict = {}

    if config.mixed is not None:
        mx = config.mixed
        kl_tokens = calib_tokens[: mx.kl_samples, : mx.kl_seq_len]
        t1 = time.perf_counter()
        if mx.sensitivity is not None:
            missing = sorted(set(names) - set(mx.sensitivity))
            if missing:
                raise LeanlmError(f"mixed precision: the given sensitivity lacks {len(missing)} Linear(s) of this "
                                  f"model (e.g. {missing[0]}); measure it on this model (sensitivity=None)")  # fmt: skip
            sens = {n: float(mx.sensitivity[n]) for n in names}
        else:
            sens = layer_sensitivity(model, kl_tokens, names, mx.probe or config.spec, progress)
        specs, avg = assign_bits(sens, shapes, config.spec, mx.high, mx.target_bits)
        report["mixed"] = {"sensitivity_kl": sens, "high": [n for n in names if specs[n] != config.spec],
                           "avg_bits_per_weight": avg, "seconds": time.perf_counter() - t1}  # fmt: skip
        for n in names:
            specs[n].validate(shapes[n][1], config.pad, n)

    layers: dict = {}
    residuals: dict = {}  # learnable rounding starts from each weight's rounding error
    # block reconstruction trains the installed Linears, so a held weight would go stale there
    calibrating = isinstance(config, (GPTQ, AWQ)) and not config.recon_steps

    def install(root, prefix: str, lin: str, qw: QuantizedWeight, bias) -> None:
        module = make_linear(qw, None if bias is None else bias.data)
        if calibrating and isinstance(module, CodebookLinear):
            # the block's next calibration forwards run through it (released after the block): a table grid has no
            # multi-row kernel, so each of them would dequantize it again; uniform grids run the int8 GEMM instead
            module.hold_weight()
        set_module(root, lin, module)
        layers[prefix + lin] = _meta(module)
        if (config.tune_codes or config.recon_steps) and qw.residual is not None:
            residuals[prefix + lin] = qw.residual

    if isinstance(config, GPTQ) or isinstance(config, AWQ):
        by_block: dict[int, dict[str, QSpec]] = {}
        for n, s in specs.items():
            _, i, lin = n.split(".", 2)
            by_block.setdefault(int(i), {})[lin] = s

        fp_stream: list = []  # block reconstruction: the unquantized model's inputs to block i

        def per_block(i, layer, xs, rope, dtype_):
            try:
                return per_block_held(i, layer, xs, rope, dtype_)
            finally:
                for m in layer.modules():
                    if isinstance(m, RowDequantized):
                        m.release_weight()

        def per_block_held(i, layer, xs, rope, dtype_):
            if not config.recon_steps:
                return quantize_block(i, layer, xs, rope, dtype_)
            fp_layer = copy.deepcopy(layer)  # before AWQ folds its scales or any Linear is swapped
            xfp = fp_stream.pop() if fp_stream else xs
            out = quantize_block(i, layer, xs, rope, dtype_)
            yfp = [fp_layer(x, rope, 0, dtype_) for x in xfp]
            if by_block.get(i):
                prefix = f"layers.{i}."
                mine = {n.removeprefix(prefix): residuals.pop(n) for n in list(residuals) if n.startswith(prefix)}
                report.setdefault("recon", {})[i] = reconstruct_block(
                    layer, xs, yfp, rope, dtype_, mine, config.recon_steps, config.recon_lr, config.recon_batch,
                    loss=config.recon_loss)  # fmt: skip
                out = None  # the block changed: run_sequential recomputes its outputs
            fp_stream.append(yfp)
            return out

        def quantize_block(i, layer, xs, rope, dtype_):
            local = by_block.get(i, {})
            if not local:
                return
            prefix = f"layers.{i}."
            if isinstance(config, AWQ):
                stats = collect(layer, list(local), xs, rope, dtype_)
                stats = {n: (h.hessian(), h.act_mean()) for n, h in stats.items()}
                report.setdefault("awq", {})[i] = awq_block(
                    layer, stats, local, config, lambda lin, qw, bias: install(layer, prefix, lin, qw, bias))
                return
            def quantize_one(n, stats):
                lin = get_module(layer, n)
                H = stats.hessian()
                shrink = search_clip(lin.weight.data.float(), H, local[n], config.clip_grid, config.max_shrink) \
                    if config.clip else None  # fmt: skip
                qw = gptq(lin.weight.data, H, local[n], config.damp, config.block_size, config.act_order, shrink,
                          overwrite_h=True)  # H was handed over by stats.hessian()
                install(layer, prefix, n, qw, lin.bias)

            if config.true_sequential:
                out = sequential_block(layer, xs, rope, dtype_, list(local), quantize_one)
                if out is not None:
                    return out
            # generic path: hooks, one forward per stage (cut after the stage's last Linear)
            stages = [[n] for n in LINEARS] if config.true_sequential else [list(LINEARS)]
            for stage in stages:
                todo = [n for n in stage if n in local]
                if not todo:
                    continue
                stats = collect(layer, todo, xs, rope, dtype_)
                for n in todo:
                    quantize_one(n, stats[n])

        hidden = run_sequential(model, calib_tokens, per_block, batch_size, progress, desc=config.method,
                                block_dtype=torch.float32 if per_block_fp32 else None)  # fmt: skip
    else:
        hidden = None
        for n in tqdm(names, desc="rtn", disable=not progress, leave=False):
            lin = get_module(model, n)
            install(model, "", n, rtn(lin.weight.data, specs[n], residual=config.tune_codes), lin.bias)

    quantize_head(model, config, dtype, layers, hidden)
    del hidden
    if teacher is not None:
        tokens = calib_tokens if tune_tokens is None else tune_tokens
        report["tune"] = tune_grids(model, teacher, tokens, config.tune_steps, config.tune_lr, config.tune_batch,
                                    progress=progress, codes=residuals if config.tune_codes else None,
                                    codes_lr=config.tune_codes_lr)  # fmt: skip
        residuals.clear()
        del teacher
    cast_unquantized(model, dtype)
    seconds = time.perf_counter() - t0
    bits = average_bits({n: m for n, m in layers.items() if n.startswith("layers.")})
    model.quantization = {"format": 1, "config": config.to_dict(), "layers": layers, "dtype": str(dtype).removeprefix("torch."),
                          "seconds": seconds, "bits_per_weight": bits, "report": report}  # fmt: skip
    record(model, config, {"bits_per_weight": bits, "dtype": model.quantization["dtype"]})
    return model


@register(QuantConfig)
def _apply_quantization(model, cfg: QuantConfig, calib, progress: bool) -> dict:
    """leanlm.apply: RTN / GPTQ / AWQ (and mixed precision, grid tuning) on the calibration windows."""
    quantize(model, cfg, None if calib is None else calib.tokens(), progress=progress)
    q = model.quantization
    return {"bits_per_weight": q["bits_per_weight"], "dtype": q["dtype"], "report": q["report"]}
