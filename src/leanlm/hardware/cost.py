"""Roofline cost of the leanlm runtime for a model + compression plan on a hardware profile.

Every op of a forward pass is priced as max(bytes / bandwidth, flops / throughput), plus the
fixed per-layer and per-step overheads of the profile (op dispatch / kernel launches) and a
per-layer cost per extra row for multi-token forwards (elementwise work the roofline misses). The
ops are the runtime's own: fused qkv, o, fused gate_up, down projections per layer (with the
layer's own widths, so pruned shapes count), attention over the (possibly windowed) KV cache,
and the LM head (last position only at prefill, as the runtime does).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import LeanlmError
from ..model.config import ModelConfig
from .profiles import HardwareProfile

# int3 / int5 / int6: the 3-bit table grids and the 5- / 6-bit signed integer tables (codebook.py)
BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int6": 6, "int5": 5, "int4": 4, "int3": 3}


@dataclass
class Plan:
    """What a recipe does to the cost (shapes come from the model config itself). Each method's config
    fills in its part with `config.price(plan)`; `leanlm.apply.plan_for(model, configs)` builds one."""

    weight_dtype: str = "fp32"  # storage of linear weights: fp32 | bf16 | fp16 | int8 | int6 | int5 | int4 | int3 | fp8
    compute_dtype: str = "fp32"  # activations / matmul dtype
    group_size: int | None = None  # quantization group (adds scale/zero bytes)
    layer_weight_dtype: dict[int, str] = field(default_factory=dict)  # mixed precision overrides
    embed_dtype: str | None = None  # LM head / embedding storage (None: as compute_dtype)
    sparsity: float = 0.0  # fraction of linear weights pruned
    sparsity_pattern: str = "none"  # none | unstructured | 2:4 | 4:8
    dense_ops: list[str] = field(default_factory=list)  # linears left dense under the pattern (`layers.3.mlp.w_down`)
    activation_sparsity: float = 0.0  # fraction of MLP inputs skipped (input-sparse GEMV)
    kv_dtype: str | None = None  # None: compute dtype
    kv_window: int | None = None  # tokens kept per layer (sinks + window / eviction budget)
    kv_pool_group: int | None = None  # pooled-global (TGA): + one pooled key per group of older tokens
    kv_attend: int | None = None  # keys a decode query attends over, all kept (query-aware sparse attention)
    kv_scan: float = 0.0  # rows read per visible key to choose them, in K rows (top-k: 1; Quest: its page bounds)
    spec_accepted: float = 1.0  # mean tokens emitted per target forward (speculative decoding)
    spec_draft_cost: float = 0.0  # draft cost per target step, as a fraction of a target step

    def validate(self) -> "Plan":
        for d in (self.weight_dtype, self.compute_dtype, self.kv_dtype or "fp32", self.embed_dtype or "fp32",
                  *self.layer_weight_dtype.values()):  # fmt: skip
            if d not in BITS:
                raise LeanlmError(f"unknown dtype '{d}' in cost plan; use one of {', '.join(BITS)}")
        if not 0 <= self.sparsity < 1 or not 0 <= self.activation_sparsity < 1:
            raise LeanlmError("sparsity and activation_sparsity must be in [0, 1)")
        if self.sparsity_pattern not in ("none", "unstructured", "2:4", "4:8"):
            raise LeanlmError(f"unknown sparsity pattern '{self.sparsity_pattern}' (none, unstructured, 2:4, 4:8)")
        return self


@dataclass
class OpCost:
    name: str
    bytes: float
    flops: float
    seconds: float


def _weight_bytes(params: float, dtype: str, group: int | None) -> float:
    b = params * BITS[dtype] / 8
    if dtype.startswith("int"):
        b += params / (group or 1_000_000) * 4  # a bf16 scale (+ zero) per group
    return b


def _linear(hw: HardwareProfile, plan: Plan, name: str, n_in: int, n_out: int, rows: int,
            dtype: str, input_sparsity: float = 0.0) -> OpCost:  # fmt: skip
    params = n_in * n_out * (1 - input_sparsity)
    dense_bytes = _weight_bytes(params, dtype, plan.group_size)
    flops = 2 * params * rows
    # weight-only quantization: low-bit weights are widened, the math runs in the compute dtype
    # (at the measured rate of the quantized layer's multi-row path, where calibrated)
    bytes_, flop_rate = dense_bytes, hw.flops(plan.compute_dtype)
    if rows > 8 and dtype in hw.weight_only_tflops:  # up to 8 rows run the GEMV kernel
        flop_rate = hw.weight_only_tflops[dtype] * 1e12
    if name in plan.dense_ops:
        pass  # left dense by the method (MaskLLM's cost-aware choice): priced as stored
    elif plan.sparsity_pattern in ("2:4", "4:8") and plan.sparsity:
        # N:M: values + 2-bit indices stream; tensor cores run at nm_sparse_speedup
        bytes_ = dense_bytes * (1 - plan.sparsity) * (1 + 2 / BITS[dtype])
        if hw.nm_sparse_speedup > 1:
            flops /= hw.nm_sparse_speedup
        else:
            bytes_ = dense_bytes  # no sparse kernel: stored dense
    elif plan.sparsity_pattern == "unstructured" and plan.sparsity >= hw.unstructured_sparse_min:
        bytes_ = dense_bytes * (1 - plan.sparsity) * (1 + 32 / BITS[dtype])  # values + int32 column index
        flops *= 1 - plan.sparsity
    seconds = max(bytes_ / hw.bandwidth(dtype), flops / flop_rate)
    return OpCost(name, bytes_, flops, seconds)


def forward_cost(cfg: ModelConfig, hw: HardwareProfile, plan: Plan, batch: int, new_tokens: int,
                 context: int, last_only: bool) -> list[OpCost]:  # fmt: skip
    """Op costs of one forward of `new_tokens` per sequence with `context` tokens visible."""
    plan.validate()
    rows = batch * new_tokens
    kv_bytes = BITS[plan.kv_dtype or plan.compute_dtype] / 8
    act_bytes = BITS[plan.compute_dtype] / 8
    ops: list[OpCost] = []
    for i, l in enumerate(cfg.layers):
        dtype = plan.layer_weight_dtype.get(i, plan.weight_dtype)
        D, q, kv = cfg.hidden_size, l.n_heads * l.head_dim, l.n_kv_heads * l.head_dim
        ops.append(_linear(hw, plan, f"layers.{i}.attn.wqkv", D, q + 2 * kv, rows, dtype))
        ops.append(_linear(hw, plan, f"layers.{i}.attn.wo", q, D, rows, dtype))
        ops.append(_linear(hw, plan, f"layers.{i}.mlp.w_gate_up", D, 2 * l.ffn_dim, rows, dtype))
        ops.append(_linear(hw, plan, f"layers.{i}.mlp.w_down", l.ffn_dim, D, rows, dtype, plan.activation_sparsity))
        window = min(x for x in (l.sliding_window, plan.kv_window, context) if x)
        if plan.kv_pool_group and not l.sliding_window:  # TGA: the window + the pooled groups before it
            window += max(0, context - window) // plan.kv_pool_group
        # causal prefill sees on average half of the new tokens
        keys = window if new_tokens == 1 else min(window, context - new_tokens / 2)
        read = 2 * keys  # K and V rows read per sequence
        if plan.kv_attend and new_tokens <= 16:  # sparse decode: the chosen keys' K and V, and the selection scan
            scan = plan.kv_scan * keys
            keys = min(keys, plan.kv_attend)
            read = 2 * keys + scan
        att_flops = 4 * batch * new_tokens * (read / 2) * l.n_heads * l.head_dim
        att_bytes = batch * read * kv * kv_bytes + rows * (q + 2 * kv) * act_bytes
        ops.append(OpCost(f"layers.{i}.attn.sdpa", att_bytes, att_flops,
                          max(att_bytes / hw.bandwidth("fp32"), att_flops / hw.flops(plan.compute_dtype))))  # fmt: skip
        ops.append(OpCost(f"layers.{i}.overhead", 0, 0, (hw.layer_overhead_us + (rows - 1) * hw.token_overhead_us) * 1e-6))
    head_rows = batch if last_only else rows
    ops.append(_linear(hw, Plan(compute_dtype=plan.compute_dtype), "lm_head", cfg.hidden_size, cfg.vocab_size,
                       head_rows, plan.embed_dtype or plan.compute_dtype))  # fmt: skip
    ops.append(OpCost("step.overhead", 0, 0, hw.step_overhead_us * 1e-6))
    return ops


def estimate(cfg: ModelConfig, hw: HardwareProfile, plan: Plan | None = None, batch: int = 1,
             prompt_len: int = 512, context: int = 512) -> dict:  # fmt: skip
    """Predicted prefill/decode speed, memory, energy and $ per 1M generated tokens."""
    plan = (plan or Plan()).validate()
    prefill = forward_cost(cfg, hw, plan, batch, prompt_len, prompt_len, last_only=True)
    decode = forward_cost(cfg, hw, plan, batch, 1, context, last_only=False)
    t_prefill = sum(o.seconds for o in prefill)
    t_step = sum(o.seconds for o in decode)
    # speculative decoding: each target step emits spec_accepted tokens and pays for the drafts
    t_token = t_step * (1 + plan.spec_draft_cost) / (plan.spec_accepted * batch)
    weights = sum(o.bytes for o in decode if o.name.endswith(("wqkv", "wo", "gate_up", "down")))
    weights += cfg.vocab_size * cfg.hidden_size * BITS[plan.embed_dtype or plan.compute_dtype] / 8
    kv_per_token = sum(2 * l.n_kv_heads * l.head_dim for l in cfg.layers) * BITS[plan.kv_dtype or plan.compute_dtype] / 8
    kv_tokens = min(context, plan.kv_window) if plan.kv_window else context
    if plan.kv_window and plan.kv_pool_group:
        kv_tokens += max(0, context - plan.kv_window) // plan.kv_pool_group
    bottleneck = max(decode, key=lambda o: o.seconds)
    return {
        "hardware": hw.name,
        "plan": asdict(plan),
        "batch": batch,
        "prompt_len": prompt_len,
        "context": context,
        "prefill_tok_s": batch * prompt_len / t_prefill,
        "decode_tok_s": 1 / t_token,
        "decode_step_ms": t_step * 1e3,
        "memory_gb": (weights + batch * kv_tokens * kv_per_token) / 1e9,
        "weight_mb": weights / 2**20,
        "kv_bytes_per_token": kv_per_token,
        "fits": (weights + batch * kv_tokens * kv_per_token) / 1e9 <= hw.mem_gb,
        "energy_j_per_token": hw.power_w * t_token,
        "usd_per_1m_tokens": hw.price_per_hour / 3600 * t_token * 1e6 if hw.price_per_hour else None,
        "decode_breakdown_ms": _breakdown(decode),
        "largest_decode_op": bottleneck.name,
    }


def _breakdown(ops: list[OpCost]) -> dict[str, float]:
    out: dict[str, float] = {}
    for o in ops:
        kind = o.name.split(".")[-1]
        out[kind] = out.get(kind, 0.0) + o.seconds * 1e3
    return out
