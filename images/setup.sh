#!/bin/sh
# Clawdspace sandbox setup, shared by images/Dockerfile (CPU) and images/Dockerfile.gpu (CUDA):
# packages, the `sandbox` user (uid/gid 1001) owning /workspace, E2B's `user` (uid/gid 1000,
# home /home/user), sudo for both (inert unless a template allows it), and shell history capture.
set -eu
export DEBIAN_FRONTEND=noninteractive

apt-get update
apt-get install -y --no-install-recommends \
    bash ca-certificates coreutils curl git inotify-tools less nano passwd procps python3 \
    sudo tini
apt-get clean
rm -rf /var/lib/apt/lists/*

# account NAME ID: user and group NAME with uid/gid ID and home /home/NAME. Whatever else a base
# image put on ID is removed first; a NAME user or group that already exists is moved to ID.
account() {
    other_user="$(getent passwd "$2" | cut -d: -f1)"
    if [ -n "$other_user" ] && [ "$other_user" != "$1" ]; then userdel "$other_user"; fi
    other_group="$(getent group "$2" | cut -d: -f1)"
    if [ -n "$other_group" ] && [ "$other_group" != "$1" ]; then groupdel "$other_group"; fi
    if getent group "$1" >/dev/null; then groupmod -g "$2" "$1"; else groupadd -g "$2" "$1"; fi
    if getent passwd "$1" >/dev/null; then
        usermod -u "$2" -g "$2" -d "/home/$1" -s /bin/bash "$1"
    else
        useradd -u "$2" -g "$2" -d "/home/$1" -m -s /bin/bash "$1"
    fi
    install -d -o "$2" -g "$2" -m 0755 "/home/$1"
}

# The space user: `sandbox`, 1001. Docker copies the image's /workspace ownership into a fresh
# named volume, so the user can write there without helper containers.
account sandbox 1001
install -d -o 1001 -g 1001 -m 0755 /workspace

# E2B's base template's user: `user`, 1000. An E2B sandbox runs as it with the volume mounted
# on /home/user (first, so a fresh volume takes this directory's ownership and skeleton files)
# and on /workspace.
account user 1000

# sudo without a password for both users. It works only in a space whose template sets
# `security.sudo: true`: every other space runs with no-new-privileges, under which the kernel
# ignores sudo's setuid bit and sudo refuses to run.
printf '%s\n' 'sandbox ALL=(ALL:ALL) NOPASSWD: ALL' 'user ALL=(ALL:ALL) NOPASSWD: ALL' \
    > /etc/sudoers.d/clawdspace
chmod 0440 /etc/sudoers.d/clawdspace

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
for rc in /etc/bash.bashrc /home/sandbox/.bashrc /home/user/.bashrc /root/.bashrc; do
    printf '\n%s\n' "$hook" >> "$rc"
done
chown 1001:1001 /home/sandbox/.bashrc
chown 1000:1000 /home/user/.bashrc
