"""Healing: a short distillation of the pruned model towards the unpruned one.

Loss: mean per-token KL(teacher || student) over all positions of calibration windows, the
teacher being the unpruned model. All remaining weights of the decoder blocks are trained
(model/distill.py: AdamW, linear warm-up then linear decay, gradient clipping); embeddings, the LM head and
the final norm stay frozen. With `keep_zeros` the zeros of an unstructured / N:M pruned model
are restored after every step, so healing never undoes the sparsity.
"""

from __future__ import annotations

import torch

from ..errors import LeanlmError
from ..model.distill import distill, distill_loss  # noqa: F401  (distill_loss: re-exported)


def heal(student, teacher, tokens: torch.Tensor, steps: int = 100, lr: float = 1e-4, batch_size: int = 2,
         keep_zeros: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Distil `teacher` into `student` (in place) on calibration windows `tokens` [n, T]."""
    if student.dtype != torch.float32:
        raise LeanlmError("healing trains in float32: load the model with dtype float32")
    params = [p for n, p in student.named_parameters() if n.startswith("layers.")]
    masks = {}
    if keep_zeros:
        masks = {p: p.detach() != 0 for n, p in student.named_parameters()
                 if n.startswith("layers.") and p.dim() == 2 and bool((p == 0).any())}  # fmt: skip

    def restore_zeros():
        for p, m in masks.items():
            p.mul_(m)

    return distill(student, teacher, tokens, params, steps, lr, batch_size, seed, progress, desc="heal",
                   after_step=restore_zeros if masks else None)  # fmt: skip
