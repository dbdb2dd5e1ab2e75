"""GPRL inside OpenRLHF 0.11.2 (Ray + DeepSpeed + vLLM), without forking it.

- `experience_maker.GPRLExperienceMaker`: `RemoteExperienceMaker` with GPRL advantages rebuilt
  from the verifier's `extra_logs` (embedding coordinates and eigenvalues per response);
- `drift_loop.DriftLoop`: drift monitor + controller applied every step (β → `kl_ctl.value`,
  ε → the policy actors' `actor_loss_fn`, m → the next advantages), drift report;
- `trainer.GPRLPPOTrainer`: `PPOTrainer` using both;
- `launcher`: `gprl train [GPRL options] -- [OpenRLHF options]`.

Submodules import OpenRLHF (and Ray); nothing is imported here so that the launcher's checks
and the docs work without it.
"""
