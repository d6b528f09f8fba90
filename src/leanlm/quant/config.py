"""Quantization configs: small dataclasses in the torchao style, `quantize(model, GPTQ(bits=4, group=128), calib)`.

A `QSpec` says how one weight matrix is stored: `bits` (4 or 8; 3 on table grids), `group` (input columns sharing
one scale; 0 = one scale per output channel) and `symmetric`. The grid of a group is

    w_hat = (q - 2**(bits-1)) * scale + zero,   q in [0, 2**bits - 1]

with `zero` = 0 when symmetric. `scale` and `zero` are bfloat16, the format torch's CPU
int4/int8 kernels consume, so the grid used while quantizing is exactly the one the kernels
compute with. When `group` does not divide a layer's in_features, the last group is shorter:
the weight is stored zero-padded to a whole group and the input is zero-padded at run time
(`pad=False` refuses such layers instead).

`levels` picks non-uniform grids instead (codebook.py): w_hat = scale * T[q], T a table of 2**bits int8 values per
tensor, one bf16 scale per group and no zero. At 4 bits: "iq4nl" (llama.cpp IQ4_NL's fixed table) or "learned"
(fitted to each tensor's weights); at 3 bits: "iq3" (a fixed 8-level table, codebook.IQ3) or "learned". Their bits
per weight equal a symmetric uniform grid's: bits + 16 / group (4.5 / 3.5 at g32, 4.25 / 3.25 at g64; plus the
table's 16 or 8 bytes per tensor). 3 bits exist on table grids only (no uniform 3-bit grid). "signed" is the table
of all 2**bits signed integers, -2**(bits-1) .. 2**(bits-1) - 1 (the grid of llama.cpp's Q4_0 / Q5_0: unlike the
symmetric uniform grid it uses the code -2**(bits-1) too, for the group's largest weight when it is negative), at 3
to 6 bits: 5.5 and 6.5 bpw at g32, the tiers between the 4-bit grids and int8.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..errors import LeanlmError

BITS = (4, 8)  # uniform grids
TABLE_BITS = (3, 4, 5, 6)  # table grids (codebook.py): 5 and 6 on the "signed" table only
GROUPS = (0, 32, 64, 128, 256)
METHODS = ("rtn", "gptq", "awq")
LEVELS = ("uniform", "iq4nl", "iq3", "learned", "signed")  # uniform integer levels; codebook.py's tables
FIXED_TABLE_BITS = {"iq4nl": 4, "iq3": 3}  # the bits of each fixed table ("learned" fits 3 or 4)
LEVEL_BITS = {"iq4nl": (4,), "iq3": (3,), "learned": (3, 4), "signed": (3, 4, 5, 6)}  # the bits each table takes


@dataclass(frozen=True)
class QSpec:
    bits: int = 4
    group: int = 128  # 0 = per output channel
    symmetric: bool = False
    levels: str = "uniform"  # LEVELS: "uniform", or a table (codebook.py)

    @property
    def codebook(self) -> bool:
        return self.levels != "uniform"

    @property
    def mid(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def group_size(self, in_features: int) -> int:
        return self.group or in_features

    def n_groups(self, in_features: int) -> int:
        g = self.group_size(in_features)
        return -(-in_features // g)

    def padded(self, in_features: int) -> int:
        return self.n_groups(in_features) * self.group_size(in_features)

    def bits_per_weight(self, in_features: int) -> float:
        """Storage bits per weight including bf16 scales (and zeros) and group padding."""
        per_group = 16 * (1 if self.symmetric else 2)
        return (self.bits * self.padded(in_features) + per_group * self.n_groups(in_features)) / in_features

    def validate(self, in_features: int | None = None, pad: bool = True, name: str = "weight") -> "QSpec":
        if self.levels not in LEVELS:
            raise LeanlmError(f"levels={self.levels!r} is not supported; use one of {', '.join(LEVELS)}")
        if self.bits == 3 and not self.codebook:
            raise LeanlmError("bits=3 exists on table grids only (no uniform 3-bit grid): use levels='iq3' or "
                              "'learned' (--levels) with symmetric=True (--sym), or bits=4 / 8")  # fmt: skip
        fixed = FIXED_TABLE_BITS.get(self.levels)
        if fixed is not None and self.bits != fixed:
            other = next((n for n, b in FIXED_TABLE_BITS.items() if b == self.bits), None)
            hint = f", or levels {other!r} / 'learned' at {self.bits} bits" if other else ""
            raise LeanlmError(f"levels {self.levels!r} is a {fixed}-bit table, got bits={self.bits}; use bits={fixed}{hint}")
        if self.bits not in (TABLE_BITS if self.codebook else BITS):
            raise LeanlmError(f"bits={self.bits} is not supported; use 4 or 8 (uniform grids), 3 or 4 on a table "
                              "grid (levels 'iq3' / 'iq4nl' / 'learned'), or 3 to 6 on levels='signed'")  # fmt: skip
        if self.codebook and self.bits not in LEVEL_BITS[self.levels]:
            hint = "; 5 and 6 bits exist on levels='signed' only" if self.bits in (5, 6) else ""
            raise LeanlmError(f"levels {self.levels!r} takes bits {' / '.join(map(str, LEVEL_BITS[self.levels]))}, got "
                              f"bits={self.bits}{hint}")  # fmt: skip
        if self.group not in GROUPS:
            raise LeanlmError(f"group={self.group} is not supported; use 32, 64, 128, 256 or 0 (per output channel)")
        if self.codebook and (not self.symmetric or not self.group):
            raise LeanlmError(f"levels {self.levels!r} is a {self.bits}-bit table with one scale per group and no "
                              f"zero: use symmetric=True (--sym) and a group of 32, 64, 128 or 256, got "
                              f"symmetric={self.symmetric}, group={self.group}")  # fmt: skip
        if in_features is not None and self.group and in_features % self.group and not pad:
            raise LeanlmError(
                f"group {self.group} does not divide in_features {in_features} of {name}; use a group that divides "
                f"it, 0 (per channel), or pad=True (--pad) to store a shorter last group zero-padded"
            )
        return self

    def label(self) -> str:
        g = f"g{self.group}" if self.group else "pc"
        if self.codebook:
            return f"cb{self.bits}-{self.levels}-{g}"
        return f"int{self.bits}-{g}-{'sym' if self.symmetric else 'asym'}"


@dataclass
class MixedPrecision:
    """Per-layer bit widths from measured sensitivity, meeting a target average bits/weight.

    Each quantizable Linear is quantized alone at the low spec (RTN) and the KL of the model's
    next-token distribution to the unquantized model is measured on `kl_tokens` calibration
    tokens; layers are then promoted to int8 per channel, most sensitive per stored bit first,
    while the average storage bits/weight of the quantized Linears stays <= `target_bits`.

    probe: the spec each Linear is measured at (None: the low spec). A uniform spec of the same bits is a
        quick stand-in for a table grid, whose scale search costs about 28 rounding passes per Linear.
    sensitivity: {Linear name: KL} measured before (report["mixed"]["sensitivity_kl"] of an earlier run on
        the same model and probe), so several targets on one model measure once; None measures.
    """

    target_bits: float = 5.0
    high: QSpec = field(default_factory=lambda: QSpec(8, 0, True))
    kl_samples: int = 2
    kl_seq_len: int = 256
    probe: QSpec | None = None
    sensitivity: dict[str, float] | None = None


@dataclass
class QuantConfig:
    """Fields shared by every method.

    bits/group/symmetric/levels: the spec of decoder-layer Linears (attn.wqkv, attn.wo, mlp.w_gate_up, mlp.w_down);
        levels "iq4nl" / "iq3" / "learned": a 4-bit (iq4nl) or 3-bit (iq3) table, or one learned per tensor at
        `bits` 4 or 3, instead of uniform levels (codebook.py; RTN or GPTQ, symmetric).
    head_bits: output layer (lm_head) bits, 8 or 4 (round-to-nearest, uniform, symmetric for 8); 0 keeps it in
        `dtype`. For tied embeddings the one table is quantized once and shared by the lookup and the head.
        With a table grid (levels) an untied 4-bit head takes IQ4_NL's table (a fixed one: the head is rounded in
        row chunks, which one learned table cannot span); GPTQ also rounds it (GPTQ.head_gptq). 6 or 5: an untied
        head on the signed integer table (codebook.py) at head_group (default 32), also rounded by GPTQ.
    head_group: the head's (and embeddings') group; None: `group` when the decoder spec is int8 (an int8 g32
        model keeps g32 everywhere, like llama.cpp's Q8_0), else per channel for 8 bits and `group` (or 128)
        for 4 bits.
    embed_bits: untied input embedding table bits (8, 4 or 0 = keep). Ignored for tied models.
    skip: substrings of Linear names to leave unquantized (e.g. ["layers.0."]).
    dtype: compute dtype of the quantized model (bf16 by default: the kernels take bf16 inputs).
    pad: allow a last group shorter than `group` (stored zero-padded); False raises instead.
    mixed: optional MixedPrecision assignment (per-layer 4/8 bits).
    tune_steps: after quantizing, train every group's scale and zero (codes frozen) for this many
        steps of KL distillation to the unquantized model (tune.py); 0 = off. tune_lr / tune_batch:
        its learning rate (on log-scales and zero shifts in scale units) and windows per step.
    tune_codes: during that tuning, also learn each weight's rounding (codes move one step at most;
        tune.py); tune_codes_lr: its learning rate, in code steps.
    recon_steps: GPTQ / AWQ only: after each block is quantized, train its grids and rounding for this
        many steps to reproduce the unquantized block's outputs (reconstruct.py; 0 = off), on
        `recon_batch` calibration windows per step at learning rate `recon_lr`; recon_loss "mse" or
        "channel" (each residual channel's error relative to its mean square).
    """

    bits: int = 4
    group: int = 128
    symmetric: bool = False
    levels: str = "uniform"
    head_bits: int = 8
    head_group: int | None = None
    embed_bits: int = 8
    skip: list[str] = field(default_factory=list)
    dtype: str = "bfloat16"
    pad: bool = True
    mixed: MixedPrecision | None = None
    tune_steps: int = 0
    tune_lr: float = 1e-3
    tune_batch: int = 1
    tune_codes: bool = False
    tune_codes_lr: float = 2e-3
    recon_steps: int = 0
    recon_lr: float = 1e-3
    recon_batch: int = 4
    recon_loss: str = "mse"
    method = "rtn"

    @property
    def spec(self) -> QSpec:
        return QSpec(self.bits, self.group, self.symmetric, self.levels)

    @property
    def needs_calibration(self) -> bool:
        """GPTQ / AWQ, mixed precision and grid tuning learn from calibration windows; plain RTN does not."""
        return self.method != "rtn" or self.mixed is not None or self.tune_steps > 0

    def price(self, plan) -> None:
        """Cost model: low-bit weights streamed, bf16 math, the head / embedding at head_bits."""
        plan.weight_dtype, plan.compute_dtype = f"int{self.bits}", "bf16"
        plan.group_size = self.group or None
        plan.embed_dtype = {8: "int8", 6: "int6", 5: "int5", 4: "int4"}.get(self.head_bits, "bf16")

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        d = dict(d)
        return make_config(d.pop("method", cls.method), **d)

    def validate(self) -> "QuantConfig":
        self.spec.validate()
        if self.head_group is not None and self.head_group not in GROUPS:
            raise LeanlmError(f"head_group={self.head_group} is not supported; use 32, 64, 128, 256 or 0 (per channel)")
        if self.spec.codebook and (self.method == "awq" or self.tune_steps or self.recon_steps):
            raise LeanlmError(f"levels {self.levels!r} is quantized with RTN or GPTQ; AWQ, grid tuning (tune_steps) and "
                              "block reconstruction (recon_steps) train uniform grids only")  # fmt: skip
        if self.head_bits not in (0, 4, 5, 6, 8):
            raise LeanlmError(f"head_bits={self.head_bits} is not supported; use 8, 6, 5, 4 or 0 (keep unquantized)")
        if self.embed_bits not in (0, 4, 8):
            raise LeanlmError(f"embed_bits={self.embed_bits} is not supported; use 8, 4 or 0 (keep unquantized)")
        if self.tune_steps < 0 or self.tune_batch < 1 or not 0 < self.tune_lr < 1:
            raise LeanlmError(f"grid tuning needs tune_steps >= 0, tune_batch >= 1 and 0 < tune_lr < 1, got "
                              f"{self.tune_steps}, {self.tune_batch}, {self.tune_lr}")  # fmt: skip
        if self.tune_codes and not (self.tune_steps and 0 < self.tune_codes_lr < 1):
            raise LeanlmError(f"tune_codes needs tune_steps > 0 and 0 < tune_codes_lr < 1, got {self.tune_steps}, "
                              f"{self.tune_codes_lr}")  # fmt: skip
        if self.recon_steps < 0 or self.recon_batch < 1 or not 0 < self.recon_lr < 1:
            raise LeanlmError(f"block reconstruction needs recon_steps >= 0, recon_batch >= 1 and 0 < recon_lr < 1, "
                              f"got {self.recon_steps}, {self.recon_batch}, {self.recon_lr}")  # fmt: skip
        if self.recon_loss not in ("mse", "channel"):
            raise LeanlmError(f"recon_loss must be 'mse' or 'channel', got {self.recon_loss!r}")
        if self.recon_steps and self.method == "rtn":
            raise LeanlmError("block reconstruction (recon_steps) runs on calibration activations: use GPTQ or AWQ")
        if self.recon_steps and self.tune_codes:
            raise LeanlmError("recon_steps already learns the rounding block by block; drop tune_codes (grid tuning "
                              "with tune_steps may follow it)")  # fmt: skip
        if self.mixed is not None:
            self.mixed.high.validate()
            if self.mixed.probe is not None:
                self.mixed.probe.validate()
            lo, hi = self.spec.bits_per_weight(4096), self.mixed.high.bits_per_weight(4096)
            if not lo <= self.mixed.target_bits:
                raise LeanlmError(f"target_bits={self.mixed.target_bits} is below the low spec's {lo:.2f} bits/weight")
            if hi <= lo:
                raise LeanlmError("mixed precision needs a high spec with more bits than the low spec")
        return self

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["mixed"] = None if self.mixed is None else asdict(self.mixed)
        d["method"] = self.method
        return d


@dataclass
class RTN(QuantConfig):
    """Round to nearest: min/max of each group (no calibration data needed)."""

    method = "rtn"


@dataclass
class GPTQ(QuantConfig):
    """GPTQ (Frantar et al. 2022): column-by-column rounding with Hessian-based error feedback.

    damp: fraction of the mean Hessian diagonal added to the diagonal.
    act_order: quantize columns in order of decreasing Hessian diagonal; group scales are then
        fixed up front from the unmodified weights ("static groups"), so storage and kernels
        stay in natural column order.
    block_size: columns per lazy batch update (rounded to a multiple of the group).
    true_sequential: within a block, quantize wqkv, then wo, gate_up, down, each calibrated on
        inputs that already went through the quantized earlier Linears.
    clip: clip each (row, group) grid by the shrink factor that minimises the group's output error
        (AWQ's clipping search, on this Linear's Hessian); the grids are then static.
    head_gptq: round an untied 4- to 6-bit LM head with GPTQ too, on the final hidden states of the calibration windows
        (its Hessian is hidden x hidden, so it costs seconds). Measured on Qwen2.5-0.5B, the head alone at int4 g32
        RTN costs about half the whole model's KL at 4.5 bits per weight.
    """

    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    true_sequential: bool = True
    clip: bool = False
    clip_grid: int = 20
    max_shrink: float = 0.5
    head_gptq: bool = True
    method = "gptq"

    def validate(self):
        super().validate()
        if not 0 < self.damp < 1:
            raise LeanlmError(f"damp must be in (0, 1), got {self.damp}")
        if self.clip and self.spec.codebook:
            raise LeanlmError(f"levels {self.levels!r} searches each group's scale itself (weighted by the Hessian "
                              "diagonal); drop clip")  # fmt: skip
        if self.clip_grid < 1 or not 0 < self.max_shrink < 1:
            raise LeanlmError(f"GPTQ's clipping search needs clip_grid >= 1 and 0 < max_shrink < 1, got "
                              f"clip_grid={self.clip_grid}, max_shrink={self.max_shrink}")  # fmt: skip
        return self


@dataclass
class AWQ(QuantConfig):
    """AWQ (Lin et al. 2023): per-input-channel scales s = mean|x|^a (a searched on a grid),
    folded into the preceding norm / Linear, chosen to minimise the layer's output error; then
    an optional per-group clipping search. Output errors use the calibration Hessian X^T X,
    so each candidate costs one small matrix product instead of a forward pass.
    gptq: round the scaled (and clipped) weights with GPTQ's error feedback (act-order, static
    groups) instead of to nearest: AWQ + GPTQ.
    """

    grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    gptq: bool = False
    method = "awq"

    def validate(self):
        super().validate()
        if self.grid < 1 or self.clip_grid < 1 or not 0 < self.max_shrink < 1:
            raise LeanlmError("AWQ needs grid >= 1, clip_grid >= 1 and 0 < max_shrink < 1")
        return self


CONFIGS = {"rtn": RTN, "gptq": GPTQ, "awq": AWQ}


def make_config(method: str, **kwargs) -> QuantConfig:
    if method not in CONFIGS:
        raise LeanlmError(f"unknown quantization method '{method}'; use one of: {', '.join(CONFIGS)}")
    names = {f.name for f in fields(CONFIGS[method])}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise LeanlmError(f"unknown option(s) {', '.join(unknown)} for {method}; valid: {', '.join(sorted(names))}")
    mixed = kwargs.get("mixed")
    if isinstance(mixed, (int, float)) and not isinstance(mixed, bool):
        kwargs["mixed"] = MixedPrecision(target_bits=float(mixed))
    elif isinstance(mixed, dict):
        m = dict(mixed)
        for k in ("high", "probe"):
            if isinstance(m.get(k), dict):
                m[k] = QSpec(**m[k])
        try:
            kwargs["mixed"] = MixedPrecision(**m)
        except TypeError as e:
            raise LeanlmError(f"bad mixed-precision settings {mixed!r}: {e}") from e
    return CONFIGS[method](**kwargs).validate()
