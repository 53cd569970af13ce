#!/usr/bin/env bash
# The Debian 12 packages gpufleet's demo and tests need beyond Python, in one place; `make demo`
# and `make test` run this before anything else.
#
#   scripts/system-packages.sh demo|test
#
# Installed already: says so, exit 0. Missing, as root: `apt-get update` once, then installs them.
# Missing, not root: prints the exact apt-get line and exits 2, before any test runs.
set -euo pipefail

# `make demo` (gpufleet up --stack local):
# python3-venv: `make` builds .venv with it. libpython3.11: Triton's python-backend stub links
# the system's libpython. git: the lineage manifest records the project's commit. iproute2 (ss),
# procps (ps): testinfra's socket and process checks in the host gate. libb64-0d: perf_analyzer
# (the load gate's engine, from the tritonclient wheel in .venv-perf) links it. nginx: the
# gateway in front of Triton that splits, mirrors and switches traffic for `gpufleet rollout`.
demo_packages=(python3-venv libpython3.11 git iproute2 procps libb64-0d nginx)

# `make test`, besides those:
# util-linux (taskset, unshare): bench/serving.py pins server and load generator to a core each;
# debootstrap runs under unshare. docker.io: the tests start a dockerd of their own for the
# Debian 12 hosts. debootstrap: builds those hosts' image from deb.debian.org (no image can be
# pulled). openssh-client (ssh, ssh-keygen): Ansible's and testinfra's transport to the hosts.
# docker-compose: validates and runs the generated serving stacks (Compose v1; no v2 plugin is
# packaged for Debian 12). prometheus (with promtool): checks and unit-tests the generated
# configuration and alert rules, and scrapes a real Triton. postgresql-client (psql): the
# stand-in Postgres image's tests log in with it.
test_packages=("${demo_packages[@]}" util-linux docker.io debootstrap openssh-client
    docker-compose prometheus postgresql-client)

case "${1:-}" in
    demo) wanted=("${demo_packages[@]}") purpose="gpufleet's demo" ;;
    test) wanted=("${test_packages[@]}") purpose="gpufleet's tests" ;;
    *)
        echo "usage: $0 demo|test" >&2
        exit 2
        ;;
esac

if ! command -v dpkg-query >/dev/null; then
    echo "error: cannot check the system packages for $purpose: no dpkg-query (they need" \
        "Debian 12 or a derivative); install the equivalents of: ${wanted[*]}" >&2
    exit 2
fi

missing=()
for package in "${wanted[@]}"; do
    # `dpkg -s` also succeeds for a removed package whose config files remain.
    status=$(dpkg-query --show --showformat='${db:Status-Status}' "$package" 2>/dev/null || true)
    [[ "$status" == installed ]] || missing+=("$package")
done

if ((${#missing[@]} == 0)); then
    echo "system packages for $purpose: all ${#wanted[@]} installed"
    exit 0
fi

if [[ "$(id -u)" != 0 ]]; then
    echo "error: system packages for $purpose missing here: ${missing[*]}; install them as" \
        "root with:" >&2
    echo "sudo apt-get install -y ${missing[*]}" >&2
    exit 2
fi

echo "system packages for $purpose: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}"
