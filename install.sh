#!/bin/sh
# Clawdspace installer: sandboxed Linux spaces over HTTP, as a hardened systemd service.
#
#   curl -fsSL https://raw.githubusercontent.com/adam91holt/clawdspace/main/install.sh | sudo sh
#
# or, from a checkout (the local files are installed, nothing is downloaded):
#
#   sudo ./install.sh
#
# Safer: download it, read it, see what it would do, then run it:
#
#   curl -fsSL -o install.sh https://raw.githubusercontent.com/adam91holt/clawdspace/main/install.sh
#   less install.sh
#   sh install.sh --dry-run
#   sudo sh install.sh
#
# What it does, on Debian 12+ or Ubuntu 22.04+ (other systems get a clear message):
#   1. installs what is missing of python3, python3-venv, ca-certificates and iptables, and
#      docker.io when no Docker engine is installed;
#   2. installs the program in /opt/clawdspace: clawdspace.py, a virtual environment (venv/)
#      with the dependencies of requirements.txt, a copy of this installer and uninstall.sh;
#   3. writes the configuration in /etc/clawdspace: clawdspace.env (mode 600, with a generated
#      API key) and the shipped templates in templates/; data lives in /var/lib/clawdspace;
#   4. builds the sandbox image clawdspace:latest from images/ when it is missing (or, if this
#      installer built it, when images/ or the base image changed);
#   5. checks for an NVIDIA GPU and the NVIDIA Container Toolkit, and says what to do if needed;
#   6. installs, enables and (re)starts clawdspace.service, waits for /api/health, and prints
#      the URL, where the key is, and a first command to try.
#
# Running it again upgrades in place: the key, clawdspace.env, your templates (the API's, in
# /var/lib/clawdspace/templates, and any shipped template you edited) and every space are kept,
# and the service is restarted only when something it runs changed.
#
# Options:
#   --dry-run     print what would be done; change nothing (needs no root)
#   --uninstall   remove the unit and /opt/clawdspace; keep configuration, data and spaces
#   --purge       with --uninstall: also remove every space (containers, volumes, networks and
#                 firewall rules of this node's prefix), /etc/clawdspace, /var/lib/clawdspace,
#                 /etc/default/clawdspace and the unit's drop-ins
#   --write-manifest   in a checkout: rewrite release.sha256 from the files (needs no root)
#   --check-manifest   in a checkout: check release.sha256 against the files (needs no root)
#   --help        this text
#
# Environment (all optional; the default follows each name):
#   CLAWDSPACE_VERSION=main          git branch or tag to install when downloading
#   CLAWDSPACE_BASE_URL=https://raw.githubusercontent.com/adam91holt/clawdspace/$CLAWDSPACE_VERSION
#                                    where the files are fetched from when not run from a
#                                    checkout (any web server holding the repository's files)
#   CLAWDSPACE_INSTALL_DOCKER=1      0: never install docker.io (fail if no engine is installed)
#   CLAWDSPACE_BASE_IMAGE=           base image of the sandbox image (empty: the Dockerfile's
#                                    default, ubuntu:24.04); set it on nodes without Docker Hub
#   CLAWDSPACE_BUILD_NETWORK=        network of the image build's RUN steps (empty: the engine's
#                                    default bridge); e.g. host, where only the host reaches
#                                    a package mirror
#   CLAWDSPACE_HOST=0.0.0.0          address the service binds    } written to clawdspace.env at
#   CLAWDSPACE_PORT=7777             port the service binds       } the first install; given on a
#   CLAWDSPACE_PREFIX=clawdspace-    container and volume prefix  } re-run, they replace its lines
#   CLAWDSPACE_PIP_INDEX=            Python package index URL (empty: pip's own configuration)
#   CLAWDSPACE_PIP_FIND_LINKS=       a wheelhouse (directory or URL) to install from instead of
#                                    any index (pip --no-index --find-links), for offline nodes
#   CLAWDSPACE_HEALTH_TIMEOUT=60     seconds to wait for the started service to answer
#
# The files: release.sha256, at the top of the repository, lists every file the install uses
# (clawdspace.py, requirements.txt, clawdspace.service, install.sh, the whole images/ build
# context, templates/*.yaml) with its SHA-256, in sha256sum's format. Downloading, the installer
# fetches that list first, then each file in it, and checks each against its hash: a file that is
# missing or differs stops it before anything is installed. From a checkout, the list must match
# the local files (after editing them: sh install.sh --write-manifest). The sandbox image's
# label clawdspace.build-sha256 is the hash of the list's images/ lines and the base image.
set -eu

# Up to the last line there are only settings and functions: main is called there, so that a
# truncated download (curl | sh) runs nothing at all.

PROGRAM_DIR=/opt/clawdspace
CONFIG_DIR=/etc/clawdspace
DATA_DIR=/var/lib/clawdspace
ENV_FILE=$CONFIG_DIR/clawdspace.env
DEFAULTS_FILE=/etc/default/clawdspace
UNIT=clawdspace.service
UNIT_FILE=/etc/systemd/system/$UNIT
VENV=$PROGRAM_DIR/venv
IMAGE=clawdspace:latest
# Label on a sandbox image this installer built: the hash of what it was built from.
IMAGE_LABEL=clawdspace.build-sha256
# The list of a release's files and their SHA-256 (see the header).
MANIFEST=release.sha256

# The settings given by the caller, before defaults fill them in (a re-run only writes these).
GIVEN_HOST=${CLAWDSPACE_HOST:-}
GIVEN_PORT=${CLAWDSPACE_PORT:-}
GIVEN_PREFIX=${CLAWDSPACE_PREFIX:-}

CLAWDSPACE_VERSION=${CLAWDSPACE_VERSION:-main}
CLAWDSPACE_BASE_URL=${CLAWDSPACE_BASE_URL:-https://raw.githubusercontent.com/adam91holt/clawdspace/$CLAWDSPACE_VERSION}
CLAWDSPACE_INSTALL_DOCKER=${CLAWDSPACE_INSTALL_DOCKER:-1}
CLAWDSPACE_BASE_IMAGE=${CLAWDSPACE_BASE_IMAGE:-}
CLAWDSPACE_BUILD_NETWORK=${CLAWDSPACE_BUILD_NETWORK:-}
CLAWDSPACE_PIP_INDEX=${CLAWDSPACE_PIP_INDEX:-}
CLAWDSPACE_PIP_FIND_LINKS=${CLAWDSPACE_PIP_FIND_LINKS:-}
CLAWDSPACE_HEALTH_TIMEOUT=${CLAWDSPACE_HEALTH_TIMEOUT:-60}

# --- logging -------------------------------------------------------------------------------

# info MESSAGE: progress, to stderr (stdout stays free for --dry-run's command list).
info() { printf '==> %s\n' "$*" >&2; }
# warn MESSAGE: something the user should know about; the install goes on.
warn() { printf 'WARNING: %s\n' "$*" >&2; }
# fatal MESSAGE: stop here.
fatal() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

# --- running commands ----------------------------------------------------------------------

# Every command that changes the system goes through run, which shows it ("+ cmd") and runs it
# with $sh_c; --dry-run turns sh_c into echo, so the same lines only print what would be done.
sh_c='sh -c'
dry_run=""

# run COMMAND: one shell command line that changes the system (never holding a secret); any
# failure stops the installer.
run() {
    if [ -z "$dry_run" ]; then
        printf '+ %s\n' "$1" >&2
    fi
    $sh_c "$1" </dev/null || fatal "failed ($?): $1"
}

# have COMMAND: is it on PATH?
have() { command -v "$1" >/dev/null 2>&1; }

# systemd_running: is systemd the init system here (sd_booted)?
systemd_running() { [ -d /run/systemd/system ] && have systemctl; }

# fetch URL FILE: download, failing on HTTP errors.
fetch() {
    if have curl; then
        curl -fsSL --retry 3 -o "$2" "$1"
    elif have wget; then
        wget -q -O "$2" "$1"
    else
        python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$1" "$2"
    fi
}

# venv_python ARGS...: the installed program's Python (it has the docker SDK).
venv_python() { "$VENV/bin/python" "$@"; }

# setting NAME: the value the service will see (clawdspace.env, then /etc/default/clawdspace).
setting() {
    cat "$ENV_FILE" "$DEFAULTS_FILE" 2>/dev/null | sed -n "s/^$1=//p" | tail -n 1 | tr -d '"'"'"
}

# --- preflight -----------------------------------------------------------------------------

parse_args() {
    action=install
    purge=""
    for arg in "$@"; do
        case "$arg" in
            --dry-run) dry_run=1; sh_c='echo' ;;
            --uninstall) action=uninstall ;;
            --purge) purge=1 ;;
            --write-manifest) action=write-manifest ;;
            --check-manifest) action=check-manifest ;;
            -h | --help) sed -n '2,/^set -eu/p' "$0" 2>/dev/null | sed '$d; s/^# \{0,1\}//' \
                || echo "see the header of install.sh"; exit 0 ;;
            *) fatal "unknown option $arg (try --help)" ;;
        esac
    done
    if [ -n "$purge" ] && [ "$action" != uninstall ]; then
        fatal "--purge goes with --uninstall"
    fi
    case "$CLAWDSPACE_INSTALL_DOCKER" in 0 | 1) ;; *) fatal "CLAWDSPACE_INSTALL_DOCKER must be 0 or 1" ;; esac
    case "$GIVEN_PORT" in
        "") ;;
        *[!0-9]*) fatal "CLAWDSPACE_PORT must be a number, not '$GIVEN_PORT'" ;;
        *) if [ "$GIVEN_PORT" -lt 1 ] || [ "$GIVEN_PORT" -gt 65535 ]; then
               fatal "CLAWDSPACE_PORT must be 1-65535, not $GIVEN_PORT"
           fi ;;
    esac
    case "$GIVEN_PREFIX" in *[!a-z0-9-]*) fatal "CLAWDSPACE_PREFIX may hold only a-z, 0-9 and -" ;; esac
    case "$GIVEN_HOST" in *[!0-9A-Za-z.:_-]*) fatal "CLAWDSPACE_HOST is not an address: '$GIVEN_HOST'" ;; esac
    case "$CLAWDSPACE_HEALTH_TIMEOUT" in "" | *[!0-9]*) fatal "CLAWDSPACE_HEALTH_TIMEOUT must be seconds" ;; esac
    case "$CLAWDSPACE_BUILD_NETWORK" in *[!0-9A-Za-z._-]*) fatal "CLAWDSPACE_BUILD_NETWORK is not a network name: '$CLAWDSPACE_BUILD_NETWORK'" ;; esac
}

need_root() {
    if [ -n "$dry_run" ] || [ "$(id -u)" = 0 ]; then
        return 0
    fi
    fatal "this installer must run as root, e.g.
    curl -fsSL $CLAWDSPACE_BASE_URL/install.sh | sudo sh
or, to only see what it would do: sh install.sh --dry-run"
}

# The OS must be Debian or Ubuntu (or a close derivative: a warning); anything else stops here
# with what a bug report needs.
detect_os() {
    os_id="" os_like="" os_version="" os_name=""
    if [ -r /etc/os-release ]; then
        # shellcheck disable=SC1091
        os_id=$(. /etc/os-release && printf '%s' "${ID:-}")
        # shellcheck disable=SC1091
        os_like=$(. /etc/os-release && printf '%s' "${ID_LIKE:-}")
        # shellcheck disable=SC1091
        os_version=$(. /etc/os-release && printf '%s' "${VERSION_ID:-}")
        # shellcheck disable=SC1091
        os_name=$(. /etc/os-release && printf '%s' "${PRETTY_NAME:-}")
    fi
    case "$os_id" in
        debian | ubuntu) ;;
        *)
            case " $os_like " in
                *" debian "* | *" ubuntu "*)
                    warn "$os_name is not Debian or Ubuntu; trying anyway as a derivative" ;;
                *)
                    fatal "unsupported OS: Clawdspace installs on Debian 12+ and Ubuntu 22.04+.
    OS=$os_id VERSION=$os_version ($os_name)
    $(uname -a)
On another system, install by hand: see \"From a checkout\" in the README." ;;
            esac ;;
    esac
    [ "$(uname -s)" = Linux ] || fatal "Clawdspace needs Linux"
    info "OS: ${os_name:-$os_id $os_version}"
}

python_ok() {
    have python3 && python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null
}

# --- system packages -----------------------------------------------------------------------

docker_installed() {
    have dockerd || [ -S /var/run/docker.sock ] || [ -n "${DOCKER_HOST:-}" ]
}

install_packages() {
    packages=""
    have python3 || packages="$packages python3"
    python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || packages="$packages python3-venv"
    [ -s /etc/ssl/certs/ca-certificates.crt ] || packages="$packages ca-certificates"
    # The spaces' egress firewall runs iptables (docker.io brings it too).
    have iptables || [ -x /usr/sbin/iptables ] || packages="$packages iptables"
    if ! docker_installed; then
        [ "$CLAWDSPACE_INSTALL_DOCKER" = 1 ] || fatal "no Docker engine is installed here, and \
CLAWDSPACE_INSTALL_DOCKER=0. Install Docker (e.g. apt-get install docker.io), then re-run."
        packages="$packages docker.io"
    fi
    if [ -n "$packages" ]; then
        info "installing system packages:$packages"
        have apt-get || fatal "apt-get not found; install by hand:$packages"
        run "DEBIAN_FRONTEND=noninteractive apt-get update -q"
        run "DEBIAN_FRONTEND=noninteractive apt-get install -y -q$packages"
    fi
    if [ -z "$dry_run" ]; then
        python_ok || fatal "Python 3.10 or newer is needed; python3 is $(python3 -V 2>&1)"
    fi
    case "$packages" in
        *docker.io*) if systemd_running; then run "systemctl enable --now docker.service"; fi ;;
    esac
    return 0
}

# --- the files to install --------------------------------------------------------------------

# checkout_dir: the directory of this installer when it is a checkout's (the program and the
# unit lie beside it); nothing when it is piped from curl or run on its own.
checkout_dir() {
    here=""
    case "$0" in */*) here=$(cd "$(dirname "$0")" && pwd) ;; *) [ -f "$0" ] && here=$(pwd) ;; esac
    if [ -n "$here" ] && [ -f "$here/clawdspace.py" ] && [ -f "$here/install.sh" ] \
            && [ -f "$here/$UNIT" ]; then
        printf '%s\n' "$here"
    fi
}

# sha256 FILE: its SHA-256, in hex.
sha256() { sha256sum <"$1" | cut -d' ' -f1; }

# safe_path PATH: a relative path of plain names, fit to be a manifest entry and a file under
# $SRC (no "..", no leading "/" or "-", nothing a shell or sha256sum would read otherwise).
safe_path() {
    case "$1" in
        "" | /* | -* | */-* | ./* | *..* | *//* | */ | "$MANIFEST" | *[!A-Za-z0-9._/-]*) return 1 ;;
    esac
}

# release_files DIR: the paths a release is made of, relative to the checkout DIR, one a line,
# in byte order. This is the one rule of what release.sha256 lists.
release_files() {
    (
        cd "$1"
        printf '%s\n' clawdspace.py requirements.txt "$UNIT" install.sh
        find images -type f
        for file in templates/*.yaml; do
            if [ -f "$file" ]; then printf '%s\n' "$file"; fi
        done
    ) | LC_ALL=C sort
}

# manifest_of DIR OUT: write to OUT what DIR/release.sha256 must hold (sha256sum's format).
manifest_of() {
    [ -f "$1/images/Dockerfile" ] || fatal "$1/images/Dockerfile is missing"
    release_files "$1" >"$TMP/release-files"
    : >"$2"
    while read -r path; do
        safe_path "$path" \
            || fatal "$1/$path: a name release.sha256 cannot hold (use A-Z a-z 0-9 . _ - and /)"
        printf '%s  %s\n' "$(sha256 "$1/$path")" "$path" >>"$2"
    done <"$TMP/release-files"
}

# check_manifest DIR: DIR/release.sha256 lists exactly DIR's release files, with their hashes.
check_manifest() {
    regenerate="regenerate it (and commit it with the files): sh $1/install.sh --write-manifest"
    [ -f "$1/$MANIFEST" ] || fatal "$1/$MANIFEST is missing; $regenerate"
    manifest_of "$1" "$TMP/manifest.want"
    if ! cmp -s "$TMP/manifest.want" "$1/$MANIFEST"; then
        stale=$(cat "$TMP/manifest.want" "$1/$MANIFEST" | LC_ALL=C sort | uniq -u \
                | awk '{ print $2 }' | LC_ALL=C sort -u | tr '\n' ' ')
        fatal "$1/$MANIFEST does not match the files of this checkout (stale or missing lines:
    ${stale% }); after editing those files, $regenerate"
    fi
}

# The manifest of a checkout, for developers: --write-manifest and --check-manifest.
manifest_command() {
    dir=$(checkout_dir)
    [ -n "$dir" ] || fatal "--$action works in a checkout: sh path/to/checkout/install.sh --$action"
    if [ "$action" = check-manifest ]; then
        check_manifest "$dir"
        info "$dir/$MANIFEST matches the checkout ($(wc -l <"$dir/$MANIFEST" | tr -d ' ') files)"
        return 0
    fi
    manifest_of "$dir" "$TMP/manifest"
    if cmp -s "$TMP/manifest" "$dir/$MANIFEST"; then
        info "$dir/$MANIFEST is up to date"
    else
        cp "$TMP/manifest" "$dir/$MANIFEST.new"
        mv "$dir/$MANIFEST.new" "$dir/$MANIFEST"
        info "wrote $dir/$MANIFEST ($(wc -l <"$dir/$MANIFEST" | tr -d ' ') files)"
    fi
}

# download_release: fetch release.sha256, then every file it lists into $SRC, each checked
# against its SHA-256 (the way k3s checks its binary). Any failure stops the installer here,
# before anything is installed.
download_release() {
    info "downloading Clawdspace $CLAWDSPACE_VERSION from $CLAWDSPACE_BASE_URL"
    mkdir -p "$SRC"
    list=$CLAWDSPACE_BASE_URL/$MANIFEST
    fetch "$list" "$SRC/$MANIFEST" </dev/null \
        || fatal "could not download $list (the list of the release's files and their SHA-256)"
    count=0
    line=0
    while read -r want path rest || [ -n "$want" ]; do  # (a last line without newline too)
        line=$((line + 1))
        case "$want" in *[!0-9a-f]*) want="" ;; esac
        if [ "${#want}" != 64 ] || [ -n "$rest" ] || ! safe_path "$path"; then
            fatal "line $line of $list is not '<sha256>  <path>': nothing was installed"
        fi
        mkdir -p "$SRC/$(dirname "$path")"
        fetch "$CLAWDSPACE_BASE_URL/$path" "$SRC/$path" </dev/null \
            || fatal "could not download $CLAWDSPACE_BASE_URL/$path (listed in $MANIFEST): \
nothing was installed"
        got=$(sha256 "$SRC/$path")
        [ "$got" = "$want" ] || fatal "$CLAWDSPACE_BASE_URL/$path does not match $MANIFEST:
    its SHA-256 is $got, $MANIFEST says $want.
Nothing was installed. If the release was being updated just then, run the installer again."
        count=$((count + 1))
    done <"$SRC/$MANIFEST"
    for file in clawdspace.py requirements.txt "$UNIT" install.sh images/Dockerfile; do
        [ -f "$SRC/$file" ] || fatal "$list does not list $file: nothing was installed"
    done
    info "downloaded $count files, each matching its SHA-256 in $MANIFEST"
}

# Sets SRC to a directory holding the files, each matching release.sha256: this checkout, or
# a download into $TMP/src.
get_source() {
    SRC=$(checkout_dir)
    if [ -n "$SRC" ]; then
        check_manifest "$SRC"
        info "installing from the checkout $SRC (it matches its $MANIFEST)"
        return 0
    fi
    SRC=$TMP/src
    download_release
}

# put FILE DEST MODE: install FILE as DEST when DEST differs; true if it did (or would).
put() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        return 1
    fi
    run "install -D -m $3 '$1' '$2'"
}

install_program() {
    program_changed=""
    if put "$SRC/clawdspace.py" "$PROGRAM_DIR/clawdspace.py" 0644; then program_changed=1; fi
    put "$SRC/requirements.txt" "$PROGRAM_DIR/requirements.txt" 0644 || true
    # A copy of the installer, so that uninstall.sh works after a curl | sh install.
    put "$SRC/install.sh" "$PROGRAM_DIR/install.sh" 0755 || true
    printf '#!/bin/sh\n# Remove Clawdspace (add --purge to remove its data and spaces too).\nexec sh %s --uninstall "$@"\n' \
        "$PROGRAM_DIR/install.sh" >"$TMP/uninstall.sh"
    put "$TMP/uninstall.sh" "$PROGRAM_DIR/uninstall.sh" 0755 || true
    setup_venv
}

# The virtual environment, rebuilt only when requirements.txt or the system Python changed.
# A new one is built beside the old and swapped in, so a failed pip run leaves the old intact
# (only bin/python is used, and a moved venv's python still finds its packages).
setup_venv() {
    want=$({ python3 -c 'import sys; print(sys.version)' 2>/dev/null || true
             cat "$SRC/requirements.txt"; } | sha256sum | cut -d' ' -f1)
    stamp=$VENV/.requirements.sha256
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
            && "$VENV/bin/python" -c 'import aiohttp, docker, yaml' >/dev/null 2>&1; then
        return 0
    fi
    program_changed=1
    pip_options="--disable-pip-version-check --no-input -q"
    if [ -n "$CLAWDSPACE_PIP_FIND_LINKS" ]; then
        pip_options="$pip_options --no-index --find-links '$CLAWDSPACE_PIP_FIND_LINKS'"
    elif [ -n "$CLAWDSPACE_PIP_INDEX" ]; then
        pip_options="$pip_options --index-url '$CLAWDSPACE_PIP_INDEX'"
    fi
    info "installing the Python dependencies into $VENV"
    run "rm -rf $VENV.new && python3 -m venv $VENV.new"
    run "$VENV.new/bin/python -m pip install $pip_options -r '$SRC/requirements.txt'"
    run "echo $want >$VENV.new/.requirements.sha256"
    run "rm -rf $VENV.old; if [ -d $VENV ]; then mv $VENV $VENV.old; fi; mv $VENV.new $VENV; rm -rf $VENV.old"
}

# --- Docker ----------------------------------------------------------------------------------

check_engine() {
    if [ -n "$dry_run" ]; then
        info "would check that the Docker engine answers"
        return 0
    fi
    i=0
    until venv_python -c 'import docker; docker.from_env().ping()' >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -ge 30 ]; then
            venv_python -c 'import docker; docker.from_env().ping()' 2>&1 | tail -n 1 >&2 || true
            fatal "the Docker engine does not answer (${DOCKER_HOST:-/var/run/docker.sock}). \
Start it (systemctl start docker), then re-run this installer."
        fi
        sleep 1
    done
    info "Docker engine: $(venv_python -c 'import docker; print(docker.from_env().version()["Version"])')"
}

# The sandbox image: built when missing, and rebuilt when this installer built it from another
# build context (any file of images/, as release.sha256 lists them) or base; an image made some
# other way (docker build, tests) is left alone.
ensure_image() {
    want=$({ awk '$2 ~ /^images\// { print }' "$SRC/$MANIFEST"
             echo "BASE_IMAGE=$CLAWDSPACE_BASE_IMAGE"; } | sha256sum | cut -d' ' -f1)
    if [ -n "$dry_run" ]; then
        info "would build $IMAGE from images/ if it is missing or out of date"
        return 0
    fi
    have=$(venv_python - "$IMAGE" "$IMAGE_LABEL" <<'PY'
import sys
import docker
try:
    image = docker.from_env().images.get(sys.argv[1])
except docker.errors.ImageNotFound:
    print("missing")
else:
    print((image.labels or {}).get(sys.argv[2], "not-ours"))
PY
)
    case "$have" in
        "$want") info "sandbox image $IMAGE is up to date"; return 0 ;;
        not-ours) info "sandbox image $IMAGE exists (not built by this installer); kept"; return 0 ;;
        missing) info "building the sandbox image $IMAGE (a few minutes)" ;;
        *) info "rebuilding the sandbox image $IMAGE (images/ or its base changed)" ;;
    esac
    printf '+ docker build -t %s%s%s %s/images\n' "$IMAGE" \
        "${CLAWDSPACE_BASE_IMAGE:+ --build-arg BASE_IMAGE=$CLAWDSPACE_BASE_IMAGE}" \
        "${CLAWDSPACE_BUILD_NETWORK:+ --network $CLAWDSPACE_BUILD_NETWORK}" "$SRC" >&2
    # The docker SDK's build (the classic builder) works with any engine, CLI or none.
    venv_python - "$SRC/images" "$IMAGE" "$CLAWDSPACE_BASE_IMAGE" "$IMAGE_LABEL" "$want" \
            "$CLAWDSPACE_BUILD_NETWORK" <<'PY' \
        || fatal "building $IMAGE failed; with no access to Docker Hub, set CLAWDSPACE_BASE_IMAGE to a local Debian or Ubuntu image"
import sys
import docker
context, tag, base, label, digest, network = sys.argv[1:7]
api = docker.from_env().api
for chunk in api.build(path=context, tag=tag, buildargs={"BASE_IMAGE": base} if base else {},
                       labels={label: digest}, network_mode=network or None,
                       rm=True, forcerm=True, decode=True):
    if "stream" in chunk:
        sys.stderr.write(chunk["stream"])
    elif "error" in chunk:
        sys.exit(chunk["error"].strip())
PY
}

# --- GPU -------------------------------------------------------------------------------------

# Says whether GPU spaces will work here, and what to do when they will not.
check_gpu() {
    gpu_count=""
    if ! have nvidia-smi; then
        for dev in /sys/bus/pci/devices/*; do
            if [ "$(cat "$dev/vendor" 2>/dev/null)" = 0x10de ]; then
                case "$(cat "$dev/class" 2>/dev/null)" in
                    0x03*) warn "an NVIDIA GPU is present but its driver is not (no nvidia-smi). \
Install the NVIDIA driver (Ubuntu: ubuntu-drivers install; Debian: nvidia-driver), reboot, and \
re-run this installer for GPU spaces."; return 0 ;;
                esac
            fi
        done
        info "GPU: none found; this is a CPU node"
        return 0
    fi
    if ! gpus=$(nvidia-smi -L 2>/dev/null) || [ -z "$gpus" ]; then
        warn "nvidia-smi is installed but lists no GPU (driver not loaded?): $(nvidia-smi 2>&1 | head -n 1)"
        return 0
    fi
    gpu_count=$(printf '%s\n' "$gpus" | wc -l | tr -d ' ')
    info "GPU: $gpu_count NVIDIA GPU(s): $(printf '%s\n' "$gpus" | head -n 1)"
    runtimes=$(venv_python -c 'import docker; print(" ".join(docker.from_env().info().get("Runtimes") or {}))' 2>/dev/null || true)
    # dockerd serves --gpus (device requests) through the toolkit's hook; a configured "nvidia"
    # runtime says the same.
    case " $runtimes " in *" nvidia "*) toolkit=1 ;; *) toolkit="" ;; esac
    if have nvidia-container-runtime-hook || [ -n "$toolkit" ]; then
        info "NVIDIA Container Toolkit found: GPU spaces work ({\"gpu\": true}, or the gpu template)"
    else
        warn "the NVIDIA Container Toolkit is missing, so GPU spaces will fail. Install it
    (https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html),
    then: nvidia-ctk runtime configure --runtime=docker && systemctl restart docker
    and check: docker run --rm --gpus all $IMAGE nvidia-smi"
    fi
}

# --- configuration ---------------------------------------------------------------------------

# set_line NAME VALUE FILE: replace NAME's line in FILE, or append one (the value never
# appears on a command line).
set_line() {
    N=$1 V=$2 awk 'BEGIN { n = ENVIRON["N"]; v = ENVIRON["V"] }
        index($0, n "=") == 1 { if (!done) print n "=" v; done = 1; next }
        { print }
        END { if (!done) print n "=" v }' "$3" >"$3.new"
    mv "$3.new" "$3"
}

write_config() {
    config_changed=""
    new_key=""
    if [ ! -d "$CONFIG_DIR/templates" ]; then
        run "install -d -m 0700 $CONFIG_DIR $CONFIG_DIR/templates"
    fi
    if [ -n "$dry_run" ] && [ -f "$ENV_FILE" ] && [ ! -r "$ENV_FILE" ]; then
        info "would keep $ENV_FILE and its key (only root can read it)"
        install_templates
        return 0
    fi
    if [ -f "$ENV_FILE" ]; then
        cp "$ENV_FILE" "$TMP/env"
    else
        cat >"$TMP/env" <<EOF
# Clawdspace node settings, read by $UNIT when it starts (EnvironmentFile=).
# Written by install.sh at the first install; a re-run keeps this file and its key, and only
# rewrites the lines of CLAWDSPACE_HOST, CLAWDSPACE_PORT or CLAWDSPACE_PREFIX when given to it.
# Every setting is in the README (Configuration). After a change: systemctl restart clawdspace
CLAWDSPACE_DATA_DIR=$DATA_DIR
CLAWDSPACE_TEMPLATES_DIR=$DATA_DIR/templates
CLAWDSPACE_SHIPPED_TEMPLATES_DIR=$CONFIG_DIR/templates
EOF
    fi
    # A key is kept as it is (also under the API_KEY alias); an empty one is replaced, which is
    # how to rotate it: blank the line and re-run the installer.
    if [ -z "$(sed -n 's/^\(CLAWDSPACE_\)\{0,1\}API_KEY=//p' "$TMP/env")" ]; then
        # 64 hex digits from the OS's CSPRNG, into the file only (never on a command line).
        key=$(python3 -c 'import secrets; print(secrets.token_hex(32))') \
            || fatal "python3 could not make a key"
        set_line CLAWDSPACE_API_KEY "$key" "$TMP/env"
        key=""
        new_key=1
    fi
    for name in HOST PORT PREFIX; do
        eval "given=\$GIVEN_$name"
        case "$name" in HOST) default=0.0.0.0 ;; PORT) default=7777 ;; PREFIX) default=clawdspace- ;; esac
        if [ -n "$given" ]; then
            set_line "CLAWDSPACE_$name" "$given" "$TMP/env"
        elif ! grep -q "^CLAWDSPACE_$name=" "$TMP/env"; then
            set_line "CLAWDSPACE_$name" "$default" "$TMP/env"
        fi
    done
    if put "$TMP/env" "$ENV_FILE" 0600; then config_changed=1; fi
    install_templates
}

# Shipped templates go to /etc/clawdspace/templates (the service reads them there; templates
# made through the API live in /var/lib/clawdspace/templates and win over them). They are
# handled like a package's configuration files, by their hashes at the last install: one you
# edited or deleted stays so; if this release changes it, the new version is put beside it as
# <name>.yaml.new. Unedited ones are updated, or removed when the release drops them.
install_templates() {
    dir=$CONFIG_DIR/templates
    sums=$PROGRAM_DIR/templates.sha256   # what the last install shipped
    : >"$TMP/templates.sha256"
    for file in "$SRC"/templates/*.yaml; do
        [ -f "$file" ] || continue
        base=${file##*/}
        shipped=$(sha256sum <"$file" | cut -d' ' -f1)
        printf '%s  %s\n' "$shipped" "$base" >>"$TMP/templates.sha256"
        last=$(awk -v f="$base" '$2 == f { print $1 }' "$sums" 2>/dev/null || true)
        if [ ! -f "$dir/$base" ]; then
            if [ "$last" != "$shipped" ]; then
                run "install -m 0644 '$file' '$dir/$base'"
            fi
            continue
        fi
        current=$(sha256sum <"$dir/$base" | cut -d' ' -f1)
        if [ "$current" = "$shipped" ] || [ "$last" = "$shipped" ]; then
            continue
        elif [ "$current" = "$last" ]; then
            run "install -m 0644 '$file' '$dir/$base'"
        else
            warn "kept your edited $dir/$base; this release's version is $base.new beside it"
            put "$file" "$dir/$base.new" 0644 || true
        fi
    done
    if [ -f "$sums" ]; then
        while read -r last base; do
            [ -f "$dir/$base" ] || continue
            grep -q "  $base\$" "$TMP/templates.sha256" && continue
            if [ "$(sha256sum <"$dir/$base" | cut -d' ' -f1)" = "$last" ]; then
                run "rm -f '$dir/$base'"
            fi
        done <"$sums"
    fi
    put "$TMP/templates.sha256" "$sums" 0644 || true
}

# --- the service -----------------------------------------------------------------------------

# On a GPU node: does the running service see the GPUs nvidia-smi lists here? (The unit's
# sandbox must let nvidia-smi reach /dev/nvidia*; this catches a node where it does not.)
check_service_gpus() {
    [ -n "$gpu_count" ] || return 0
    if seen=$(python3 - "$(local_url)/api/system/capabilities" "$ENV_FILE" <<'PY'
import json, sys, urllib.request
key = ""
with open(sys.argv[2], encoding="utf-8") as env:
    for line in env:
        if line.startswith("CLAWDSPACE_API_KEY="):
            key = line.split("=", 1)[1].strip().strip("'\"")
request = urllib.request.Request(sys.argv[1], headers={"Authorization": f"Bearer {key}"})
direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with direct.open(request, timeout=10) as reply:
    print(json.load(reply).get("gpuCount", 0))
PY
    ); then
        if [ "$seen" = "$gpu_count" ]; then
            info "the service sees the node's $seen GPU(s)"
        else
            warn "nvidia-smi lists $gpu_count GPU(s) here but the service sees $seen: see
    journalctl -u clawdspace, and the GPU notes in the README"
        fi
    fi
}

install_unit() {
    unit_changed=""
    if put "$SRC/$UNIT" "$UNIT_FILE" 0644; then unit_changed=1; fi
}

start_service() {
    if [ -n "$unit_changed" ]; then
        run "systemctl daemon-reload"
    fi
    systemctl is-enabled -q "$UNIT" 2>/dev/null || run "systemctl enable $UNIT"
    if systemctl is-failed -q "$UNIT" 2>/dev/null; then
        run "systemctl reset-failed $UNIT"
    fi
    if ! systemctl is-active -q "$UNIT" 2>/dev/null; then
        run "systemctl start $UNIT"
    elif [ -n "$unit_changed$program_changed$config_changed" ]; then
        run "systemctl restart $UNIT"
    else
        info "no change to what $UNIT runs: left running"
    fi
}

# The local URL of the service, from its settings.
local_url() {
    host=$(setting CLAWDSPACE_HOST)
    port=$(setting CLAWDSPACE_PORT)
    case "$host" in
        "" | 0.0.0.0) host=127.0.0.1 ;;
        :: | "[::]") host="[::1]" ;;
        *:*) host="[$host]" ;;
    esac
    printf 'http://%s:%s' "$host" "${port:-7777}"
}

wait_health() {
    url="$(local_url)/api/health"
    info "waiting for $url"
    if python3 - "$url" "$CLAWDSPACE_HEALTH_TIMEOUT" <<'PY'
import json, sys, time, urllib.error, urllib.request
url, deadline = sys.argv[1], time.monotonic() + int(sys.argv[2])
direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
last = "no answer"
while time.monotonic() < deadline:
    try:
        with direct.open(url, timeout=3) as reply:
            body = json.load(reply)
        if body.get("status") == "ok":
            sys.exit(0)
        last = json.dumps(body)
    except urllib.error.HTTPError as err:
        last = f"HTTP {err.code}: {err.read()[:300].decode('utf-8', 'replace')}"
    except (OSError, ValueError) as err:
        last = str(err)
    time.sleep(0.5)
print(f"last answer: {last}", file=sys.stderr)
sys.exit(1)
PY
    then
        check_service_gpus
        return 0
    fi
    journalctl -u "$UNIT" -n 30 --no-pager >&2 2>/dev/null || true
    fatal "the service did not answer $url within ${CLAWDSPACE_HEALTH_TIMEOUT}s (above: its log)"
}

summary() {
    version=$(venv_python "$PROGRAM_DIR/clawdspace.py" version 2>/dev/null || echo "?")
    url=$(local_url)
    port=$(setting CLAWDSPACE_PORT)
    host=$(setting CLAWDSPACE_HOST)
    cat >&2 <<EOF

Clawdspace $version is running as $UNIT.

  API          $url/api  (health: curl $url/api/health)
EOF
    case "$host" in
        "" | 0.0.0.0 | ::)
            printf '  network      http://%s:%s/api\n' "$(hostname)" "${port:-7777}" >&2
            if have tailscale && ts=$(tailscale ip -4 2>/dev/null | head -n 1) && [ -n "$ts" ]; then
                printf '  tailnet      http://%s:%s/api\n' "$ts" "${port:-7777}" >&2
            fi ;;
    esac
    if [ -n "$new_key" ]; then
        printf '  key          a new key was generated for this node\n' >&2
    fi
    cat >&2 <<EOF
  key file     $ENV_FILE (root only); print the key with:
                 sudo sed -n 's/^CLAWDSPACE_API_KEY=//p' $ENV_FILE
  settings     $ENV_FILE, overrides in $DEFAULTS_FILE or: sudo systemctl edit clawdspace
  data         $DATA_DIR (audit.jsonl, your templates)
  logs         journalctl -u clawdspace -f
  update       run this installer again
  uninstall    sudo $PROGRAM_DIR/uninstall.sh  (keeps data and spaces; --purge removes them)

Try it:

  KEY=\$(sudo sed -n 's/^CLAWDSPACE_API_KEY=//p' $ENV_FILE)
  curl -s -H "Authorization: Bearer \$KEY" -X POST $url/api/spaces -d '{"name": "hello"}'
  curl -s -H "Authorization: Bearer \$KEY" -X POST $url/api/spaces/hello/exec -d '{"command": "uname -a"}'
EOF
}

# --- uninstall -------------------------------------------------------------------------------

# Every container, volume and network labelled with this node's prefix, and the firewall
# rules of those networks' bridges (the service's iptables chains, CLAWDSPACE-*). It talks to
# the engine with the system's Python alone, so it also works after a plain uninstall.
remove_spaces() {
    prefix=$(setting CLAWDSPACE_PREFIX)
    prefix=${prefix:-clawdspace-}
    info "removing every space of prefix $prefix (containers, volumes, networks, firewall rules)"
    if [ -n "$dry_run" ]; then
        echo "remove containers, volumes and networks labelled clawdspace.instance=$prefix"
        return 0
    fi
    python3 - "$prefix" <<'PY' || fatal "some spaces could not be removed (see above)"
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse

host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
if not host.startswith("unix://"):
    sys.exit(f"DOCKER_HOST={host}: only a unix:// socket is supported here")


class Connection(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(host[len("unix://"):])


def engine(method, path, **query):
    for _ in range(40):  # an endpoint or volume may stay busy a moment after its container
        connection = Connection("localhost", timeout=60)
        connection.request(method, f"{path}?{urllib.parse.urlencode(query)}")
        reply = connection.getresponse()
        body = reply.read()
        connection.close()
        if reply.status == 409:
            time.sleep(0.25)
            continue
        if reply.status >= 400 and reply.status != 404:
            sys.exit(f"{method} {path}: {reply.status} {body.decode(errors='replace')}")
        return json.loads(body) if body else None
    sys.exit(f"{method} {path}: still busy")


def drop_firewall(bridge):
    """Every rule matched on the bridge that jumps to one of our chains, then those chains."""
    for family in ("iptables", "ip6tables"):
        try:
            listing = subprocess.run([family, "-w", "5", "-S"], capture_output=True, text=True)
        except OSError:
            continue
        chains = set()
        for line in listing.stdout.splitlines() if listing.returncode == 0 else []:
            words = line.split()
            if (words[:1] == ["-A"] and "-i" in words and "-j" in words
                    and words[words.index("-i") + 1] == bridge
                    and words[words.index("-j") + 1].startswith("CLAWDSPACE-")):
                subprocess.run([family, "-w", "5", "-D", *words[1:]], capture_output=True)
                chains.add(words[words.index("-j") + 1])
        for chain in chains:
            subprocess.run([family, "-w", "5", "-F", chain], capture_output=True)
            subprocess.run([family, "-w", "5", "-X", chain], capture_output=True)


selector = json.dumps({"label": [f"clawdspace.instance={sys.argv[1]}"]})
for container in engine("GET", "/containers/json", all="1", filters=selector):
    engine("DELETE", f"/containers/{container['Id']}", force="1")
    print(f"removed container {container['Names'][0].lstrip('/')}", file=sys.stderr)
for volume in engine("GET", "/volumes", filters=selector).get("Volumes") or []:
    engine("DELETE", f"/volumes/{volume['Name']}", force="1")
    print(f"removed volume {volume['Name']}", file=sys.stderr)
for network in engine("GET", "/networks", filters=selector):
    engine("DELETE", f"/networks/{network['Id']}")
    bridge = (network.get("Options") or {}).get("com.docker.network.bridge.name")
    if bridge:
        drop_firewall(bridge)
    print(f"removed network {network['Name']}", file=sys.stderr)
PY
}

uninstall() {
    need_root
    if systemd_running && { [ -f "$UNIT_FILE" ] || systemctl cat "$UNIT" >/dev/null 2>&1; }; then
        run "systemctl disable --now $UNIT"
    fi
    # Spaces go after the service stopped, so that it cannot make or fence new ones meanwhile.
    if [ -n "$purge" ]; then
        remove_spaces
        run "rm -rf $UNIT_FILE.d $DEFAULTS_FILE $CONFIG_DIR $DATA_DIR"
    fi
    run "rm -f $UNIT_FILE"
    if systemd_running; then
        run "systemctl daemon-reload"
        if systemctl is-failed -q "$UNIT" 2>/dev/null; then run "systemctl reset-failed $UNIT"; fi
    fi
    run "rm -rf $PROGRAM_DIR"
    if [ -n "$purge" ]; then
        info "Clawdspace is removed, with its configuration, data and spaces. The image is
    kept: docker rmi $IMAGE"
    else
        info "Clawdspace is removed. Kept: $CONFIG_DIR (settings and key), $DATA_DIR (audit
    log, templates), every space and $IMAGE. Install again to use them, or remove them
    too with: sh install.sh --uninstall --purge"
    fi
}

# --- main ------------------------------------------------------------------------------------

main() {
    parse_args "$@"
    umask 022
    TMP=$(mktemp -d)
    trap 'rm -rf "$TMP"' EXIT
    trap 'exit 130' INT TERM
    case "$action" in
        uninstall) uninstall; return 0 ;;
        write-manifest | check-manifest) manifest_command; return 0 ;;
    esac
    need_root
    detect_os
    install_packages
    get_source
    install_program
    check_engine
    ensure_image
    write_config
    install_unit
    if [ -n "$dry_run" ]; then
        info "dry run: nothing was changed"
        return 0
    fi
    check_gpu
    if ! systemd_running; then
        warn "systemd is not running here, so $UNIT is installed but not started. Start it by hand:
    set -a; . $ENV_FILE; set +a; $VENV/bin/python $PROGRAM_DIR/clawdspace.py serve"
        return 0
    fi
    start_service
    wait_health
    summary
}

main "$@"
