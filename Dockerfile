# The gateway as a container: the same install steps as the README (pip install of this project).
# A build stage with a C compiler makes the wheel with the compiled codec (gateway/iso/_ccodec.c); the
# runtime image only installs wheels. Without the build stage's compiler the package would still install,
# with the pure-Python codec (`gateway.iso.codec.codec_implementation()` says which one runs).
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY gateway ./gateway
COPY specs ./specs
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
WORKDIR /app
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir --no-index --find-links /wheels iso8583-gateway && rm -rf /wheels

# terminals, admin/metrics; the journal and key store live in /var/lib/gateway (mount a volume there)
EXPOSE 5000 9100
VOLUME ["/var/lib/gateway"]
ENV GATEWAY_STORE__PATH=/var/lib/gateway/journal.db \
    GATEWAY_SECURITY__KEYSTORE=/var/lib/gateway/keys.bin
USER nobody
ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "/etc/gateway/gateway.toml"]
