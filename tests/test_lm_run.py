"""benchmarks/lm_run.py end to end with tiny models: real service subprocess, TRL GPRL, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tinymodels

pytest.importorskip("trl")
pytest.importorskip("matplotlib")


def tiny_policy(out: Path) -> str:
    tok = tinymodels.tiny_tokenizer()
    model = tinymodels.tiny_backbone(tok, seed=1)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_lm_run_two_steps_report(tmp_path: Path) -> None:
    from benchmarks import lm_run

    gpm = tinymodels.make_gprl_checkpoint(tmp_path / "gpm", k=3)
    policy = tiny_policy(tmp_path / "policy")
    out = tmp_path / "out"
    argv = ["--policy", policy, "--gpm-model", str(gpm), "--out", str(out), "--steps", "2"]
    argv += ["--max-completion-length", "8", "--baseline-steps", "1", "--learning-rate", "1e-3"]
    path = lm_run.main(argv)
    report = json.loads(path.read_text())
    assert (out / "lm_run.png").stat().st_size > 0
    assert report["n_steps"] == 2 and len(report["steps"]) == 2
    assert report["wall_time_s"] > 0
    assert report["drift"]["controller"] is not None
    for step in report["steps"]:
        for key in ("D", "beta", "clip_eps", "reward", "mean_length"):
            assert key in step, key
        assert step["beta"] > 0 and step["clip_eps"] > 0
        for axis in range(3):
            assert f"alpha_{axis}" in step and f"m_{axis}" in step
            assert f"adv/mean_axis_var_{axis}" in step
    assert [s["step"] for s in report["steps"]] == sorted(s["step"] for s in report["steps"])
