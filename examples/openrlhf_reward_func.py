"""OpenRLHF 0.11.2 reward function backed by the GPM service (a file OpenRLHF can load).

    # the service
    gpm-server serve --model general-preference/GPM-Llama-3.1-8B --port 8000
    # OpenRLHF (any estimator; the GPRL learner itself is `gprl train`, see docs/openrlhf.md)
    export GPRL_GPM_URL=http://gpm-host:8000
    python -m openrlhf.cli.train_ppo_ray ... --reward.remote_url examples/openrlhf_reward_func.py

Run this file directly to try it against a running service:

    python examples/openrlhf_reward_func.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import json
import os

from gprl_client.adapters.openrlhf_reward_func import reward_func

__all__ = ["reward_func"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("GPRL_GPM_URL", "http://127.0.0.1:8000"))
    args = parser.parse_args()
    os.environ["GPRL_GPM_URL"] = args.url
    prompt = "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    answer = "Sunlight scatters off air molecules; blue light scatters the most.<|im_end|>"
    label = json.dumps({"reference": "Because it reflects the ocean."})
    print(json.dumps(reward_func([prompt + answer], [prompt], [label]), indent=1))


if __name__ == "__main__":
    main()
