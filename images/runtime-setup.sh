#!/bin/bash
# Prepares an image's runtime: the numeric non-root user, its home, the working directory, and the
# directories KFP's launcher writes to.
#
# Works on bases without useradd (a debootstrap minbase has no `passwd` package).
# Usage: runtime-setup.sh UID
set -euo pipefail

uid=${1:?usage: runtime-setup.sh UID}
home=/home/app

if ! getent group "$uid" >/dev/null; then
    if command -v groupadd >/dev/null; then
        groupadd --gid "$uid" app
    else
        echo "app:x:$uid:" >>/etc/group
    fi
fi
if ! getent passwd "$uid" >/dev/null; then
    if command -v useradd >/dev/null; then
        useradd --uid "$uid" --gid "$uid" --home-dir "$home" --no-create-home --shell /usr/sbin/nologin app
    else
        echo "app:x:$uid:$uid::$home:/usr/sbin/nologin" >>/etc/passwd
    fi
fi

# Group 0 owns the writable directories so a cluster that picks an arbitrary uid (in group 0,
# as OpenShift does) can still write them.
mkdir -p "$home" /opt/cascade-rcnn
chown "$uid:0" "$home" /opt/cascade-rcnn
chmod 0775 "$home" /opt/cascade-rcnn
# KFP's launcher puts artifacts under /gcs, /minio and /s3 at the file-system root: a non-root
# user cannot create those, so they exist, writable like /tmp (sticky).
mkdir -p /gcs /minio /s3
chmod 1777 /gcs /minio /s3
chmod 0755 /usr/local/lib/cascade-rcnn/entrypoint.sh
