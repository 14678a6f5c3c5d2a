#!/usr/bin/env bash
# The one test command: bash tests/run.sh [pytest args...]
#
# On a Debian/Ubuntu machine, as root, from any directory, it:
#   1. installs what is missing (docker.io, mmdebstrap, iptables, ca-certificates, python3-venv),
#   2. starts dockerd in the background when no Docker engine answers (no systemd needed),
#   3. builds the sandbox test image clawdspace-test:<hash> (tests/build-image.sh, cached) and
#      exports its tag as CLAWDSPACE_TEST_IMAGE (the suite never uses or moves clawdspace:latest),
#   4. creates or updates the virtualenv .venv from requirements*.txt (cached by their hash),
#   5. runs ruff, mypy (clawdspace.py, tests, bench) and pytest; every step runs, and any failure
#      fails the whole run.
# pytest's exit code 5 (no tests collected) counts as a failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Root's tools live in sbin; a minimal environment may lack them in PATH.
for dir in /usr/local/sbin /usr/sbin /sbin; do
    case ":$PATH:" in *":$dir:"*) ;; *) PATH="$PATH:$dir" ;; esac
done
export PATH

log() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'tests/run.sh: error: %s\n' "$*" >&2; exit 1; }

# --- 1. System packages ------------------------------------------------------------------------

python_can_venv() {
    python3 -c 'import ensurepip, venv' >/dev/null 2>&1
}

missing_packages() {
    local missing=()
    # /usr/local/bin/docker may be a bare client, so look for the engine itself.
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    command -v iptables >/dev/null || missing+=(iptables)
    [ -s /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
    if ! command -v python3 >/dev/null; then
        missing+=(python3 python3-venv)
    elif ! python_can_venv; then
        missing+=(python3-venv)
    fi
    if [ "${#missing[@]}" -gt 0 ]; then printf '%s\n' "${missing[@]}"; fi
}

install_packages() {
    local pkgs=()
    mapfile -t pkgs < <(missing_packages)
    [ "${#pkgs[@]}" -gt 0 ] || return 0
    if [ "$(id -u)" -ne 0 ]; then
        die "missing system packages: ${pkgs[*]} (run as root, or: sudo apt-get install ${pkgs[*]})"
    fi
    command -v apt-get >/dev/null || die "missing system packages ${pkgs[*]} and no apt-get"
    log "installing system packages: ${pkgs[*]}"
    # Keep package scripts from starting services (there may be no init system to run them);
    # dockerd is started below.
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 0755 "$policy"
        made_policy=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 apt-get install -y -qq \
                -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
                "${pkgs[@]}" </dev/null
    } || rc=$?
    if [ -n "$made_policy" ]; then rm -f "$policy"; fi
    [ "$rc" -eq 0 ] || die "apt-get failed (exit $rc) installing: ${pkgs[*]}"
    local still
    still="$(missing_packages | tr '\n' ' ')"
    [ -z "$still" ] || die "still missing after apt-get: $still"
}

# --- 2. Docker engine --------------------------------------------------------------------------

ensure_docker() {
    if docker info >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        die "no Docker engine answers (docker info failed) and only root can start one here"
    fi
    local dlog=/var/log/clawdspace-dockerd.log
    if ! { : >>"$dlog"; } 2>/dev/null; then
        dlog="$(mktemp /tmp/clawdspace-dockerd.XXXXXX.log)"
    fi
    if pgrep -x dockerd >/dev/null 2>&1; then
        log "dockerd is running but not answering yet; waiting"
    else
        log "starting dockerd in the background (log: $dlog)"
        # Its own session, so it outlives this script and ignores our terminal's signals.
        setsid dockerd >>"$dlog" 2>&1 </dev/null &
    fi
    local i
    for i in $(seq 1 60); do
        if docker info >/dev/null 2>&1; then
            log "Docker engine is up after ${i}s"
            return 0
        fi
        sleep 1
    done
    printf '%s\n' "--- last lines of $dlog ---" >&2
    tail -n 40 "$dlog" >&2 || true
    die "Docker engine did not answer within 60 s (see $dlog)"
}

# --- 4. Virtualenv -----------------------------------------------------------------------------

VENV="$ROOT/.venv"

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        log "creating virtualenv $VENV"
        python3 -m venv --clear "$VENV"
    fi
    local stamp="$VENV/.requirements.sha256" want have=""
    want="$({ "$VENV/bin/python" -c 'import sys; print(sys.version)'
              cat requirements.txt requirements-dev.txt; } | sha256sum | cut -d' ' -f1)"
    [ -f "$stamp" ] && have="$(cat "$stamp")"
    if [ "$want" != "$have" ]; then
        log "installing Python requirements into $VENV"
        rm -f "$stamp"
        "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
            -r requirements.txt -r requirements-dev.txt
        printf '%s\n' "$want" > "$stamp"
    else
        log "Python requirements up to date"
    fi
}

# --- Main --------------------------------------------------------------------------------------

install_packages
ensure_docker

log "building the sandbox image"
CLAWDSPACE_TEST_IMAGE="$(bash tests/build-image.sh)"
[ -n "$CLAWDSPACE_TEST_IMAGE" ] || die "tests/build-image.sh printed no image tag"
export CLAWDSPACE_TEST_IMAGE
log "sandbox image: $CLAWDSPACE_TEST_IMAGE"

ensure_venv
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"

failed=()

log "ruff check ."
ruff check . || failed+=(ruff)

log "mypy clawdspace.py tests bench"
mypy clawdspace.py tests bench || failed+=(mypy)

log "pytest $*"
pytest_rc=0
python -m pytest "$@" || pytest_rc=$?
case "$pytest_rc" in
    0) ;;
    5) printf 'tests/run.sh: pytest collected no tests; that is a failure\n' >&2
       failed+=("pytest (no tests collected)") ;;
    *) failed+=("pytest (exit $pytest_rc)") ;;
esac

# Nothing is printed after pytest's summary line on success.
if [ "${#failed[@]}" -gt 0 ]; then
    printf '\ntests/run.sh: FAILED: %s\n' "${failed[*]}" >&2
    case "$pytest_rc" in 0 | 5) exit 1 ;; *) exit "$pytest_rc" ;; esac
fi
