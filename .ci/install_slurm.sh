#!/usr/bin/env bash
# Installs a one-node SLURM (Debian's slurmctld, slurmd, munge, slurm-client) for the tests marked
# `slurm` (tests/slurm_cluster.py starts the daemons itself; this script only installs packages).
#
# Idempotent and non-interactive. Never fails CI: when it cannot install (not root and no
# password-less sudo, no apt-get, apt errors) it says why and exits 0, and the slurm tests then
# skip with the missing binary named. Set RCKA_REQUIRE_SLURM=1 to make such a failure fatal.
set -uo pipefail

PACKAGES=(slurmctld slurmd munge slurm-client)
BINARIES=(slurmctld slurmd munged sbatch)
# Daemons live in /usr/sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { echo "install_slurm: $*" >&2; }

give_up() {
    log "$*"
    log "the tests marked 'slurm' will be skipped."
    if [ "${RCKA_REQUIRE_SLURM:-0}" = "1" ]; then
        exit 1
    fi
    exit 0
}

missing=()
for b in "${BINARIES[@]}"; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
done
if [ "${#missing[@]}" -eq 0 ]; then
    log "SLURM already installed ($(slurmctld -V 2>/dev/null || echo present)); nothing to do."
    exit 0
fi
log "missing: ${missing[*]}; installing ${PACKAGES[*]}"

if ! command -v apt-get >/dev/null 2>&1; then
    give_up "apt-get not found: install ${PACKAGES[*]} (SLURM + munge) with this system's package manager."
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
        SUDO=(sudo -n)
    else
        give_up "not root and no password-less sudo: run as root: apt-get install -y ${PACKAGES[*]}"
    fi
fi

export DEBIAN_FRONTEND=noninteractive
apt_opts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
if ! ${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2; then
    log "apt-get update failed; trying the install with the package lists already present"
fi
if ! ${SUDO[@]+"${SUDO[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" \
        --no-install-recommends "${PACKAGES[@]}" >&2; then
    give_up "apt-get install ${PACKAGES[*]} failed."
fi

still_missing=()
for b in "${BINARIES[@]}"; do
    command -v "$b" >/dev/null 2>&1 || still_missing+=("$b")
done
if [ "${#still_missing[@]}" -ne 0 ]; then
    give_up "installed ${PACKAGES[*]} but still missing: ${still_missing[*]}"
fi
log "installed: $(slurmctld -V 2>/dev/null)"
exit 0
