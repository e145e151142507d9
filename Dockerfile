# The gateway as a container: the same install steps as the README (pip install of this project).
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY specs ./specs
RUN python -m pip install --no-cache-dir .

# terminals, admin/metrics; the journal and key store live in /var/lib/gateway (mount a volume there)
EXPOSE 5000 9100
VOLUME ["/var/lib/gateway"]
ENV GATEWAY_STORE__PATH=/var/lib/gateway/journal.db \
    GATEWAY_SECURITY__KEYSTORE=/var/lib/gateway/keys.bin
USER nobody
ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "/etc/gateway/gateway.toml"]
