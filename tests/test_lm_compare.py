"""benchmarks/lm_compare end to end with tiny models: the real service subprocess, all four arms
for 2 steps each through TRL, held-out answers, the judge, the report; then a rerun that resumes."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import tinymodels
import torch
from test_lm_run import tiny_policy

pytest.importorskip("trl")
pytest.importorskip("matplotlib")


def write_pairs(path: Path, prompts: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for p in prompts:
            fh.write(json.dumps({"prompt": p, "chosen": "yes", "rejected": "no"}) + "\n")


def tiny_data(root: Path) -> Path:
    write_pairs(
        root / "alpacaeval-prefs" / "train.jsonl.gz", [f"Say {i} things." for i in range(8)]
    )
    dialogues = [
        [{"role": "user", "content": f"Can you hurt {i}?"}, {"role": "assistant", "content": "No."},
         {"role": "user", "content": "Why not?"}]
        for i in range(8)
    ]  # fmt: skip
    write_pairs(root / "hh-rlhf-harmless" / "train.jsonl.gz", dialogues)
    return root


def tiny_judge(out: Path) -> str:
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    w = torch.randn(1, tinymodels.HIDDEN, generator=torch.Generator().manual_seed(3))
    save_file({"reward_head.weight": w}, str(out / "bt_head.safetensors"))
    return str(out)


def test_lm_compare_four_arms_two_steps_and_resume(tmp_path: Path, capsys) -> None:
    from benchmarks.lm_compare import run
    from benchmarks.lm_compare.prompts import load_prompts

    policy = tiny_policy(tmp_path / "policy")
    out = tmp_path / "out"
    argv = [
        "--policy",
        policy,
        "--gpm-model",
        str(tinymodels.make_gprl_checkpoint(tmp_path / "gpm")),
    ]
    argv += ["--judge", tiny_judge(tmp_path / "judge"), "--judge-backbone", policy]
    argv += ["--data-root", str(tiny_data(tmp_path / "data")), "--out", str(out)]
    argv += ["--steps", "2", "--n-train", "4", "--n-eval", "4", "--eval-samples", "1"]
    argv += ["--alpha-prompts", "2", "--max-completion-length", "6", "--baseline-steps", "1"]
    argv += ["--learning-rate", "1e-3", "--max-prompt-tokens", "512", "--threads", "1"]
    report = json.loads(run.main(argv).read_text())
    assert (out / "lm_compare.png").stat().st_size > 0
    assert "| gprl_paper |" in (out / "lm_compare.md").read_text()
    assert "content" not in (out / "prompts.json").read_text()  # the shared data stays out
    prompts = load_prompts(out)
    assert [p["source"] for p in prompts["train"]] == ["instruction", "red_team"] * 2
    train_keys = {json.dumps(p["prompt"]) for p in prompts["train"]}
    assert not train_keys & {json.dumps(p["prompt"]) for p in prompts["eval"]}
    mix = report["mix_before_training"]
    assert len(mix["all"]["alpha"]) == 3 and sum(mix["all"]["alpha"]) == pytest.approx(1.0)
    assert set(report["arms"]) == {"scalar_grpo", "gprl", "gprl_paper", "gprl_project"}
    for name, arm in report["arms"].items():
        assert len(arm["steps"]) == 2, name
        assert all("D" in s and "m_0" in s and "mean_length" in s for s in arm["steps"])
        lr = [s["learning_rate"] for s in arm["steps"]]  # TRL's default: linear decay to 0
        assert lr == pytest.approx([1e-3, 5e-4]), (name, lr)
        assert all(0 <= s["clipped_ratio"] <= 1 for s in arm["steps"]), name
        spread = [s["length_group_std"] for s in arm["steps"]]  # tokens, cap 6: at most 3
        assert all(0 <= x <= 3 for x in spread), (name, spread)
        assert all(s["log_length_group_std"] >= 0 for s in arm["steps"]), name
        assert 0.05 < arm["peak_rss_gib"] < 64, (name, arm["peak_rss_gib"])  # torch alone > 50 MiB
        assert report["length"][name]["all"]["n"] == 4
        assert 0 <= report["verifier_vs_base"][name]["win_rate"]["all"]["rate"] <= 1
        assert 0 <= report["judge_vs_base"][name]["all"]["rate"] <= 1
    assert report["arms"]["gprl_paper"]["drift_config"]["rule"] == "paper"
    assert report["arms"]["scalar_grpo"]["normalization"] == "global"
    assert not report["arms"]["gprl"]["control"]
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "arms").glob("*.json")}
    capsys.readouterr()
    run.main(argv)  # resumes: nothing retrained
    assert capsys.readouterr().out.count("done before, skipped") == 4
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "arms").glob("*.json")}
    with pytest.raises(SystemExit, match="other settings"):
        run.main([*argv, "--seed", "1"])
    with pytest.raises(SystemExit, match="need --oracle-axis"):
        run.main([*argv, "--arms", "gprl_oracle"])
    # Oracle arms added to the finished run (oracle.py): axis 1 named, corrected at every step.
    oracle = json.loads(
        run.main(
            [*argv, "--arms", "gprl_oracle", "gprl_drop", "gprl_drop_late", "--oracle-axis", "1"]
        ).read_text()
    )
    assert capsys.readouterr().out.count("done before, skipped") == 0
    corrected = oracle["arms"]["gprl_oracle"]["corrections"]
    assert [(c["step"], c["axis"]) for c in corrected] == [(1, 1), (2, 1)]
    m1 = [s["m_1"] for s in oracle["arms"]["gprl_oracle"]["steps"]]
    assert m1[0] < 1 and m1[1] < m1[0], m1
    drop = oracle["arms"]["gprl_drop"]
    assert drop["oracle_axis"] == 1 and not drop["corrections"]
    assert all((s["m_0"], s["m_1"], s["m_2"]) == (1.5, 0.0, 1.5) for s in drop["steps"])
    late = oracle["arms"]["gprl_drop_late"]  # the baseline is one step: off from step 1 on
    assert [(c["step"], c["axis"]) for c in late["corrections"]] == [(1, 1), (2, 1)]
    assert all((s["m_0"], s["m_1"], s["m_2"]) == (1.5, 0.0, 1.5) for s in late["steps"])
    assert all(len(a["steps"]) == 2 for a in oracle["arms"].values())
    for name in ("gprl_oracle", "gprl_drop", "gprl_drop_late"):
        (out / "arms" / f"{name}.json").rename(tmp_path / f"{name}.json")  # the rest: as before
    assert report["evaluated_with"]["device"] == "cpu" and report["evaluated_with"]["transformers"]

    # --report-only: re-evaluates the saved phases with other threads; trains and samples nothing.
    saved = (out / "settings.json").read_text()
    capsys.readouterr()
    again = json.loads(run.main([*argv[:-1], "2", "--report-only"]).read_text())
    assert "done before" not in capsys.readouterr().out and stamps == {
        p.name: p.stat().st_mtime_ns for p in (out / "arms").glob("*.json")
    }
    assert (out / "settings.json").read_text() == saved  # still the settings the phases ran with
    for name, got in again["verifier_vs_base"].items():  # other threads: equal to rounding
        assert got["win_rate"] == report["verifier_vs_base"][name]["win_rate"]
        assert got["mean_prob"] == pytest.approx(report["verifier_vs_base"][name]["mean_prob"])
    for name in report["arms"]:
        assert again["judge_vs_base"][name] == report["judge_vs_base"][name]
    assert again["judge_vs_base"]["rewards"]["base"] == pytest.approx(
        report["judge_vs_base"]["rewards"]["base"], abs=1e-5
    )
    assert set(report["judge_vs_base"]["length_relation"]) == set(report["arms"])
    from benchmarks.lm_compare.length_control import from_run

    lc = report["judge_vs_base"]["length_controlled"]
    assert (
        set(lc["arms"]) == set(report["arms"])
        and "judge, length-controlled" in (out / "lm_compare.md").read_text()
    )
    assert from_run(out) == lc  # the stored rewards give the report's figures back
    with pytest.raises(SystemExit, match="other settings"):
        run.main([*argv, "--report-only", "--steps", "3"])  # a training setting still counts
    older = {k: v for k, v in json.loads(saved).items() if k != "prompt_set"}
    (out / "settings.json").write_text(json.dumps(older))  # saved before --prompt-set existed
    run.main([*argv, "--report-only"])  # a missing option counts as its default
    with pytest.raises(SystemExit, match="prompt_set"):
        run.main([*argv, "--report-only", "--prompt-set", "one_axis"])
    (out / "base.json").unlink()
    with pytest.raises(SystemExit, match="lacks"):
        run.main([*argv, "--report-only"])


def test_replay_matches_a_live_controller(tmp_path: Path) -> None:
    """benchmarks/lm_compare/replay.py: the corrections a rule takes on recorded variances are
    those a live monitor + controller take on the same steps; a flat record has none."""
    from benchmarks.lm_compare import replay
    from gprl_client.drift import DriftController, DriftMonitor, drift_config

    tilt = [[0.0, 1.0, 0.2]] * 4 + [[0.0, 1.0, 0.2 + 0.3 * t] for t in range(8)]
    flat = [[0.0, 1.0, 0.002]] * 12
    for variances, quiet in ((tilt, False), (flat, True)):
        record = tmp_path / "run.json"
        steps = [{f"adv/mean_axis_var_{i}": v for i, v in enumerate(row)} for row in variances]
        record.write_text(json.dumps({"steps": steps}))
        out = replay.main([str(record)])
        for r in out:
            cfg = drift_config(r["preset"], **r["knobs"])
            monitor, controller = DriftMonitor(3, cfg), DriftController(3, cfg)
            live = [
                i + 1
                for i, v in enumerate(variances)
                if controller.update(monitor.update(v)).active
            ]
            assert [c["step"] for c in r["corrections"]] == live
            assert (not live) == quiet


def test_budget_callback_stops_every_arm_at_the_first_arms_step(tmp_path: Path) -> None:
    """The first arm out of time writes its step; the others stop at that step, whether they
    are ahead or behind; without a budget nothing stops."""
    from types import SimpleNamespace

    from benchmarks.lm_compare.arms import budget_callback

    stop = tmp_path / "stop_step.json"

    def step(cb, n: int) -> bool:
        control = SimpleNamespace(should_training_stop=False)
        cb.on_step_end(None, SimpleNamespace(global_step=n), control)
        return control.should_training_stop

    assert not step(budget_callback(0.0, stop), 99) and not stop.exists()
    first, behind = budget_callback(1e-9, stop), budget_callback(1e9, stop)
    assert step(first, 7)
    assert json.loads(stop.read_text()) == {"step": 7}
    assert not step(behind, 6) and step(behind, 7)
    late = budget_callback(1e-9, stop)  # also out of time, later: keeps the first arm's step
    assert step(late, 9) and json.loads(stop.read_text()) == {"step": 7}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stop_step.json"]


def test_parallel_runs_share_one_service(tmp_path: Path) -> None:
    """benchmarks/lm_compare/parallel.py: a two-axis run and a one-axis run side by side
    against one service, each through prepare / arms / report, with a time limit and three
    arms queued two at a time."""
    from benchmarks.lm_compare import parallel

    policy = tiny_policy(tmp_path / "policy")
    common = f"--policy {policy} --steps 2 --n-eval 2 --eval-samples 1 --alpha-prompts 2 "
    common += "--max-completion-length 6 --baseline-steps 1 --max-prompt-tokens 512"
    mix, one = tmp_path / "mix", tmp_path / "one"
    data = tiny_data(tmp_path / "data")
    summary = parallel.main(
        ["--gpm-model", str(tinymodels.make_gprl_checkpoint(tmp_path / "gpm")),
         "--time-limit-s", "3600", "--reserve-s", "60", "--poll-s", "5", "--jobs", "2",
         "--run", f"{common} --out {mix} --data-root {data} --n-train 4 --arms scalar_grpo gprl",
         "--run", f"{common} --out {one} --prompt-set one_axis --n-train 4 --arms gprl_project"]
    )  # fmt: skip
    assert set(summary["phases"]["arms"]) == {"mix/scalar_grpo", "mix/gprl", "one/gprl_project"}
    assert all(v["rc"] == 0 for ph in summary["phases"].values() for v in ph.values())
    report = json.loads((mix / "lm_compare.json").read_text())
    assert set(report["arms"]) == {"scalar_grpo", "gprl"}
    assert all(arm["steps_done"] == 2 for arm in report["arms"].values())
    one_axis = json.loads((one / "prompts.json").read_text())
    assert one_axis["set"] == "one_axis" and len(one_axis["train"]) == 4
    assert json.loads((one / "arms" / "gprl_project.json").read_text())["steps_done"] == 2
    assert not (mix / "stop_step.json").exists()  # the budget was never reached
    assert (mix / "logs" / "gprl.log").stat().st_size > 0

    from benchmarks.lm_compare import axes  # per-axis terms, recomputed by a fresh service

    res = axes.main([str(mix), "--threads", "1"])
    assert set(res["paired"]) == {"scalar_grpo - gprl"} and (mix / "axes.json").exists()
    for name in ("scalar_grpo", "gprl"):
        got = [a["mean"] for a in res["vs_base"][name]["all"]]
        assert len(got) == 3 and all(a["n"] == 2 for a in res["vs_base"][name]["all"])
        want = report["verifier_vs_base"][name]["mean_weighted_axis_score"]["all"]
        assert got == pytest.approx(want, abs=1e-5)  # the report's means, same verifier
    paired = [a["mean"] for a in res["paired"]["scalar_grpo - gprl"]["all"]]
    one, two = res["vs_base"]["scalar_grpo"]["all"], res["vs_base"]["gprl"]["all"]
    diff = [a["mean"] - b["mean"] for a, b in zip(one, two, strict=True)]
    assert paired == pytest.approx(diff, abs=1e-6)
    assert res["train_length"]["scalar_grpo - gprl"]["before_correction"]["n"] == 2


def test_train_length_pairs_steps_and_splits_at_the_first_correction() -> None:
    """Step t's answers were sampled before a correction at step t acted: they stay 'before'."""
    from benchmarks.lm_compare.axes import train_length

    def arm(lengths: list[float], fixes: list[int]) -> dict:
        steps = [{"mean_length": x} for x in lengths]
        return {"steps": steps, "corrections": [{"step": float(t), "axis": 1.0} for t in fixes]}

    res = train_length({"a": arm([10, 12, 15, 20, 30], []), "b": arm([10, 11, 16, 14, 20], [3])})
    got = res["a - b"]
    assert got["first_correction"] == 3
    before, after = [0.0, 1.0, -1.0], [6.0, 10.0]  # by hand: a - b at steps 1-3, then 4-5
    assert got["before_correction"]["mean"] == pytest.approx(sum(before) / 3)
    assert got["before_correction"]["n_positive"] == 1
    sd = torch.tensor(after).std().item()
    assert got["after_correction"]["ci95"] == pytest.approx(1.96 * sd / 2**0.5, rel=1e-6)
    assert got["after_correction"]["mean"] == pytest.approx(8.0)
    quiet = train_length({"a": arm([1, 2], []), "b": arm([1, 1, 1], [])})["a - b"]
    assert quiet["first_correction"] is None and "after_correction" not in quiet
    assert quiet["before_correction"]["n"] == 2  # the shorter run sets the steps compared


def test_make_lm_compare_gpu_runs_parse(tmp_path: Path) -> None:
    """`make lm-compare-gpu` (not run here: it needs a GPU) hands parallel.py arguments that
    both it and every lm_compare run accept: the four mix arms and the one-axis pair."""
    import shlex
    import shutil
    import subprocess

    from benchmarks.lm_compare import parallel
    from benchmarks.lm_compare import run as lm_compare

    if shutil.which("make") is None:
        pytest.skip("no make")
    root = Path(__file__).resolve().parents[1]
    dry = subprocess.run(
        ["make", "-s", "-n", "lm-compare-gpu"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    argv = shlex.split(dry.replace("\\\n", " "))
    a = parallel.parse_args(argv[argv.index("benchmarks.lm_compare.parallel") + 1 :])
    assert a.device == "cuda" and a.jobs == 4 and len(a.run) == 2
    mix, one = (lm_compare.parse_args(shlex.split(r)) for r in a.run)
    assert (mix.steps, mix.prompts_per_step, mix.max_completion_length) == (40, 8, 256)
    assert set(mix.arms) == {"scalar_grpo", "gprl", "gprl_paper", "gprl_project"}
    assert (one.prompt_set, one.steps, one.arms) == ("one_axis", 20, ["gprl_paper", "gprl_project"])


def test_select_prompts_drops_prompts_over_the_token_rule(tmp_path: Path) -> None:
    """The rule counts the templated prompt with its system message (it once counted len() of
    transformers 5's dict, 2, and let every prompt through)."""
    from benchmarks.lm_compare.prompts import prompt_tokens, select_prompts, with_system

    tok = tinymodels.tiny_tokenizer()
    long = "Say " + "many more things " * 40
    write_pairs(tmp_path / "alpacaeval-prefs" / "train.jsonl.gz", [long, "Say a.", "Say b."])
    dialogues = [[{"role": "user", "content": c}] for c in (long, "Hurt a?", "Hurt b?")]
    write_pairs(tmp_path / "hh-rlhf-harmless" / "train.jsonl.gz", dialogues)
    short = prompt_tokens(tok, with_system([{"role": "user", "content": "Say a."}], "Be brief."))
    assert prompt_tokens(tok, [{"role": "user", "content": long}]) > 4 * short

    got = select_prompts(tmp_path, tok, 2, 2, 2 * short, seed=0, system="Be brief.")
    chosen = [p["prompt"] for p in got["train"] + got["eval"]]
    assert len(chosen) == 4 and all(long not in json.dumps(p) for p in chosen)
    with pytest.raises(ValueError, match="only 0 prompts"):  # the system message counts too
        select_prompts(tmp_path, tok, 2, 2, short - 1, seed=0, system="Be brief.")


def test_eos_check_scores_each_pair_under_both_eos(tmp_path: Path) -> None:
    """Its own EOS gives the service's per-axis terms and full agreement; another EOS gives the
    terms of a GPM built with that EOS (a slow reference: a second model, nothing switched)."""
    from benchmarks.lm_compare import eos_check
    from gpm_server.model import GPM

    ckpt = str(tinymodels.make_gprl_checkpoint(tmp_path / "gpm"))
    prompts = [{"source": "instruction", "prompt": [{"role": "user", "content": f"Q{i}?"}]}
               for i in range(4)]  # fmt: skip
    answers = lambda texts: [  # noqa: E731
        {"prompt_index": i, "sample": 0, "source": "instruction", "text": t}
        for i, t in enumerate(texts)
    ]
    out = tmp_path / "run"
    (out / "arms").mkdir(parents=True)
    (out / "settings.json").write_text(json.dumps({"system": "Be brief.", "gpm_model": ckpt}))
    (out / "prompts.json").write_text(json.dumps({"eval": prompts}))
    (out / "base.json").write_text(json.dumps({"answers": answers(["no", "yes", "ok", "hm"])}))
    arm = answers(["a long answer", "yes", "sure thing", "b"])
    (out / "arms" / "scalar_grpo.json").write_text(json.dumps({"answers": arm}))

    tok = tinymodels.tiny_tokenizer()
    res = eos_check.main([str(out), "--eos", str(tok.bos_token_id), "--threads", "1"])
    r = res["arms"]["scalar_grpo"]
    gpm = GPM.from_pretrained(ckpt)
    base = json.loads((out / "base.json").read_text())["answers"]
    own = eos_check.pair_terms(gpm, prompts, arm, base, "Be brief.")
    assert r["axis_mean_own"] == pytest.approx(own.mean(0).tolist(), abs=1e-6)
    gpm.tokenizer.eos_token = tok.bos_token  # a GPM whose tokenizer has the other EOS
    other = GPM(gpm.backbone, gpm.tokenizer, gpm.heads(), tau=gpm.info.tau)
    want = eos_check.pair_terms(other, prompts, arm, base, "Be brief.")
    assert r["axis_mean_other"] == pytest.approx(want.mean(0).tolist(), abs=1e-6)
    assert r["axis_mean_other"] != pytest.approx(r["axis_mean_own"], abs=1e-4)
    x, y = own.sum(-1), want.sum(-1)
    assert r["n"] == 4 and x[1] == y[1] == 0  # pair 1: the same answer twice, a tie
    assert r["winner_agreement"] == float((torch.sign(x) == torch.sign(y)).float().mean())
    assert r["win_rate_own"] == eos_check.win_rate(x)
    assert eos_check.win_rate(torch.tensor([1.0, 0.0, -2.0, 3.0])) == 0.625


def test_length_relation_splits_wins_by_the_length_gap() -> None:
    from benchmarks.lm_compare.evaluate import length_relation

    base = [{"tokens": t} for t in (10, 10, 10, 10, 10)]
    arm = [{"tokens": t} for t in (20, 30, 10, 5, 10)]
    margin = [1.0, 2.0, 0.0, -1.0, -0.5]
    got = length_relation(arm, base, margin)
    # by hand: gaps (10, 20, 0, -5, 0); longer wins 2/2, same: a tie and a loss, shorter 0/1
    assert got["longer"]["rate"] == 1.0 and got["longer"]["n"] == 2
    assert got["same"]["rate"] == 0.25 and got["same"]["n"] == 2
    assert got["shorter"]["rate"] == 0.0 and got["shorter"]["n"] == 1
    gap, m = [10.0, 20.0, 0.0, -5.0, 0.0], margin
    mg, mm = sum(gap) / 5, sum(m) / 5
    cov = sum((a - mg) * (b - mm) for a, b in zip(gap, m, strict=True))
    var = sum((a - mg) ** 2 for a in gap) * sum((b - mm) ** 2 for b in m)
    assert got["corr"] == pytest.approx(cov / var**0.5)
    flat = length_relation(base, base, margin)  # no length gap at all: no correlation to report
    assert flat["corr"] is None and flat["longer"] is None and flat["same"]["n"] == 5


def test_prompts_json_names_shared_prompts_by_reference(tmp_path: Path) -> None:
    """The selection is the one shuffling the prompts themselves gives (the rule before prompts
    were stored by reference); prompts.json keeps no text and resolves only against the same
    data."""
    import random

    from benchmarks.lm_compare.prompts import (
        distinct_prompts,
        load_prompts,
        select_prompts,
        stored_form,
    )

    data = tiny_data(tmp_path / "data")
    tok = tinymodels.tiny_tokenizer()
    got = select_prompts(data, tok, 4, 4, 512, seed=5)
    for source, folder in (("instruction", "alpacaeval-prefs"), ("red_team", "hh-rlhf-harmless")):
        prompts = distinct_prompts(data / folder / "train.jsonl.gz")
        random.Random(5).shuffle(prompts)
        rows = [r for r in got["train"] + got["eval"] if r["source"] == source]
        assert sorted(map(json.dumps, (r["prompt"] for r in rows))) == sorted(
            map(json.dumps, prompts[:4])
        )
    out = tmp_path / "run"
    out.mkdir()
    (out / "prompts.json").write_text(json.dumps(stored_form(got)))
    assert "content" not in (out / "prompts.json").read_text()
    back = load_prompts(out, data)
    for key in ("train", "eval"):
        assert [{k: v for k, v in r.items() if k != "sha256"} for r in back[key]] == got[key]
    with pytest.raises(FileNotFoundError, match="--data-root"):
        load_prompts(out, tmp_path / "nowhere")
    other = tmp_path / "other"
    write_pairs(other / "alpacaeval-prefs" / "train.jsonl.gz", [f"Do {i}." for i in range(8)])
    write_pairs(other / "hh-rlhf-harmless" / "train.jsonl.gz", [f"Do {i}." for i in range(8)])
    with pytest.raises(ValueError, match="SHA-256"):
        load_prompts(out, other)


def test_parallel_resume_keeps_earlier_logs_and_summaries(tmp_path: Path) -> None:
    """A rerun of parallel.py (e.g. to add arms) skips finished phases: it must not overwrite
    their logs or the earlier launch's wall times."""
    import os

    from benchmarks.lm_compare.parallel import Job, write_summary

    log = tmp_path / "logs" / "gprl.log"
    log.parent.mkdir()
    log.write_text("step 12/12 of the first launch\n")
    job = Job("x/gprl", ["--help"], log, dict(os.environ))
    assert job.proc.wait(timeout=120) == 0
    text = log.read_text()
    assert text.startswith("step 12/12 of the first launch\n") and "\n=== " in text
    assert "first launch" not in job.output() and "--report-only" in job.output()

    path = tmp_path / "parallel.json"
    write_summary(path, {"phases": {"arms": {"x/gprl": {"wall_s": 1253.0}}}, "wall_s": 1700.0})
    write_summary(path, {"phases": {"arms": {"x/gprl": {"wall_s": 6.0}}}, "wall_s": 1816.0})
    write_summary(path, {"phases": {}, "wall_s": 3.0})
    got = json.loads(path.read_text())
    assert got["wall_s"] == 3.0 and [e["wall_s"] for e in got["earlier"]] == [1700.0, 1816.0]
    assert got["earlier"][0]["phases"]["arms"]["x/gprl"]["wall_s"] == 1253.0


def test_parallel_does_not_relaunch_a_finished_arm(tmp_path: Path) -> None:
    """A rerun that adds arms launches only the new ones; a finished arm is entered as skipped,
    with no wall time of its own, so the summary's wall times are all measured by this launch."""
    from benchmarks.lm_compare.arms import arm_record
    from benchmarks.lm_compare.parallel import arm_specs

    a, b = tmp_path / "a", tmp_path / "b"
    arm_record(a, "scalar_grpo").parent.mkdir(parents=True)
    arm_record(a, "scalar_grpo").write_text("{}")
    runs = [["--out", str(a)], ["--out", str(b)]]
    specs, finished = arm_specs(runs, [a, b], [["scalar_grpo", "gprl"], ["scalar_grpo"]], ["-x"])
    assert finished == {
        "a/scalar_grpo": {"rc": 0, "skipped": "done before", "log": str(a / "logs/scalar_grpo.log")}
    }
    assert [(n, log) for n, _, log in specs] == [
        ("a/gprl", a / "logs" / "gprl.log"),
        ("b/scalar_grpo", b / "logs" / "scalar_grpo.log"),
    ]
    assert specs[0][1] == ["--out", str(a), "-x", "--arms", "gprl", "--no-report"]


def test_parallel_names_a_killed_job() -> None:
    """rc −9 (the OOM killer's SIGKILL) says what to do; other signals are named; exits are not."""
    from benchmarks.lm_compare.parallel import exit_reason

    assert "out of memory" in exit_reason(-9) and "--jobs" in exit_reason(-9)
    assert exit_reason(-15) == " (killed by signal 15)"
    assert exit_reason(0) == exit_reason(1) == exit_reason(None) == ""


def test_length_axes_splits_each_axis_term_into_length_and_content(tmp_path: Path) -> None:
    """benchmarks/lm_compare/length_axes.py against a slow reference: value_head(h) from a GPM
    without the length head or normalisation, the length head applied by hand, s_l written out."""
    from benchmarks.lm_compare import length_axes
    from gpm_server.checkpoint import LENGTH_HEAD
    from gpm_server.model import GPM

    model, tok, heads = tinymodels.tiny_parts(3, True, seed=5)
    heads[LENGTH_HEAD] = torch.randn(6, 2, generator=torch.Generator().manual_seed(5))
    gpm = GPM(model, tok, heads, max_length=32)
    raw = GPM(model, tok, {k: v for k, v in heads.items() if k != LENGTH_HEAD},
              max_length=32, l2_normalize=False)  # fmt: skip
    prompts = [{"source": s, "prompt": [{"role": "user", "content": f"Q{i}?"}]}
               for i, s in enumerate(["instruction", "red_team", "instruction"])]  # fmt: skip
    answers = lambda texts: [  # noqa: E731
        {"prompt_index": i, "sample": 0, "source": p["source"], "text": t}
        for i, (p, t) in enumerate(zip(prompts, texts, strict=True))
    ]
    out = tmp_path / "run"
    (out / "arms").mkdir(parents=True)
    (out / "settings.json").write_text(json.dumps({"system": None}))
    (out / "prompts.json").write_text(json.dumps({"eval": prompts}))
    base = answers(["no", "yes yes", "ok " * 40])  # the last one is truncated: n > what h sees
    arm = answers(["a much longer answer than base", "yes yes", "ok"])
    (out / "base.json").write_text(json.dumps({"answers": base}))
    (out / "arms" / "scalar_grpo.json").write_text(json.dumps({"answers": arm}))
    res = length_axes.analyse(gpm, out)

    def ref_embedding(row: dict, n: int) -> torch.Tensor:
        pair = (prompts[row["prompt_index"]]["prompt"], row["text"])
        v = raw.embed([pair]).embeddings[0] + heads[LENGTH_HEAD] @ torch.tensor(
            [math.log1p(n), 1.0]
        )
        return v / v.norm()

    def s(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> list[float]:
        return [
            float(lam[k] * (x[2 * k] * y[2 * k + 1] - x[2 * k + 1] * y[2 * k])) for k in range(3)
        ]

    def count(row: dict) -> int:
        (seq,) = gpm.encode([(prompts[row["prompt_index"]]["prompt"], row["text"])])
        return seq.full_response_tokens

    want_len, want_con, want_dbl = [], [], []
    for a, b in zip(arm, base, strict=True):
        lam = gpm.embed([(prompts[a["prompt_index"]]["prompt"], a["text"])]).eigenvalues[0]
        na, nb = count(a), count(b)
        vb = ref_embedding(b, nb)
        total = s(ref_embedding(a, na), vb, lam)
        content = s(ref_embedding(a, nb), vb, lam)
        want_con.append(content)
        want_len.append([t - c for t, c in zip(total, content, strict=True)])
        want_dbl.append(s(ref_embedding(b, 2 * nb), vb, lam))
    r = res["arms"]["scalar_grpo"]
    got = lambda part: [a["mean"] for a in part["all"]]  # noqa: E731
    assert got(r["length"]) == pytest.approx(torch.tensor(want_len).mean(0).tolist(), abs=1e-5)
    assert got(r["content"]) == pytest.approx(torch.tensor(want_con).mean(0).tolist(), abs=1e-5)
    assert got(res["doubling_probe"]) == pytest.approx(
        torch.tensor(want_dbl).mean(0).tolist(), abs=1e-5
    )
    assert any(abs(x) > 1e-3 for x in got(r["length"]))  # the arm's extra tokens count
    assert [a["n"] for a in r["total"]["red_team"]] == [1, 1, 1]
    # The pair with the same answer on both sides: no length part, no content part.
    same = gpm.encode([(prompts[1]["prompt"], "yes yes")])
    single = length_axes.split_terms(gpm, same, same, gpm.forward(same))
    assert single["total"].abs().max() == 0 and single["length"].abs().max() == 0
    # Without a length head nothing is length.
    plain = GPM(model, tok, {k: v for k, v in heads.items() if k != LENGTH_HEAD}, max_length=32)
    none = length_axes.analyse(plain, out)
    assert not none["length_head"]
    assert all(a["mean"] == 0 for a in none["arms"]["scalar_grpo"]["length"]["all"])
    assert all(a["mean"] == 0 for a in none["doubling_probe"]["all"])
    assert (out / "length_axes.json").exists()


def test_gain_probe_against_hand_written_gains(tmp_path: Path) -> None:
    """benchmarks/lm_compare/gain_probe.py against a slow reference: ū averaged by hand, each
    g_l = λ_l (a_l(x) b_l(ū) − b_l(x) a_l(ū)) written out, the paired shift, z, the named axis."""
    from benchmarks.lm_compare import gain_probe
    from gpm_server.model import GPM

    model, tok, heads = tinymodels.tiny_parts(3, True, seed=10)  # every λ_l ≥ 0.05
    gpm = GPM(model, tok, heads, max_length=32)
    sources = ["instruction", "red_team", "instruction", "red_team"]
    prompts = [
        {"source": s, "prompt": [{"role": "user", "content": f"Q{i}?"}]}
        for i, s in enumerate(sources)
    ]
    answers = lambda texts: [  # noqa: E731
        {"prompt_index": i, "sample": 0, "source": p["source"], "text": t}
        for i, (p, t) in enumerate(zip(prompts, texts, strict=True))
    ]
    out = tmp_path / "run"
    (out / "arms").mkdir(parents=True)
    settings = {"system": None, "ema_rate": 0.25, "baseline_steps": 2, "prompts_per_step": 2}
    (out / "settings.json").write_text(json.dumps(settings))
    (out / "prompts.json").write_text(json.dumps({"eval": prompts}))
    base, arm = answers(["no", "yes yes", "ok", "fine"]), answers(["a b c", "yes", "ok ok", "x"])
    (out / "base.json").write_text(json.dumps({"answers": base}))
    var = lambda a, b, c: {"var_0": a, "var_1": b, "var_2": c}  # noqa: E731
    steps = [var(3.0, 4.0, 0.25), var(5.0, 4.0, 0.25), var(99.0, 99.0, 99.0)]
    (out / "arms" / "gprl.json").write_text(json.dumps({"answers": arm, "steps": steps}))
    res = gain_probe.analyse(gpm, out)["arms"]["gprl"]

    def emb(row: dict) -> tuple[torch.Tensor, torch.Tensor]:
        o = gpm.embed([(prompts[row["prompt_index"]]["prompt"], row["text"])])
        return o.embeddings[0], o.eigenvalues[0]

    ref = sum(emb(r)[0] for r in base) / len(base)

    def g(row: dict) -> list[float]:
        v, lam = emb(row)
        return [
            float(lam[k] * (v[2 * k] * ref[2 * k + 1] - v[2 * k + 1] * ref[2 * k]))
            for k in range(3)
        ]

    gb, ga = torch.tensor([g(r) for r in base]), torch.tensor([g(r) for r in arm])
    shift = (ga - gb).mean(0)
    sd = gb.std(0)
    assert [d["mean"] for d in res["shift"]] == pytest.approx(shift.tolist(), abs=1e-6)
    assert res["z"] == pytest.approx((shift / sd).tolist(), rel=1e-4)
    v0_sd = torch.tensor([2.0, 2.0, 0.5])  # √v(0), v(0) the mean of the first 2 steps
    assert res["z_within"] == pytest.approx((shift / v0_sd).tolist(), rel=1e-4, abs=1e-6)
    assert res["named_axis"] == int(torch.argmax(shift / sd))
    noise = sd * math.sqrt(0.25 / 1.75 + 1 / 2) / math.sqrt(2)
    assert res["shift_over_noise"] == pytest.approx((shift / noise).tolist(), rel=1e-4)
    assert shift.abs().max() > 1e-4  # the arm's answers differ, so the probe sees something
    assert res.get("training_noise_split") is None  # no groups sampled: no measured split
    # With G = 2 sampled answers to each of 2 prompts: the one-way ANOVA split, by hand.
    texts = [["no", "yes"], ["maybe so", "never"]]
    groups = [{"prompt_index": i, "sample": j, "source": prompts[i]["source"], "text": t}
              for i, pair in enumerate(texts) for j, t in enumerate(pair)]  # fmt: skip
    (out / "gain_groups.json").write_text(json.dumps({"prompts": 2, "answers": groups}))
    settings["generations"] = 2
    (out / "settings.json").write_text(json.dumps(settings))
    split = gain_probe.analyse(gpm, out)
    gg = torch.tensor([[g(groups[2 * i + j]) for j in range(2)] for i in range(2)], dtype=float)
    within = sum(((gg[i, 0] - gg[i, 1]) ** 2 / 2 for i in range(2)), torch.zeros(3)) / 2
    means = gg.mean(1)
    between = ((means[0] - means[1]) ** 2 / 2 - within / 2).clamp_min(0)
    got = split["variance_split"]
    assert got["within"] == pytest.approx(within.tolist(), rel=1e-3, abs=1e-12)
    assert got["between"] == pytest.approx(between.tolist(), rel=1e-3, abs=1e-12)
    want = [math.sqrt(0.25 / 1.75 + 1 / 2) * math.sqrt(b / 2 + w / 4)
            for b, w in zip(between.tolist(), within.tolist(), strict=True)]  # fmt: skip
    assert split["arms"]["gprl"]["training_noise_split"] == pytest.approx(want, rel=1e-3)
    assert gain_probe.balanced(prompts, 3) == [0, 1, 2]  # sources alternate, stored order kept
    stored = [{"source": "instruction"}] * 3 + [{"source": "red_team"}] * 3
    assert gain_probe.balanced(stored, 4) == [0, 1, 3, 4]
    assert gain_probe.balanced(stored, 10) == list(range(6))
    # The base policy against itself: no shift on any axis.
    (out / "arms" / "gprl.json").write_text(json.dumps({"answers": base, "steps": steps}))
    same = gain_probe.analyse(gpm, out)["arms"]["gprl"]
    assert all(abs(d["mean"]) < 1e-7 for d in same["shift"])
    assert (out / "gain_probe.json").exists()


def test_global_paper_ablation_is_opt_in() -> None:
    """The ablations (`global_paper`, scalar GRPO's advantage + the paper controller, and the
    oracle arms) run only when named: the default is the issue's four arms."""
    from benchmarks.lm_compare.arms import ARMS, ISSUE_ARMS
    from benchmarks.lm_compare.oracle import ORACLE_ARMS
    from benchmarks.lm_compare.run import parse_args

    assert parse_args([]).arms == list(ISSUE_ARMS)
    assert set(ISSUE_ARMS) | {"global_paper", *ORACLE_ARMS} == set(ARMS)
    assert not any(ARMS[name].oracle for name in ISSUE_ARMS)
    assert parse_args(["--arms", "global_paper"]).arms == ["global_paper"]
    arm = ARMS["global_paper"]
    assert (arm.normalization, arm.control, arm.preset) == ("global", True, "paper")
    assert (
        ARMS["scalar_grpo"].normalization == arm.normalization and not ARMS["scalar_grpo"].control
    )


def test_lr_scheduler_option_reaches_trl(tmp_path: Path) -> None:
    """`--lr-scheduler constant` keeps TRL's step size fixed over the run; the default stays
    TRL's linear decay to 0 over --steps (what every committed run used)."""
    from transformers import get_scheduler

    from benchmarks.lm_compare.run import parse_args
    from benchmarks.lm_run import grpo_config

    def lrs(argv: list[str]) -> list[float]:
        args = grpo_config(tmp_path, parse_args(["--steps", "4", *argv]))
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
        sched = get_scheduler(args.lr_scheduler_type, opt, 0, args.max_steps)
        out = []
        for _ in range(args.max_steps):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    assert parse_args([]).lr_scheduler == "linear"
    assert lrs([]) == pytest.approx([3e-5, 2.25e-5, 1.5e-5, 0.75e-5])
    assert lrs(["--lr-scheduler", "constant"]) == pytest.approx([3e-5] * 4)
    with pytest.raises(SystemExit):
        parse_args(["--lr-scheduler", "cosine_typo"])


def test_memory_probe_refuses_a_completion_longer_than_the_sequence(capsys) -> None:
    from benchmarks.lm_compare import memory_probe

    with pytest.raises(SystemExit):
        memory_probe.main(["--tokens", "640", "--completion", "640"])
    assert "--completion must be in (0, --tokens)" in capsys.readouterr().err
