# Prometheus from Debian's package, on the same Debian base as the sipfarm image (no registry
# image pulled). compose.yaml mounts docker/prometheus.yml and passes the flags.
ARG BASE=sipfarm-base:bookworm
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/*
USER prometheus
WORKDIR /var/lib/prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/var/lib/prometheus/metrics2"]
