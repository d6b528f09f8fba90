"""Adaptive computation: a compute budget per token.

Four methods, each a config dataclass and an apply function over a loaded model (in place):
- ActivationSparsity / apply_activation_sparsity (sparsity.py): calibrated magnitude thresholds on
  matmul inputs, an input-sparse decode kernel (embedding_bag over the transposed weight);
- EarlyExit / apply_early_exit (early_exit.py): leave after the layer where the model is sure,
  with the skipped layers' K/V computed from the exit state;
- LayerSkip / apply_layer_skip (layer_skip.py): a per-layer router skips layers per token;
- NeuronRouting / apply_neuron_routing (routing.py): FFN neurons clustered into groups, a router
  picks how many groups each token gets.
`runtime.meter(model)` counts the FLOPs fraction a token used; `save_adaptive` / `load_adaptive`
(state.py) keep what calibration learned in one safetensors file. Specs such as "teal:0.5",
"exit:kl=0.05", "skip:0.2", "moe:groups=8,p=0.9" (CLI --adaptive, recipe step `adaptive`) are
parsed by `parse_adaptive`; `apply_adaptive` applies a list of them in a sensible order.
"""

from __future__ import annotations

from ..apply import register
from ..errors import LeanlmError
from .early_exit import EarlyExit, apply_early_exit
from .layer_skip import LayerSkip, apply_layer_skip
from .routing import NeuronRouting, apply_neuron_routing
from .runtime import AdaptiveTransformer, make_adaptive, meter
from .sparsity import ActivationSparsity, SparseInputLinear, apply_activation_sparsity
from .state import load_adaptive, save_adaptive

SPEC_HELP = ("adaptive computation: teal:SPARSITY[,mlp|gate_up|down][,attn][,kernel=auto|native|bag|dense|dense_t]"
             "[,allocation=uniform|greedy|layers][,criterion=magnitude|wina][,head=FRACTION] | "
             "teal:head=FRACTION (the LM head alone) | "
             "exit:[cosine|softmax,]kl=TARGET|threshold=T[,min_layer=N,every=N] | "
             "skip:FRACTION[,keep_first=N,keep_last=N] | "
             "moe:groups=E,p=MASS[,steps=N] | PATH/adaptive.safetensors (a saved state)  (repeatable)")  # fmt: skip
ORDER = (ActivationSparsity, NeuronRouting, LayerSkip, EarlyExit)  # matmul changes first, then gates


def _num(v: str, where: str):
    try:
        return int(v) if v.lstrip("-").isdigit() else float(v)
    except ValueError:
        raise LeanlmError(f"{where}: '{v}' is not a number") from None


def parse_adaptive(spec: str):
    """A config object from a spec string (see SPEC_HELP)."""
    method, _, rest = spec.strip().partition(":")
    items = [s.strip() for s in rest.split(",") if s.strip()]
    kw: dict = {}
    pos: list[str] = []
    for it in items:
        if "=" in it:
            k, v = it.split("=", 1)
            kw[k.strip()] = v.strip()
        else:
            pos.append(it)
    where = f"--adaptive {spec}"
    try:
        if method in ("teal", "sparsity", "act"):
            from .sparsity import TARGETS

            nums = [p for p in pos if p not in TARGETS]
            targets = tuple(p for p in pos if p in TARGETS)
            if targets == ("attn",):
                targets = ("mlp", "attn")  # "teal:0.5,attn" = the MLP and attention inputs
            given = bool(nums) or "sparsity" in kw
            sparsity = _num(nums[0], where) if nums else _num(kw.pop("sparsity", "0.5"), where)
            kernel, allocation = kw.pop("kernel", "auto"), kw.pop("allocation", "uniform")
            criterion, head = kw.pop("criterion", "magnitude"), kw.pop("head", None)
            head = None if head is None else float(_num(head, where))
            if head is not None and not given and not targets:
                targets, sparsity = (), 0  # "teal:head=0.4": the LM head alone, decoder layers untouched
            elif not targets:
                targets = ("mlp",)
            return ActivationSparsity(float(sparsity), targets, kernel, allocation,
                                      **{k: int(v) for k, v in kw.items()}, criterion=criterion, head=head)  # fmt: skip
        if method == "exit":
            conf = next((p for p in pos if p in ("cosine", "softmax")), "cosine")
            thr = kw.pop("threshold", None)
            return EarlyExit(conf, None if thr is None else float(thr), float(kw.pop("kl", 0.05)),
                             **{k: int(v) for k, v in kw.items()})  # fmt: skip
        if method == "skip":
            frac = _num(pos[0], where) if pos else float(kw.pop("skip", 0.2))
            return LayerSkip(float(frac), **{k: _num(v, where) for k, v in kw.items()})
        if method == "moe":
            return NeuronRouting(**{k: _num(v, where) for k, v in kw.items()})
    except TypeError as e:  # an unknown key
        raise LeanlmError(f"{where}: {e}".replace("__init__() ", "")) from None
    raise LeanlmError(f"unknown adaptive method '{method}'; use teal, exit, skip or moe ({SPEC_HELP})")


def apply_adaptive(model, configs: list, tokenizer=None, calib_text: str = "wikitext2-valid", data_dir=None,
                   progress: bool = True) -> list[dict]:  # fmt: skip
    """Apply adaptive configs (objects or spec strings) in place through leanlm.apply, matmul changes
    before gates; each is calibrated on `calib_text` windows of its own calib_samples x calib_seq_len."""
    from ..apply import apply
    from ..calibration import Calibration

    if calib_text == "wikitext2":
        raise LeanlmError("'wikitext2' is the evaluation split; calibrate on other text, e.g. wikitext2-valid")
    cfgs = [parse_adaptive(c) if isinstance(c, str) else c for c in configs]
    cfgs.sort(key=lambda c: ORDER.index(type(c)))
    calib = None if tokenizer is None else Calibration(tokenizer, calib_text, data_dir=data_dir)
    return [{"method": type(c).__name__, **apply(model, c, calib, progress=progress)} for c in cfgs]


def _tokens(cfg, calib):
    return None if calib is None else calib.tokens(cfg.calib_samples, cfg.calib_seq_len)


@register(ActivationSparsity)
def _apply_activation_sparsity(model, cfg, calib, progress):
    return apply_activation_sparsity(model, cfg, _tokens(cfg, calib), progress=progress)


@register(EarlyExit)
def _apply_early_exit(model, cfg, calib, progress):
    return apply_early_exit(model, cfg, _tokens(cfg, calib) if cfg.needs_calibration else None, progress=progress)


@register(LayerSkip)
def _apply_layer_skip(model, cfg, calib, progress):
    return apply_layer_skip(model, cfg, _tokens(cfg, calib), progress=progress)


@register(NeuronRouting)
def _apply_neuron_routing(model, cfg, calib, progress):
    return apply_neuron_routing(model, cfg, _tokens(cfg, calib), progress=progress)


__all__ = ["ActivationSparsity", "EarlyExit", "LayerSkip", "NeuronRouting", "SparseInputLinear", "AdaptiveTransformer",
           "apply_activation_sparsity", "apply_early_exit", "apply_layer_skip", "apply_neuron_routing",
           "apply_adaptive", "save_adaptive", "load_adaptive",
           "parse_adaptive", "make_adaptive", "meter", "SPEC_HELP"]  # fmt: skip
