"""`gprl`: the learner's command line. Subcommands:

    gprl train [GPRL options] -- [OpenRLHF train_ppo_ray options]   (OpenRLHF 0.11.2 + GPRL)
    gprl audit-length --groups samples.jsonl [--url URL]            (which axes pay for length)

Each subcommand lives in its own module and is imported only when used (OpenRLHF is heavy).
"""

from __future__ import annotations

import sys

USAGE = """usage: gprl COMMAND [ARGS]

commands:
  train   run OpenRLHF 0.11.2 (train_ppo_ray) with GPRL advantages and drift control:
          gprl train [GPRL options] -- [OpenRLHF options]   (gprl train --help for details)
  audit-length
          which axes of a running GPM service pay for answer length, and the axis prior that
          switches them off: gprl audit-length --groups samples.jsonl [--url URL]
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "train":
        from gprl_client.openrlhf.launcher import train_main

        return train_main(rest)
    if command == "audit-length":
        from gprl_client.audit import audit_main

        return audit_main(rest)
    print(f"gprl: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
