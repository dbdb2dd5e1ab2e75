"""Container health check: exit 0 when the service answers 200 on /ready (model loaded, warm).

Stdlib only, so it runs in the slim image without curl. Reads the port from GPM_PORT.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("GPM_PORT", "8000")
    url = f"http://127.0.0.1:{port}/ready"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:  # URLError and HTTPError (503 while loading) are OSErrors
        print(f"not ready: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
