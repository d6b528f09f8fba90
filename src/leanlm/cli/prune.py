"""`leanlm prune`: unstructured / N:M / structured pruning, optional healing, saved atomically."""

from __future__ import annotations

import time

from ..errors import LeanlmError
from .common import add_model_args, check_json_dest, emit_json, integer, load_model, number, verb_parser


def add_parser(subparsers):
    p = verb_parser(subparsers, "prune", help="unstructured / N:M / structured pruning, healing, save",
                    description="Prune a model and save it. Unstructured and N:M (--method) zero weights: the file "
                                "shrinks only with --storage bitmask (default), speed does not change. Structured "
                                "pruning (--structured) removes FFN neurons, attention heads or whole layers: a "
                                "smaller, faster dense model. --heal-steps distils it back towards the original.",
                    examples=["leanlm prune smollm2-135m --method wanda --sparsity 0.5 --out pruned-w50",
                              "leanlm prune smollm2-135m --method sparsegpt --pattern 2:4 --out pruned-24",
                              "leanlm prune smollm2-135m --method maskllm --pattern 2:4 --mask-steps 24 --out learned-24",
                              "leanlm prune smollm2-135m --structured neurons --ratio 0.25 --heal-steps 100 --out ffn75",
                              "leanlm prune smollm2-135m --structured layers --remove 4 --eval-windows 10 --out l26",
                              "leanlm prune gemma3-270m --structured heads --ratio 0.25 --head-mode q --out g-heads"])  # fmt: skip
    add_model_args(p)
    p.add_argument("--out", required=True, help="output directory (written atomically; --force to replace)")
    p.add_argument("--force", action="store_true", help="replace an existing --out / --json")
    g = p.add_argument_group("unstructured / N:M")
    g.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt", "maskllm"),
                   help="weight pruning criterion (maskllm: N:M masks learned from a prior, see below)")
    g.add_argument("--sparsity", type=number(0, 1, high_open=True), help="fraction of block weights zeroed, in [0, 1)")
    g.add_argument("--pattern", help="N:M semi-structured pattern, e.g. 2:4 or 4:8 (N kept of every M)")
    g.add_argument("--allocation", default="uniform", choices=("uniform", "owl"),
                   help="per-layer ratios: uniform, or OWL outlier-weighted (default uniform)")
    g.add_argument("--storage", default="bitmask", choices=("bitmask", "dense"),
                   help="bitmask: smaller file, leanlm-only (default); dense: zeros stored, transformers-loadable")
    g = p.add_argument_group("learned N:M masks (--method maskllm)")
    g.add_argument("--mask-prior", choices=("sparsegpt", "wanda", "magnitude"),
                   help="mask the logits start from (default sparsegpt)")
    g.add_argument("--mask-steps", type=integer(0), help="optimizer steps per block (default 24)")
    g.add_argument("--mask-batch", type=integer(1), help="calibration windows per step (default 1)")
    g.add_argument("--mask-weights", choices=("prior", "original"),
                   help="frozen weights under the mask: the prior's (SparseGPT-compensated, default) or the original")
    g.add_argument("--mask-target", choices=("teacher", "block"),
                   help="block output target: the dense model's hidden state (default) or the dense block on the same input")
    g.add_argument("--cost-weight", type=number(0), help="weight of the cost model's price of dense vs N:M per "
                   "linear in the loss (each linear then learns whether to stay dense); needs --hardware")
    g.add_argument("--hardware", help="hardware profile that prices the cost term (a100, h100, h200, cpu or a JSON)")
    g = p.add_argument_group("structured")
    g.add_argument("--structured", choices=("neurons", "heads", "layers"), help="what to remove physically")
    g.add_argument("--ratio", type=number(0, 1, low_open=True, high_open=True), help="fraction of FFN neurons / heads removed, in (0, 1)")
    g.add_argument("--remove", type=integer(1), help="number of decoder layers removed (--structured layers)")
    g.add_argument("--importance", default="activation", choices=("activation", "wanda", "magnitude"),
                   help="neuron/head score (default activation: max residual contribution)")
    g.add_argument("--scope", default="layer", choices=("layer", "global"),
                   help="layer: same ratio per layer (uniform, transformers-loadable); global: one ranking")
    g.add_argument("--head-mode", default="kv", choices=("kv", "q"),
                   help="kv: remove whole KV groups; q: remove query heads within every group (default kv)")
    g = p.add_argument_group("calibration and healing")
    g.add_argument("--calib-text", default="wikitext2-valid",
                   help="calibration text: wikitext2-valid (default), pride-and-prejudice, or a file")
    g.add_argument("--calib-samples", type=integer(1), default=32, help="calibration windows (default 32)")
    g.add_argument("--calib-seq-len", type=integer(16), default=512, help="calibration window length (default 512)")
    g.add_argument("--data-dir", help="data folder (default $LEANLM_DATA)")
    g.add_argument("--heal-steps", type=integer(0), default=0, help="distillation steps after pruning (default 0)")
    g.add_argument("--heal-lr", type=number(0, 1, low_open=True, high_open=True), default=1e-4, help="healing learning rate (default 1e-4)")
    g.add_argument("--heal-batch", type=integer(1), default=2, help="healing windows per step (default 2)")
    g.add_argument("--heal-seq-len", type=integer(16), default=256, help="healing window length (default 256)")
    g.add_argument("--eval-windows", type=integer(0), default=0,
                   help="report WikiText-2 ppl and KL vs the unpruned model on N 512-token windows (default off)")
    p.add_argument("--json", metavar="PATH", help="write the pruning report as JSON ('-' for stdout)")
    return p


def main(args) -> int:
    """Validate everything before loading the model, prune, optionally heal, save atomically."""
    import copy

    from ..evaluate.speed import disk_bytes, weight_bytes
    from ..io import check_writable, estimated_bytes
    from ..prune import (MaskLLM, Structured, Unstructured, calibration_tokens, heal, prune_maskllm, prune_structured,
                         prune_unstructured, save_compressed)  # fmt: skip

    if (args.method is None) == (args.structured is None):
        raise LeanlmError("choose either --method magnitude|wanda|sparsegpt|maskllm (unstructured / N:M) "
                          "or --structured neurons|heads|layers")  # fmt: skip
    mask_args = {"prior": args.mask_prior, "weights": args.mask_weights, "target": args.mask_target,
                 "steps": args.mask_steps, "batch": args.mask_batch, "cost_weight": args.cost_weight,
                 "hardware": args.hardware}  # fmt: skip
    if args.method == "maskllm":
        if args.pattern is None or args.allocation != "uniform":
            raise LeanlmError("--method maskllm learns an N:M pattern: give --pattern (e.g. 2:4), without --allocation")
        cfg = MaskLLM(args.pattern, **{k: v for k, v in mask_args.items() if v is not None})
        implied = 1 - cfg.nm[0] / cfg.nm[1]
        if args.sparsity is not None and abs(args.sparsity - implied) > 1e-9:
            raise LeanlmError(f"pattern {args.pattern} means sparsity {implied:g}, not {args.sparsity:g}; drop --sparsity")
    elif any(v is not None for v in mask_args.values()):
        raise LeanlmError("--mask-*, --cost-weight and --hardware belong to --method maskllm")
    elif args.method:
        cfg = Unstructured(args.method, args.sparsity, args.pattern, args.allocation)
    else:
        cfg = Structured(args.structured, args.ratio, args.remove, args.importance, args.scope, args.head_mode)
    # the output: about the kept weights at --dtype (a lower bound: a bitmask and layer removal not counted)
    kept = (1 - (args.sparsity or 0.5)) if args.method else 1 - (args.ratio or 0)
    bits = 32 if args.dtype in ("float32", "fp32") else 16
    check_writable(args.out, args.force, directory=True, need_bytes=estimated_bytes(args.model, bits * kept))
    check_json_dest(args)
    if args.heal_steps and args.dtype not in ("float32", "fp32"):
        raise LeanlmError("healing trains in float32: drop --dtype or use --heal-steps 0")

    model, tok = load_model(args)
    needs_calib = cfg.needs_calibration
    calib = None
    if needs_calib or args.heal_steps:
        calib = calibration_tokens(tok, args.calib_text, args.calib_samples, args.calib_seq_len, data_dir=args.data_dir)
    teacher = copy.deepcopy(model) if args.heal_steps or args.eval_windows else None
    before = {"weight_mb": weight_bytes(model) / 2**20, "params": sum(p.numel() for p in model.parameters())}
    t0 = time.perf_counter()
    if args.method == "maskllm":
        report = prune_maskllm(model, cfg, calib)
    elif args.method:
        report = prune_unstructured(model, cfg, calib)
    else:
        report = prune_structured(model, cfg, calib)
    result = {"model": args.model, "out": str(args.out), "pruning": report, "before": before,
              "prune_seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip

    def quality(tag):
        if not args.eval_windows:
            return
        from ..evaluate import data
        from ..evaluate.perplexity import kl_divergence

        text = data.read_text("wikitext2", args.data_dir)
        result[tag] = kl_divergence(teacher, model, tok, text, 512, args.eval_windows)
        print(f"{tag}: ppl {result[tag]['ppl']:.3f} (base {result[tag]['ppl_base']:.3f}), KL {result[tag]['kl']:.4f}")

    quality("quality_pruned")
    if args.heal_steps:
        heal_tokens = calibration_tokens(tok, args.calib_text, max(64, args.heal_steps * args.heal_batch),
                                         args.heal_seq_len, seed=1, data_dir=args.data_dir)  # fmt: skip
        result["heal"] = heal(model, teacher, heal_tokens, args.heal_steps, args.heal_lr, args.heal_batch,
                              keep_zeros=bool(args.method))  # fmt: skip
        quality("quality_healed")
    teacher = None  # free it before saving
    if args.method and args.storage == "bitmask":
        save_compressed(model, tok, args.out, args.force)
    else:
        from ..model import save

        save(model, tok, args.out, args.force)
    result["after"] = {"weight_mb": weight_bytes(model) / 2**20, "params": sum(p.numel() for p in model.parameters()),
                       "disk_mb": disk_bytes(args.out) / 2**20, "uniform_layers": model.config.is_uniform()}  # fmt: skip
    from ..export import check_transformers_load

    loaded = check_transformers_load(args.out, model)  # the answer comes from a load, not from the shapes
    result["after"].update(transformers_loadable=loaded.loadable, transformers_error=loaded.error)
    a = result["after"]
    if args.method:
        note = (f"sparsity {report['sparsity_prunable']:.1%} of block weights ({report['sparsity_all_params']:.1%} of all). "
                + ("Stored as bitmask + values (leanlm.load reads it; transformers does not)."
                   if args.storage == "bitmask" else
                   "Stored dense (zeros kept): same size and speed as the original; --storage bitmask shrinks the file."))  # fmt: skip
    else:
        note = (f"params {before['params']:,} -> {a['params']:,}; "
                + ("loads in transformers (checked by a load)." if loaded.loadable else
                   f"loads in leanlm, not in transformers ({loaded.error})."))  # fmt: skip
    print(f"wrote {args.out} ({a['disk_mb']:.1f} MB on disk, weights {before['weight_mb']:.1f} -> {a['weight_mb']:.1f} MB "
          f"in memory). {note}")  # fmt: skip
    if args.json:
        emit_json(result, args.json, args.force)
    return 0
