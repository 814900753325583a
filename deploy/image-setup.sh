#!/bin/sh
# Run inside the runtime image's root filesystem (Dockerfile RUN, or chroot from test-image.sh):
# the unprivileged user and group shmback runs as, and the directories it writes.
# uid/gid 10001: above any distribution range, and what the Kubernetes manifests and Akash notes use
# (the app runs as another uid in the same group, so a segment made with --group-shared is shared).
set -eu
groupadd --gid 10001 shmback
useradd --no-log-init --uid 10001 --gid 10001 --home-dir /var/lib/shmback --create-home \
  --shell /usr/sbin/nologin shmback
# restic's and rclone's caches and configs live under HOME; /var/lib/shmback is the writable home.
chmod 0750 /var/lib/shmback
