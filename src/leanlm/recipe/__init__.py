"""Recipes: an ordered list of compression steps in YAML, validated, applied in one pass.

    name: smollm2-lean
    calibration: {text: wikitext2-valid, samples: 32, seq_len: 512}
    steps:
      - prune: {structured: neurons, ratio: 0.25, heal_steps: 0}
      - quantize: {method: gptq, bits: 4, group: 128}
      - kv: "sinks:4,window:1024"          # decode-time cache policy (recorded with the model)

Step kinds: `prune` (structured: neurons|heads|layers with the fields of prune.Structured, or
unstructured with the fields of prune.Unstructured), `quantize` (method + the fields of the
quant config), `dtype` (float32 | bfloat16), `kv` (a cache-policy string, see `--kv`), `adaptive`
(a leanlm.adaptive spec string such as "teal:0.4" or "skip:0.1", see `--adaptive`; applied in
place by apply_recipe, calibrated on the recipe's calibration text).
Calibration tokens are computed once and shared by every step that needs them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LeanlmError

TOP_KEYS = {"name", "description", "calibration", "steps"}
CALIB_KEYS = {"text": str, "samples": int, "seq_len": int}
STEP_KINDS = ("prune", "quantize", "dtype", "kv", "adaptive")


@dataclass
class Step:
    kind: str
    params: Any  # dict for prune/quantize, str for dtype/kv


@dataclass
class Recipe:
    name: str
    steps: list[Step]
    calibration: dict = field(default_factory=lambda: {"text": "wikitext2-valid", "samples": 32, "seq_len": 512})
    description: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "calibration": self.calibration,
                "steps": [{s.kind: s.params} for s in self.steps]}  # fmt: skip


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _check_keys(where: str, given: dict, allowed: set[str]) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise LeanlmError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def build_step(kind: str, params: Any, where: str = "step"):
    """The config object a step stands for (raises LeanlmError naming a bad key or value)."""
    if kind == "dtype":
        from ..model.load import parse_dtype

        if params not in ("float32", "bfloat16", "fp32", "bf16"):
            raise LeanlmError(f"{where}: dtype must be float32 or bfloat16, got {params!r}")
        return parse_dtype(params)
    if kind == "kv":
        from ..attention import KVPolicy

        if not isinstance(params, str):
            raise LeanlmError(f"{where}: kv takes a policy string such as 'sinks:4,window:1024' or 'int8'")
        return KVPolicy.parse(params)
    if kind == "adaptive":  # a decode-time compute policy (leanlm.adaptive), e.g. "teal:0.4" or "exit:kl=0.1"
        from ..adaptive import parse_adaptive

        if not isinstance(params, str):
            raise LeanlmError(f"{where}: adaptive takes a spec string such as 'teal:0.4', 'exit:kl=0.1' or 'skip:0.1'")
        return parse_adaptive(params)
    if not isinstance(params, dict):
        raise LeanlmError(f"{where}: {kind} takes a mapping of settings, got {params!r}")
    p = dict(params)
    if kind == "quantize":
        from ..quant.config import CONFIGS, make_config

        method = p.pop("method", "rtn")
        if method not in CONFIGS:
            raise LeanlmError(f"{where}: unknown quantization method '{method}'; use one of: {', '.join(CONFIGS)}")
        _check_keys(where, p, _fields(CONFIGS[method]))
        return make_config(method, **p)
    if kind == "prune":
        from ..prune import Structured, Unstructured

        heal_steps = p.pop("heal_steps", 0)
        if not isinstance(heal_steps, int) or heal_steps < 0:
            raise LeanlmError(f"{where}: heal_steps must be an integer >= 0, got {heal_steps!r}")
        if "structured" in p:
            p["kind"] = p.pop("structured")
            _check_keys(where, p, _fields(Structured))
            return Structured(**p), heal_steps
        _check_keys(where, p, _fields(Unstructured))
        return Unstructured(**p), heal_steps
    raise LeanlmError(f"{where}: unknown step kind '{kind}'; use one of: {', '.join(STEP_KINDS)}")


def parse_recipe(d: Any, source: str = "recipe") -> Recipe:
    if not isinstance(d, dict):
        raise LeanlmError(f"{source}: a recipe is a mapping with 'steps' (see examples/recipes/)")
    _check_keys(source, d, TOP_KEYS)
    steps_raw = d.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise LeanlmError(f"{source}: 'steps' must be a non-empty list of steps")
    calib = {"text": "wikitext2-valid", "samples": 32, "seq_len": 512, **(d.get("calibration") or {})}
    _check_keys(f"{source}: calibration", calib, set(CALIB_KEYS))
    for k, typ in CALIB_KEYS.items():
        if not isinstance(calib[k], typ):
            raise LeanlmError(f"{source}: calibration.{k} must be {typ.__name__}, got {calib[k]!r}")
    if calib["samples"] < 1 or calib["seq_len"] < 16:
        raise LeanlmError(f"{source}: calibration needs samples >= 1 and seq_len >= 16")
    steps = []
    for i, raw in enumerate(steps_raw):
        where = f"{source}: step {i + 1}"
        if not isinstance(raw, dict) or len(raw) != 1:
            raise LeanlmError(f"{where}: each step is a one-key mapping like '- quantize: {{method: gptq}}'")
        kind, params = next(iter(raw.items()))
        build_step(kind, params, where)  # validate now, not halfway through a long run
        steps.append(Step(kind, params))
    return Recipe(d.get("name") or Path(source).stem, steps, calib, d.get("description", ""))


def load_recipe(path: str | Path) -> Recipe:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LeanlmError(f"recipe {path} not found; see examples/recipes/ for examples")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise LeanlmError(f"recipe {path} is not valid YAML: {e}") from e
    return parse_recipe(d, str(path))


def needs_calibration(recipe: Recipe) -> bool:
    for s in recipe.steps:
        if s.kind == "quantize" and s.params.get("method", "rtn") != "rtn":
            return True
        if s.kind == "quantize" and s.params.get("mixed"):
            return True
        if s.kind == "prune":
            method = s.params.get("method", "wanda")
            importance = s.params.get("importance", "activation")
            if "structured" in s.params and (s.params["structured"] == "layers" or importance != "magnitude"):
                return True
            if "structured" not in s.params and method != "magnitude":
                return True
            if s.params.get("heal_steps"):
                return True
    return False


def apply_recipe(model, tokenizer, recipe: Recipe, progress: bool = True) -> dict:
    """Apply the steps in order, in place. Returns a report per step (what changed, seconds)."""
    model.set_decode_layout(False)  # row-major weights: the rows this code slices and views
    import time

    import torch

    calib = None
    if needs_calibration(recipe):
        from ..evaluate.data import read_text
        from ..quant import calibration_tokens

        c = recipe.calibration
        calib = calibration_tokens(tokenizer, read_text(c["text"]), n_samples=c["samples"], seq_len=c["seq_len"])
    report: list[dict] = []
    for i, s in enumerate(recipe.steps):
        t0 = time.time()
        cfg = build_step(s.kind, s.params, f"step {i + 1}")
        entry: dict = {"step": s.kind, "params": s.params}
        if s.kind == "dtype":
            model.to(cfg)
        elif s.kind == "kv":
            model.kv_policy = cfg  # decode-time setting, recorded with the saved model
        elif s.kind == "adaptive":
            from ..adaptive import apply_adaptive

            entry["result"] = _jsonable(apply_adaptive(model, [cfg], tokenizer, recipe.calibration["text"], progress=progress))
        elif s.kind == "quantize":
            from ..quant import quantize

            quantize(model, cfg, calib, progress=progress)
        elif s.kind == "prune":
            from ..prune import Structured, heal, prune_structured, prune_unstructured

            pcfg, heal_steps = cfg
            teacher = copy.deepcopy(model) if heal_steps else None
            if isinstance(pcfg, Structured):
                entry["result"] = _jsonable(prune_structured(model, pcfg, calib, progress=progress))
            else:
                entry["result"] = _jsonable(prune_unstructured(model, pcfg, calib, progress=progress))
            if heal_steps:
                with torch.enable_grad():
                    entry["heal"] = _jsonable(heal(model, teacher, calib, steps=heal_steps,
                                                   keep_zeros=not isinstance(pcfg, Structured), progress=progress))  # fmt: skip
                del teacher
        entry["seconds"] = time.time() - t0
        report.append(entry)
    return {"recipe": recipe.to_dict(), "steps": report}


def _jsonable(obj):
    try:
        return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    except (TypeError, ValueError):
        return str(obj)


def plan_for(model, recipe: Recipe | None = None):
    """The cost-model plan of a (compressed) model: weight dtype/bits, sparsity, KV policy."""
    from ..hardware import Plan

    own = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(model.dtype).removeprefix("torch."), "fp32")
    plan = Plan(weight_dtype=own, compute_dtype=own)
    for s in recipe.steps if recipe else []:
        if s.kind == "dtype":
            plan.weight_dtype = plan.compute_dtype = "bf16" if s.params in ("bfloat16", "bf16") else "fp32"
        elif s.kind == "quantize":
            bits = s.params.get("bits", 4)
            plan.weight_dtype, plan.compute_dtype = f"int{bits}", "bf16"
            plan.group_size = s.params.get("group", 128) or None
            plan.embed_dtype = {8: "int8", 4: "int4", 0: "bf16"}.get(s.params.get("head_bits", 8), "bf16")
        elif s.kind == "prune" and "structured" not in s.params:
            pattern = s.params.get("pattern")
            plan.sparsity = 0.5 if pattern else float(s.params.get("sparsity") or 0.0)
            plan.sparsity_pattern = pattern or "unstructured"
        elif s.kind == "adaptive":
            cfg = build_step("adaptive", s.params)
            if type(cfg).__name__ == "ActivationSparsity":
                plan.activation_sparsity = cfg.sparsity
        elif s.kind == "kv":
            pol = build_step("kv", s.params)
            if pol is not None:
                if pol.method != "full":
                    plan.kv_window = pol.capacity(1 << 30)  # tokens kept per layer
                if pol.bits:
                    plan.kv_dtype = f"int{pol.bits}"
    return plan


def compress(spec: str, recipe: Recipe, out: str | Path, force: bool = False, progress: bool = True) -> dict:
    """Load `spec` in float32, apply `recipe`, save to `out` (atomically). Returns the report."""
    import time

    from ..io import check_writable
    from ..model import load

    check_writable(out, force)  # fail before the work, not after
    kinds = [s.kind for s in recipe.steps]
    adaptive = [s for s in recipe.steps if s.kind == "adaptive"]
    if adaptive and kinds[len(kinds) - len(adaptive) :] != ["adaptive"] * len(adaptive):
        raise LeanlmError("adaptive steps must come last in a recipe for `compress` (they act at decode time on the "
                          "saved weights); move them to the end")  # fmt: skip
    if adaptive:
        recipe = Recipe(recipe.name, [s for s in recipe.steps if s.kind != "adaptive"] or [Step("dtype", "float32")],
                        recipe.calibration, recipe.description)  # fmt: skip
    t0 = time.time()
    model, tok = load(spec, "float32")
    report = apply_recipe(model, tok, recipe, progress)
    quantized = any(s.kind == "quantize" for s in recipe.steps)
    if quantized:
        from ..quant import save_quantized

        save_quantized(model, tok, out, force=force)
    else:
        from ..model import save

        save(model, tok, out, force=force)
    if adaptive:  # calibrated on the saved weights, kept beside them (leanlm eval OUT --adaptive OUT/adaptive.safetensors)
        from ..adaptive import save_adaptive

        extra = apply_recipe(model, tok, Recipe(recipe.name, adaptive, recipe.calibration), progress)
        report["steps"] += extra["steps"]
        report["adaptive_state"] = str(save_adaptive(model, out))
    report["model"] = str(spec)
    report["seconds"] = time.time() - t0
    report["kv"] = next((s.params for s in recipe.steps if s.kind == "kv"), None)
    (Path(out) / "leanlm_recipe.json").write_text(json.dumps(report, indent=2, default=str))
    return report
