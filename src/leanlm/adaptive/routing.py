"""Neuron-group routing (MoE-fication): every FFN becomes E experts, a router picks how many a token gets.

1. Cluster: per layer, the FFN neurons' activation patterns on calibration text (|act(gate)*up|
   over a few thousand tokens, each neuron's column L2-normalised) are grouped by balanced
   spherical k-means into E groups of F/E neurons that tend to fire together.
2. Permute: the weights are laid out group by group - w_gate_up as [gate_e; up_e] blocks of
   2F/E rows, w_down transposed to [F, D] - so one group is one contiguous slice of each
   (a view; nothing is copied at decode).
3. Router: a linear layer on the MLP input predicts each group's share of the FFN output
   (|W_down,e a_e| / sum over groups), trained with soft-target cross-entropy for `steps`
   Adam steps on the calibration activations.
4. Inference: groups sorted by router probability are taken until their mass reaches `p`
   (top-p), so an easy token gets few groups and a hard one many; p=1 takes all of them and
   is the dense FFN (up to summation order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..apply import record, update_latest
from ..errors import LeanlmError
from ..model.runtime import upcast_for_matmul
from .runtime import gemv, layer_flops, make_adaptive


@dataclass
class NeuronRouting:
    groups: int = 8
    p: float = 0.9  # router probability mass covered per token
    steps: int = 200  # router training steps (full batch of up to 4096 calibration tokens)
    lr: float = 1e-2
    kmeans_iters: int = 10
    calib_samples: int = 8
    calib_seq_len: int = 512

    saved_apart = True  # what calibration learned is kept in adaptive.safetensors (state.py), not in the weights
    needs_calibration = True  # clusters and routers come from calibration activations

    def price(self, plan) -> None:
        """Not priced: the cost model has no routed FFN yet (the measured FLOPs fraction is in eval)."""

    def __post_init__(self):
        if self.groups < 2:
            raise LeanlmError(f"neuron routing needs at least 2 groups, got {self.groups}")
        if not 0 < self.p <= 1:
            raise LeanlmError(f"neuron routing p must be in (0, 1], got {self.p}")


class RoutedMLP(nn.Module):
    """The FFN of one block with neurons in E contiguous groups and a router choosing groups per token."""

    def __init__(self, w_gate_up: torch.Tensor, w_down: torch.Tensor, perm: torch.Tensor, groups: int, act, p: float,
                 router: nn.Linear):  # fmt: skip
        super().__init__()
        F2, D = w_gate_up.shape
        f = F2 // 2
        E, G = groups, f // groups
        self.ffn_dim, self.groups, self.group_size, self.act, self.p = f, E, G, act, float(p)
        gate, up = w_gate_up[:f][perm], w_gate_up[f:][perm]
        self.w1 = nn.Parameter(torch.stack([gate.view(E, G, D), up.view(E, G, D)], 1).reshape(F2, D).contiguous(),
                               requires_grad=False)  # fmt: skip
        self.w2t = nn.Parameter(w_down[:, perm].t().contiguous(), requires_grad=False)  # [F, D]
        self.router = router
        self.register_buffer("perm", perm, persistent=False)
        self.dense_flops = 2.0 * D * F2 + 2.0 * f * D
        self.router_flops = 2.0 * D * E
        self.last_flops = None

    def select(self, x2: torch.Tensor) -> torch.Tensor:
        """[N, E] bool: the smallest set of groups (by router probability) whose mass reaches p."""
        probs = self.router(x2.float()).softmax(-1)
        sp, idx = probs.sort(-1, descending=True)
        keep_sorted = (sp.cumsum(-1) - sp) < self.p  # keep a group while the mass before it is short of p
        return torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        E, G = self.groups, self.group_size
        if self.p >= 1.0:
            keep = None
        else:
            keep = self.select(x2)
        if x2.shape[0] == 1:  # decode: only the chosen groups' weight slices are read
            chosen = list(range(E)) if keep is None else keep[0].nonzero().view(-1).tolist()
            self.last_flops = self.dense_flops * len(chosen) / E + (0 if keep is None else self.router_flops)
            y = None
            for s, e in _runs(chosen):
                h = gemv(x2, self.w1[2 * G * s : 2 * G * e]).view(e - s, 2, G)  # a contiguous slice: no copy
                a = (self.act(h[:, 0]) * h[:, 1]).reshape(1, -1)
                part = a @ self.w2t[G * s : G * e]
                y = part if y is None else y + part
            return y.view(*shape[:-1], -1)
        up = upcast_for_matmul(x2)  # same rule as the runtime's Linear (bf16 GEMMs are slow on CPU)
        h = (F.linear(x2.float(), self.w1.float()) if up else F.linear(x2, self.w1)).view(-1, E, 2, G)
        a = self.act(h[:, :, 0]) * h[:, :, 1]  # [N, E, G]
        if keep is not None:
            a = a * keep.unsqueeze(-1)
            self.last_flops = keep.sum(-1) * (self.dense_flops / E) + self.router_flops
        else:
            self.last_flops = None
        y = a.reshape(-1, self.ffn_dim) @ (self.w2t.float() if up else self.w2t)
        return y.to(x.dtype).view(*shape[:-1], -1)


def _runs(groups: list[int]) -> list[tuple[int, int]]:
    """Sorted group ids -> maximal [start, end) runs (one matmul per contiguous run)."""
    out = []
    for g in groups:
        if out and out[-1][1] == g:
            out[-1] = (out[-1][0], g + 1)
        else:
            out.append((g, g + 1))
    return out


def balanced_kmeans(feats: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Assign the rows of feats [F, n] (L2-normalised) to k equal-size clusters (F divisible by k):
    spherical k-means where each assignment step fills clusters greedily by similarity."""
    n = feats.shape[0]
    cap = n // k
    g = torch.Generator().manual_seed(seed)
    centers = feats[torch.randperm(n, generator=g)[:k]].clone()
    for _ in range(iters):
        sim = feats @ centers.T  # [F, k]
        order = sim.flatten().argsort(descending=True).tolist()
        assign = [-1] * n
        room = [cap] * k
        left = n
        for flat in order:  # best (neuron, cluster) pairs first, clusters capped at F/k
            i, c = divmod(flat, k)
            if assign[i] < 0 and room[c] > 0:
                assign[i] = c
                room[c] -= 1
                left -= 1
                if left == 0:
                    break
        a = torch.tensor(assign)
        centers = torch.stack([F.normalize(feats[a == c].sum(0), dim=0) for c in range(k)])
    return a


@torch.no_grad()
def apply_neuron_routing(model, cfg: NeuronRouting, calib: torch.Tensor | None = None, tokenizer=None,
                         progress: bool = True) -> dict:  # fmt: skip
    """Cluster, permute and route every FFN of the model in place. Returns a report per layer."""
    from ..calibration import run_sequential

    make_adaptive(model)
    if calib is None:
        if tokenizer is None:
            raise LeanlmError("neuron routing needs calibration tokens (or a tokenizer to cut them)")
        from ..calibration import calibration_tokens

        calib = calibration_tokens(tokenizer, "wikitext2-valid", cfg.calib_samples, cfg.calib_seq_len)
    for layer in model.layers:
        m = layer.mlp
        if isinstance(m, RoutedMLP):
            raise LeanlmError("neuron routing is already applied to this model")
        if type(m.w_gate_up).__name__ != "Linear" or type(m.w_down).__name__ != "Linear":
            raise LeanlmError("neuron routing needs plain Linear FFN weights: apply it before activation sparsity "
                              "on the MLP (teal), quantization or packing")  # fmt: skip
        if m.ffn_dim % cfg.groups:
            raise LeanlmError(f"FFN width {m.ffn_dim} is not divisible by groups={cfg.groups}")
    report = []

    def per_block(i, layer, xs, rope, dtype):
        m = layer.mlp
        ins: list = []
        handle = m.register_forward_pre_hook(lambda mod, args: ins.append(args[0].detach().flatten(0, -2)))
        try:
            ys = [layer(x, rope, 0, dtype) for x in xs]
        finally:
            handle.remove()
        X = torch.cat(ins).float()  # MLP inputs (after the norm) [N, D]
        X = X[torch.randperm(len(X), generator=torch.Generator().manual_seed(i))[:4096]]
        f = m.ffn_dim
        gu = F.linear(X, m.w_gate_up.weight.float())
        A = m.act(gu[:, :f]) * gu[:, f:]  # [N, F]
        assign = balanced_kmeans(F.normalize(A[:2048].abs().T, dim=1), cfg.groups, cfg.kmeans_iters, seed=i)
        perm = torch.cat([(assign == c).nonzero().view(-1) for c in range(cfg.groups)])
        # soft targets: each group's share of the FFN output norm
        Wd = m.w_down.weight.float()[:, perm]
        G = f // cfg.groups
        Ap = A[:, perm].view(len(A), cfg.groups, G)
        contrib = torch.stack([(Ap[:, e] @ Wd[:, e * G : (e + 1) * G].T).norm(dim=-1) for e in range(cfg.groups)], 1)
        target = contrib / contrib.sum(-1, keepdim=True).clamp_min(1e-12)
        router = nn.Linear(X.shape[1], cfg.groups)
        with torch.inference_mode(False), torch.enable_grad():  # callers may be in inference / no-grad mode
            X, target = X.clone(), target.clone()
            opt = torch.optim.Adam(router.parameters(), lr=cfg.lr)
            for _ in range(cfg.steps):
                loss = -(target * F.log_softmax(router(X), -1)).sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        router.requires_grad_(False)
        routed = RoutedMLP(m.w_gate_up.weight.detach(), m.w_down.weight.detach(), perm, cfg.groups, m.act, cfg.p,
                           router)  # fmt: skip
        with torch.no_grad():
            keep = routed.select(X)
            # how much of the FFN output the chosen groups carry (1.0 = all of it)
            kept_mass = float((target * keep).sum(-1).mean())
        layer.mlp = routed
        report.append({"layer": i, "router_loss": float(loss), "groups_mean": float(keep.sum(-1).float().mean()),
                       "target_mass_kept": kept_mass})  # fmt: skip
        return ys

    run_sequential(model, calib, per_block, batch_size=4, progress=progress, desc="neuron routing")
    model._flops = [layer_flops(l) for l in model.layers]
    record(model, cfg)
    return {"groups": cfg.groups, "p": cfg.p, "layers": report,
            "groups_mean": sum(r["groups_mean"] for r in report) / len(report)}  # fmt: skip


def set_routing_p(model, p: float) -> None:
    """Change the probability mass every routed FFN covers (clusters and routers stay as trained)."""
    if not 0 < p <= 1:
        raise LeanlmError(f"neuron routing p must be in (0, 1], got {p}")
    for layer in model.layers:
        if isinstance(layer.mlp, RoutedMLP):
            layer.mlp.p = float(p)
    update_latest(model, NeuronRouting, p=float(p))
