"""benchmarks/lm_compare/seeds.py against numbers worked out by hand on made-up run folders."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")


def answers(tokens: list[int]) -> list[dict]:
    return [
        {"prompt_index": i, "sample": 0, "source": "instruction", "tokens": t, "hit_cap": False}
        for i, t in enumerate(tokens)
    ]


def fake_run(root: Path, seed: int, base: list[int], arms: dict[str, tuple[list, list]]) -> Path:
    """A finished lm_compare folder: arms maps name -> (held-out tokens, training step lengths)."""
    (root / "arms").mkdir(parents=True)
    (root / "settings.json").write_text(json.dumps({"seed": seed}))
    (root / "base.json").write_text(json.dumps({"answers": answers(base)}))
    for name, (held_out, train) in arms.items():
        steps = [{"step": i + 1, "mean_length": x} for i, x in enumerate(train)]
        record = {"answers": answers(held_out), "steps": steps, "corrections": []}
        (root / "arms" / f"{name}.json").write_text(json.dumps(record))
    return root


def test_t_quantile_matches_the_table() -> None:
    from benchmarks.lm_compare.seeds import t_quantile

    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 10: 2.228, 30: 2.042}
    for df, q in table.items():
        assert t_quantile(0.975, df) == pytest.approx(q, abs=2e-3), df
    assert t_quantile(0.95, 5) == pytest.approx(2.015, abs=2e-3)
    with pytest.raises(ValueError):
        t_quantile(0.4, 3)


def test_seeds_pool_paired_differences(tmp_path: Path) -> None:
    from benchmarks.lm_compare import seeds

    runs = [
        # seed, base, gprl held out, scalar held out, gprl train, scalar train
        (2, [10, 20, 30, 40], [14, 26, 30, 48], [12, 20, 31, 41], [1, 2, 3, 4, 5, 6], [1] * 6),
        (3, [10, 10, 10, 10], [10, 12, 10, 10], [11, 10, 10, 15], [5] * 6, [6] * 6),
        (4, [5, 5, 5, 5], [9, 9, 9, 9], [5, 6, 7, 8], [2] * 6, [1] * 6),
    ]
    dirs = [
        fake_run(tmp_path / f"s{s}", s, base, {"gprl": (g, gt), "scalar_grpo": (c, ct)})
        for s, base, g, c, gt, ct in runs
    ]
    out = tmp_path / "pooled.json"
    res = seeds.main([*map(str, dirs), "--arms", "gprl", "scalar_grpo", "--out", str(out)])
    assert json.loads(out.read_text()) == res and out.with_suffix(".png").stat().st_size > 0

    diffs = [[a - b for a, b in zip(g, c, strict=True)] for _, _, g, c, _, _ in runs]
    means = [statistics.fmean(d) for d in diffs]  # 1.0, -1.0, 2.5
    for row, d, m in zip(res["per_seed"], diffs, means, strict=True):
        got = row["held_out_paired_tokens"]
        assert got["mean"] == pytest.approx(m)
        assert got["ci95"] == pytest.approx(1.96 * statistics.stdev(d) / 2)
    first = res["per_seed"][0]
    assert first["seed"] == 2 and first["steps"] == 6
    assert first["held_out_growth"]["gprl"] == pytest.approx(118 / 100 - 1)
    assert first["held_out_growth"]["scalar_grpo"] == pytest.approx(104 / 100 - 1)
    assert first["train_last5_tokens"]["gprl"] == pytest.approx(4.0)  # steps 2..6
    pooled = res["pooled"]
    assert pooled["seeds_as_units"]["mean"] == pytest.approx(statistics.fmean(means))
    assert pooled["seeds_as_units"]["ci95"] == pytest.approx(
        4.303 * statistics.stdev(means) / math.sqrt(3), rel=1e-3
    )
    flat = [x for d in diffs for x in d]
    assert pooled["pairs_as_units"]["mean"] == pytest.approx(statistics.fmean(flat))
    half = 1.96 * statistics.stdev(flat) / 12**0.5
    assert pooled["pairs_as_units"]["ci95"] == pytest.approx(half)
    assert pooled["seeds_a_longer_held_out"] == 2
    assert pooled["train_last5_difference"] == pytest.approx([3.0, -1.0, 1.0])
    assert pooled["seeds_a_longer_in_training"] == 2

    with pytest.raises(SystemExit, match="no finished arm"):
        seeds.main([str(dirs[0]), "--arms", "gprl", "gprl_paper"])

    # One seed: no interval between seeds (JSON stays valid: None, not NaN), the pairs' stays.
    one = seeds.main([str(dirs[0]), "--arms", "gprl", "scalar_grpo", "--out", str(out)])
    assert json.loads(out.read_text())["pooled"]["seeds_as_units"]["ci95"] is None
    assert one["pooled"]["pairs_as_units"]["n"] == 4 and "needs 2 seeds" in seeds.table(one)
