#!/bin/sh
# Entry point of the SimSkip images: make the output folder writable, then run the command as
# the unprivileged user `simskip` (uid 10001).
#
# Why an entrypoint rather than a folder made in the image: /out is normally a bind mount
# (./orgs/<name>/out in deploy/docker-compose.yml), and a bind-mount source that compose
# creates is root's, mode 755, whatever the image holds at /out. Only a process that starts as
# root can hand that folder to uid 10001, so the container starts as root, fixes /out (the
# folder itself, never its contents, and only when it is not already uid 10001's) and drops
# to uid 10001 with setpriv before running anything else. A plain `docker compose up`, podman
# and named volumes all work the same. Started as non-root (`--user`), it only runs the
# command (mount the certificate folder at /tls, readable by that user, then).
#
# The same holds for the party's certificate folder, mounted read-only at /tls-in: its key is
# mode 0600 and belongs to whoever ran `simskip certs`, so uid 10001 could not read it. The
# entrypoint copies it to /tls inside the container, owned by uid 10001, the key still 0600.
set -eu
SIMSKIP_UID=10001
if [ "$(id -u)" = 0 ]; then
  mkdir -p /out
  if [ "$(stat -c %u /out)" != "$SIMSKIP_UID" ]; then
    chown "$SIMSKIP_UID:$SIMSKIP_UID" /out
  fi
  if [ -d /tls-in ]; then
    rm -rf /tls
    mkdir -m 0700 /tls
    cp /tls-in/*.pem /tls/
    chmod 0644 /tls/*.pem
    chmod 0600 /tls/key.pem
    if [ -f /tls-in/federation.secret ]; then
      cp /tls-in/federation.secret /tls/
      chmod 0600 /tls/federation.secret
    fi
    chown -R "$SIMSKIP_UID:$SIMSKIP_UID" /tls
  fi
  exec setpriv --reuid="$SIMSKIP_UID" --regid="$SIMSKIP_UID" --clear-groups -- "$@"
fi
exec "$@"
