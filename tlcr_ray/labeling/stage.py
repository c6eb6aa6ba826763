"""`tlcr label`: revise the rejected responses of a split and write Levenshtein token labels.

    tlcr label --config configs/demo.yaml
    tlcr label --config configs/demo.yaml --set reviser.kind=openai --set reviser.base_url=http://127.0.0.1:8000/v1

Writes into `<output_dir>/label/`: revisions.jsonl (the append-only cache of the reviser's raw replies;
a rerun after a kill requests only what is missing), quarantine.jsonl (rejected revisions with their
reason), labels.jsonl (two labelled sequences per accepted pair) and summary.json. Everything but the
cache is recomputed from it on each run and written atomically, accept/reject included: a rerun with
another reviser.max_edit_ratio relabels from the cached replies without a request.
"""
from __future__ import annotations

import time
from collections import Counter

from tlcr_ray.config import Config
from tlcr_ray.data.pairs import load_split
from tlcr_ray.io import write_json_atomic, write_jsonl_atomic
from tlcr_ray.labeling.labels import IGNORE, label_pair, write_labels
from tlcr_ray.labeling.revise import INSTRUCTION_VERSION, make_reviser, revise_all
from tlcr_ray.layout import RunLayout
from tlcr_ray.models import load_tokenizer


def run(cfg: Config, args=None) -> dict:
    """Revise, label and summarize one split (cfg.data.split, `reward` by default)."""
    start = time.perf_counter()
    layout = RunLayout.of(cfg)
    layout.label_dir.mkdir(parents=True, exist_ok=True)
    pairs, data_stats = load_split(cfg.data)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.base)

    def tokenize(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    reviser = make_reviser(cfg.reviser, tokenize)
    results, revise_stats = revise_all(pairs, reviser, layout.revisions, cfg.reviser.max_concurrency)

    rows, quarantine = [], []
    for pair, result in zip(pairs, results):
        if result.accepted:
            rows += label_pair(tokenizer, pair.pair_id, pair.prompt, pair.rejected, result.revision,
                               cfg.model.max_prompt_len, cfg.model.max_response_len)
        else:
            quarantine.append({"pair_id": pair.pair_id, "source": pair.source,
                               "reason": result.reason, "detail": result.detail})
    write_labels(layout.label_output, rows)
    write_jsonl_atomic(layout.quarantine, quarantine)

    token_labels = Counter(label for row in rows for label in row.labels if label != IGNORE)
    summary = {
        "output": str(layout.label_dir),
        "split": data_stats["split"],
        "pairs_read": data_stats["rows"],
        "pairs": len(pairs),
        "skipped": data_stats["skipped"],
        "reviser": cfg.reviser.kind,
        "model": cfg.reviser.model if cfg.reviser.kind == "openai" else None,
        "instruction_version": INSTRUCTION_VERSION if cfg.reviser.kind == "openai" else None,
        "revised": sum(r.accepted for r in results),
        "quarantined": dict(Counter(r.reason for r in results if not r.accepted)),
        "from_cache": revise_stats["cached"],
        "requested": revise_stats["requested"],
        "label_rows": len(rows),
        "token_labels": {"0": token_labels[0.0], "0.5": token_labels[0.5], "1": token_labels[1.0]},
        "tokens_used": revise_stats["usage"],
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_json_atomic(layout.label_summary, summary)
    return summary
