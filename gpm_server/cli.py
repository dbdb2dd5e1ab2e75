"""`gpm-server`: the command line. `serve` runs the verifier service.

Subcommands register themselves through `SUBCOMMANDS`: each entry takes the argparse
subparsers object, adds its parser and sets `func` (a callable `args -> exit code`). Keep heavy
imports inside the functions so `gpm-server --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("gpm_server")

# Flags of `serve` that map one-to-one onto Settings fields (None: not given, env/default wins).
_SERVE_FLAGS: list[tuple[str, type, str]] = [
    ("--model", str, "checkpoint directory or hub id (default: the embedded default model)"),
    ("--revision", str, "hub revision (branch, tag or commit)"),
    ("--host", str, "address to bind (default 127.0.0.1)"),
    ("--port", int, "TCP port (default 8000)"),
    ("--device", str, "auto | cpu | cuda | cuda:N | mps (default auto)"),
    ("--dtype", str, "auto | float32 | bfloat16 | float16 (default auto)"),
    ("--tau", float, "temperature τ of P = sigmoid(s/τ) (default: the checkpoint's, else 0.1)"),
    ("--max-length", int, "token limit per (prompt, response) sequence (default: checkpoint's)"),
    ("--truncation", str, "right (truncate and flag) | reject (413) for over-long sequences"),
    ("--max-batch-tokens", int, "padded token budget of one forward pass (default 16384)"),
    ("--max-batch-size", int, "most sequences per forward pass (default 64)"),
    ("--max-wait-ms", float, "how long a sequence may wait for company (default 5)"),
    ("--max-queue", int, "most waiting sequences before 429 (default 4096)"),
    ("--model-workers", int, "batches run at once, one model thread each (default 1)"),
    ("--max-in-flight", int, "most inference requests in progress before 429 (default 256)"),
    ("--max-body-bytes", int, "largest request body (default 8 MiB)"),
    ("--telemetry-db", str, "SQLite file for drift telemetry (default ./gpm_telemetry.sqlite3)"),
    ("--drain-timeout-s", float, "on SIGTERM, time accepted requests get to finish (default 30)"),
    ("--log-level", str, "debug | info | warning | error (default info)"),
]


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def add_serve_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the GPM verifier service",
        description="Run the GPM verifier service. Every flag overrides the matching GPM_* "
        "environment variable (e.g. --max-batch-size ↔ GPM_MAX_BATCH_SIZE).",
    )
    for flag, kind, text in _SERVE_FLAGS:
        p.add_argument(flag, type=kind, default=None, help=text)
    p.add_argument(
        "--l2-normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="L2-normalise embeddings (default: the checkpoint's, else on)",
    )
    p.add_argument(
        "--api-key-env",
        metavar="VAR",
        default=None,
        help="name of an environment variable holding the API key (keeps the key off the "
        "command line; GPM_API_KEY also works)",
    )
    p.set_defaults(func=serve)


def add_train_eval_parsers(subparsers: Any) -> None:
    """`train` and `eval` (gpm_server/training/commands.py; stdlib-only at import)."""
    from gpm_server.training.commands import register

    register(subparsers)


# Register subcommands here (helpers add `train` and `eval` with their own add_*_parser).
SUBCOMMANDS: list[Callable[[Any], None]] = [add_serve_parser, add_train_eval_parsers]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpm-server", description="GPM preference verifier service."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def serve_settings(args: argparse.Namespace) -> Any:
    """Settings from GPM_* env vars, overridden by the flags that were given."""
    from gpm_server.settings import Settings

    overrides: dict[str, Any] = {}
    for flag, _, _ in _SERVE_FLAGS:
        name = flag[2:].replace("-", "_")
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.l2_normalize is not None:
        overrides["l2_normalize"] = args.l2_normalize
    if args.api_key_env is not None:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise SystemExit(f"gpm-server: environment variable {args.api_key_env} is not set")
        overrides["api_key"] = key
    return Settings(**overrides)


def serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from gpm_server.app import ModelNotConfigured, create_app, default_model_path

    try:
        settings = serve_settings(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"gpm-server: invalid settings: {problems}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if settings.model is None:
        try:
            log.info("no model given: using the embedded default %s", default_model_path())
        except ModelNotConfigured as exc:
            print(f"gpm-server: {exc}", file=sys.stderr)
            return 2
    failed: list[bool] = []
    server: uvicorn.Server | None = None

    def on_fatal() -> None:
        failed.append(True)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the logging configured above
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)),
    )
    server = uvicorn.Server(config)

    def after_shutdown(signum: int, frame: Any) -> None:
        # uvicorn re-raises SIGTERM/SIGINT once its graceful shutdown is done; by then the
        # accepted requests have finished, so that is a clean exit, not death by signal.
        if server is None or not server.should_exit:
            raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, after_shutdown)
    server.run()
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
