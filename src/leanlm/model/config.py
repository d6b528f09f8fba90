"""leanlm's model description: one ModelConfig with a LayerSpec per decoder layer.

Per-layer specs let pruning give layers different head counts and FFN widths. The config
is derived from a transformers config (which does the parsing of every checkpoint format)
and can be written back as one, so that saved models stay loadable by transformers.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import LeanlmError

# model_type -> family. Families differ only in the switches of ModelConfig below.
SUPPORTED_ARCHITECTURES = {
    "llama": "llama",  # Llama 2/3 (incl. rope scaling), SmolLM, TinyLlama
    "mistral": "llama",
    "qwen2": "llama",  # q/k/v bias
    "qwen3": "llama",  # QK-norm
    "gemma3_text": "gemma3",  # GeGLU, QK-norm, sandwich norms, (1 + w) norms, sliding layers
}
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class LayerSpec:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    sliding_window: int | None = None  # attend to the last `sliding_window` keys (incl. self)
    rope_key: str = "default"  # which rotary table of ModelConfig.rope this layer uses


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    layers: list[LayerSpec]
    norm_eps: float = 1e-5
    activation: str = "silu"  # silu (SwiGLU) | gelu_tanh (GeGLU)
    norm_plus_one: bool = False  # Gemma scales by (1 + w)
    sandwich_norms: bool = False  # Gemma: extra norms after attention and after the MLP
    qk_norm: bool = False
    qkv_bias: bool = False
    embed_scale: float | None = None  # Gemma multiplies embeddings by sqrt(hidden)
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    final_logit_softcap: float | None = None
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    # rope_key -> {"type": ..., "theta": ..., plus scaling params}; inv_freq is derived from it
    rope: dict[str, dict[str, Any]] = field(default_factory=dict)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)  # for saving

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.model_type]

    def is_uniform(self) -> bool:
        first = self.layers[0]
        keys = ("n_heads", "n_kv_heads", "head_dim", "ffn_dim")
        return all(all(getattr(l, k) == getattr(first, k) for k in keys) for l in self.layers)

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        return sum(2 * l.n_kv_heads * l.head_dim * bytes_per_element for l in self.layers)

    # ---- transformers interop -------------------------------------------------------
    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        """Build from a transformers PretrainedConfig (or its dict)."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        mt = d.get("model_type")
        if mt == "gemma3":  # multimodal wrapper: take its text part
            d = {**d["text_config"], "model_type": "gemma3_text"}
            mt = "gemma3_text"
        if mt not in SUPPORTED_ARCHITECTURES:
            raise LeanlmError(
                f"unsupported architecture '{mt}'; leanlm supports: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[mt]
        n_layers = d["num_hidden_layers"]
        n_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // n_heads
        n_kv = d.get("num_key_value_heads") or n_heads
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise LeanlmError(f"{mt}: partial rotary embeddings are not supported")

        layer_types = d.get("layer_types") or ["full_attention"] * n_layers
        rope_params = d.get("rope_parameters") or {
            "rope_type": (d.get("rope_scaling") or {}).get("rope_type", "default"),
            "rope_theta": d.get("rope_theta", 10000.0),
            **(d.get("rope_scaling") or {}),
        }
        per_type = isinstance(next(iter(rope_params.values()), None), dict)
        rope, layers = {}, []
        for i in range(n_layers):
            lt = layer_types[i]
            key = lt if per_type else "default"
            params = rope_params[lt] if per_type else rope_params
            rtype = params.get("rope_type", params.get("type", "default"))
            if rtype not in STATIC_ROPE_TYPES:
                raise LeanlmError(
                    f"rope type '{rtype}' is not supported (supported: {', '.join(STATIC_ROPE_TYPES)})"
                )
            rope[key] = {"layer_type": lt if per_type else None, **params, "rope_type": rtype}
            if lt == "sliding_attention" or (mt == "mistral" and d.get("sliding_window")):
                window = d.get("sliding_window")
            else:
                window = None
            layers.append(LayerSpec(n_heads, n_kv, head_dim, d["intermediate_size"], window, key))

        eos = d.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        gemma = family == "gemma3"
        if d.get("attn_logit_softcapping"):
            raise LeanlmError("attention logit soft-capping (Gemma 2) is not supported")
        act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
        act = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_tanh"}.get(act)
        if act is None:
            raise LeanlmError(f"activation '{d.get('hidden_act')}' is not supported (silu, gelu_pytorch_tanh)")
        return cls(
            model_type=mt,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            layers=layers,
            norm_eps=d.get("rms_norm_eps", 1e-6),
            activation=act,
            norm_plus_one=gemma,
            sandwich_norms=gemma,
            qk_norm=gemma or mt == "qwen3",
            qkv_bias=bool(d.get("attention_bias", mt == "qwen2")),
            embed_scale=d["hidden_size"] ** 0.5 if gemma else None,
            attn_scale=d["query_pre_attn_scalar"] ** -0.5 if gemma else None,
            final_logit_softcap=d.get("final_logit_softcapping"),
            tie_embeddings=d.get("tie_word_embeddings", True),
            max_seq_len=d.get("max_position_embeddings", 2048),
            rope=rope,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos,
            hf_config=d,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers config.json for this model, with leanlm's per-layer specs beside it.

        Uniform models load in transformers as they are; models with per-layer shapes
        (after non-uniform pruning) load in leanlm through the `leanlm_layers` entry.
        """
        d = copy.deepcopy(self.hf_config)
        first = self.layers[0]
        d.update(
            num_hidden_layers=self.n_layers,
            num_attention_heads=first.n_heads,
            num_key_value_heads=first.n_kv_heads,
            head_dim=first.head_dim,
            intermediate_size=first.ffn_dim,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            tie_word_embeddings=self.tie_embeddings,
        )
        if d.get("layer_types"):
            d["layer_types"] = [
                "sliding_attention" if l.sliding_window else "full_attention" for l in self.layers
            ]
        d["leanlm_layers"] = [asdict(l) for l in self.layers]
        for k in ("transformers_version", "_name_or_path", "_model_name_or_path", "torch_dtype", "dtype"):
            d.pop(k, None)
        return d


def apply_layer_overrides(cfg: ModelConfig, hf_dict: dict[str, Any]) -> ModelConfig:
    """Per-layer shapes written by leanlm's save (see ModelConfig.to_hf_dict)."""
    specs = hf_dict.get("leanlm_layers")
    if specs:
        cfg.layers = [LayerSpec(**s) for s in specs]
    return cfg
