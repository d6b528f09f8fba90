"""Measurement: perplexity, KL to a reference, zero-shot tasks, speed, memory."""

from .perplexity import kl_divergence, perplexity
from .speed import measure_speed, memory_report
from .tasks import TASKS, evaluate_task

__all__ = ["TASKS", "evaluate_task", "kl_divergence", "measure_speed", "memory_report", "perplexity"]
