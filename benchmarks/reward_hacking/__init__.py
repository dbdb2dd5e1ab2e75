"""Reward-hacking testbed: a toy policy, a GPM proxy with an exploitable verbosity axis, and
GRPO / GPRL training loops that show (or fail to show) single-axis exploitation.

Run `python -m benchmarks.reward_hacking.run` (see docs/reward_hacking.md).
"""
