"""Same-run A/B of two revisions of leanlm: decode and prefill speed of a model, before vs after.

Each revision is checked out into its own `git worktree` under /tmp (or, for WORKTREE, this
repository's working tree as it is, uncommitted edits included) and every measurement runs in a
fresh Python process with PYTHONPATH=<tree>/src, so the two never share code, kernels or caches.
Rounds are interleaved A, B, B, A, ... so that machine noise and order effects hit both alike; each process warms
up (a prefill and a few decode steps, which also builds the native kernels on first use) before
it measures (with --adaptive, each revision calibrates once, in its first process, and later
processes load the saved state):
- decode tok/s: --new-tokens (128) greedy tokens after a --prompt (32) token prompt, batch 1;
- prefill tok/s: one forward over a --prefill (512) token prompt.
The result gives every run, the median and min-max per revision and the after/before ratio of the
medians.

    python benchmarks/bench_ab_commits.py --before 700d925 --after HEAD \
        --models smollm2-135m,gemma3-270m --dtypes bfloat16,float32 --threads 2 --runs 5 --out ab_refactor
    python benchmarks/bench_ab_commits.py --before HEAD --after WORKTREE --models smollm2-135m \
        --dtypes bfloat16 --threads 1 --runs 3 --adaptive skip:0.1 --out ab_adaptive_gemv
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKTREE = "WORKTREE"

# what each measuring process runs (the same text for both revisions: only public APIs that both have)
CHILD = r"""
import json, sys, time
import torch
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
import leanlm
from leanlm.decode.generate import GenerationStats, generate_tokens

model, tok = leanlm.load(cfg["model"], cfg["dtype"])
if cfg["adaptive"]:  # calibrated once per revision (the first process), then loaded from its saved state
    import os
    from leanlm.adaptive import apply_adaptive, load_adaptive, save_adaptive
    if os.path.exists(cfg["adaptive_state"]):
        load_adaptive(model, cfg["adaptive_state"])
    else:
        apply_adaptive(model, [cfg["adaptive"]], tok, progress=False)
        save_adaptive(model, cfg["adaptive_state"])
text = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
        "grain, salt and cloth. Over the centuries it grew into a market town, then a port, and its people "
        "built bridges, churches, schools and a library that still stands in the old square. ")
ids = tok.encode(text * 64)
vocab = model.config.vocab_size
ids = [i % vocab for i in ids]
need = max(cfg["prefill"], cfg["prompt"])
while len(ids) < need:
    ids = ids + ids
prompt, long_prompt = ids[: cfg["prompt"]], ids[: cfg["prefill"]]

def decode(n):
    st = GenerationStats()
    for _ in generate_tokens(model, prompt, n, eos_ids=set(), stats=st):
        pass
    return st.decode_tok_s

def prefill():
    st = GenerationStats()
    for _ in generate_tokens(model, long_prompt, 1, eos_ids=set(), stats=st):
        pass
    return len(long_prompt) / st.prefill_s

with torch.inference_mode():
    prefill()
    decode(8)  # warm-up: kernels built and loaded, caches and allocator warm
    out = {"decode_tok_s": decode(cfg["new_tokens"]), "prefill_tok_s": prefill()}
try:
    from leanlm import ops
    out["isa"] = ops.isa()
except ImportError:
    pass
print("AB_RESULT " + json.dumps(out))
"""


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


class Tree:
    """A revision's source tree: a temporary git worktree of a commit, or this working tree."""

    def __init__(self, rev: str, tmp: Path, side: str):
        self.rev, self.side = rev, side
        if rev == WORKTREE:
            self.commit = git("rev-parse", "HEAD") + (" (+ uncommitted changes)" if git("status", "--porcelain") else "")
            self.path = REPO
        else:
            self.commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
            self.path = tmp / f"{side}_{self.commit[:12]}"
            git("worktree", "add", "--detach", str(self.path), self.commit)
        self.label = f"{rev} ({self.commit[:12]})"

    def remove(self) -> None:
        if self.rev != WORKTREE:
            subprocess.run(["git", "worktree", "remove", "--force", str(self.path)], cwd=REPO, capture_output=True)

    def measure(self, cfg: dict, timeout: float, state_dir: Path) -> dict:
        cfg = {**cfg, "adaptive_state": str(state_dir / (re.sub(r"\W", "_", f"{self.side}_{cfg['model']}_{cfg['dtype']}") + ".safetensors"))}
        env = {**os.environ, "PYTHONPATH": str(self.path / "src")}
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(cfg["threads"])
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], env=env, cwd=self.path,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
        line = next((l for l in proc.stdout.splitlines() if l.startswith("AB_RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"{self.label} failed on {cfg['model']} {cfg['dtype']}:\n{proc.stderr[-3000:]}")
        return json.loads(line[len("AB_RESULT ") :])


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="git revision (commit, branch, tag) or WORKTREE")
    p.add_argument("--after", required=True, help="git revision or WORKTREE (this working tree, uncommitted edits included)")
    p.add_argument("--models", default="smollm2-135m", help="comma-separated model specs (as leanlm.load takes them)")
    p.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16, float32")
    p.add_argument("--adaptive", default=None, help="an adaptive spec applied in both, e.g. skip:0.1 or exit:threshold=0.9")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=5, help="interleaved rounds (one process per revision per round)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens decoded")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurement")
    p.add_argument("--timeout", type=float, default=900, help="seconds per measuring process")
    p.add_argument("--out", default=None, help="result name: benchmarks/results/OUT.json (default: print only)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.threads < 1:
        p.error("--runs and --threads must be at least 1")

    tmp = Path(tempfile.mkdtemp(prefix="leanlm_ab_"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # (a killed run still removes its worktrees)
    trees: list[Tree] = []
    try:
        for rev, side in ((args.before, "before"), (args.after, "after")):
            trees.append(Tree(rev, tmp, side))
        before, after = trees
        results = []
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
                cfg = {"model": model, "dtype": dtype, "threads": args.threads, "adaptive": args.adaptive,
                       "prompt": args.prompt, "new_tokens": args.new_tokens, "prefill": args.prefill}  # fmt: skip
                runs: dict[str, list[dict]] = {"before": [], "after": []}
                for r in range(args.runs):
                    # ABBA: the side that runs first alternates by round, so an order effect (a machine that
                    # slows down over consecutive processes, a cache one run warms for the next) cancels
                    order = (("before", before), ("after", after))
                    for side, tree in order if r % 2 == 0 else order[::-1]:
                        m = tree.measure(cfg, args.timeout, tmp)
                        runs[side].append(m)
                        print(f"{model} {dtype} round {r + 1}/{args.runs} {side}: decode {m['decode_tok_s']:.2f} tok/s, "
                              f"prefill {m['prefill_tok_s']:.1f} tok/s", flush=True)  # fmt: skip
                row = {"model": model, "dtype": dtype}
                for key in ("decode_tok_s", "prefill_tok_s"):
                    b, a = (summary([m[key] for m in runs[s]]) for s in ("before", "after"))
                    row[key] = {"before": b, "after": a, "after_over_before": a["median"] / b["median"]}
                row["isa"] = {s: runs[s][0].get("isa") for s in runs}
                results.append(row)
                print(f"== {model} {dtype}: decode x{row['decode_tok_s']['after_over_before']:.3f}, "
                      f"prefill x{row['prefill_tok_s']['after_over_before']:.3f} (after/before medians)", flush=True)
    finally:
        for tree in trees:
            tree.remove()
        shutil.rmtree(tmp, ignore_errors=True)

    obj = {
        "benchmark": "same-run A/B of two leanlm revisions: decode and prefill tok/s, batch 1",
        "before": {"rev": args.before, "commit": before.commit},
        "after": {"rev": args.after, "commit": after.commit},
        "settings": {"threads": args.threads, "runs": args.runs, "prompt_tokens": args.prompt,
                     "new_tokens": args.new_tokens, "prefill_tokens": args.prefill, "adaptive": args.adaptive,
                     "order": "interleaved ABBA (before first in even rounds, after first in odd ones); "
                              "one fresh process per measurement, warm-up first"},
        "results": results,
    }  # fmt: skip
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import write_result

        write_result(args.out, obj)
    else:
        print(json.dumps(obj, indent=1))
    return obj


if __name__ == "__main__":
    main()
