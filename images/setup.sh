#!/bin/sh
# Clawdspace sandbox setup, shared by images/Dockerfile (CPU) and images/Dockerfile.gpu (CUDA):
# packages, the `sandbox` user (uid/gid 1001) owning /workspace, and shell history capture.
set -eu
export DEBIAN_FRONTEND=noninteractive

apt-get update
apt-get install -y --no-install-recommends \
    bash ca-certificates coreutils curl git less nano passwd procps python3 tini
apt-get clean
rm -rf /var/lib/apt/lists/*

# User and group `sandbox`, uid/gid 1001. Whatever else a base image put on 1001 is removed
# first; a `sandbox` user or group that already exists is moved to 1001.
other_user="$(getent passwd 1001 | cut -d: -f1)"
if [ -n "$other_user" ] && [ "$other_user" != sandbox ]; then userdel "$other_user"; fi
other_group="$(getent group 1001 | cut -d: -f1)"
if [ -n "$other_group" ] && [ "$other_group" != sandbox ]; then groupdel "$other_group"; fi
if getent group sandbox >/dev/null; then groupmod -g 1001 sandbox; else groupadd -g 1001 sandbox; fi
if getent passwd sandbox >/dev/null; then
    usermod -u 1001 -g 1001 -d /home/sandbox -s /bin/bash sandbox
else
    useradd -u 1001 -g 1001 -d /home/sandbox -m -s /bin/bash sandbox
fi
# Docker copies the image's /workspace ownership into a fresh named volume, so the user can
# write there without helper containers.
install -d -o 1001 -g 1001 -m 0755 /home/sandbox /workspace

# Shell history: every interactive bash (login or not) appends each command to
# /workspace/.bash_history as soon as it runs, with timestamps, keeping commands that start with
# a space and repeated ones. The skeleton ~/.bashrc of Debian/Ubuntu sets HISTCONTROL=ignoreboth
# and small sizes after /etc/bash.bashrc has run, so ~/.bashrc re-applies the settings last.
cat > /etc/profile.d/clawdspace-history.sh <<'HISTORY'
# Clawdspace: record shell history in the workspace volume, with timestamps.
if [ -n "${BASH_VERSION:-}" ]; then
    HISTFILE=/workspace/.bash_history
    HISTSIZE=100000
    HISTFILESIZE=200000
    HISTTIMEFORMAT='%F %T '
    HISTCONTROL=
    HISTIGNORE=
    shopt -s histappend
    case "${PROMPT_COMMAND:-}" in
        "history -a"*) ;;
        *) PROMPT_COMMAND="history -a${PROMPT_COMMAND:+; $PROMPT_COMMAND}" ;;
    esac
fi
HISTORY
chmod 0644 /etc/profile.d/clawdspace-history.sh
hook='if [ -r /etc/profile.d/clawdspace-history.sh ]; then . /etc/profile.d/clawdspace-history.sh; fi'
for rc in /etc/bash.bashrc /home/sandbox/.bashrc /root/.bashrc; do
    printf '\n%s\n' "$hook" >> "$rc"
done
chown 1001:1001 /home/sandbox/.bashrc
