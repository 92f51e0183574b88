# redis-server (Debian's 7.0) with the utmem module. Built by docker/build.sh.
FROM utmem/bookworm:base
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -m 1777 /data
COPY libredis_utmem.so /usr/lib/redis/modules/libredis_utmem.so
COPY utmem /usr/local/bin/utmem
WORKDIR /data
# Any uid works: each tenant runs as its own (compose's `user:`), which is its identity
# on the host. The module keeps utmem.id (its pool's name) in --dir.
CMD ["redis-server", "--port", "6379", "--protected-mode", "no", "--dir", "/data", \
     "--loadmodule", "/usr/lib/redis/modules/libredis_utmem.so", "transport", "unix:/run/utmem/utmem.sock", "threshold", "4096"]
