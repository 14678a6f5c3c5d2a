#!/usr/bin/env bash
# Build the sandbox image the tests use, `clawdspace-test:<hash>`, without any image registry,
# and print its tag on stdout.
#
#   bash tests/build-image.sh                         # the suite's image: clawdspace-test:<hash>
#   bash tests/build-image.sh --tag clawdspace:latest # also tag it so (the service's default
#                                                     # image), e.g. to run a checkout offline
#
# 1. A base image `clawdspace-base:bookworm` is made once from Debian packages: a minimal root
#    file system from mmdebstrap, loaded with `docker import`.
# 2. images/Dockerfile is built on it (build arg BASE_IMAGE) and tagged `clawdspace-test:<hash>`,
#    where <hash> is the first 12 hex digits of the sha256 of the build context (images/). When
#    that tag exists already, nothing is built.
# Without --tag, no other tag is made or moved: the suite never touches `clawdspace:latest`, so it
# can share an engine with an installed service. With --tag, that tag is printed instead.
#
# Needs root (mmdebstrap, docker), a running Docker engine, and a Debian package mirror.
# Environment (all optional):
#   CLAWDSPACE_BUILD_TAG       the same as --tag
#   CLAWDSPACE_BASE_SUITE      Debian suite of the base image (default bookworm)
#   CLAWDSPACE_DEBIAN_MIRROR   mirror URI for mmdebstrap (default: the host's Debian mirror, else
#                              mmdebstrap's own default, deb.debian.org with updates and security)
#   CLAWDSPACE_BUILD_NETWORK   network mode of the build's RUN steps (default: Docker's default)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUITE="${CLAWDSPACE_BASE_SUITE:-bookworm}"
BASE_IMAGE="clawdspace-base:${SUITE}"
TEST_REPO="clawdspace-test"
EXTRA_TAG="${CLAWDSPACE_BUILD_TAG:-}"
CONTEXT="images"

log() { printf 'build-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

while [ "$#" -gt 0 ]; do
    case "$1" in
        --tag) [ "$#" -ge 2 ] || die "--tag needs an image tag"; EXTRA_TAG="$2"; shift 2 ;;
        --tag=*) EXTRA_TAG="${1#--tag=}"; shift ;;
        -h | --help) sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (usage: bash tests/build-image.sh [--tag IMAGE:TAG])" ;;
    esac
done
case "$EXTRA_TAG" in
    "${TEST_REPO}:"*) die "--tag $EXTRA_TAG: the ${TEST_REPO} tags are this script's own" ;;
esac

command -v docker >/dev/null || die "docker is not installed"
command -v sha256sum >/dev/null || die "sha256sum is not installed"
[ -f "$CONTEXT/Dockerfile" ] || die "$CONTEXT/Dockerfile not found"

# The legacy builder works with every client/engine pair seen here (a newer CLI without the buildx
# plugin refuses BuildKit outright).
export DOCKER_BUILDKIT=0

# Hash of every file in the build context, names included, so any change rebuilds.
context_hash() {
    find "$CONTEXT" -type f -print0 | LC_ALL=C sort -z \
        | xargs -0 sha256sum | sha256sum | cut -c1-12
}

# The host's Debian mirror, when the host is Debian and uses one other than deb.debian.org.
# Prints nothing otherwise, so that mmdebstrap uses its default (which adds updates and security).
host_debian_mirror() {
    [ -r /etc/os-release ] || return 0
    # shellcheck disable=SC1091
    ( . /etc/os-release; [ "${ID:-}" = debian ] ) || return 0
    local uri=""
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        uri="$(awk '$1 == "deb" {
                   for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; exit }
               }' "$f" | grep -v -e security -e '^$' | head -n1 || true)"
        [ -n "$uri" ] && break
    done
    if [ -z "$uri" ]; then
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -r "$f" ] || continue
            uri="$(awk 'tolower($1) == "uris:" { print $2 }' "$f" \
                   | grep -v -e security -e '^$' | grep '/debian/*$' | head -n1 || true)"
            [ -n "$uri" ] && break
        done
    fi
    case "$uri" in
        "" | http://deb.debian.org/debian | http://deb.debian.org/debian/ \
            | https://deb.debian.org/debian | https://deb.debian.org/debian/) ;;
        *) printf '%s\n' "$uri" ;;
    esac
}

HASH="$(context_hash)"
TEST_TAG="${TEST_REPO}:${HASH}"

# The tag the caller gets: the extra one if asked for (pointed at the test image), else the test
# image's own.
finish() {
    if [ -n "$EXTRA_TAG" ]; then
        docker tag "$TEST_TAG" "$EXTRA_TAG"
        log "tagged $TEST_TAG as $EXTRA_TAG"
        printf '%s\n' "$EXTRA_TAG"
    else
        printf '%s\n' "$TEST_TAG"
    fi
}

if docker image inspect "$TEST_TAG" >/dev/null 2>&1; then
    log "cached: $TEST_TAG"
    finish
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    command -v mmdebstrap >/dev/null || die "mmdebstrap is not installed (apt-get install mmdebstrap)"
    mirror="${CLAWDSPACE_DEBIAN_MIRROR:-$(host_debian_mirror)}"
    mirror_args=()
    if [ -n "$mirror" ]; then
        mirror_args=("$mirror")
    fi
    log "making base image $BASE_IMAGE with mmdebstrap (${SUITE}, mirror: ${mirror:-default})"
    mmdebstrap --variant=minbase \
        --include=bash,python3-minimal,git,procps,ca-certificates \
        "$SUITE" "$tmp/base.tar" "${mirror_args[@]}" </dev/null
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["bash"]' \
        "$tmp/base.tar" "$BASE_IMAGE" >/dev/null
    rm -f "$tmp/base.tar"
fi

build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$TEST_TAG")
if [ -n "${CLAWDSPACE_BUILD_NETWORK:-}" ]; then
    build_args+=(--network "$CLAWDSPACE_BUILD_NETWORK")
fi
log "building $TEST_TAG from $CONTEXT/Dockerfile on $BASE_IMAGE"
docker build "${build_args[@]}" "$CONTEXT" >&2

# Drop test images of older contexts (ignore any still used by a container, or by another tag).
docker image ls "$TEST_REPO" --format '{{.Repository}}:{{.Tag}}' \
    | { grep -v -x -F "$TEST_TAG" || true; } \
    | while read -r old; do docker rmi "$old" >/dev/null 2>&1 || true; done

log "built: $TEST_TAG"
finish
