"""Finding evaluation data offline: --data-dir, else $LEANLM_DATA, in the layout of shared/data."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import LeanlmError

FILES = {
    "wikitext2": "wikitext-2-raw/wiki.test.raw",
    "wikitext2-valid": "wikitext-2/valid.txt",  # word-level valid split: calibration text, never eval
    "hellaswag": "hellaswag/hellaswag_val.jsonl",
    "piqa": "piqa/valid.jsonl",
    "arc_easy": "arc/ARC-Easy-Test.jsonl",
    "arc_challenge": "arc/ARC-Challenge-Test.jsonl",
    "winogrande": "winogrande/dev.jsonl",
    "boolq": "boolq/dev.jsonl",
    "lambada": "lambada_openai/lambada_test.jsonl",
    "openbookqa": "openbookqa/test.jsonl",
    "pride-and-prejudice": "gutenberg/pg1342.txt",
    "moby-dick": "gutenberg/pg2701.txt",
    "mt-bench": "prompts/mt_bench_question.jsonl",
    "vicuna-bench": "prompts/vicuna_bench_question.jsonl",
}


def data_dir(explicit: str | Path | None = None) -> Path:
    d = explicit or os.environ.get("LEANLM_DATA")
    if not d:
        raise LeanlmError(
            "no evaluation data: pass --data-dir DIR or set LEANLM_DATA=DIR "
            "(a folder in the layout of shared/data: wikitext-2-raw/, hellaswag/, piqa/, ...)"
        )
    path = Path(d).expanduser()
    if not path.is_dir():
        raise LeanlmError(f"data directory {path} does not exist; check --data-dir / LEANLM_DATA")
    return path


def data_file(name: str, explicit_dir: str | Path | None = None) -> Path:
    path = data_dir(explicit_dir) / FILES[name]
    if not path.exists():
        raise LeanlmError(f"{path} is missing from the data directory (expected layout: {FILES[name]})")
    return path


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with path.open() as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def wikitext2_test(explicit_dir=None) -> str:
    """The perplexity string of the GPTQ/SparseGPT scripts: HF test rows joined with blank lines."""
    lines = data_file("wikitext2", explicit_dir).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rows = ["" if line == " " else line + "\n" for line in lines]  # HF rows keep their newline
    return "\n\n".join(rows)


def read_text(spec: str, explicit_dir=None) -> str:
    """A named text (wikitext2, a Gutenberg book, ...) or a path to a text file."""
    if spec == "wikitext2":
        text = wikitext2_test(explicit_dir)
    elif spec in FILES:
        text = data_file(spec, explicit_dir).read_text(encoding="utf-8")
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise LeanlmError(
                f"text '{spec}' is neither a file nor a known name ({', '.join(k for k in FILES if k != 'mt-bench')})"
            )
        text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise LeanlmError(f"evaluation text '{spec}' is empty")
    return text
