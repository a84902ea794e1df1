#!/usr/bin/env bash
# Make sure the `prometheus` and `promtool` binaries are on PATH, for the tests that run a real
# Prometheus (tests/integration/test_prometheus.py) and check the rule files with promtool
# (tests/unit/test_deploy_files.py). Idempotent: does nothing when both are already there;
# otherwise installs Debian's `prometheus` package with apt-get (root, or sudo without a password).
#
# The package's own service is never started: the tests run their own `prometheus` process with a
# generated configuration and stop it themselves. (Debian's package may try to start the service
# when systemd runs; `policy-rc.d` below keeps it from doing so under sysvinit-style invokers.)
#
# Exit status: 0 when both binaries are available afterwards, 1 when they could not be installed
# (the message says why). Set ENSURE_PROMETHEUS_OPTIONAL=1 to turn that failure into a warning
# (exit 0): the tests that need Prometheus then skip with a clear reason.
set -euo pipefail

log() { echo "ensure-prometheus.sh: $*" >&2; }

have_all() { command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; }

fail() {
    log "error: $*"
    log "install Prometheus by hand (Debian/Ubuntu: apt-get install prometheus, or the release" \
        "tarball from https://prometheus.io/download/) so that prometheus and promtool are on PATH"
    if [ "${ENSURE_PROMETHEUS_OPTIONAL:-0}" = 1 ]; then
        log "ENSURE_PROMETHEUS_OPTIONAL=1: going on; the Prometheus tests will be skipped"
        exit 0
    fi
    exit 1
}

if have_all; then
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || fail "prometheus/promtool are missing and apt-get is not available"

SUDO=()
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        fail "prometheus/promtool are missing and installing them needs root (or sudo without a password)"
    fi
fi

log "prometheus/promtool not found: installing Debian's prometheus package"
export DEBIAN_FRONTEND=noninteractive
# Keep maintainer scripts from starting the service (exit 101 = "action forbidden"); only when no
# policy is in place already, and removed again afterwards.
POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [ ! -e "$POLICY" ] \
    && printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null 2>&1 \
    && "${SUDO[@]}" chmod +x "$POLICY"; then
    ADDED_POLICY=1
fi
cleanup() { if [ "$ADDED_POLICY" = 1 ]; then "${SUDO[@]}" rm -f "$POLICY"; fi; }
trap cleanup EXIT

"${SUDO[@]}" apt-get update -qq || fail "apt-get update failed"
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    || fail "apt-get install prometheus failed"

# Debian ships promtool in the same package; make sure the shell sees the new binaries.
hash -r
have_all || fail "the prometheus package is installed but prometheus/promtool are not on PATH"
log "installed: $(prometheus --version 2>&1 | head -n 1)"
