"""`leanlm export`: one llama.cpp GGUF file or a transformers directory."""

from __future__ import annotations

import sys
import time

from ..errors import LeanlmError
from ..export.gguf import TYPES as GGUF_TYPES
from .common import add_model_args, load_model, verb_parser


def add_parser(subparsers):
    p = verb_parser(subparsers, "export", help="write a GGUF file (llama.cpp) or an HF directory",
                    description="Export a model: --format gguf writes one llama.cpp-loadable file (f32 | f16 | q8_0 | "
                                "q4_0 | q4_k | q5_k | q6_k | iq4_nl; Llama, Mistral, Qwen2, Qwen3, Gemma 3; per-layer "
                                "pruned widths of Llama and Qwen2 as llama.cpp's deci architecture; a quantized "
                                "model keeps its own codes where the type is its grid); --format hf writes a transformers directory "
                                "(safetensors; a quantized model as compressed-tensors); --format compressed-tensors "
                                "writes a quantized model's pack-quantized checkpoint (vLLM, transformers). Written "
                                "atomically; an existing --out needs --force.",
                    examples=["leanlm export smollm2-135m --format gguf --type q8_0 --out smollm2-q8_0.gguf",
                              "leanlm export smollm2-135m --format hf --type bf16 --out out/smollm2-bf16",
                              "python -c \"from llama_cpp import Llama; print(Llama('smollm2-q8_0.gguf')('Hi', max_tokens=8))\""])  # fmt: skip
    add_model_args(p)
    p.add_argument("--format", choices=("gguf", "hf", "compressed-tensors"), default="gguf",
                   help="gguf (default), hf, or compressed-tensors (quantized models)")
    p.add_argument("--type", choices=("f32", "f16", "bf16") + GGUF_TYPES[2:], default=None,
                   help="gguf: f32 | f16 (default) | q8_0 | q4_0 | q4_k | q5_k | q6_k | iq4_nl; hf / compressed-tensors: f32 | f16 | bf16 "
                        "(dense tensors; default: the model's dtype)")
    p.add_argument("--out", required=True, help="output .gguf file or directory")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    return p


def main(args) -> int:
    from ..io import check_writable, estimated_bytes

    if args.format != "gguf" and args.type not in (None, "f32", "f16", "bf16"):
        raise LeanlmError(f"--type {args.type} is for --format gguf; {args.format} takes f32 | f16 | bf16")
    if args.format == "gguf" and args.type == "bf16":
        raise LeanlmError(f"--format gguf takes --type {' | '.join(GGUF_TYPES)}")
    default_bits = 16 if args.format == "gguf" or args.dtype not in ("float32", "fp32") else 32
    bits = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q4_0": 4.5, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625,
            "iq4_nl": 4.5}.get(args.type, default_bits)  # fmt: skip
    check_writable(args.out, args.force, directory=args.format != "gguf",
                   need_bytes=estimated_bytes(args.model, bits))  # fail before loading the model  # fmt: skip
    model, tok = load_model(args)
    t0 = time.time()
    if args.format == "gguf":
        from ..export import export_gguf
        from ..export.gguf import summarize_report

        report: dict = {}
        path = export_gguf(model, tok, args.out, args.type or "f16", force=args.force, report=report)
        print(f"tensors: {summarize_report(report)}", file=sys.stderr)
    else:
        from ..export import export_compressed_tensors, export_hf

        dtype = {None: None, "f32": "float32", "f16": "float16", "bf16": "bfloat16"}[args.type]
        export = export_hf if args.format == "hf" else export_compressed_tensors
        path = export(model, tok, args.out, force=args.force, dtype=dtype)
    size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    print(f"wrote {path} ({size / 2**20:.1f} MB, {time.time() - t0:.1f} s)", file=sys.stderr)
    return 0
