"""benchmarks/soak.py holds one sustainable step below the last one by default."""

from __future__ import annotations

from benchmarks.soak import Config, hold_rate, parse_args


def test_hold_rate_is_a_step_below_the_last_sustainable() -> None:
    steps = [
        {"rate": r, "sustainable": ok} for r, ok in [(4, True), (6, True), (9, True), (13.5, False)]
    ]
    assert hold_rate(steps, 1) == 6
    assert hold_rate(steps, 0) == 9
    assert hold_rate(steps[:1], 1) == 4  # only one passed: hold it
    assert hold_rate([{"rate": 4, "sustainable": False}], 1) == 0.0
    assert Config().hold_margin_steps == 1
    assert parse_args(["--hold-margin-steps", "2"]).hold_margin_steps == 2
