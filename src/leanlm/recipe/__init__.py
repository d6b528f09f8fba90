"""Recipes: an ordered list of compression steps in YAML, validated, applied in one pass.

    name: smollm2-lean
    calibration: {text: wikitext2-valid, samples: 32, seq_len: 512}
    steps:
      - prune: {structured: neurons, ratio: 0.25, heal_steps: 0}
      - quantize: {method: gptq, bits: 4, group: 128}
      - kv: "sinks:4,window:1024"          # decode-time cache policy (saved with the model, used at decode)

A step is the YAML spelling of one config; STEP_PARSERS maps each step name to the function that
turns its value into config objects: `prune` (structured: neurons|heads|layers with the fields of
prune.Structured, method: maskllm with the fields of prune.MaskLLM, or unstructured with the fields of
prune.Unstructured; heal_steps on structured and unstructured),
`quantize` (method + the fields of the quant config), `dtype` (float32 | bfloat16), `kv` (a
cache-policy string, see `--kv`), `adaptive` (a leanlm.adaptive spec string such as "teal:0.4" or
"skip:0.1", see `--adaptive`), `mla` (the fields of attention.MLA: rank, rope_dims, heal_steps, ...).
Everything after parsing goes through `leanlm.apply`: each config
says whether it needs calibration (`needs_calibration`) and how the cost model prices it (`price`).
Calibration windows are cut once (per shape) and shared by every step that needs them.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LeanlmError

TOP_KEYS = {"name", "description", "calibration", "steps"}
CALIB_KEYS = {"text": str, "samples": int, "seq_len": int}


@dataclass
class Step:
    kind: str
    params: Any  # the step's YAML value: a mapping for prune / quantize, a string for dtype / kv / adaptive

    def configs(self, where: str = "step") -> list:
        """The config objects this step stands for (raises LeanlmError naming a bad key or value)."""
        return build_step(self.kind, self.params, where)


@dataclass
class Recipe:
    name: str
    steps: list[Step]
    calibration: dict = field(default_factory=lambda: {"text": "wikitext2-valid", "samples": 32, "seq_len": 512})
    description: str = ""
    source: str = "recipe"  # the file it came from: error messages name it

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "calibration": self.calibration,
                "steps": [{s.kind: s.params} for s in self.steps]}  # fmt: skip

    def configs(self) -> list:
        return [c for i, s in enumerate(self.steps) for c in s.configs(f"{self.source}: step {i + 1} ({s.kind})")]


# ---- step parsers: YAML value -> config objects --------------------------------------------
def _init_fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return "a list" + (f" of {_type_name(args[0]).removeprefix('a ')}s" if len(args) == 1 else "")
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} settings"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _matches(value, hint) -> bool:
    """Does a YAML value fit a dataclass field's annotation? (bool is not an int; an int is a float)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(any(_matches(v, a) for a in args) for v in value) if args \
            else isinstance(value, (list, tuple))  # fmt: skip
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(hint):  # a nested config (e.g. mixed precision): a mapping, or a number for mixed
        return isinstance(value, (dict, int, float)) and not isinstance(value, bool)
    return True


def _check_keys(where: str, given: dict, allowed: set[str]) -> None:
    unknown = sorted(str(k) for k in set(given) - allowed)
    if unknown:
        raise LeanlmError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _checked(where: str, given: dict, cls, prefix: str = "") -> dict:
    """`given` after checking its keys and value types against the fields of config class `cls` (the schema
    is the class's annotations); a nested config given as a mapping is checked the same way, key by key."""
    fields = _init_fields(cls)
    _check_keys(where if not prefix else f"{where}: '{prefix[:-1]}'", given, set(fields))
    for k, v in given.items():
        if not _matches(v, fields[k]):
            raise LeanlmError(f"{where}: '{prefix}{k}' must be {_type_name(fields[k])}, got {v!r} "
                              f"({type(v).__name__})")  # fmt: skip
        nested = [a for a in (typing.get_args(fields[k]) or (fields[k],)) if dataclasses.is_dataclass(a)]
        if nested and isinstance(v, dict):
            _checked(where, v, nested[0], f"{prefix}{k}.")
    return given


def _mapping(where: str, kind: str, params) -> dict:
    if not isinstance(params, dict):
        raise LeanlmError(f"{where}: {kind} takes a mapping of settings, got {params!r}")
    return dict(params)


def _parse_quantize(params, where: str) -> list:
    from ..quant.config import CONFIGS, make_config

    p = _mapping(where, "quantize", params)
    method = p.pop("method", "rtn")
    if not isinstance(method, str) or method not in CONFIGS:
        raise LeanlmError(f"{where}: unknown quantization method '{method}'; use one of: {', '.join(CONFIGS)}")
    return [make_config(method, **_checked(where, p, CONFIGS[method]))]


def _parse_prune(params, where: str) -> list:
    from ..prune import MaskLLM, Structured, Unstructured

    p = _mapping(where, "prune", params)
    if p.get("method") == "maskllm":  # learned N:M masks: a config of its own (prune/maskllm.py)
        p.pop("method")
        return [MaskLLM(**_checked(where, p, MaskLLM))]
    if "structured" in p:
        if not isinstance(p["structured"], str):
            raise LeanlmError(f"{where}: 'structured' must be neurons, heads or layers, got {p['structured']!r}")
        p["kind"] = p.pop("structured")
        return [Structured(**_checked(where, p, Structured))]
    return [Unstructured(**_checked(where, p, Unstructured))]


def _parse_dtype(params, where: str) -> list:
    from ..apply import Dtype

    if params not in ("float32", "bfloat16", "fp32", "bf16"):
        raise LeanlmError(f"{where}: dtype must be float32 or bfloat16, got {params!r}")
    return [Dtype(params)]


def _parse_kv(params, where: str) -> list:
    from ..attention import KVPolicy

    if not isinstance(params, str):
        raise LeanlmError(f"{where}: kv takes a policy string such as 'sinks:4,window:1024' or 'int8'")
    policy = KVPolicy.parse(params)
    return [] if policy is None else [policy]


def _parse_adaptive(params, where: str) -> list:
    from ..adaptive import parse_adaptive

    if not isinstance(params, str):
        raise LeanlmError(f"{where}: adaptive takes a spec string such as 'teal:0.4', 'exit:kl=0.1' or 'skip:0.1'")
    return [parse_adaptive(params)]


def _parse_mla(params, where: str) -> list:
    from ..attention.mla import MLA

    return [MLA(**_checked(where, _mapping(where, "mla", params), MLA))]


STEP_PARSERS = {"prune": _parse_prune, "quantize": _parse_quantize, "dtype": _parse_dtype, "kv": _parse_kv,
                "adaptive": _parse_adaptive, "mla": _parse_mla}  # fmt: skip
STEP_KINDS = tuple(STEP_PARSERS)


def build_step(kind: str, params: Any, where: str = "step") -> list:
    """The config objects a step stands for (raises LeanlmError naming the file, step and bad key or value)."""
    if kind not in STEP_PARSERS:
        raise LeanlmError(f"{where}: unknown step kind '{kind}'; use one of: {', '.join(STEP_KINDS)}")
    try:
        return STEP_PARSERS[kind](params, where)
    except LeanlmError as e:
        msg = str(e)
        raise LeanlmError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    except TypeError as e:  # a config constructor refusing a value
        raise LeanlmError(f"{where}: {e}") from None


def parse_recipe(d: Any, source: str = "recipe") -> Recipe:
    if not isinstance(d, dict):
        raise LeanlmError(f"{source}: a recipe is a mapping with 'steps' (see examples/recipes/)")
    _check_keys(source, d, TOP_KEYS)
    steps_raw = d.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise LeanlmError(f"{source}: 'steps' must be a non-empty list of steps")
    for key in ("name", "description"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise LeanlmError(f"{source}: '{key}' must be a string, got {d[key]!r}")
    if d.get("calibration") is not None and not isinstance(d["calibration"], dict):
        raise LeanlmError(f"{source}: 'calibration' must be a mapping such as {{text: wikitext2-valid, samples: 32, "
                          f"seq_len: 512}}, got {d['calibration']!r}")  # fmt: skip
    calib = {"text": "wikitext2-valid", "samples": 32, "seq_len": 512, **(d.get("calibration") or {})}
    _check_keys(f"{source}: calibration", calib, set(CALIB_KEYS))
    for k, typ in CALIB_KEYS.items():
        if not _matches(calib[k], typ):
            raise LeanlmError(f"{source}: calibration.{k} must be {_type_name(typ)}, got {calib[k]!r}")
    if calib["samples"] < 1 or calib["seq_len"] < 16:
        raise LeanlmError(f"{source}: calibration needs samples >= 1 and seq_len >= 16")
    steps = []
    for i, raw in enumerate(steps_raw):
        where = f"{source}: step {i + 1}"
        if not isinstance(raw, dict) or len(raw) != 1:
            raise LeanlmError(f"{where}: each step is a one-key mapping like '- quantize: {{method: gptq}}'")
        kind, params = next(iter(raw.items()))
        build_step(kind, params, f"{where} ({kind})" if kind in STEP_PARSERS else where)  # fail now, not mid-run
        steps.append(Step(kind, params))
    return Recipe(d.get("name") or Path(source).stem, steps, calib, d.get("description", ""), source)


def load_recipe(path: str | Path) -> Recipe:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LeanlmError(f"recipe {path} not found; see examples/recipes/ for examples")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LeanlmError(f"recipe {path} is not valid YAML{where}: {problem}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise LeanlmError(f"cannot read recipe {path} ({e})") from e
    return parse_recipe(d, str(path))


def needs_calibration(recipe: Recipe) -> bool:
    return any(c.needs_calibration for c in recipe.configs())


def calibration_for(recipe: Recipe, tokenizer):
    """The recipe's calibration source (windows are cut when a step first asks for them)."""
    from ..calibration import Calibration

    c = recipe.calibration
    return Calibration(tokenizer, c["text"], samples=c["samples"], seq_len=c["seq_len"])


def apply_recipe(model, tokenizer, recipe: Recipe, progress: bool = True) -> dict:
    """Apply the steps in order, in place, each config through leanlm.apply. Returns a report per step."""
    import time

    from ..apply import apply

    model.set_decode_layout(False)  # row-major weights: the rows this code slices and views
    calib = calibration_for(recipe, tokenizer)
    if needs_calibration(recipe):
        calib.tokens()  # read and cut the text now: a missing file fails before any step runs
    report: list[dict] = []
    for i, s in enumerate(recipe.steps):
        t0 = time.time()
        results = [{"method": type(c).__name__, **apply(model, c, calib, progress=progress)}
                   for c in s.configs(f"{recipe.source}: step {i + 1} ({s.kind})")]  # fmt: skip
        report.append({"step": s.kind, "params": s.params, "result": _jsonable(results), "seconds": time.time() - t0})
    return {"recipe": recipe.to_dict(), "steps": report}


def _jsonable(obj):
    from ..apply import jsonable

    return jsonable(obj)


def plan_for(model, recipe: Recipe | None = None):
    """The cost-model plan of a model after `recipe` (default: after what model.applied records):
    every config prices itself (its `price(plan)`)."""
    from ..apply import plan_for as plan_of

    return plan_of(model, None if recipe is None else recipe.configs())


def compress(spec: str, recipe: Recipe, out: str | Path, force: bool = False, progress: bool = True) -> dict:
    """Load `spec` in float32, apply `recipe`, save to `out` (atomically). Returns the report.

    Steps whose calibrated state is kept apart from the weights (adaptive methods: `saved_apart`)
    must come last: they are applied to the saved weights and written to OUT/adaptive.safetensors."""
    import time

    from ..io import check_writable, estimated_bytes, write_json_atomic
    from ..model import load, save

    check_writable(out, force, directory=True, need_bytes=estimated_bytes(spec, output_bits(recipe)))  # before the work
    apart = [all(getattr(c, "saved_apart", False) for c in s.configs()) and s.configs() != [] for s in recipe.steps]
    n_apart = sum(apart)
    if n_apart and apart[len(apart) - n_apart :] != [True] * n_apart:
        raise LeanlmError("adaptive steps must come last in a recipe for `compress` (they act at decode time on the "
                          "saved weights); move them to the end")  # fmt: skip
    weights = Recipe(recipe.name, recipe.steps[: len(recipe.steps) - n_apart], recipe.calibration,
                     recipe.description, recipe.source)  # fmt: skip
    t0 = time.time()
    model, tok = load(spec, "float32")
    report = apply_recipe(model, tok, weights, progress)
    save(model, tok, out, force=force)  # model.applied (a kv step included) goes into config.json
    if n_apart:  # calibrated on the saved weights, kept beside them (eval OUT --adaptive OUT/adaptive.safetensors)
        from ..adaptive import save_adaptive

        rest = Recipe(recipe.name, recipe.steps[len(recipe.steps) - n_apart :], recipe.calibration,
                      recipe.description, recipe.source)  # fmt: skip
        report["steps"] += apply_recipe(model, tok, rest, progress)["steps"]
        report["recipe"] = recipe.to_dict()
        report["adaptive_state"] = str(save_adaptive(model, out))
    report["model"] = str(spec)
    report["seconds"] = time.time() - t0
    report["applied"] = _jsonable(model.applied)
    write_json_atomic(Path(out) / "leanlm_recipe.json", report)
    return report


def output_bits(recipe: Recipe) -> float:
    """Fewest bits per parameter the recipe's output may take (a lower bound for the free-space check)."""
    bits = 32.0
    for s in recipe.steps:
        if s.kind == "quantize" and isinstance(s.params, dict):
            bits = min(bits, s.params.get("bits", 4))
        elif s.kind == "dtype":
            bits = min(bits, 16 if s.params in ("bfloat16", "bf16") else 32)
    return bits
