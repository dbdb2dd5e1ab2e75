"""`gprl audit-length` on a finished run's base-policy groups, for one or more verifiers.

    python -m benchmarks.lm_compare.audit benchmarks/results/lm_compare_length_axis_seed3 \
      --verifier default= --verifier length_free=benchmarks/results/length_free_verifier \
      --json benchmarks/results/length_audit.json

The groups are the G base answers to each held-out prompt that `gain_probe --groups` cached
(`DIR/gain_groups.json`), with the run's system message: what a user would sample from the
policy before training. For each verifier (`NAME=PATH`, an empty PATH for the embedded default
model) a `gpm-server` is started and the real command runs against it over HTTP. The groups'
JSONL holds the shared data's prompts, so it is written to a temporary folder only; the JSON
written holds the audit's numbers.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.lm_compare.advantage_length import grouped
from benchmarks.lm_compare.prompts import load_prompts, with_system
from benchmarks.lm_compare.report import run_dir_parser
from benchmarks.lm_run import start_service
from benchmarks.servers import free_port
from gprl_client.audit import audit_main


def audit_groups(out: Path, data_root: Path | None = None) -> list[dict[str, Any]]:
    """`{"prompt", "responses"}` per cached group of base answers, prompts with the system."""
    path = out / "gain_groups.json"
    if not path.exists():
        cmd = f"python -m benchmarks.lm_compare.gain_probe {out} --groups 32"
        raise SystemExit(f"{path} missing: {cmd}")
    answers = json.loads(path.read_text())["answers"]
    system = json.loads((out / "settings.json").read_text())["system"]
    prompts = load_prompts(out, data_root)["eval"]
    return [
        {
            "prompt": with_system(prompts[answers[rows[0]]["prompt_index"]]["prompt"], system),
            "responses": [answers[i]["text"] for i in rows],
            "tokens": [answers[i]["tokens"] for i in rows],  # the policy's, uncut
        }
        for rows in grouped(answers)
    ]


def parse_verifier(spec: str) -> tuple[str, str | None]:
    name, sep, path = spec.partition("=")
    if not sep or not name:
        msg = f"--verifier wants NAME=PATH (empty PATH: the default model), got {spec!r}"
        raise SystemExit(msg)
    return name, path or None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = run_dir_parser(__doc__)
    p.add_argument("--verifier", action="append", required=True, help="NAME=PATH, repeatable")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    groups = audit_groups(a.out, a.data_root)
    report: dict[str, Any] = {"run": str(a.out), "groups": len(groups), "verifiers": {}}
    with tempfile.TemporaryDirectory(prefix="gprl-audit-") as tmp:
        samples = Path(tmp) / "samples.jsonl"
        samples.write_text("\n".join(json.dumps(g) for g in groups) + "\n")
        for spec in a.verifier:
            name, model = parse_verifier(spec)
            work = Path(tmp) / name
            work.mkdir()
            server = start_service(free_port(), model, work, a.threads, a.device)
            try:
                server.wait_ready(900)
                result = work / "audit.json"
                print(f"== {name} ({model or 'embedded default model'})")
                argv = ["--groups", str(samples), "--url", server.url, "--json", str(result)]
                argv += ["--timeout", "1800"]  # 128 answers on a CPU shared with training
                rc = audit_main(argv)
                if rc != 0:
                    raise SystemExit(f"gprl audit-length failed on {name} (exit {rc})")
                report["verifiers"][name] = {"checkpoint": model, **json.loads(result.read_text())}
            finally:
                server.stop()
    for v in report["verifiers"].values():
        v.pop("url", None)  # a port of this run, not a result
    a.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
