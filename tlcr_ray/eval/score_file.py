"""`tlcr score`: the token rewards of a whole file, offline, through the library's one scoring path.

    tlcr score --checkpoint runs/demo/disc/model --input pairs.jsonl --output scores.jsonl \\
               [--mode continuous|fixed|no_negative|no_positive] [--batch-size 16] [--on-bad-row error|skip]

Input (.jsonl, .jsonl.gz or .parquet), one row per line:
  * `prompt` + `response`: one item, id "<line>:response" (the prompt may be empty, the response not);
    <line> is the 1-based line of the file (the row number for parquet);
  * `chosen` + `rejected`, full HH-RLHF dialogues: two items, ids "<line>:chosen" and "<line>:rejected",
    the prompt split off as `tlcr_ray.data.split_dialogue` does for training.
Output (JSONL, append-only), one row per item:
  {"id": "12:chosen", "line": 12, "which": "chosen", "mode": "continuous", "num_tokens": 31,
   "sum": -1.2, "mean": -0.04, "tokens": [{"id", "text", "start", "end", "p", "reward"}, ...]}
The numbers come from `tlcr_ray.rl.text_scoring` (encode_items -> response_probabilities -> item_score), the same
functions the HTTP API calls, so they equal the API's for the same checkpoint and mode (up to float noise
from which items share a padded batch).

Resumable: each batch is appended and fsync'ed. On start the existing output is read back; a torn last
line (a kill mid-write) is cut, and ids already written are skipped, so a rerun after SIGKILL neither loses
nor duplicates rows. `<output>.meta.json` pins checkpoint, input, mode and thresholds: a resume with other
settings is refused instead of mixing two scorings in one file.

Bad rows (invalid JSON, missing or non-string fields, an empty response, a dialogue that does not split,
more tokens than the model's positions) are reported as file:line; `--on-bad-row error` (the default,
as data.on_bad_row) stops there, `skip` counts them in the summary and goes on. No Ray here.
"""
from __future__ import annotations

import gzip
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tlcr_ray.choices import TOKEN_MODES
from tlcr_ray.config import Config, ConfigError
from tlcr_ray.data.pairs import DataError, _BadRow, _raw_rows, split_dialogue
from tlcr_ray.io import cut_torn_tail, iter_jsonl, read_json, write_json_atomic

WHICH = ("response", "chosen", "rejected")
MAX_EXAMPLES = 10


def add_arguments(p) -> None:
    """The `tlcr score` flags (besides --config/--set), for tlcr_ray.cli's subparser."""
    p.add_argument("--checkpoint",
                   help="discriminator folder (default: serve.checkpoint, then <output_dir>/disc/model)")
    p.add_argument("--input", required=True,
                   help=".jsonl/.jsonl.gz/.parquet rows: prompt+response, or chosen+rejected dialogues")
    p.add_argument("--output", required=True, help="JSONL of per-item token rewards (appended; a rerun resumes)")
    p.add_argument("--mode", choices=TOKEN_MODES, default="continuous", help="token-reward mode (default continuous)")
    p.add_argument("--batch-size", type=int, default=16, help="items per forward pass (default 16)")
    p.add_argument("--on-bad-row", choices=("error", "skip"), default=None,
                   help="a malformed row stops the run (error) or is counted and skipped (default: data.on_bad_row)")


@dataclass
class _Item:
    id: str
    line: int
    which: str
    prompt: str
    response: str


# ---------------------------------------------------------------- settings

def _meta_path(output: Path) -> Path:
    return output.with_name(output.name + ".meta.json")


def _check_meta(output: Path, meta: dict, resuming: bool) -> None:
    """Write `<output>.meta.json` for a fresh output; for a resume, refuse other settings."""
    path = _meta_path(output)
    if not resuming:  # nothing scored yet: these settings are the file's
        write_json_atomic(path, meta)
        return
    if not path.exists():
        raise DataError(f"{output}: exists but {path.name} does not, so it was not written by `tlcr score`; "
                        "move it away or choose another --output")
    old = read_json(path)
    changed = [f"{key}: {old.get(key)!r} -> {value!r}" for key, value in meta.items() if old.get(key) != value]
    if changed:
        raise DataError(f"{output}: was scored with other settings ({'; '.join(changed)}); resuming would mix them. "
                        f"Choose another --output, or delete {output} and {path.name} to start over")


# ---------------------------------------------------------------- resume

def _resume(output: Path) -> tuple[set[str], int]:
    """Ids already in `output`, after cutting a torn last line; -> (ids, bytes cut)."""
    if not output.exists():
        return set(), 0
    size = output.stat().st_size
    cut_torn_tail(output)
    done: set[str] = set()
    for number, row in iter_jsonl(output, on_invalid="yield"):
        row_id = row.get("id") if isinstance(row, dict) else None
        if row_id is None:
            raise DataError(f"{output}:{number}: not a row written by `tlcr score` (a complete line that is "
                            "not JSON with an id); not resuming into it")
        if row_id in done:
            raise DataError(f"{output}:{number}: id {row_id!r} appears twice; not resuming into it")
        done.add(row_id)
    return done, size - output.stat().st_size


# ---------------------------------------------------------------- input

def _count_rows(path: str) -> int | None:
    """Rows for the progress bar (non-empty lines, or parquet's row count); None when unknown."""
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except (OSError, ValueError, ImportError):  # only the bar's total needs it; reading the rows reports real problems
        return None


def _items(line: int, row) -> list[_Item]:
    """The item(s) of one input row; raises _BadRow (reason, field, detail)."""
    if isinstance(row, _BadRow):
        raise row
    if "response" in row or ("prompt" in row and "chosen" not in row and "rejected" not in row):
        for field in ("prompt", "response"):
            if not isinstance(row.get(field), str):
                kind = "missing" if row.get(field) is None else type(row[field]).__name__
                raise _BadRow(f"bad_field_{field}", field, f"expected a string, got {kind}")
        if not row["response"]:
            raise _BadRow("empty_response", "response", "the response is empty (nothing to score)")
        return [_Item(f"{line}:response", line, "response", row["prompt"], row["response"])]
    if "chosen" in row or "rejected" in row:
        for field in ("chosen", "rejected"):
            if not isinstance(row.get(field), str):
                kind = "missing" if row.get(field) is None else type(row[field]).__name__
                raise _BadRow(f"bad_field_{field}", field, f"expected a string, got {kind}")
        split = split_dialogue(row["chosen"], row["rejected"])
        return [_Item(f"{line}:chosen", line, "chosen", split.prompt, split.chosen),
                _Item(f"{line}:rejected", line, "rejected", split.prompt, split.rejected)]
    fields = ", ".join(sorted(map(str, row))) or "none"
    raise _BadRow("no_known_fields", "-", f"expected prompt+response or chosen+rejected fields, got {fields}")


# ---------------------------------------------------------------- the run

def run_cli(cfg: Config, args) -> dict:
    """`tlcr score`: score every item of args.input into args.output (resuming); -> the summary."""
    mode = getattr(args, "mode", None) or "continuous"
    batch_size = getattr(args, "batch_size", None) or 16
    on_bad_row = getattr(args, "on_bad_row", None) or cfg.data.on_bad_row
    if mode not in TOKEN_MODES:
        raise ConfigError(f"--mode: expected one of {', '.join(TOKEN_MODES)}, got {mode!r}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size: expected >= 1, got {batch_size}")
    if on_bad_row not in ("error", "skip"):
        raise ConfigError(f"--on-bad-row: expected error or skip, got {on_bad_row!r}")
    source = str(args.input)
    if not source.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")):
        raise DataError(f"{source}: unknown format; expected .jsonl, .jsonl.gz or .parquet")
    if not os.path.exists(source):
        raise DataError(f"{source}: file not found")
    output = Path(args.output)
    if output.resolve() == Path(source).resolve():
        raise DataError(f"--output {output} is the input file")
    from tlcr_ray.rl import text_scoring as scoring

    checkpoint = scoring.resolve_discriminator(cfg, getattr(args, "checkpoint", None), flag="--checkpoint")
    pos, neg = cfg.reward.fixed_pos_threshold, cfg.reward.fixed_neg_threshold
    output.parent.mkdir(parents=True, exist_ok=True)
    resuming = output.exists() and output.stat().st_size > 0
    _check_meta(output, {"checkpoint": str(checkpoint), "input": str(Path(source).resolve()), "mode": mode,
                         "fixed_pos_threshold": pos, "fixed_neg_threshold": neg, "dtype": cfg.serve.dtype}, resuming)
    done, cut = _resume(output)

    began = time.time()
    import torch
    from tqdm import tqdm

    from tlcr_ray.models import load_head_model, load_tokenizer

    model = load_head_model(checkpoint, dtype=cfg.serve.dtype)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    tokenizer = load_tokenizer(scoring.tokenizer_folder(cfg, checkpoint))
    max_positions = getattr(model.config, "max_position_embeddings", None)
    loaded = time.time()

    counts = Counter()
    skipped: Counter = Counter()
    examples: list[str] = []
    pending: list[tuple[_Item, object]] = []
    bar = tqdm(total=_count_rows(source), desc=f"score ({mode})", unit="row", file=sys.stderr, dynamic_ncols=True)

    def flush(out) -> None:
        if not pending:
            return
        encoded = [enc for _, enc in pending]
        probs = scoring.response_probabilities(model, encoded, tokenizer.pad_token_id)
        lines = []
        for (item, enc), p in zip(pending, probs):
            scored = scoring.item_score(item.response, enc, p, mode, pos, neg)
            lines.append(json.dumps({
                "id": item.id, "line": item.line, "which": item.which, "mode": mode,
                "num_tokens": len(scored.tokens), "sum": scored.sum, "mean": scored.mean,
                "tokens": [vars(t) for t in scored.tokens]}, ensure_ascii=False) + "\n")
            counts["items"] += 1
            counts["response_tokens"] += len(scored.tokens)
            counts["tokens"] += len(enc.input_ids)
        out.write("".join(lines))
        out.flush()
        os.fsync(out.fileno())  # a batch is on disk before the next one starts
        pending.clear()
        bar.set_postfix(items=counts["items"], skipped=sum(skipped.values()), refresh=False)

    def bad(line: int, error: _BadRow) -> None:
        where = f"{source}:{line}: field {error.field!r}: {error}"
        if on_bad_row == "error":
            raise DataError(f"{where} (--on-bad-row skip to skip such rows)")
        skipped[error.reason] += 1
        if len(examples) < MAX_EXAMPLES:
            examples.append(where)
            tqdm.write(f"tlcr score: skipped {where}", file=sys.stderr)

    try:
        with open(output, "a", encoding="utf-8") as out:
            for line, row in _rows(source):
                bar.update(1)
                counts["rows"] += 1
                try:
                    items = _items(line, row)
                except _BadRow as error:
                    bad(line, error)
                    continue
                todo = [item for item in items if item.id not in done]
                counts["already_done"] += len(items) - len(todo)
                if not todo:
                    continue
                encoded = scoring.encode_items(tokenizer, [(item.prompt, item.response) for item in todo])
                too_long = next(((i, e) for i, e in zip(todo, encoded)
                                 if max_positions and len(e.input_ids) > max_positions), None)
                if too_long:
                    item, enc = too_long
                    bad(line, _BadRow("too_long", item.which, f"{len(enc.input_ids)} tokens (prompt + response); "
                                                              f"the model takes {max_positions}"))
                    continue
                for item, enc in zip(todo, encoded):
                    pending.append((item, enc))
                    if len(pending) >= batch_size:
                        flush(out)
            flush(out)
    finally:
        bar.close()
    elapsed = time.time() - loaded
    return {
        "input": source, "output": str(output), "checkpoint": str(checkpoint), "mode": mode,
        "rows_read": counts["rows"],
        "items_scored": counts["items"], "items_already_done": counts["already_done"],
        "torn_bytes_cut": cut, "bad_rows": dict(skipped), "bad_row_examples": examples,
        "response_tokens": counts["response_tokens"], "tokens": counts["tokens"],
        "model_load_s": round(loaded - began, 2), "scoring_s": round(elapsed, 2),
        "items_per_s": round(counts["items"] / elapsed, 2) if elapsed > 0 else None,
        "response_tokens_per_s": round(counts["response_tokens"] / elapsed, 1) if elapsed > 0 else None,
    }


def _rows(source: str) -> Iterator[tuple[int, dict | _BadRow]]:
    """(line number, row | _BadRow) of .jsonl/.jsonl.gz/.parquet, as tlcr_ray.data.pairs reads them."""
    return _raw_rows(source, "test")
