"""`leanlm.apply(model, config, calib=None)`: the one way a method enters a model.

    import leanlm
    from leanlm.calibration import Calibration
    from leanlm.quant import GPTQ
    from leanlm.attention import KVPolicy

    model, tok = leanlm.load("smollm2-135m")
    calib = Calibration(tok, "wikitext2-valid", samples=32, seq_len=512)
    leanlm.apply(model, GPTQ(bits=4, group=128), calib)         # in place; returns what the method reports
    leanlm.apply(model, KVPolicy.parse("sinks:4,window:1024"))  # decode-time: generate / eval --speed / serve
    leanlm.save(model, tok, "out/lean")                          # model.applied is saved and reloaded with it

A registry maps each config type to the function that applies it (torchao's `quantize_` pattern):
`@register(ConfigType) def _apply_x(model, cfg, calib, progress) -> dict`. The lookup walks the
config's class hierarchy, so one handler can serve a family (RTN / GPTQ / AWQ share QuantConfig's).

Every config type declares
- `needs_calibration` (attribute or property; may depend on fields: RTN needs none, GPTQ does);
- `price(plan)`: how it changes the cost model's `hardware.Plan` (a no-op when the shapes say it all).

Calibration rule: apply never reads data by itself. A config that needs calibration gets it from
`calib`, either token windows ([n, seq_len] ids) or a `leanlm.calibration.Calibration` (a tokenizer and
a text, which cuts the windows each method asks for); without one, apply raises LeanlmError.

What was applied is recorded in ONE list, `model.applied`: `{"type", "config", "result"}` entries in
order, JSON-able; `leanlm.save` / `quant.save_quantized` write it into the saved config.json and
`leanlm.load` restores it. Decode-time settings (a KV policy) act from there: `generate_tokens`
(so `leanlm generate`, `eval --speed` and `serve`) uses the newest KVPolicy entry unless given one.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import LeanlmError

Handler = Callable[..., dict]
_REGISTRY: dict[type, Handler] = {}
# packages whose import registers their handlers (imported on first use, so `import leanlm` stays light)
METHOD_MODULES = ("leanlm.quant", "leanlm.prune", "leanlm.attention", "leanlm.adaptive")


def register(config_type: type) -> Callable[[Handler], Handler]:
    """Decorator: `fn(model, cfg, calib, progress) -> dict` applies configs of `config_type` in place."""
    missing = [a for a in ("needs_calibration", "price") if not hasattr(config_type, a)]
    if missing:
        raise TypeError(f"{config_type.__name__} must declare {' and '.join(missing)} to be registered")

    def deco(fn: Handler) -> Handler:
        _REGISTRY[config_type] = fn
        return fn

    return deco


def _load_methods() -> None:
    for name in METHOD_MODULES:
        importlib.import_module(name)


def handler_for(config) -> Handler:
    _load_methods()
    for cls in type(config).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    known = ", ".join(sorted(_config_classes()))
    raise LeanlmError(f"no method is registered for {type(config).__name__}; leanlm.apply takes one of: {known}")


def _config_classes() -> dict[str, type]:
    """Registered config classes and their subclasses (GPTQ under QuantConfig), by name."""
    _load_methods()
    out, todo = {}, list(_REGISTRY)
    while todo:
        cls = todo.pop()
        out.setdefault(cls.__name__, cls)
        todo.extend(cls.__subclasses__())
    return out


def config_type(name: str) -> type:
    """The config class called `name` (as stored in model.applied)."""
    classes = _config_classes()
    if name not in classes:
        raise LeanlmError(f"unknown applied method type '{name}'; known: {', '.join(sorted(classes))}")
    return classes[name]


# ---- the verb --------------------------------------------------------------------------------
def apply(model, config, calib=None, progress: bool = True) -> dict:
    """Apply `config` to `model` in place through its registered method; returns the method's report.

    calib: None, [n, seq_len] token windows, or a leanlm.calibration.Calibration. Required when
    `config.needs_calibration` is true."""
    from .calibration import Calibration

    fn = handler_for(config)
    if calib is not None and not isinstance(calib, Calibration):
        calib = Calibration.from_tokens(calib)
    if config.needs_calibration and calib is None:
        raise LeanlmError(f"{type(config).__name__} needs calibration data: pass calib=leanlm.calibration."
                          f"Calibration(tokenizer, 'wikitext2-valid') or [n, seq_len] token windows")  # fmt: skip
    before = len(applied(model))
    t0 = time.perf_counter()
    result = fn(model, config, calib, progress) or {}
    seconds = time.perf_counter() - t0
    entries = applied(model)
    if len(entries) > before:  # the method function recorded itself (what it kept is its choice: reports can be large)
        entries[-1]["result"] = {**(entries[-1].get("result") or {}), "seconds": seconds}
    else:
        record(model, config, {**result, "seconds": seconds})
    return result


# ---- the record: model.applied --------------------------------------------------------------
def applied(model) -> list[dict]:
    """model.applied, created empty on models that have none yet."""
    entries = getattr(model, "applied", None)
    if entries is None:
        entries = []
        model.applied = entries
    return entries


def config_dict(config) -> dict:
    if hasattr(config, "to_dict"):
        return jsonable(config.to_dict())
    return jsonable({f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init})


def config_from_dict(type_name: str, d: dict):
    """Rebuild a config object from a model.applied entry."""
    cls = config_type(type_name)
    if hasattr(cls, "from_dict"):
        return cls.from_dict(d)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.init and f.name in d:
            v = d[f.name]
            kw[f.name] = tuple(v) if isinstance(v, list) and isinstance(f.default, tuple) else v
    return cls(**kw)


def record(model, config, result: dict | None = None) -> dict:
    """Note in model.applied that `config` was applied (method functions call this themselves, so
    direct calls are recorded too); returns the entry."""
    entry = {"type": type(config).__name__, "config": config_dict(config),
             "result": None if result is None else jsonable(result)}  # fmt: skip
    applied(model).append(entry)
    return entry


def latest(model, config_type_: type):
    """The config object of the newest model.applied entry of `config_type_` (or a subclass), else None."""
    entries = getattr(model, "applied", None) or []
    if not entries:
        return None
    classes = _config_classes()
    for e in reversed(entries):
        cls = classes.get(e["type"])
        if cls is not None and issubclass(cls, config_type_):
            return config_from_dict(e["type"], e["config"])
    return None


def update_latest(model, config_type_: type, **fields) -> None:
    """Change fields of the newest recorded config of `config_type_` (e.g. a routing p set after calibration)."""
    for e in reversed(getattr(model, "applied", None) or []):
        if e["type"] == config_type_.__name__:
            e["config"].update(jsonable(fields))
            return


def jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else
                                 dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)))  # fmt: skip


# ---- pricing -----------------------------------------------------------------------------------
def plan_for(model, configs=None):
    """The cost-model Plan of `model` after `configs` (default: what model.applied records)."""
    from .hardware import Plan

    own = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(model.dtype).removeprefix("torch."),
                                                                         "fp32")  # fmt: skip
    plan = Plan(weight_dtype=own, compute_dtype=own)
    if configs is None:
        configs = [config_from_dict(e["type"], e["config"]) for e in getattr(model, "applied", None) or []]
    for c in configs:
        c.price(plan)
    return plan


# ---- a decode setting with no package of its own: the weights' dtype ----------------------------
DTYPE_NAMES = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16"}


@dataclass
class Dtype:
    """Cast the model's weights and compute to float32 or bfloat16."""

    dtype: str = "bfloat16"
    needs_calibration = False

    def __post_init__(self):
        if self.dtype not in DTYPE_NAMES:
            raise LeanlmError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")

    def price(self, plan) -> None:
        plan.weight_dtype = plan.compute_dtype = DTYPE_NAMES[self.dtype]


@register(Dtype)
def _apply_dtype(model, cfg: Dtype, calib, progress) -> dict:
    from .model.load import parse_dtype

    model.to(parse_dtype(cfg.dtype))
    return {"dtype": cfg.dtype}


# `leanlm.apply` is this function (the package exports it), so the registry is reachable from it too:
# `@leanlm.apply.register(MyConfig)`, `leanlm.apply.record(...)`, as docs/adding-a-method.md shows
apply.register, apply.record, apply.latest, apply.applied = register, record, latest, applied

__all__ = ["Dtype", "apply", "applied", "config_from_dict", "latest", "plan_for", "record", "register"]
