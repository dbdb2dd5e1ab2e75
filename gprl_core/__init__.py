"""What the verifier service and the learner share, and no trainer owns: the GPM score math,
the GPRL advantages, the telemetry records, drift config/monitor/controller and the drift loop.

`gpm_server` and `gprl_client` both import this package; it imports neither of them, and nothing
outside the standard library, torch and numpy (tests/test_package_boundaries.py). Import the
submodules (`gprl_core.gpm_math`, `gprl_core.drift`, ...): nothing is imported here.
"""
