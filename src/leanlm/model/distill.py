"""Logit distillation towards a reference model: the training loop that pruning's healing and
quantization's scale tuning share.

Loss: mean per-token KL(teacher || student) over every position of calibration windows
(the quantity `leanlm eval` reports as KL to the base model). AdamW on the given parameters
only, linear warm-up then linear decay, gradient clipping; `after_step` lets a caller project
the parameters back onto a constraint (e.g. pruned zeros stay zero).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import LeanlmError


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student)."""
    lt = F.log_softmax(teacher_logits.float(), -1)
    ls = F.log_softmax(student_logits.float(), -1)
    return F.kl_div(ls.flatten(0, -2), lt.flatten(0, -2), log_target=True, reduction="batchmean")


def distill(student, teacher, tokens: torch.Tensor, params: list[torch.Tensor] | list[dict], steps: int, lr: float,
            batch_size: int = 2, seed: int = 0, progress: bool = True, desc: str = "distill",
            after_step: Callable[[], None] | None = None) -> dict:  # fmt: skip
    """Train `params` of `student` (in place) to match `teacher`'s next-token distributions on
    windows `tokens` [n, T]; every other parameter of the student is frozen. `params` is a list of
    tensors or of optimizer parameter groups ({"params": [...], "lr": ...}) whose own learning
    rates override `lr`. Returns a report with the loss of every step."""
    if steps < 0:
        raise LeanlmError(f"training steps must be >= 0, got {steps}")
    if batch_size < 1 or lr <= 0:
        raise LeanlmError(f"need batch_size >= 1 and lr > 0, got batch_size={batch_size}, lr={lr}")
    report = {"steps": steps, "lr": lr, "batch_size": batch_size, "seq_len": tokens.shape[1], "losses": []}
    if steps == 0:
        return report
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    params = [p for group in groups for p in group["params"]]
    ids = {id(p) for p in params}
    for p in student.parameters():
        p.requires_grad_(id(p) in ids)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    g = torch.Generator().manual_seed(seed)
    student.clear_cache()
    teacher.clear_cache()
    student.train()
    t0 = time.perf_counter()
    try:
        bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
        for step in bar:
            idx = torch.randint(0, tokens.shape[0], (batch_size,), generator=g)
            batch = tokens[idx].to(student.device)
            with torch.no_grad():
                t_logits = teacher(batch)
            loss = distill_loss(student(batch), t_logits)
            del t_logits
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step()
            value = loss.item()
            if not math.isfinite(value):
                raise LeanlmError(f"{desc} diverged at step {step} (loss {value}); lower the learning rate")
            report["losses"].append(round(value, 5))
            bar.set_postfix(kl=f"{value:.4f}")
    finally:
        student.eval()
        for p in student.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    report["seconds"] = time.perf_counter() - t0
    report["first_loss"] = report["losses"][0]
    report["last_loss"] = sum(report["losses"][-10:]) / len(report["losses"][-10:])
    return report
