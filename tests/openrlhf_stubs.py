"""Stand-ins for `flash_attn` and `vllm` so that the *real* OpenRLHF 0.11.2 code imports on CPU.

Why: both are CUDA-only packages (no CPU wheels; OpenRLHF is installed here with `--no-deps`).
OpenRLHF imports a few names from them at module level (`flash_attn.bert_padding`,
`flash_attn.utils.distributed`, `vllm.SamplingParams`, `vllm.inputs.TokensPrompt`,
`vllm.utils.random_uuid`) but the code paths our tests drive (experience maker, trainer step,
single-turn agent executor) never call them. Each stand-in raises if it is ever used. They are
registered only where the real package is missing (on a GPU machine the real ones are used), and
only while OpenRLHF's modules are imported (see `install`).
Used by the `openrlhf_cpu` fixture in conftest.py; nothing else may stub modules.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from typing import Any


def _unavailable(name: str) -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{name} is a CPU-test stand-in (the CUDA package is not installed)")

    return fail


def _module(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    module.__path__ = []  # a package, so submodules can be registered under it
    # find_spec() (transformers' availability probe) needs a spec; without distribution
    # metadata transformers still reports the package as unavailable.
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    return module


def _stubs() -> dict[str, types.ModuleType]:
    fa = [f"flash_attn.bert_padding.{n}" for n in ("index_first_axis", "pad_input", "rearrange")]
    return {
        "flash_attn": _module("flash_attn"),
        "flash_attn.bert_padding": _module(
            "flash_attn.bert_padding",
            **{n.rsplit(".", 1)[1]: _unavailable(n) for n in fa},
            unpad_input=_unavailable("flash_attn.bert_padding.unpad_input"),
        ),
        "flash_attn.utils": _module("flash_attn.utils"),
        "flash_attn.utils.distributed": _module(
            "flash_attn.utils.distributed", all_gather=_unavailable("flash_attn all_gather")
        ),
        "vllm": _module(
            "vllm", __version__="0.0.0+cpu-stub", SamplingParams=_unavailable("vllm.SamplingParams")
        ),
        "vllm.inputs": _module("vllm.inputs", TokensPrompt=dict),
        "vllm.utils": _module("vllm.utils", random_uuid=_unavailable("vllm.utils.random_uuid")),
    }


# The OpenRLHF modules our tests use; imported while the stand-ins are registered.
OPENRLHF_MODULES = (
    "openrlhf.models",
    "openrlhf.utils.agent",
    "openrlhf.trainer.ppo_utils.experience_maker",
    "openrlhf.trainer.ppo_utils.samples_generator",
    "openrlhf.trainer.ppo_trainer",
)


def install() -> list[str]:
    """Import OpenRLHF's modules with the stand-ins registered for the missing packages, then
    unregister them again (the imported modules keep their references), so that other libraries'
    "is vllm installed?" probes (TRL, transformers) still see the truth. Returns the names that
    were stubbed."""
    done: list[str] = []
    for top in ("flash_attn", "vllm"):
        if top in sys.modules or importlib.util.find_spec(top) is not None:
            continue
        for name, module in _stubs().items():
            if name == top or name.startswith(top + "."):
                sys.modules[name] = module
                done.append(name)
    try:
        for name in OPENRLHF_MODULES:
            importlib.import_module(name)
    finally:
        for name in done:
            del sys.modules[name]
    return done
