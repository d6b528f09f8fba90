"""`leanlm optimize`: the user's model within their quality budget, against llama.cpp on this machine.

What it searches (each lever is a candidate's setting, measured for real):
- weight formats: bf16, int8 (per-channel RTN), int4 GPTQ (g128 symmetric), int4 GPTQ on the IQ4_NL table (g32),
  int4/int8 mixed precision at a target of ~5 bits per weight;
- exact speculative decoding on each format: prompt lookup, a compressed self-draft (an int4 copy of the model),
  and lookup falling back to that draft. Speculation is lossless: its output is checked token for token against
  the same format's plain greedy decoding.
What it does not search yet (the report says so): pruning with healing, activation sparsity and the adaptive
budget, KV policies for long contexts.

How: the cost model prices every weight format (predicted decode tok/s and weight MB) and drops a format that a
format with as many bits or more is predicted to beat on both; the survivors are measured, mildest first, as long
as `--minutes` allows (the ETA decides). Quality: perplexity and KL(reference || candidate) on WikiText-2 test
windows, the reference being the model as loaded in float32, and greedy agreement with the reference on the
prompts. Speed: greedy decode tok/s over the prompts (default: MT-Bench first turns, which nothing here tunes
on), a fixed number of new tokens each.

Peers, same run: llama.cpp Q8_0, Q4_K_M and Q4_0 GGUFs made by llama.cpp's own converter and quantizer, scored on
the same windows (llama-cpp-python's logits) and timed on the same prompts. The final speed table is a separate
pass with the chosen configurations and the peers interleaved, so machine noise hits all alike.

Answers (optimize.json "answers" and "summary"):
- lossless: the fastest configuration whose greedy output equals the reference's on every prompt, or within
  +0.5% perplexity and KL <= 0.01;
- budget: the fastest within --max-ppl-increase (and --max-kl);
- q4_k_m_quality: the fastest at llama.cpp Q4_K_M's KL or lower.

The run is resumable: every measurement is checkpointed in OUT/state.json and a re-run with the same settings
continues where it stopped. Outputs: OUT/optimize.json, OUT/report.html (Pareto plot, table against llama.cpp,
what each lever contributed), OUT/recipe.yaml and OUT/model (the budget answer's weights), and the exports its
format allows (OUT/model.gguf for llama.cpp, OUT/compressed-tensors for vLLM / transformers).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import LeanlmError
from . import Recipe, Step

# weight formats: name -> recipe steps (applied to the float32 load)
FORMATS: dict[str, list[Step]] = {
    "bf16": [Step("dtype", "bfloat16")],
    "int8": [Step("quantize", {"method": "rtn", "bits": 8, "group": 0, "symmetric": True})],
    # a scale per 128 inputs: per-channel int8 misses the lossless bar on Qwen2.5 (+0.7% ppl), whose rows mix
    # groups of very different ranges (llama.cpp's Q8_0 keeps one scale per 32)
    "int8-g128": [Step("quantize", {"method": "rtn", "bits": 8, "group": 128, "symmetric": True})],
    "mixed-5bit": [Step("quantize", {"method": "gptq", "bits": 4, "group": 128, "symmetric": True,
                                     "mixed": {"target_bits": 5.0}})],  # fmt: skip
    "int4-gptq-g128": [Step("quantize", {"method": "gptq", "bits": 4, "group": 128, "symmetric": True})],
    "int4-iq4nl-g32": [Step("quantize", {"method": "gptq", "bits": 4, "group": 32, "symmetric": True,
                                         "levels": "iq4nl"})],
}
# bits per weight with the bf16 scales, so that a finer grouping ranks milder than a coarser one of the same width
# (the cost model never lets the coarser rule it out: int8 per channel vs int8-g128, int4 g128 vs IQ4_NL g32)
FORMAT_BITS = {"bf16": 16, "int8": 8, "int8-g128": 8.125, "mixed-5bit": 5, "int4-gptq-g128": 4.125,
               "int4-iq4nl-g32": 4.5}  # fmt: skip
# the self-draft: an int4 round-to-nearest copy (cheap to make, a quarter of bf16's bytes)
DRAFT_RECIPE = [Step("quantize", {"method": "rtn", "bits": 4, "group": 64, "symmetric": True})]
DRAFTS = ("lookup", "self-int4", "lookup+self-int4")
PEER_TYPES = ("q8_0", "q4_k_m", "q4_0")
LOSSLESS_PPL, LOSSLESS_KL = 0.005, 0.01
NOT_SEARCHED = ["pruning with healing", "activation sparsity / adaptive budget", "KV policies (long context)"]
LEANLM_ONLY = {"speculation": "exact speculative decoding (prompt lookup, self-draft) runs in leanlm's runtime only",
               "iq4nl": "the IQ4_NL-table int4 exports to GGUF as IQ4_NL (llama.cpp runs it); compressed-tensors has "
                        "no table format",
               "mixed": "per-layer int4/int8 exports to GGUF per tensor; compressed-tensors takes one scheme per "
                        "layer group"}  # fmt: skip


@dataclass
class Settings:
    model: str
    max_ppl_increase: float = 0.02
    max_kl: float | None = None
    windows: int = 4
    seq_len: int = 512
    prompts: list[str] = field(default_factory=list)
    new_tokens: int = 128
    minutes: float = 60.0
    seed: int = 0
    peers: bool = True
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    drafts: list[str] = field(default_factory=lambda: list(DRAFTS))
    speed_runs: int = 3

    def key(self) -> str:
        """What the measurements depend on: a resumed run must have the same (minutes may change)."""
        d = asdict(self)
        d.pop("minutes")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def default_prompts(n: int = 8, data_dir=None) -> list[str]:
    """First turns of MT-Bench questions, one per category in file order, then the rest in file order."""
    from ..evaluate.data import data_file, read_jsonl

    rows = read_jsonl(data_file("mt-bench", data_dir))
    firsts, seen = [], set()
    for r in rows:
        if r["category"] not in seen:
            seen.add(r["category"])
            firsts.append(r["turns"][0])
    rest = [r["turns"][0] for r in rows if r["turns"][0] not in firsts]
    return (firsts + rest)[:n]


def read_prompts(path: str | Path) -> list[str]:
    """A prompts file: one prompt per line, or JSONL with a "prompt" (or MT-Bench "turns") field per line."""
    p = Path(path)
    if not p.is_file():
        raise LeanlmError(f"--prompts file {p} not found; give a text file with one prompt per line")
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LeanlmError(f"{p}:{i}: not valid JSON ({e.msg}); use one prompt per line or JSONL") from e
            text = row.get("prompt") or (row.get("turns") or [None])[0]
            if not isinstance(text, str):
                raise LeanlmError(f"{p}:{i}: a JSONL line needs a \"prompt\" string (or MT-Bench \"turns\")")
            out.append(text)
        else:
            out.append(line)
    if not out:
        raise LeanlmError(f"--prompts file {p} has no prompts")
    return out


# ---- the checkpoint ------------------------------------------------------------------------------------------
class State:
    """OUT/state.json: settings key + every finished measurement, written atomically after each one."""

    def __init__(self, out: Path, settings: Settings, force: bool):
        from ..io import write_json_atomic

        self.path, self._write = out / "state.json", write_json_atomic
        self.data = {"key": settings.key(), "settings": asdict(settings), "done": {}}
        if self.path.exists() and not force:
            old = json.loads(self.path.read_text())
            if old.get("key") != self.data["key"]:
                raise LeanlmError(f"{out} holds an optimize run with other settings; pass --force to start over, "
                                  "or the same settings to resume it")  # fmt: skip
            self.data = old

    def get(self, name: str):
        return self.data["done"].get(name)

    def put(self, name: str, value) -> None:
        self.data["done"][name] = value
        self._write(self.path, self.data, force=True)


# ---- measuring -----------------------------------------------------------------------------------------------
def _load(spec: str, steps: list[Step], name: str, progress: bool, keep: Path | None = None):
    """The model with a format's recipe applied -> (model, tokenizer, seconds to apply, report). With `keep`, the
    result is saved to keep/name the first time and loaded from there afterwards: a format is quantized once per
    run (a resumed run included), not again for the speed table and the answer."""
    from ..model import load, save
    from ..io import write_json_atomic
    from ..model.load import checkpoint_dtype
    from . import apply_recipe

    saved = keep / name if keep is not None else None
    if saved is not None and (saved / "config.json").exists():
        meta = json.loads((saved / "config.json").read_text())
        dtype = (meta.get("leanlm_quant") or {}).get("dtype") or checkpoint_dtype(saved)
        model, tok = load(saved, dtype)
        return model, tok, meta.get("leanlm_optimize_apply_seconds", 0.0), None
    model, tok = load(spec, "float32")
    t0 = time.time()
    report = apply_recipe(model, tok, Recipe(name, copy.deepcopy(steps)), progress=progress)
    seconds = time.time() - t0
    if saved is not None:
        save(model, tok, saved, force=True)
        meta = json.loads((saved / "config.json").read_text())
        meta["leanlm_optimize_apply_seconds"] = seconds  # the resumed run reports the real quantization time
        write_json_atomic(saved / "config.json", meta, force=True)
    return model, tok, seconds, report


def _decode(model, prompts: list[list[int]], n: int, draft_factory=None) -> dict:
    """Greedy decode of n tokens per prompt (EOS ignored: every configuration does the same work)."""
    from ..decode.generate import GenerationStats, generate_tokens
    from ..decode.speculative import speculative_generate_tokens

    outs, tokens, seconds = [], 0, 0.0
    for ids in prompts:
        st = GenerationStats()
        if draft_factory is None:
            out = list(generate_tokens(model, ids, n, eos_ids=set(), stats=st))
        else:
            out = list(speculative_generate_tokens(model, ids, n, eos_ids=set(), stats=st, draft=draft_factory()))
        outs.append(out)
        tokens += st.new_tokens - 1
        seconds += st.decode_s
    return {"outputs": outs, "decode_tok_s": tokens / seconds if seconds > 0 else 0.0, "decode_s": seconds}


def make_draft_factory(kind: str | None, draft_model):
    """kind None (plain decoding), "lookup", "self-int4" (draft_model, an int4 copy sharing the target's cache) or
    "lookup+self-int4" -> a function making a fresh draft per prompt."""
    from ..decode.drafts import LookupDraft, ModelDraft

    if kind is None:
        return None
    if kind == "lookup":
        return LookupDraft
    if draft_model is None:
        raise LeanlmError(f"draft {kind} needs the int4 self-draft model")

    def self_draft():
        return ModelDraft(draft_model, name="self-int4", sync_kv=True)

    return self_draft if kind == "self-int4" else (lambda: LookupDraft(fallback=self_draft()))


def _identical(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b))


def _predict(spec: str, hw_name: str, log, formats: list[str]) -> dict:
    from ..hardware.calibrate import profile_or_calibrate
    from ..model import load_model
    from .search import predict

    hw = profile_or_calibrate(hw_name, log)
    model = load_model(spec)
    out = {f: predict(model, Recipe(f, FORMATS[f]), hw) for f in formats}
    del model
    return out


def cost_model_keep(formats: list[str], predicted: dict) -> list[str]:
    """Drop a format when one with as many bits or more is predicted faster and smaller (quality is not
    predicted, so a harsher format never rules out a milder one)."""
    keep = []
    for f in formats:
        p = predicted[f]
        beaten = any(FORMAT_BITS[o] >= FORMAT_BITS[f] and o != f
                     and predicted[o]["predicted_decode_tok_s"] > p["predicted_decode_tok_s"] * 1.02
                     and predicted[o]["predicted_weight_mb"] < p["predicted_weight_mb"] * 0.98 for o in formats)  # fmt: skip
        if not beaten:
            keep.append(f)
    return keep


def _quality_ok(t: dict, settings: Settings) -> bool:
    return t["ppl_increase"] <= settings.max_ppl_increase and (settings.max_kl is None or t["kl"] <= settings.max_kl)


def _lossless(t: dict, n_prompts: int) -> bool:
    return t["identical_to_reference"] == n_prompts or (t["ppl_increase"] <= LOSSLESS_PPL and t["kl"] <= LOSSLESS_KL)


def _fastest(rows: list[dict]) -> dict | None:
    return max(rows, key=lambda r: r["decode_tok_s"]) if rows else None


def optimize(settings: Settings, out: str | Path, hw: str = "cpu", force: bool = False, progress: bool = True,
             log=print) -> dict:  # fmt: skip
    from tqdm.auto import tqdm

    from ..decode.generate import encode_prompt
    from ..evaluate.data import wikitext2_test
    from ..evaluate.perplexity import make_windows
    from ..evaluate.peers import QualityRef
    from ..evaluate.speed import weight_bytes
    from ..io import write_json_atomic
    from ..provenance import git_commit, stamp

    t_start = time.time()
    code = git_commit()
    unknown = set(settings.formats) - set(FORMATS) or set(settings.drafts) - set(DRAFTS)
    if unknown:
        raise LeanlmError(f"unknown format or draft {sorted(unknown)}; formats: {', '.join(FORMATS)}; "
                          f"drafts: {', '.join(DRAFTS)}")  # fmt: skip
    if not 0 < settings.max_ppl_increase < 10:
        raise LeanlmError(f"--max-ppl-increase must be a fraction in (0, 10), e.g. 0.02 for 2%, got "
                          f"{settings.max_ppl_increase}")  # fmt: skip
    out = Path(out)
    if out.exists() and not (out / "state.json").exists() and any(out.iterdir()) and not force:
        raise LeanlmError(f"{out} exists and is not an optimize run; pick a new --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    state = State(out, settings, force)
    formats_dir = out / "formats"  # each format quantized once, reloaded by the speed table and the answer
    if not state.data["done"] and formats_dir.exists():
        shutil.rmtree(formats_dir)  # left by a run with other settings (--force): its weights may differ
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    deadline = t_start + settings.minutes * 60

    # the reference: the model as loaded (float32), its log-probs on the windows and greedy outputs on the prompts
    from ..model import load

    ref_model, tok = load(settings.model, "float32")
    windows = make_windows(tok, wikitext2_test(), settings.seq_len, settings.windows)
    ref = QualityRef(ref_model, windows)
    prompts = [encode_prompt(tok, p) for p in settings.prompts]
    if state.get("reference") is None:
        log("reference: float32 greedy outputs on the prompts")
        r = _decode(ref_model, prompts, settings.new_tokens)
        state.put("reference", {"ppl": ref.base_ppl(), "outputs": r["outputs"], "decode_tok_s": r["decode_tok_s"]})
    reference = state.get("reference")
    del ref_model

    predicted = state.get("predicted") or {}
    unpriced = [f for f in settings.formats if f not in predicted]  # a resumed run prices only what is new
    if unpriced:
        state.put("predicted", {**predicted, **_predict(settings.model, hw, log, unpriced)})
    predicted = state.get("predicted")
    formats = cost_model_keep(settings.formats, predicted)
    # mildest first: a cut by the time budget loses the harshest formats
    formats.sort(key=lambda f: (-FORMAT_BITS[f], predicted[f]["predicted_decode_tok_s"]))
    n_trials = len(formats) * (1 + len(settings.drafts)) + (len(PEER_TYPES) if settings.peers else 0)
    bar = tqdm(total=n_trials, desc="optimize", disable=not progress)
    skipped: list[str] = []

    draft_model = None

    def draft_for(kind: str):
        nonlocal draft_model
        if kind != "lookup" and draft_model is None:
            draft_model = _load(settings.model, DRAFT_RECIPE, "self-int4", False, formats_dir)[0]
        return make_draft_factory(kind, draft_model)

    def over_time(elapsed_per_item: float) -> bool:
        return time.time() + elapsed_per_item > deadline

    per_trial = 0.0
    for f in formats:
        names = [f] + [f"{f}+{d}" for d in settings.drafts if not (d.endswith("self-int4") and FORMAT_BITS[f] < 5)]
        if all(state.get(n) is not None for n in names):
            bar.update(1 + len(settings.drafts))
            continue
        if per_trial and over_time(per_trial * len(names)):
            skipped += [n for n in names if state.get(n) is None]
            bar.update(1 + len(settings.drafts))
            continue
        t0 = time.time()
        model, _, apply_s, _ = _load(settings.model, FORMATS[f], f, progress, formats_dir)
        if state.get(f) is None:
            q = ref(model)
            d = _decode(model, prompts, settings.new_tokens)
            state.put(f, {"name": f, "format": f, "draft": None, "bits": FORMAT_BITS[f], "ppl": q["ppl"],
                          "ppl_increase": q["ppl"] / reference["ppl"] - 1, "kl": q["kl"],
                          "top1_agreement": q["top1_agreement"], "weight_mb": weight_bytes(model) / 2**20,
                          "decode_tok_s": d["decode_tok_s"], "outputs": d["outputs"], "apply_seconds": apply_s,
                          "identical_to_reference": _identical(d["outputs"], reference["outputs"]),
                          **predicted[f]})  # fmt: skip
        bar.update(1)
        plain = state.get(f)
        for dk in settings.drafts:
            name = f"{f}+{dk}"
            if name not in names:
                bar.update(1)
                continue
            if state.get(name) is None:
                d = _decode(model, prompts, settings.new_tokens, draft_for(dk))
                exact = _identical(d["outputs"], plain["outputs"])
                row = {k: v for k, v in plain.items() if k not in ("outputs", "decode_tok_s", "name", "draft")}
                state.put(name, {**row, "name": name, "draft": dk, "decode_tok_s": d["decode_tok_s"],
                                 "exact_vs_plain": exact, "outputs_checked": len(prompts)})  # fmt: skip
            bar.update(1)
        del model
        per_trial = (time.time() - t0) / len(names)

    # peers: llama.cpp's own GGUFs of the same weights, scored on the same windows, timed on the same prompts
    peers: dict[str, dict] = {}
    if settings.peers:
        from ..evaluate.llamacpp import build_ggufs
        from ..evaluate.peers import LlamaCppEngine, gguf_scores
        from ..model.load import resolve

        ggufs = None
        for t in PEER_TYPES:
            name = f"llama.cpp {t.upper()}"
            if state.get(name) is None:
                if ggufs is None:
                    ggufs = build_ggufs(resolve(settings.model), Path(str(settings.model)).name, types=PEER_TYPES,
                                        threads=torch.get_num_threads(), log=log)  # fmt: skip
                s = gguf_scores(ggufs[t], {"wikitext2": ref}, torch.get_num_threads())["wikitext2"]
                eng = LlamaCppEngine(str(ggufs[t]), name, torch.get_num_threads(),
                                     n_ctx=max(map(len, prompts)) + settings.new_tokens + 8)  # fmt: skip
                rates = [eng.decode(ids, settings.new_tokens) for ids in prompts]
                secs = sum((settings.new_tokens - 1) / r for r in rates)
                state.put(name, {"name": name, "gguf_type": t, "gguf": str(ggufs[t]), "ppl": s["ppl"],
                                 "ppl_increase": s["ppl"] / reference["ppl"] - 1, "kl": s["kl"],
                                 "top1_agreement": s["top1_agreement"],
                                 "gguf_mb": Path(ggufs[t]).stat().st_size / 2**20,
                                 "decode_tok_s": len(prompts) * (settings.new_tokens - 1) / secs})  # fmt: skip
                del eng
            peers[t] = state.get(name)
            bar.update(1)
    bar.close()

    trials = [state.get(n) for n in state.data["done"] if n not in ("reference", "predicted")
              and not n.startswith("llama.cpp") and not n.startswith("speed:")]  # fmt: skip
    trials = [t for t in trials if t is not None]
    n_p = len(prompts)
    answers = {
        "lossless": _fastest([t for t in trials if _lossless(t, n_p)]),
        "budget": _fastest([t for t in trials if _quality_ok(t, settings)]),
    }
    if "q4_k_m" in peers:
        answers["q4_k_m_quality"] = _fastest([t for t in trials if t["kl"] <= peers["q4_k_m"]["kl"]])

    del draft_model
    shoot = _speed_table(settings, state, answers, peers, prompts, formats_dir, log=log)
    summary = _summary(answers, shoot, peers, t_start)
    result = {
        "model": settings.model,
        "settings": asdict(settings),
        "reference": {"ppl": reference["ppl"], "decode_tok_s_fp32": reference["decode_tok_s"]},
        "cost_model": {"hardware": hw, "predicted": predicted, "formats_priced": len(settings.formats),
                       "formats_after_cost_model": formats},  # fmt: skip
        "trials": [{k: v for k, v in t.items() if k != "outputs"} for t in trials],
        "skipped_for_time": skipped,
        "peers": peers,
        "speed_table": shoot,
        "answers": {k: (v or {}).get("name") for k, v in answers.items()},
        "not_searched": NOT_SEARCHED,
        "leanlm_only": LEANLM_ONLY,
        "summary": summary,
        "provenance": stamp(code=code),
    }
    result["deploy"] = _write_answer(settings, answers.get("budget"), out, formats_dir, force, progress, log)
    write_json_atomic(out / "optimize.json", result, force=True)
    _report_page(result, out)
    return result


def _speed_table(settings, state, answers, peers, prompts, formats_dir, log) -> dict:
    """The chosen configurations, plain bf16 and the peers, timed interleaved over --speed-runs rounds."""
    from ..evaluate.peers import LlamaCppEngine

    if state.get("speed:table") is not None:
        return state.get("speed:table")
    chosen = {t["name"]: t for t in answers.values() if t}
    if state.get("bf16") is not None:  # the fastest unquantized baseline runs beside them
        chosen.setdefault("bf16", state.get("bf16"))
    engines = []
    for name, t in chosen.items():
        engines.append((name, _LeanlmRunner(settings, t, formats_dir)))
    for p in peers.values():
        engines.append((p["name"], _LlamaRunner(LlamaCppEngine(p["gguf"], p["name"], torch.get_num_threads(),
                                                n_ctx=max(map(len, prompts)) + settings.new_tokens + 8))))  # fmt: skip
    rates: dict[str, list[float]] = {n: [] for n, _ in engines}
    for r in range(settings.speed_runs):
        for name, eng in engines:
            rates[name].append(eng.rate(prompts, settings.new_tokens))
        log(f"speed round {r + 1}/{settings.speed_runs}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()))
    table = {n: {"decode_tok_s": statistics.median(v), "runs": v} for n, v in rates.items()}
    for _, eng in engines:
        eng.close()
    state.put("speed:table", table)
    return table


class _LeanlmRunner:
    """A chosen configuration rebuilt for the interleaved speed table."""

    def __init__(self, settings: Settings, trial: dict, formats_dir: Path):
        self.model = _load(settings.model, FORMATS[trial["format"]], trial["format"], False, formats_dir)[0]
        self.draft_kind, self.draft = trial.get("draft"), None
        if self.draft_kind and "self-int4" in self.draft_kind:
            self.draft = _load(settings.model, DRAFT_RECIPE, "self-int4", False, formats_dir)[0]

    def rate(self, prompts, n) -> float:
        return _decode(self.model, prompts, n, make_draft_factory(self.draft_kind, self.draft))["decode_tok_s"]

    def close(self):
        self.model = self.draft = None


class _LlamaRunner:
    def __init__(self, engine):
        self.engine = engine

    def rate(self, prompts, n) -> float:
        secs = sum((n - 1) / self.engine.decode(ids, n) for ids in prompts)
        return len(prompts) * (n - 1) / secs

    def close(self):
        self.engine = None


def _summary(answers: dict, table: dict, peers: dict, t_start: float) -> dict:
    def ratio(answer: str, peer: str):
        a, p = answers.get(answer), peers.get(peer)
        if not a or not p or a["name"] not in table or p["name"] not in table:
            return None
        return table[a["name"]]["decode_tok_s"] / table[p["name"]]["decode_tok_s"]

    return {
        "lossless_decode_vs_llamacpp_q8_0": ratio("lossless", "q8_0"),
        "q4km_quality_decode_vs_llamacpp_q4_k_m": ratio("q4_k_m_quality", "q4_k_m"),
        "budget_decode_vs_llamacpp_q8_0": ratio("budget", "q8_0"),
        "lossless": (answers.get("lossless") or {}).get("name"),
        "q4_k_m_quality": (answers.get("q4_k_m_quality") or {}).get("name"),
        "budget": (answers.get("budget") or {}).get("name"),
        "wall_minutes": (time.time() - t_start) / 60,
    }


def _write_answer(settings: Settings, answer: dict | None, out: Path, formats_dir: Path, force: bool, progress: bool,
                  log) -> dict:  # fmt: skip
    """OUT/recipe.yaml, OUT/model and the exports the answer's format allows; each export's outcome is recorded."""
    import yaml

    from ..io import write_text_atomic
    from ..model import save

    if answer is None:
        return {"error": "no configuration met the quality budget; loosen --max-ppl-increase"}
    fmt = answer["format"]
    recipe = Recipe(f"optimize-{fmt}", copy.deepcopy(FORMATS[fmt]),
                    description=f"leanlm optimize answer for {settings.model} within "
                                f"+{settings.max_ppl_increase:.1%} perplexity")  # fmt: skip
    write_text_atomic(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False), force=True)
    model, tok, _, _ = _load(settings.model, FORMATS[fmt], fmt, progress, formats_dir)
    deploy: dict = {"recipe": str(out / "recipe.yaml")}
    save(model, tok, out / "model", force=True)
    run = f"leanlm generate {out / 'model'}"
    if answer.get("draft"):
        kind = {"lookup": "lookup", "self-int4": "self", "lookup+self-int4": "lookup+self"}[answer["draft"]]
        run += f" --speculate {kind}"
    deploy["model"] = {"path": str(out / "model"), "run": run}
    from ..export.gguf import export_gguf

    wtype = {"bf16": "f16", "int8": "q8_0", "int8-g128": "q8_0"}.get(fmt, "iq4_nl" if "iq4nl" in fmt else "q4_k")
    try:
        export_gguf(model, tok, out / "model.gguf", wtype=wtype, force=True)
        deploy["gguf"] = {"path": str(out / "model.gguf"), "type": wtype}
    except (LeanlmError, ValueError, NotImplementedError) as e:
        deploy["gguf"] = {"error": str(e)}
    if FORMAT_BITS[fmt] < 16:
        from ..export.compressed_tensors import export_compressed_tensors

        try:
            export_compressed_tensors(model, tok, out / "compressed-tensors", force=True)
            deploy["compressed_tensors"] = {"path": str(out / "compressed-tensors")}
        except (LeanlmError, ValueError, NotImplementedError) as e:
            deploy["compressed_tensors"] = {"error": str(e)}
    if answer.get("draft"):
        deploy["leanlm_only"] = LEANLM_ONLY["speculation"]
    log(f"answer within budget: {answer['name']} -> {out / 'model'}")
    return deploy


def _report_page(result: dict, out: Path) -> Path:
    """OUT/report.html: Pareto plot (perplexity vs decode tok/s, peers included), the table against llama.cpp,
    and what each lever added over its format's plain decoding."""
    from ..io import write_text_atomic
    from ..report.page import document, esc, provenance_footer
    from ..report.plots import plot_trials

    points = result["trials"] + list(result["peers"].values())
    plot = plot_trials(points, out / "pareto.png")
    table = result["speed_table"]
    rows = []
    for name, v in sorted(table.items(), key=lambda kv: -kv[1]["decode_tok_s"]):
        t = next((x for x in points if x["name"] == name), {})
        rows.append(f"<tr><td>{esc(name)}</td><td>{v['decode_tok_s']:.1f}</td><td>{t.get('ppl', math.nan):.3f}</td>"
                    f"<td>{t.get('kl', math.nan):.4f}</td></tr>")  # fmt: skip
    levers = []
    by = {t["name"]: t for t in result["trials"]}
    for t in result["trials"]:
        if t.get("draft") and t["format"] in by:
            gain = t["decode_tok_s"] / by[t["format"]]["decode_tok_s"]
            levers.append(f"<tr><td>{esc(t['format'])}</td><td>{esc(t['draft'])}</td><td>{gain:.2f}x</td>"
                          f"<td>{t.get('exact_vs_plain')}/{t.get('outputs_checked')}</td></tr>")  # fmt: skip
    s = result["summary"]
    body = [f"<h1>leanlm optimize: {esc(result['model'])}</h1>",
            "<p>Answers: " + ", ".join(f"<b>{esc(k)}</b> = {esc(v)}" for k, v in result["answers"].items()) + "</p>",
            "<p>" + ", ".join(f"{esc(k)}: {v:.2f}" for k, v in s.items() if isinstance(v, float)) + "</p>",
            "<h2>Decode speed, same run, interleaved</h2><table><tr><th>configuration</th><th>tok/s</th>"
            "<th>ppl</th><th>KL</th></tr>" + "".join(rows) + "</table>"]  # fmt: skip
    if plot:
        body.append(f'<h2>Quality against speed</h2><img src="{plot.name}" alt="Pareto plot">')
    body.append("<h2>What speculation added (same format, plain = 1.00x)</h2><table><tr><th>format</th><th>draft</th>"
                "<th>speed-up</th><th>exact outputs</th></tr>" + "".join(levers) + "</table>")  # fmt: skip
    body.append("<h2>Not searched yet</h2><ul>" + "".join(f"<li>{esc(x)}</li>" for x in result["not_searched"])
                + "</ul><h2>Only leanlm's runtime runs</h2><ul>"
                + "".join(f"<li>{esc(v)}</li>" for v in result["leanlm_only"].values()) + "</ul>")  # fmt: skip
    html = document(f"leanlm optimize: {result['model']}", "\n".join(body),
                    provenance_footer([("this run", result["provenance"])]))  # fmt: skip
    return write_text_atomic(out / "report.html", html, force=True)
