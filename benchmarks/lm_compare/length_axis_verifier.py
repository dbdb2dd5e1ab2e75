"""A verifier with length on an axis of its own, built from another one's heads: the test bed for
the method's premise on a real language model.

    python -m benchmarks.lm_compare.length_axis_verifier OUT_DIR [--source DIR] [--axis 1]
        [--linear-at N0]

The default verifier keeps length on axis 1, with most of the quality signal
(`length_axes.py`, docs/gprl_runs.md), so no per-axis controller can curb length without
cutting quality. This writes a `gprl` checkpoint with K + 1 axes, same backbone, no training:

- axes 0..K−1 are the source's without the log-count column of the length head (the constant
  column stays, so each axis keeps its offset; on the default verifier the count columns of
  axes 0 and 2 move them by under 0.02 when an answer doubles);
- the new axis K gets axis `--axis`'s two length-head rows, both columns, and no value-head
  rows: its coordinates are W·(log(1 + n), 1), so s_K(i, j) = det(W)·(log(1 + n_i) −
  log(1 + n_j)) before normalisation, a pure length preference;
- its prompt-head row copies axis `--axis`'s, so the gate gives both the same eigenvalue.

`--linear-at N0` replaces the new axis's log(1 + n) by its tangent line at n = N0: the
checkpoint's `length_scale` is 1 + N0, so the feature is (n / (1 + N0), 1), and the constant
column absorbs log(1 + N0) − N0 / (1 + N0). At n = N0 the embedding is the log verifier's, and
the slope in n is the same there; only the curvature goes, so the same spread in tokens counts
the same at any length (the log reads ratios, which shrink as answers converge on long ones).

Constructed, not trained: it is a probe of whether GPRL finds and curbs an exploit that sits on
its own axis, not a better verifier. Check it with `length_axes.py` (the doubling probe is zero
on every axis but the new one: changing only n rescales the others' content coordinates, and
s_l of two parallel vectors is 0).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from gpm_server.checkpoint import (
    CONFIG_FILE,
    HEADS_FILE,
    LENGTH_HEAD,
    PROMPT_HEAD,
    VALUE_HEAD,
    GPMConfig,
    save_gprl_checkpoint,
)


def split_length_axis(heads: dict[str, torch.Tensor], axis: int) -> dict[str, torch.Tensor]:
    """Heads of K axes with a length head → heads of K + 1 axes, length only on the last."""
    value, length = heads[VALUE_HEAD], heads[LENGTH_HEAD]
    rows = slice(2 * axis, 2 * axis + 2)
    new_length = length.clone()
    new_length[:, 0] = 0.0
    out = {
        VALUE_HEAD: torch.cat([value, torch.zeros(2, value.shape[1])]),
        LENGTH_HEAD: torch.cat([new_length, length[rows].clone()]),
    }
    if PROMPT_HEAD in heads:
        prompt = heads[PROMPT_HEAD]
        out[PROMPT_HEAD] = torch.cat([prompt, prompt[axis : axis + 1].clone()])
    return out


def linearise_last_axis(heads: dict[str, torch.Tensor], n0: float) -> dict[str, torch.Tensor]:
    """The last axis's length rows read `(n / (1 + n0), 1)`: the tangent of `log(1 + n)` at n0.

    Every other row must have a zero count column (as `split_length_axis` leaves them), since
    the feature changes for all rows.
    """
    if n0 < 0:
        raise ValueError(f"--linear-at must be >= 0 tokens, got {n0}")
    length = heads[LENGTH_HEAD].clone()
    if length[:-2, 0].abs().max() > 0:
        raise ValueError("only the last axis may read the count to change its scale")
    offset = math.log1p(n0) - n0 / (1 + n0)
    length[-2:, 1] += offset * length[-2:, 0]
    return {**heads, LENGTH_HEAD: length}


def build(out_dir: Path, source: Path, axis: int, linear_at: float | None = None) -> Path:
    from safetensors.torch import load_file

    config = GPMConfig.from_dict(json.loads((source / CONFIG_FILE).read_text()))
    heads = load_file(str(source / HEADS_FILE))
    if LENGTH_HEAD not in heads:
        raise ValueError(f"{source}: no length head to move")
    if not 0 <= axis < config.k:
        raise ValueError(f"--axis must be in [0, {config.k}), got {axis}")
    backbone = str(source.resolve()) if config.backbone == "." else config.backbone
    new = split_length_axis(heads, axis)
    config = replace(config, k=config.k + 1, backbone=backbone)
    if linear_at is not None:
        new = linearise_last_axis(new, linear_at)
        config = replace(config, length_scale=1 + linear_at)
    return save_gprl_checkpoint(out_dir, new, config)


def main(argv: list[str] | None = None) -> Path:
    from gpm_server.app import default_model_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--source", type=Path, default=None, help="default: the embedded verifier")
    p.add_argument("--axis", type=int, default=1, help="the axis whose length term moves")
    p.add_argument(
        "--linear-at",
        type=float,
        default=None,
        metavar="N0",
        help="read the length axis on a linear scale, tangent to log(1 + n) at n = N0 tokens",
    )
    a = p.parse_args(argv)
    out = build(a.out, a.source or Path(default_model_path()), a.axis, a.linear_at)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
