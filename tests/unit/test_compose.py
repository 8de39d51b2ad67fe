"""The container set-up: ``docker-compose.yml``, ``Dockerfile`` and ``deploy/``, checked
without Docker.

Docker is not needed here: these tests read the files and check what a broken
``docker compose up`` would otherwise reveal only at run time (a missing dependency,
a command the CLI does not have, Kafka listeners that don't line up, a healthcheck that
cannot pass, Prometheus scraping the wrong port, an alert or a dashboard panel on a metric
that does not exist).
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from sqlalchemy.engine import make_url

import orderflow.cli.main
from orderflow.api import METRICS_PATH, ApiMetrics
from orderflow.runtime.metrics import ConsumerMetrics, RelayMetrics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"

APP_SERVICES = ("topics", "migrate", "consume", "relay", "api")
LONG_RUNNING = ("consume", "relay")
#: What each long-running service is checked on: the readiness endpoint.
READINESS = {"consume": "/readyz", "relay": "/readyz", "api": "/readyz"}
#: What ``consume`` and ``relay`` need after SIGTERM to finish the work in flight.
DRAIN_SECONDS = 30


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, whichever of the two compose forms it uses."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        return dict(item.split("=", 1) for item in raw)
    return {key: "" if value is None else str(value) for key, value in raw.items()}


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Dependency -> condition (the short list form means ``service_started``)."""
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in raw.items()}


def listeners(value: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` -> {NAME: (host, port)}."""
    parsed = {}
    for entry in value.split(","):
        name, _, address = entry.strip().partition("://")
        host, _, port = address.rpartition(":")
        parsed[name] = (host, int(port))
    return parsed


def seconds(duration: str) -> float:
    """A compose duration such as ``40s``, ``1m`` or ``1m30s``."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts, f"not a duration: {duration!r}"
    assert "".join(number + unit for number, unit in parts) == duration
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(number) * scale[unit] for number, unit in parts)


def cli_commands() -> dict[str, Any]:
    """The top-level commands registered on the orderflow Typer app."""
    group: Any = typer.main.get_command(orderflow.cli.main.app)
    return dict(group.commands)


def parse_cli(arguments: list[str]) -> Any:
    """The context of the CLI command these arguments run, options parsed as the real CLI does.

    Groups are walked through their ``commands``; the leaf's ``make_context`` raises a
    usage error on an option the command does not have or a bad value.
    """
    command: Any = typer.main.get_command(orderflow.cli.main.app)
    remaining = list(arguments)
    path = ["orderflow"]
    while hasattr(command, "commands"):
        assert remaining, f"{' '.join(path)} needs a subcommand"
        name = remaining.pop(0)
        assert name in command.commands, f"{' '.join(path)} has no command {name!r}"
        command = command.commands[name]
        path.append(name)
    return command.make_context(" ".join(path), remaining)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


# -- docker-compose.yml ------------------------------------------------------------------


def test_all_services_are_defined(services: dict[str, dict[str, Any]]) -> None:
    assert {"postgres", "kafka", *APP_SERVICES} <= services.keys()


def test_app_services_build_the_repository_image(services: dict[str, dict[str, Any]]) -> None:
    for name in APP_SERVICES:
        build = services[name].get("build")
        assert build is not None, f"{name} does not build the orderflow image"
        if isinstance(build, str):
            context, dockerfile = build, "Dockerfile"
        else:
            context, dockerfile = build.get("context", "."), build.get("dockerfile", "Dockerfile")
        assert context in {".", "./"}, f"{name} builds from {context!r}"
        assert (ROOT / context / dockerfile).is_file()


def test_every_dependency_exists(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for dependency in depends_on(service):
            assert dependency in services, f"{name} depends on unknown service {dependency!r}"


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_workers_start_after_migrations_and_topics(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    dependencies = depends_on(services[name])
    assert dependencies.get("migrate") == "service_completed_successfully"
    # Auto-creation is off: without the topics the workers would fail at start.
    assert dependencies.get("topics") == "service_completed_successfully"


def test_one_shot_services_wait_for_healthy_backends(services: dict[str, dict[str, Any]]) -> None:
    assert depends_on(services["migrate"]).get("postgres") == "service_healthy"
    assert depends_on(services["topics"]).get("kafka") == "service_healthy"


@pytest.mark.parametrize("name", ["postgres", "kafka"])
def test_backends_have_healthchecks(services: dict[str, dict[str, Any]], name: str) -> None:
    healthcheck = services[name].get("healthcheck") or {}
    assert healthcheck.get("test"), f"{name} has no healthcheck"
    assert not healthcheck.get("disable", False)


def test_postgres_healthcheck_uses_pg_isready(services: dict[str, dict[str, Any]]) -> None:
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


def test_kafka_healthcheck_uses_the_image_tools(services: dict[str, dict[str, Any]]) -> None:
    test = " ".join(services["kafka"]["healthcheck"]["test"])
    assert "/opt/kafka/bin/kafka-topics.sh" in test


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_are_configured(services: dict[str, dict[str, Any]], name: str) -> None:
    env = environment(services[name])
    assert env.get("DATABASE_URL")
    assert env.get("KAFKA_BOOTSTRAP_SERVERS")


@pytest.mark.parametrize(
    ("name", "command_name"),
    [
        ("topics", "create"),
        ("migrate", "migrate"),
        ("consume", "consume"),
        ("relay", "relay"),
        ("api", "api"),
    ],
)
def test_app_commands_are_real_cli_commands(
    services: dict[str, dict[str, Any]], name: str, command_name: str
) -> None:
    command = services[name].get("command")
    arguments = command.split() if isinstance(command, str) else list(command)
    assert "orderflow" not in arguments[:1], "the image's ENTRYPOINT already is orderflow"
    assert arguments[0] in cli_commands()
    assert parse_cli(arguments).command.name == command_name


def test_topics_are_created_with_six_partitions(services: dict[str, dict[str, Any]]) -> None:
    assert parse_cli(services["topics"]["command"]).params["partitions"] == 6


def test_database_url_matches_the_postgres_service(services: dict[str, dict[str, Any]]) -> None:
    postgres = environment(services["postgres"])
    for name in APP_SERVICES:
        url = make_url(environment(services[name])["DATABASE_URL"])
        assert url.get_backend_name() == "postgresql"
        assert url.host == "postgres"
        assert url.port in {None, 5432}
        assert url.username == postgres["POSTGRES_USER"]
        assert url.password == postgres["POSTGRES_PASSWORD"]
        assert url.database == postgres["POSTGRES_DB"]


def test_postgres_keeps_its_data_in_a_named_volume(compose: dict[str, Any]) -> None:
    mounts = compose["services"]["postgres"].get("volumes") or []
    named = [m.split(":", 1)[0] for m in mounts if isinstance(m, str) and ":" in m]
    assert any(volume in (compose.get("volumes") or {}) for volume in named)


def test_backends_are_reachable_from_the_host(services: dict[str, dict[str, Any]]) -> None:
    assert "5432:5432" in [str(port) for port in services["postgres"].get("ports", [])]
    assert "29092:29092" in [str(port) for port in services["kafka"].get("ports", [])]


@pytest.mark.parametrize("name", [*LONG_RUNNING, "api"])
def test_workers_restart_and_get_time_to_drain(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    assert service.get("restart") == "unless-stopped"
    assert seconds(service.get("stop_grace_period", "10s")) > DRAIN_SECONDS


def test_kafka_runs_in_kraft_mode(services: dict[str, dict[str, Any]]) -> None:
    env = environment(services["kafka"])
    roles = {role.strip() for role in env["KAFKA_PROCESS_ROLES"].split(",")}
    assert roles == {"broker", "controller"}
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert not any("zookeeper" in name for name in services)
    assert env.get("KAFKA_NODE_ID")
    assert env.get("CLUSTER_ID")


def test_kafka_listeners_line_up(services: dict[str, dict[str, Any]]) -> None:
    env = environment(services["kafka"])
    bound = listeners(env["KAFKA_LISTENERS"])
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(
        entry.strip().split(":", 1)
        for entry in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    controllers = {name.strip() for name in env["KAFKA_CONTROLLER_LISTENER_NAMES"].split(",")}

    assert bound.keys() <= protocols.keys()
    assert controllers <= bound.keys()
    # A broker must not advertise its controller listener to clients.
    assert not controllers & advertised.keys()
    assert advertised.keys() <= bound.keys()
    for name, (_, port) in advertised.items():
        assert bound[name][1] == port, f"{name} is advertised on another port than it binds"
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised

    # The quorum is this node alone, on its controller listener.
    voter_id, _, voter_address = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].partition("@")
    voter_host, _, voter_port = voter_address.rpartition(":")
    assert voter_id == env["KAFKA_NODE_ID"]
    assert voter_host in {"kafka", "localhost", "127.0.0.1"}
    assert int(voter_port) in {bound[name][1] for name in controllers}

    # Containers use kafka:9092, the host localhost:29092: both must be advertised.
    advertised_addresses = {f"{host}:{port}" for host, port in advertised.values()}
    assert "localhost:29092" in advertised_addresses
    for name in APP_SERVICES:
        for server in environment(services[name])["KAFKA_BOOTSTRAP_SERVERS"].split(","):
            assert server.strip() in advertised_addresses
            assert server.strip().rpartition(":")[0] in services


def test_kafka_single_node_settings(services: dict[str, dict[str, Any]]) -> None:
    env = environment(services["kafka"])
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "1"
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"].lower() == "false"


def test_idempotent_producer_is_enabled_for_apache_kafka(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in LONG_RUNNING:
        assert environment(services[name]).get("ORDERFLOW_KAFKA_IDEMPOTENCE") == "true"


# -- Dockerfile --------------------------------------------------------------------------


def test_dockerfile_entrypoint_is_orderflow() -> None:
    entrypoints = [args for keyword, args in dockerfile_instructions() if keyword == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT"
    # Exec form, so that orderflow itself receives SIGTERM.
    assert json.loads(entrypoints[-1]) == ["orderflow"]


def test_dockerfile_installs_the_project_with_no_extra_but_tracing() -> None:
    installs = [
        args for keyword, args in dockerfile_instructions() if keyword == "RUN" and "pip" in args
    ]
    assert any(
        re.search(r"""pip install (\S+ )*["']?\.(\[tracing\])?["']?(\s|$)""", args)
        for args in installs
    )
    for args in installs:
        assert "[test" not in args
        assert "[embedded" not in args
        assert "pytest" not in args


def test_dockerfile_runs_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    last_stage = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    users = [args for keyword, args in instructions[last_stage:] if keyword == "USER"]
    assert users, "the runtime stage does not switch user"
    assert users[-1].split(":", 1)[0] not in {"root", "0"}


def test_dockerfile_is_based_on_python_311_slim() -> None:
    bases = [args.split()[0] for keyword, args in dockerfile_instructions() if keyword == "FROM"]
    assert bases
    assert all(base == "python:3.11-slim" for base in bases)


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git"} <= ignored


# -- health, metrics, Prometheus and Grafana ----------------------------------------------


def command_of(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else list(command)


def metrics_port(service: dict[str, Any]) -> int:
    port = parse_cli(command_of(service)).params["metrics_port"]
    assert isinstance(port, int), "the service does not serve metrics (--metrics-port)"
    return port


def healthcheck_code(service: dict[str, Any]) -> str:
    """The Python the healthcheck runs (``CMD python -c CODE``)."""
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], f"not a python -c healthcheck: {test}"
    (code,) = test[3:]
    assert isinstance(code, str)
    return code


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_workers_run_two_replicas(services: dict[str, dict[str, Any]], name: str) -> None:
    assert services[name]["deploy"]["replicas"] == 2


def test_the_api_listens_on_every_interface_of_its_published_port(
    services: dict[str, dict[str, Any]],
) -> None:
    api = services["api"]
    params = parse_cli(command_of(api)).params
    assert (params["host"], params["port"]) == ("0.0.0.0", 8000)
    assert "8000:8000" in [str(port) for port in api["ports"]]
    assert depends_on(api).get("migrate") == "service_completed_successfully"


@pytest.mark.parametrize("name", list(READINESS))
def test_healthchecks_probe_readiness_on_the_served_port(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    port = parse_cli(command_of(service)).params["port"] if name == "api" else None
    port = port or metrics_port(service)
    code = healthcheck_code(service)
    compile(code, f"{name} healthcheck", "exec")
    assert f"http://127.0.0.1:{port}{READINESS[name]}" in code
    # The image has Python but no curl or wget.
    assert "curl" not in code
    assert "wget" not in code
    healthcheck = service["healthcheck"]
    assert seconds(healthcheck["timeout"]) < seconds(healthcheck["interval"])
    assert seconds(healthcheck.get("start_period", "0s")) >= 10


class _Readiness(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def readiness_server() -> Iterator[tuple[int, type[_Readiness]]]:
    class Handler(_Readiness):
        pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], Handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_healthcheck_passes_on_200_only(
    services: dict[str, dict[str, Any]], readiness_server: tuple[int, type[_Readiness]]
) -> None:
    """Run the real one-liner (as the container would) against a stand-in /readyz."""
    port, handler = readiness_server
    code = healthcheck_code(services["consume"]).replace(":9100/", f":{port}/")

    def exit_code() -> int:
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, timeout=30
        ).returncode

    assert exit_code() == 0
    handler.status = 503
    assert exit_code() != 0


def exported_metric_names() -> set[str]:
    """Every sample name the consumer, the relay and the read API can export."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "info": ("_info",),
        "gauge": ("",),
    }
    names: set[str] = set()
    for metrics in (ConsumerMetrics(), RelayMetrics(), ApiMetrics()):
        for family in metrics.registry.collect():
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
            names.update(sample.name for sample in family.samples)
    # The API's pool gauges, which exist once it serves (it has a pool then).
    names.update(("orderflow_api_database_connections_in_use", "orderflow_api_database_pool_size"))
    return names


def orderflow_metrics_in(text: str) -> set[str]:
    return set(re.findall(r"\b(orderflow_[a-z0-9_]+)", text))


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    document = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts."""
    found = {}
    for volume in service.get("volumes") or []:
        source, _, rest = str(volume).partition(":")
        if source.startswith("."):
            found[rest.split(":", 1)[0]] = ROOT / source
    return found


def test_prometheus_loads_the_mounted_config_and_rules(
    services: dict[str, dict[str, Any]], prometheus_config: dict[str, Any]
) -> None:
    mounted = mounts(services["prometheus"])
    assert mounted["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus.yml"
    for rule_file in prometheus_config["rule_files"]:
        assert rule_file in mounted, f"rule file {rule_file} is not mounted"
        assert mounted[rule_file].is_file()


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_prometheus_scrapes_every_replica_on_its_metrics_port(
    services: dict[str, dict[str, Any]], prometheus_config: dict[str, Any], name: str
) -> None:
    port = metrics_port(services[name])
    discovered = [
        config
        for job in prometheus_config["scrape_configs"]
        for config in job.get("dns_sd_configs", [])
        if name in config["names"]
    ]
    assert discovered, f"no scrape job discovers {name}"
    # DNS A records: every replica, also after --scale.
    assert all(config["type"] == "A" and config["port"] == port for config in discovered)


def test_prometheus_scrapes_the_api_on_its_http_port(
    services: dict[str, dict[str, Any]], prometheus_config: dict[str, Any]
) -> None:
    port = parse_cli(command_of(services["api"])).params["port"]
    jobs = [
        job
        for job in prometheus_config["scrape_configs"]
        if any("api" in config["names"] for config in job.get("dns_sd_configs", []))
    ]
    assert len(jobs) == 1, "exactly one scrape job should discover the api"
    (job,) = jobs
    assert job.get("metrics_path", "/metrics") == METRICS_PATH
    assert job.get("scheme", "http") == "http"
    # Covered by the OrderflowTargetDown alert (up{job=~"orderflow-.*"}).
    assert job["job_name"].startswith("orderflow-")
    assert all(config["type"] == "A" and config["port"] == port for config in job["dns_sd_configs"])


def test_alert_rules_use_only_exported_metrics() -> None:
    document = yaml.safe_load((DEPLOY / "alerts.yml").read_text(encoding="utf-8"))
    exported = exported_metric_names()
    alerts = [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]
    assert len(alerts) >= 8
    for rule in document["groups"][0]["rules"] + alerts:
        used = orderflow_metrics_in(rule["expr"])
        assert used <= exported, f"{rule.get('alert') or rule['record']}: {used - exported}"
    for alert in alerts:
        assert alert["annotations"]["summary"]
        assert alert["labels"]["severity"] in {"warning", "critical"}


def test_the_grafana_dashboard_is_provisioned_and_uses_exported_metrics(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    mounted = mounts(grafana)
    provisioning = mounted["/etc/grafana/provisioning"]
    datasource = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(
        (provisioning / "dashboards" / "orderflow.yml").read_text(encoding="utf-8")
    )["providers"][0]
    dashboards = [path for path in mounted if path.startswith(provider["options"]["path"] + "/")]
    assert dashboards, "no dashboard file is mounted where the provider reads"
    dashboard = json.loads(mounted[dashboards[0]].read_text(encoding="utf-8"))
    exported = exported_metric_names()
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    assert len(expressions) >= 15
    for expression in expressions:
        assert orderflow_metrics_in(expression) <= exported, expression
    datasources = {
        panel["datasource"]["uid"] for panel in dashboard["panels"] if "datasource" in panel
    }
    assert datasources == {datasource["uid"]}
