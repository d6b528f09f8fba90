"""Healing: a short distillation of the pruned model towards the unpruned one.

Loss: mean per-token KL(teacher || student) over all positions of calibration windows, the
teacher being the unpruned model. All remaining weights of the decoder blocks are trained
(AdamW, linear warm-up then linear decay, gradient clipping); embeddings, the LM head and
the final norm stay frozen. With `keep_zeros` the zeros of an unstructured / N:M pruned model
are restored after every step, so healing never undoes the sparsity.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import LeanlmError


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student)."""
    lt = F.log_softmax(teacher_logits.float(), -1)
    ls = F.log_softmax(student_logits.float(), -1)
    return F.kl_div(ls.flatten(0, -2), lt.flatten(0, -2), log_target=True, reduction="batchmean")


def heal(student, teacher, tokens: torch.Tensor, steps: int = 100, lr: float = 1e-4, batch_size: int = 2,
         keep_zeros: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Distil `teacher` into `student` (in place) on calibration windows `tokens` [n, T]."""
    if steps < 0:
        raise LeanlmError(f"heal steps must be >= 0, got {steps}")
    if student.dtype != torch.float32:
        raise LeanlmError("healing trains in float32: load the model with dtype float32")
    report = {"steps": steps, "lr": lr, "batch_size": batch_size, "seq_len": tokens.shape[1], "losses": []}
    if steps == 0:
        return report
    params = [p for n, p in student.named_parameters() if n.startswith("layers.")]
    frozen = [p for n, p in student.named_parameters() if not n.startswith("layers.")]
    for p in params:
        p.requires_grad_(True)
    for p in frozen:
        p.requires_grad_(False)
    masks = {}
    if keep_zeros:
        for n, p in student.named_parameters():
            if n.startswith("layers.") and p.dim() == 2 and (p == 0).any():
                masks[n] = p.detach() != 0
    named = dict(student.named_parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    g = torch.Generator().manual_seed(seed)
    student.clear_cache()
    teacher.clear_cache()
    student.train()
    t0 = time.perf_counter()
    try:
        for step in tqdm(range(steps), desc="heal", disable=not progress, leave=False):
            idx = torch.randint(0, tokens.shape[0], (batch_size,), generator=g)
            batch = tokens[idx].to(student.device)
            with torch.no_grad():
                t_logits = teacher(batch)
            loss = distill_loss(student(batch), t_logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if masks:
                with torch.no_grad():
                    for n, m in masks.items():
                        named[n].mul_(m)
            value = loss.item()
            if not math.isfinite(value):
                raise LeanlmError(f"healing diverged at step {step} (loss {value}); lower the learning rate")
            report["losses"].append(round(value, 5))
    finally:
        student.eval()
        for p in student.parameters():
            p.requires_grad_(False)
        student.zero_grad(set_to_none=True)
    report["seconds"] = time.perf_counter() - t0
    report["first_loss"] = report["losses"][0]
    report["last_loss"] = sum(report["losses"][-10:]) / len(report["losses"][-10:])
    return report
