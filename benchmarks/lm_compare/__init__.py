"""`python -m benchmarks.lm_compare`: GPRL against scalar GRPO on a real LM (docs/gprl_runs.md)."""
