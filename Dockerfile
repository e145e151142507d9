# The gateway as a container image: the README's install (pip install with constraints.txt, so every
# run-time dependency is the pinned version), running as its own user with its data in a volume.
#
#   docker build -t iso8583-gateway .
#   README "Running it in a container": the key ceremony in one-off containers, the LMK as a secret,
#   a Prometheus in another container scraping admin on :9100.
#
# Two stages: the build stage has a C compiler and makes the wheels, the gateway's own with the compiled
# codec (gateway/iso/_ccodec.c, README "Compiled codec"); the image only installs those wheels and has
# no compiler. (Without one the package still installs, with the pure-Python codec.)
FROM python:3.11-slim AS build
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY constraints.txt pyproject.toml setup.py MANIFEST.in README.md ./
COPY gateway ./gateway
COPY specs ./specs
RUN python -m pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels --constraint constraints.txt .

FROM python:3.11-slim

# the gateway's own user (uid/gid 10001); /var/lib/gateway (journal, key store, PAN fingerprint key)
# belongs to it, so a named volume mounted there starts out owned by it too
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/gateway \
       --no-create-home --shell /usr/sbin/nologin gateway \
    && install -d -o gateway -g gateway -m 0700 /var/lib/gateway

WORKDIR /app
# the wheels of the build stage only (--no-index): the pinned versions it resolved
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir --disable-pip-version-check --no-index --find-links /wheels \
        /wheels/iso8583_gateway-*.whl \
    && rm -rf /wheels

# the production template (placeholders under .invalid: mount your own over it, or override keys
# with GATEWAY_<SECTION>__<KEY>); it listens on 0.0.0.0 inside the container, admin included
COPY deploy/gateway.production.toml /etc/gateway/gateway.toml
COPY deploy/entrypoint.sh /usr/local/bin/gateway-entrypoint

ENV PYTHONUNBUFFERED=1 \
    GATEWAY_STORE__PATH=/var/lib/gateway/journal.db \
    GATEWAY_SECURITY__KEYSTORE=/var/lib/gateway/keys.bin
# terminals; admin (/metrics /healthz /readyz) for a scraper on the container network
EXPOSE 5000 9100
VOLUME ["/var/lib/gateway"]
USER 10001:10001

# liveness from inside the container (the slim image has no curl): `gateway health` asks /healthz
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["gateway", "health", "--admin", "127.0.0.1:9100", "--timeout", "4"]

ENTRYPOINT ["gateway-entrypoint"]
CMD ["serve", "--config", "/etc/gateway/gateway.toml"]
