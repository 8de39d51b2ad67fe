# orderflow: one image for every command (migrate, consume, relay, topics create).
#   docker build -t orderflow .
#   docker run --rm -e DATABASE_URL=... -e KAFKA_BOOTSTRAP_SERVERS=... orderflow consume
#
# Build stage: install the project (runtime dependencies and the `tracing` extra, so that
# the OpenTelemetry environment can turn tracing on; no `embedded`/`test` extras) into a
# virtualenv; the runtime stage copies just that virtualenv.
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
WORKDIR /src
# .dockerignore keeps the virtualenv, caches, tests and docs out of the context.
COPY . .
RUN /opt/venv/bin/pip install ".[tracing]"


FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN groupadd --system --gid 10001 orderflow \
    && useradd --system --uid 10001 --gid orderflow --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin orderflow

COPY --from=build /opt/venv /opt/venv

USER orderflow:orderflow

# Exec form: orderflow is PID 1 and receives SIGTERM itself (it drains, then exits 0).
ENTRYPOINT ["orderflow"]
CMD ["--help"]
