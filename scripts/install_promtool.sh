#!/usr/bin/env bash
# promtool, Prometheus's rule/config checker, for tests/test_monitoring.py: taken from Debian's
# `prometheus` package and unpacked into the venv's bin/ only. Installing the package would also
# set up a Prometheus server service on the machine, which nothing here wants.
set -euo pipefail
VENV=${VENV:-.venv}
if [ -x "$VENV/bin/promtool" ]; then
  exit 0
fi
if command -v promtool >/dev/null 2>&1; then
  ln -sf "$(command -v promtool)" "$VENV/bin/promtool"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_promtool: no apt-get; install promtool yourself or the promtool checks skip" >&2
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# apt-get download needs the package lists; refresh them only when the package is not found.
(cd "$tmp" && { apt-get download -qq prometheus 2>/dev/null \
  || { apt-get update -qq && apt-get download -qq prometheus; }; })
dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
install -m 0755 "$tmp/root/usr/bin/promtool" "$VENV/bin/promtool"
"$VENV/bin/promtool" --version 2>&1 | head -1
