#!/bin/sh
# The container's command is the one a user runs locally: `gpm-server serve`, configured by
# GPM_* environment variables (docs/deployment.md). Arguments are passed through as CLI flags,
# e.g. `docker run gprl:cpu --model /models/my-gpm`. `exec` replaces the shell, so SIGTERM reaches
# the server itself and it drains in-flight requests (GPM_DRAIN_TIMEOUT_S).
set -eu
exec gpm-server serve "$@"
