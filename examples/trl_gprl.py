"""GPRL with TRL 1.16: GRPO whose advantages are per-dimension GPM advantages.

    gpm-server serve --port 8000 &            # the verifier (embedded default model on CPU)
    python examples/trl_gprl.py --url http://127.0.0.1:8000 \
        --policy HuggingFaceTB/SmolLM2-135M-Instruct

`--policy` is any causal LM with a chat template (a hub id or a local folder; TRL builds the
reference model from the same path). Without `--policy` a tiny random policy is built locally
(no download: a smoke run, the numbers mean nothing). Writes TRL's logs and the drift report
(`<out>/gprl_drift/drift_report.json` + `.png`) to `--out`. On a GPU add `--bf16` and raise
`--steps`, `--generations` and `--max-completion-length`; the GPRL paper uses G = 8.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROMPTS = [
    "Explain why the sky is blue in one short paragraph.",
    "Write a haiku about the sea.",
    "Give three tips for writing clear emails.",
    "What is the difference between weather and climate?",
]


def tiny_policy(out: Path) -> str:
    """A tiny random Llama with the test suite's tokenizer, saved to `out` (offline)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tinymodels

    tok = tinymodels.tiny_tokenizer()
    model = tinymodels.tiny_backbone(tok, seed=1)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def main() -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig

    from gprl_client import GPMClient
    from gprl_client.adapters.trl import GPRLGRPOTrainer
    from gprl_client.drift import DriftConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="GPM service (comma-separated)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--policy", default=None, help="policy model (default: tiny random, offline)")
    p.add_argument("--out", default="trl-gprl-out")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--generations", type=int, default=4, help="G, responses per prompt")
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.04, help="initial KL coefficient (> 0)")
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args()

    out = Path(a.out)
    policy = a.policy or tiny_policy(out / "tiny-policy")
    client = GPMClient(a.url.split(","), api_key=a.api_key)
    client.wait_ready(timeout=300)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in PROMPTS * 8]})
    args = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=a.prompts_per_step * a.generations,
        num_generations=a.generations,
        max_completion_length=a.max_completion_length,
        max_steps=a.steps,
        beta=a.beta,
        learning_rate=1e-6 if a.policy else 1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=a.bf16,
    )
    trainer = GPRLGRPOTrainer(
        model=policy,
        args=args,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(policy),
        gpm_client=client,
        drift_config=DriftConfig(baseline_steps=2),
        run_id="trl-example",
    )
    trainer.train()
    for entry in trainer.state.log_history:
        if "gprl/beta" in entry:
            keys = ("gprl/D", "gprl/beta", "gprl/clip_eps", "rewards/gpm_preference/mean")
            print(
                {
                    k: entry[k] if entry[k] is None else round(entry[k], 4)
                    for k in keys
                    if k in entry
                }
            )
    print(f"drift report: {out / 'gprl_drift' / 'drift_report.json'}")


if __name__ == "__main__":
    main()
