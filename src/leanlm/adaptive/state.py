"""Save and re-install what adaptive calibration learned, in one safetensors file.

The file holds only the calibrated parts (thresholds, exit lens maps, skip routers, neuron
permutations and group routers) plus the configs as JSON metadata; the model weights stay in
the model directory. `load_adaptive(model, path)` installs them on a freshly loaded copy of the
same model (`leanlm eval DIR --adaptive DIR/adaptive.safetensors`), so no recalibration is needed.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import LeanlmError

LINEARS = ("attn.wqkv", "attn.wo", "mlp.w_gate_up", "mlp.w_down")
FILENAME = "adaptive.safetensors"


def _gates(model) -> list:
    from .runtime import Gates

    g = getattr(model, "adaptive_gate", None)
    return [] if g is None else (g.gates if isinstance(g, Gates) else [g])


def save_adaptive(model, path: str | Path) -> Path:
    """Write the model's adaptive state to `path` (a .safetensors file, or a directory -> adaptive.safetensors)."""
    from safetensors.torch import save_file

    from ..apply import latest
    from ..calibration import get_module
    from .early_exit import EarlyExit, ExitGate
    from .layer_skip import LayerSkip, SkipGate
    from .routing import NeuronRouting, RoutedMLP
    from .sparsity import ActivationSparsity, SparseInputLinear

    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"version": 1, "n_layers": model.config.n_layers}
    sp = latest(model, ActivationSparsity)  # the configs are read from model.applied
    if sp is not None:
        th = {}
        for i, layer in enumerate(model.layers):
            for n in LINEARS:
                mod = get_module(layer, n)
                if isinstance(mod, SparseInputLinear):
                    th.setdefault(n, [None] * model.config.n_layers)[i] = mod.threshold
        meta["sparsity"] = {"config": asdict(sp), "thresholds": th}
        if sp.head is not None:
            meta["sparsity"]["head_threshold"] = model.lm_head.threshold
    routing = latest(model, NeuronRouting)
    if routing is not None:
        meta["routing"] = {"config": asdict(routing)}
        for i, layer in enumerate(model.layers):
            if isinstance(layer.mlp, RoutedMLP):
                tensors[f"routing.{i}.perm"] = layer.mlp.perm.contiguous()
                tensors[f"routing.{i}.router.weight"] = layer.mlp.router.weight.detach().contiguous()
                tensors[f"routing.{i}.router.bias"] = layer.mlp.router.bias.detach().contiguous()
    for g in _gates(model):
        if isinstance(g, SkipGate):
            meta["skip"] = {"config": asdict(latest(model, LayerSkip)), "routable": g.routable,
                            "threshold": g.threshold}  # fmt: skip
            tensors["skip.weight"], tensors["skip.bias"] = g.weight.contiguous(), g.bias.contiguous()
        elif isinstance(g, ExitGate):
            meta["exit"] = {"config": asdict(latest(model, EarlyExit)), "threshold": g.threshold, "check": g.check,
                            "lens_layers": sorted(g.lens)}  # fmt: skip
            for i, (A, b) in g.lens.items():
                tensors[f"exit.lens.{i}.A"], tensors[f"exit.lens.{i}.b"] = A.contiguous(), b.contiguous()
    if len(meta) == 2:
        raise LeanlmError("this model has no adaptive method applied; nothing to save")
    tensors.setdefault("_", torch.zeros(1))  # safetensors wants at least one tensor
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"leanlm_adaptive": json.dumps(meta)})
    tmp.replace(path)
    return path


def load_adaptive(model, path: str | Path) -> dict:
    """Install a saved adaptive state on `model` (the same model it was calibrated on). Returns the metadata."""
    from safetensors import safe_open

    from ..apply import record
    from . import early_exit, layer_skip, routing, sparsity
    from .runtime import add_gate, layer_flops, make_adaptive

    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise LeanlmError(f"no adaptive state at {path}; create one with leanlm.adaptive.save_adaptive "
                          "(or `leanlm compress` with an adaptive recipe step)")  # fmt: skip
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("leanlm_adaptive")
        if raw is None:
            raise LeanlmError(f"{path} is not a leanlm adaptive state file")
        meta = json.loads(raw)
        t = {k: f.get_tensor(k) for k in f.keys()}
    if meta["n_layers"] != model.config.n_layers:
        raise LeanlmError(f"{path} was calibrated for a {meta['n_layers']}-layer model; this one has "
                          f"{model.config.n_layers} layers: load it on the model it was made for")  # fmt: skip
    make_adaptive(model)
    if "routing" in meta:
        cfg = routing.NeuronRouting(**meta["routing"]["config"])
        for i, layer in enumerate(model.layers):
            if f"routing.{i}.perm" in t:
                m = layer.mlp
                r = torch.nn.Linear(m.w_gate_up.in_features, cfg.groups)
                r.weight.data.copy_(t[f"routing.{i}.router.weight"])
                r.bias.data.copy_(t[f"routing.{i}.router.bias"])
                r.requires_grad_(False)
                layer.mlp = routing.RoutedMLP(m.w_gate_up.weight.detach(), m.w_down.weight.detach(),
                                              t[f"routing.{i}.perm"], cfg.groups, m.act, cfg.p, r)  # fmt: skip
        record(model, cfg, {"loaded": str(path)})
        model._flops = [layer_flops(l) for l in model.layers]
    if "sparsity" in meta:
        s = meta["sparsity"]
        cfg = sparsity.ActivationSparsity(**{**s["config"], "targets": tuple(s["config"]["targets"])})
        th = [{n: v[i] for n, v in s["thresholds"].items()} for i in range(model.config.n_layers)]
        sparsity.apply_activation_sparsity(model, cfg, thresholds=th, head_threshold=s.get("head_threshold"))
    if "skip" in meta:
        s = meta["skip"]
        add_gate(model, layer_skip.SkipGate(t["skip.weight"], t["skip.bias"], s["routable"], s["threshold"]))
        record(model, layer_skip.LayerSkip(**s["config"]), {"loaded": str(path)})
    if "exit" in meta:
        e = meta["exit"]
        cfg = early_exit.EarlyExit(**e["config"])
        D, V, L = model.config.hidden_size, model.config.vocab_size, model.config.n_layers
        lens = {i: (t[f"exit.lens.{i}.A"], t[f"exit.lens.{i}.b"]) for i in e["lens_layers"]}
        gate = early_exit.ExitGate(cfg.confidence, e["threshold"], 0, L, 1, D, V, lens)
        gate.check = list(e["check"])
        add_gate(model, gate)
        record(model, cfg, {"loaded": str(path)})
    return meta
