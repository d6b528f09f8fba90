"""Pruning that is honest about what it buys.

- Unstructured / N:M (`Unstructured`, `prune_unstructured`): magnitude, Wanda, SparseGPT,
  uniform or OWL per-layer ratios, layer-sequential calibration. Zeros alone save nothing:
  `save_compressed` (bitmask on disk) and `sparsify_model` (CSR / bitmask in memory) cash
  them in, and the benchmark measures what that buys.
- Structured (`Structured`, `prune_structured`): FFN neurons, attention heads (GQA-aware),
  whole layers (block influence); matrices physically shrink, so the model is smaller and faster.
- Learned N:M (`MaskLLM`, `prune_maskllm`): MaskLLM-style Gumbel-softmax choice among the N:M patterns of
  every group, from a SparseGPT / Wanda / magnitude prior, trained block by block by distillation, with an
  optional cost-model term that decides dense or N:M per linear.
- Healing (`heal`): a short KL distillation towards the unpruned model.

    from leanlm.prune import Unstructured, prune_unstructured, calibration_tokens
    calib = calibration_tokens(tok, "wikitext2-valid", n_samples=32, seq_len=512)
    report = prune_unstructured(model, Unstructured("wanda", pattern="2:4"), calib)
"""

from ..calibration import calibration_tokens
from .heal import heal
from .maskllm import MaskLLM, prune_maskllm
from .masks import nm_mask, owl_layer_sparsity, parse_pattern, unstructured_mask, wanda_scores
from .sparse_storage import SparseLinear, save_compressed, sparsify_model
from .sparsegpt import sparsegpt_prune
from .structured import Structured, prune_structured, remove_layers, shrink_attention, shrink_mlp
from .unstructured import Unstructured, prune_unstructured, sparsity_report

__all__ = [
    "MaskLLM", "SparseLinear", "Structured", "Unstructured", "calibration_tokens", "heal", "nm_mask", "owl_layer_sparsity",
    "parse_pattern", "prune_maskllm", "prune_structured", "prune_unstructured", "remove_layers", "save_compressed",
    "shrink_attention", "shrink_mlp", "sparsegpt_prune", "sparsify_model", "sparsity_report",
    "unstructured_mask", "wanda_scores",
]  # fmt: skip
