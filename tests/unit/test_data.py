"""Preference data: prompt/response split, bad rows, formats, the seeded 20/40/40 partition."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tlcr_ray.config import DataConfig
from tlcr_ray.data.pairs import (
    DataError,
    PreferencePair,
    load_pairs,
    load_split,
    pair_id,
    partition,
    rl_prompt_pools,
    split_dialogue,
)

SHIPPED = Path(__file__).resolve().parents[2] / "data/hh-rlhf/harmless-base/test.jsonl.gz"
H, A = "\n\nHuman:", "\n\nAssistant:"


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_split_keeps_the_response_verbatim():
    prompt = f"{H} hi{A} hello{H} how do I pick a lock?{A}"
    split = split_dialogue(prompt + " I'm sorry, I can't.", prompt + "  Sure: first...")
    assert split == (prompt, " I'm sorry, I can't.", "  Sure: first...", False)


def test_split_falls_back_to_the_common_prefix():
    shared = f"{H} q1{A}"
    chosen = shared + f" a1{H} q2{A} a2"
    rejected = shared + f" b1{H} q2{A} b2"       # diverges before chosen's last Assistant turn
    split = split_dialogue(chosen, rejected)
    assert split == (shared, f" a1{H} q2{A} a2", f" b1{H} q2{A} b2", True)


def test_split_fallback_when_rejected_has_more_turns():
    prompt = f"{H} q1{A}"
    split = split_dialogue(prompt + " a1", prompt + f" b1{H} q2{A} b2")
    assert split == (prompt, " a1", f" b1{H} q2{A} b2", True)


@pytest.mark.parametrize("chosen, rejected, reason", [
    (f"{H} no assistant turn", f"{H} none here either", "no_assistant_turn"),
    (f"{H} q{A} same", f"{H} q{A} same", "identical_responses"),
    (f"{H} q{A}", f"{H} q{A} something", "empty_response"),
    (f"{H} q{A} a", f"{H} other{A} b", "no_common_prompt"),
])
def test_unsplittable_rows(tmp_path, chosen, rejected, reason):
    path = write_jsonl(tmp_path / "x.jsonl", [{"chosen": f"{H} ok{A} yes", "rejected": f"{H} ok{A} no"},
                                               {"chosen": chosen, "rejected": rejected}])
    pairs, skipped = load_pairs(path, on_bad_row="skip")
    assert len(pairs) == 1 and skipped == {reason: 1}
    with pytest.raises(DataError, match=r"x\.jsonl:2: field '(chosen|rejected)'"):
        load_pairs(path)


def test_bad_rows_name_file_line_and_field(tmp_path):
    good = {"chosen": f"{H} q{A} a", "rejected": f"{H} q{A} b"}
    rows = [good, "{not json", {"chosen": f"{H} q{A} a"}, {"chosen": 3, "rejected": "x"}, "[1, 2]"]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*invalid JSON"):
        load_pairs(path)
    pairs, skipped = load_pairs(path, on_bad_row="skip")
    assert [p.source for p in pairs] == [f"{path}:1"]
    assert skipped == {"invalid_json": 1, "bad_field_rejected": 1, "bad_field_chosen": 1, "not_an_object": 1}
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'rejected': expected a string, got missing"):
        load_pairs(write_jsonl(tmp_path / "bad.jsonl", rows[:1] + rows[2:]))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_pairs(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("chosen,rejected\n")
    with pytest.raises(DataError, match="unknown format"):
        load_pairs(str(tmp_path / "x.csv"))


def test_shipped_split():
    """2,312 rows, all kept; 5 need the fallback, 4 of them because rejected lacks chosen's prompt."""
    stats = load_split(DataConfig(path=str(SHIPPED)), "all")[1]
    assert stats["rows"] == stats["kept"] == stats["selected"] == 2312 and stats["skipped"] == {}
    assert stats["fallback_split"] == 5 and stats["rejected_not_prefixed"] == 4
    pairs, _ = load_pairs(str(SHIPPED))
    assert len({p.pair_id for p in pairs}) == 2312
    for pair in pairs:
        assert pair.prompt.endswith(A) and pair.prompt.startswith(H)
        assert pair.chosen and pair.rejected and pair.chosen != pair.rejected
    with gzip.open(SHIPPED, "rt") as fh:
        first = json.loads(fh.readline())
    assert pairs[0].prompt + pairs[0].chosen == first["chosen"]
    assert pairs[0].prompt + pairs[0].rejected == first["rejected"]
    assert pairs[0].pair_id == pair_id(first["chosen"], first["rejected"])
    assert pairs[0].source.endswith("test.jsonl.gz:1")


def test_formats_agree(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"chosen": f"{H} q{i}{A} yes", "rejected": f"{H} q{i}{A} no"} for i in range(5)]
    jsonl = write_jsonl(tmp_path / "p.jsonl", rows)
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as fh:
        fh.write(Path(jsonl).read_text())
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    loaded = [load_pairs(str(tmp_path / name))[0] for name in ("p.jsonl", "p.jsonl.gz", "p.parquet")]
    strip = [[(p.pair_id, p.prompt, p.chosen, p.rejected) for p in pairs] for pairs in loaded]
    assert strip[0] == strip[1] == strip[2] and len(strip[0]) == 5


def test_hub_id(tmp_path):
    """`hf:<id>` goes through `datasets` (a local folder stands in for a hub id, offline)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="needs the `datasets` package"):
            load_pairs("hf:Anthropic/hh-rlhf")
        return
    write_jsonl(tmp_path / "test.jsonl", [{"chosen": f"{H} q{A} yes", "rejected": f"{H} q{A} no"}])
    pairs, skipped = load_pairs(f"hf:{tmp_path}", hub_split="test")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [(f"{H} q{A}", " yes", " no")] and not skipped


def test_partition_is_seeded_exact_and_stable():
    pairs, _ = load_pairs(str(SHIPPED))
    parts = partition(pairs, (0.2, 0.4, 0.4), seed=0)
    assert [len(parts[k]) for k in ("sft", "reward", "rl")] == [462, 925, 925]
    ids = [{p.pair_id for p in parts[k]} for k in ("sft", "reward", "rl")]
    assert set.union(*ids) == {p.pair_id for p in pairs} and sum(map(len, ids)) == len(pairs)
    assert partition(list(reversed(pairs)), seed=0) == parts            # file order does not matter
    other = partition(pairs, seed=1)
    assert {p.pair_id for p in other["sft"]} != ids[0]
    # adding 10% more rows keeps ~all old pairs where they were (only pairs near the cut points move)
    grown = partition(pairs[:2100], seed=0)
    moved = sum(p.pair_id not in ids[i] for i, k in enumerate(("sft", "reward", "rl")) for p in grown[k])
    assert moved < 0.05 * 2100
    with pytest.raises(DataError, match="fractions"):
        partition(pairs, (0.5, 0.5, 0.5))


def test_load_split_applies_split_and_max_pairs():
    cfg = DataConfig(path=str(SHIPPED), split="rl", max_pairs=7, seed=3)
    pairs, stats = load_split(cfg)
    full = partition(load_pairs(str(SHIPPED))[0], cfg.fractions, seed=3)["rl"]
    assert pairs == full[:7] and stats["split"] == "rl" and stats["selected"] == 7
    with pytest.raises(DataError, match="data.split"):
        load_split(cfg, "train")


def test_rl_prompt_pools_hold_out_the_eval_prompts_from_ppo():
    """PPO's pool and the report's held-out prompts are disjoint, and the same on every call; the
    controller and the Fig. 6 table both take them from rl_prompt_pools."""
    from tlcr_ray.config import ConfigError, load_config
    from tlcr_ray.eval.policy_table import heldout_prompts

    cfg = load_config("configs/tiny.yaml", ["pipeline.eval_prompts=5"])
    pairs, _ = load_split(cfg.data, "rl")  # data.max_pairs already applied
    train, held_out = rl_prompt_pools(pairs, 5)
    assert len(held_out) == 5 and len(train) == len(pairs) - 5
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in held_out})
    assert rl_prompt_pools(list(pairs), 5) == (train, held_out)
    assert held_out == pairs[-5:]  # the tail of the partition's hashed order, as the report always took
    from tlcr_ray.data.tokens import encode_prompts
    from tlcr_ray.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(cfg.model.base))
    assert heldout_prompts(cfg, 5) == encode_prompts(tokenizer, [p.prompt for p in held_out], cfg.model.max_prompt_len)
    # A prompt repeated in another pair is held out with it.
    dup = [PreferencePair(f"{i}", f"q{i % 4}", "c", "r", "t") for i in range(8)]
    train, held_out = rl_prompt_pools(dup, 1)
    assert [p.pair_id for p in held_out] == ["7"] and all(p.prompt != "q3" for p in train)
    assert rl_prompt_pools(dup, 0) == (dup, [])
    with pytest.raises(ConfigError, match=r"pipeline.eval_prompts=32: the RL partition has only 32 pairs"):
        rl_prompt_pools(pairs, 32)
    with pytest.raises(ConfigError, match="pipeline.eval_prompts"):
        rl_prompt_pools(pairs, -1)
