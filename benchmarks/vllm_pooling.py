"""vLLM offline pooling throughput on pre-tokenised sequences (run inside vLLM's own venv).

Not imported by the project: `benchmarks/vllm_baseline.py` runs it as a script with vLLM's
interpreter. It embeds the same token sequences as the other baselines with last-token pooling
(the state the GPM value head reads), prefix caching on, and writes sequences/s as JSON.

    python benchmarks/vllm_pooling.py --model HF_DIR --input seqs.json --output out.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

HEAD_FILES = ("gpm_", "bt_")  # our head files: vLLM would try to load them as backbone weights


def model_view(model: str, max_len: int, workdir: str) -> str:
    """The backbone directory as vLLM should see it: `model` itself, or a view of it.

    - A gprl checkpoint that embeds its backbone keeps the heads in `gpm_*.safetensors` next to
      the weights; vLLM loads every `*.safetensors` file, so the view leaves them out.
    - vLLM refuses sequences longer than `max_position_embeddings`; Hugging Face computes RoPE
      for any position, and for the default RoPE the numbers do not depend on that field (the
      tiny test model says 512 and is benchmarked at 656 tokens): the view raises it. Other
      position schemes are left alone.

    The view symlinks every other file and writes its own `config.json`.
    """
    with open(os.path.join(model, "config.json")) as f:
        config = json.load(f)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    default_rope = rope.get("rope_type", rope.get("type", "default")) == "default"
    short = config.get("max_position_embeddings", max_len) < max_len and default_rope
    heads = [n for n in os.listdir(model) if n.startswith(HEAD_FILES)]
    if not short and not heads:
        return model
    view = os.path.join(workdir, "model_view")
    os.makedirs(view, exist_ok=True)
    for name in os.listdir(model):
        target = os.path.join(view, name)
        if name != "config.json" and name not in heads and not os.path.lexists(target):
            os.symlink(os.path.join(os.path.abspath(model), name), target)
    if short:
        config["max_position_embeddings"] = max_len
    with open(os.path.join(view, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return view


def build_llm(model: str, max_len: int):  # type: ignore[no-untyped-def]
    from vllm import LLM

    kwargs = {
        "model": model,
        "dtype": os.environ.get("GPRL_VLLM_DTYPE", "float32"),
        "max_model_len": max_len,
        "enable_prefix_caching": True,
        "enforce_eager": True,
        # On CPU this is the share of host memory reserved for the KV cache (default 0.92).
        "gpu_memory_utilization": float(os.environ.get("GPRL_VLLM_MEMORY_FRACTION", "0.25")),
    }
    try:  # vLLM ≥ 0.10: runner/convert; pooling = last token, no normalisation
        from vllm.config import PoolerConfig

        try:  # vLLM ≥ 0.2x: `use_activation`; before: `normalize`
            pooler = PoolerConfig(pooling_type="LAST", use_activation=False)
        except (TypeError, ValueError):
            pooler = PoolerConfig(pooling_type="LAST", normalize=False)
        return LLM(runner="pooling", convert="embed", pooler_config=pooler, **kwargs)
    except TypeError:
        return LLM(task="embed", **kwargs)


def timed_embed(llm, seqs: list[list[int]]) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in seqs]
    # Warm up on a sequence that shares no prefix with the timed ones, then empty the prefix
    # cache, so that no timed sequence finds blocks computed before the clock started.
    warm = [seqs[0][0], *(t - 1 if t > 0 else 1 for t in seqs[0][1:])]
    llm.embed([TokensPrompt(prompt_token_ids=warm)])
    if hasattr(llm, "reset_prefix_cache"):
        llm.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.embed(prompts)
    dt = time.perf_counter() - t0
    assert len(outs) == len(seqs)
    return {
        "sequences": len(seqs),
        "seconds": dt,
        "sequences_per_s": len(seqs) / dt,
        "tokens_per_s": sum(map(len, seqs)) / dt,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    with open(args.input) as f:
        data = json.load(f)
    max_len = max(len(s) for s in data["groups"] + data["single"]) + 8
    model = model_view(args.model, max_len, os.path.dirname(os.path.abspath(args.output)))
    llm = build_llm(model, max_len)
    import vllm

    out = {
        "vllm_version": vllm.__version__,
        "groups": timed_embed(llm, data["groups"]),
        "single": timed_embed(llm, data["single"]),
    }
    with open(args.output, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
