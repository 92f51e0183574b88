# utmem-hostd. Built by docker/build.sh from binaries built on the host (no Rust here).
FROM utmem/bookworm:base
COPY utmem-hostd utmem /usr/local/bin/
COPY utmem-hostd.toml /etc/utmem/utmem-hostd.toml
# /run/utmem: the socket folder the tenants share (a volume); /run/utmem-admin: the
# operator socket, inside this container only.
RUN groupadd --system --gid 999 utmem \
 && useradd --system --uid 999 --gid utmem --no-create-home --home-dir /nonexistent utmem \
 && install -d -o utmem -g utmem -m 0755 /run/utmem \
 && install -d -o utmem -g utmem -m 0700 /run/utmem-admin
USER utmem
# Tenants run as their own uids (their identity is `uid:N`) and need write permission on
# the socket to connect; only their containers mount the socket folder.
ENTRYPOINT ["/bin/sh", "-c", "umask 0000 && exec utmem-hostd \"$@\"", "utmem-hostd"]
CMD ["--config", "/etc/utmem/utmem-hostd.toml", "--listen", "unix:/run/utmem/utmem.sock", "--admin", "unix:/run/utmem-admin/admin.sock"]
