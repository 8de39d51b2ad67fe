"""The Kubernetes manifests, ``deploy/kubernetes``, checked without a cluster.

Every manifest is validated against the Kubernetes API's schemas (bundled with
kubernetes-validate, strict: an unknown or misspelt field fails) for the oldest Kubernetes
version the base supports and the newest the validator knows. The rest checks what no
schema can: that the probes, ports and scrape annotations agree with the ConfigMap's
``ORDERFLOW_METRICS_PORT``, that the grace period outlasts the shutdown, that every
variable named is one orderflow reads, that every command is a real ``orderflow``
command, that credentials come from the Secret and never sit in a manifest, and that the
kustomization lists every manifest.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer.main
import yaml

import orderflow.cli.main
from orderflow.api import METRICS_PATH, READY_TIMEOUT_SECONDS
from orderflow.cli.main import API_SHUTDOWN_TIMEOUT_SECONDS
from orderflow.runtime.health import CHECK_TIMEOUT_SECONDS, CLOSE_TIMEOUT_SECONDS, listen_port
from orderflow.runtime.services import CLIENT_STOP_SECONDS, SHUTDOWN_TIMEOUT_SECONDS
from orderflow.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes"
EXAMPLE_SECRET = BASE / "examples" / "secret.yaml"
OPTIONAL = BASE / "optional"

#: The oldest Kubernetes the base is checked for (every field it uses is on by default there;
#: the newest, PodDisruptionBudget's unhealthyPodEvictionPolicy, from 1.27 on), and the
#: newest the validator has schemas for.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())

#: Deployment or Job -> the orderflow command its main container runs.
WORKLOADS = {
    "orderflow-migrate": "migrate",
    "orderflow-consume": "consume",
    "orderflow-relay": "relay",
    "orderflow-api": "api",
}
#: The long-running workers that serve /metrics, /healthz and /readyz on the metrics port.
WORKERS = ("orderflow-consume", "orderflow-relay")
CONFIGMAP = "orderflow-config"
SECRET = "orderflow-credentials"
#: Settings that are secrets: they may only come from the Secret.
SECRET_VARIABLES = ("DATABASE_URL", "KAFKA_SASL_PASSWORD", "KAFKA_SSL_KEY_PASSWORD")

Document = dict[str, Any]


def load_documents(path: Path) -> list[Document]:
    documents = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    assert documents, f"{path.name} holds no document"
    for document in documents:
        assert isinstance(document, dict), f"{path.name}: a document is not a mapping"
    return documents


def kustomization(folder: Path) -> Document:
    (document,) = load_documents(folder / "kustomization.yaml")
    assert document["kind"] == "Kustomization"
    return document


def assemble(folder: Path) -> list[Document]:
    """The documents a kustomization's ``resources`` name, in order (no transformations)."""
    documents = []
    for entry in kustomization(folder)["resources"]:
        path = folder / entry
        assert path.is_file(), f"{folder.name}/kustomization.yaml lists {entry}, not a file"
        documents.extend(load_documents(path))
    return documents


@pytest.fixture(scope="module")
def base() -> list[Document]:
    return assemble(BASE)


@pytest.fixture(scope="module")
def objects(base: list[Document]) -> dict[tuple[str, str], Document]:
    found: dict[tuple[str, str], Document] = {}
    for document in base:
        key = (document["kind"], document["metadata"]["name"])
        assert key not in found, f"{key} is defined twice"
        found[key] = document
    return found


@pytest.fixture(scope="module")
def config(objects: dict[tuple[str, str], Document]) -> dict[str, str]:
    data = objects["ConfigMap", CONFIGMAP]["data"]
    assert isinstance(data, dict)
    return data


def workload(objects: dict[tuple[str, str], Document], name: str) -> Document:
    kind = "Job" if WORKLOADS[name] == "migrate" else "Deployment"
    return objects[kind, name]


def pod_spec(document: Document) -> Document:
    spec = document["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def pod_labels(document: Document) -> dict[str, str]:
    labels = document["spec"]["template"]["metadata"]["labels"]
    assert isinstance(labels, dict)
    return labels


def containers(spec: Document) -> list[Document]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def main_container(document: Document) -> Document:
    spec = pod_spec(document)
    (container,) = spec["containers"]
    assert isinstance(container, dict)
    return container


def every_pod_spec(objects: dict[tuple[str, str], Document]) -> Iterator[tuple[str, Document]]:
    for name in WORKLOADS:
        yield name, pod_spec(workload(objects, name))


def parse_cli(arguments: list[str]) -> Any:
    """The context of the orderflow command these arguments run, parsed as the real CLI
    parses them (an unknown command or option, or a bad value, is a usage error)."""
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


def container_port(container: Document, port: int | str) -> int:
    """A probe's or a Service's port, resolved through the container's named ports."""
    if isinstance(port, int):
        return port
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            number = declared["containerPort"]
            assert isinstance(number, int)
            return number
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


class _Recording(Mapping[str, str]):
    """An empty environment that remembers every variable asked for."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.asked.add(name)
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def settings_variables() -> set[str]:
    """Every environment variable ``Settings.from_env`` reads: its tables and the rest."""
    environment = _Recording()
    Settings.from_env(environment)
    return environment.asked


def cli_variables() -> set[str]:
    """The environment variables the command line's options read (``ORDERFLOW_API_PORT``)."""
    found: set[str] = set()
    pending: list[Any] = [typer.main.get_command(orderflow.cli.main.app)]
    while pending:
        command = pending.pop()
        pending.extend(getattr(command, "commands", {}).values())
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            found.update([envvar] if isinstance(envvar, str) else envvar or [])
    return found


# -- files and the kustomization -------------------------------------------------------


def test_every_manifest_parses() -> None:
    paths = sorted(BASE.rglob("*.yaml"))
    assert len(paths) >= 8
    for path in paths:
        for document in load_documents(path):
            assert document.get("apiVersion"), f"{path.name}: no apiVersion"
            assert document.get("kind"), f"{path.name}: no kind"
            if document["kind"] != "Kustomization":
                assert document.get("metadata", {}).get("name"), f"{path.name}: no name"


def test_the_base_lists_every_manifest_and_nothing_else() -> None:
    listed = kustomization(BASE)["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    on_disk = {path.name for path in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk, (
        f"not listed: {sorted(on_disk - set(listed))}; missing: {sorted(set(listed) - on_disk)}"
    )
    # The example Secret and the CRD-dependent extras stay out of the base.
    assert all("/" not in entry for entry in listed)


def test_the_optional_kustomization_lists_its_folder() -> None:
    listed = kustomization(OPTIONAL)["resources"]
    on_disk = {path.name for path in OPTIONAL.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk


def test_the_example_secret_is_in_no_kustomization() -> None:
    for path in BASE.rglob("kustomization.yaml"):
        for entry in kustomization(path.parent)["resources"]:
            assert (path.parent / entry).resolve() != EXAMPLE_SECRET.resolve()


# -- the Kubernetes schemas ----------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(
    base: list[Document], version: str
) -> None:
    documents = [*base, *load_documents(EXAMPLE_SECRET)]
    errors = []
    for document in documents:
        where = f"{document['kind']}/{document['metadata']['name']}"
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            errors.append(f"{where}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"{where}: {error.message}")
    assert not errors, "\n".join(errors)


def test_the_validator_catches_a_misspelt_field(
    objects: dict[tuple[str, str], Document],
) -> None:
    """The strict schemas refuse unknown fields, which is what catches typos."""
    deployment = objects["Deployment", "orderflow-consume"]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["livenesProbe"] = container.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_base_with_the_image_set(base: list[Document]) -> None:
    """``kubectl kustomize`` (offline) renders the same objects, with the image replaced."""
    rendered_text = subprocess.run(
        ["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    rendered = [doc for doc in yaml.safe_load_all(rendered_text) if doc]
    names = sorted((doc["kind"], doc["metadata"]["name"]) for doc in rendered)
    assert names == sorted((doc["kind"], doc["metadata"]["name"]) for doc in base)
    (image,) = kustomization(BASE)["images"]
    expected = f"{image['newName']}:{image['newTag']}"
    for document in rendered:
        if document["kind"] in {"Deployment", "Job"}:
            for container in containers(pod_spec(document)):
                assert container["image"] == expected
        kubernetes_validate.validate(document, KUBERNETES_VERSIONS[-1], strict=True)


def test_every_container_runs_the_image_kustomize_sets(
    objects: dict[tuple[str, str], Document],
) -> None:
    images = kustomization(BASE)["images"]
    assert [image["name"] for image in images] == ["orderflow"]
    assert images[0].get("newName")
    assert images[0].get("newTag")
    for name, spec in every_pod_spec(objects):
        for container in containers(spec):
            # The bare placeholder: a tag or registry here would not be replaced.
            assert container["image"] == "orderflow", f"{name}/{container['name']}"


# -- commands, ports, probes ---------------------------------------------------------------


def test_containers_run_real_orderflow_commands(objects: dict[tuple[str, str], Document]) -> None:
    group: Any = typer.main.get_command(orderflow.cli.main.app)
    commands = group.commands
    seen = set()
    for name, spec in every_pod_spec(objects):
        for container in containers(spec):
            # `command` would replace the image's ENTRYPOINT (orderflow); `args` follow it.
            assert "command" not in container, f"{name}/{container['name']} replaces orderflow"
            arguments = container["args"]
            assert arguments[0] in commands
            assert parse_cli(arguments).command.name == container["name"]
            seen.add(container["name"])
        assert WORKLOADS[name] in {c["name"] for c in spec["containers"]}
    assert seen == set(WORKLOADS.values())


def test_migrations_run_before_every_long_running_process(
    objects: dict[tuple[str, str], Document],
) -> None:
    job = objects["Job", "orderflow-migrate"]
    assert main_container(job)["args"] == ["migrate"]
    assert pod_spec(job)["restartPolicy"] in {"Never", "OnFailure"}
    for name in ("orderflow-consume", "orderflow-relay", "orderflow-api"):
        spec = pod_spec(workload(objects, name))
        first = spec.get("initContainers", [None])[0]
        assert first is not None, f"{name} starts without migrating"
        assert first["args"] == ["migrate"]
        assert first["image"] == main_container(workload(objects, name))["image"]


@pytest.mark.parametrize("name", WORKERS)
def test_workers_probe_and_announce_the_configured_metrics_port(
    objects: dict[tuple[str, str], Document], config: dict[str, str], name: str
) -> None:
    port = int(config["ORDERFLOW_METRICS_PORT"])
    document = workload(objects, name)
    container = main_container(document)
    # A --metrics-port flag would override the ConfigMap: it must say the same.
    assert parse_cli(container["args"]).params["metrics_port"] in {None, port}
    assert container_port(container, "metrics") == port

    liveness = container["livenessProbe"]
    readiness = container["readinessProbe"]
    assert liveness["httpGet"]["path"] == "/healthz"
    assert readiness["httpGet"]["path"] == "/readyz"
    for probe in (liveness, readiness):
        assert container_port(container, probe["httpGet"]["port"]) == port
        assert probe["timeoutSeconds"] < probe["periodSeconds"]
    # /readyz waits up to CHECK_TIMEOUT_SECONDS for the database and the broker.
    assert readiness["timeoutSeconds"] > CHECK_TIMEOUT_SECONDS
    # A restart only after the event loop has been stuck for 30 s or more.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30

    annotations = document["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == METRICS_PATH


def test_the_api_serves_probes_metrics_and_its_service_on_one_port(
    objects: dict[tuple[str, str], Document],
) -> None:
    document = objects["Deployment", "orderflow-api"]
    container = main_container(document)
    params = parse_cli(container["args"]).params
    # Every interface (the Service reaches the pod's address), on the declared port.
    assert params["host"] == "0.0.0.0"
    port = params["port"]
    assert container_port(container, "http") == port
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in (container["livenessProbe"], container["readinessProbe"]):
        assert container_port(container, probe["httpGet"]["port"]) == port
        assert probe["timeoutSeconds"] < probe["periodSeconds"]
    assert container["readinessProbe"]["timeoutSeconds"] > READY_TIMEOUT_SECONDS
    annotations = document["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == METRICS_PATH

    service = objects["Service", "orderflow-api"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert selects(service["spec"]["selector"], pod_labels(document))
    for entry in service["spec"]["ports"]:
        assert container_port(container, entry["targetPort"]) == port


@pytest.mark.parametrize("name", WORKERS)
def test_workers_get_time_to_drain_after_sigterm(
    objects: dict[tuple[str, str], Document], name: str
) -> None:
    """The batch in flight (SHUTDOWN_TIMEOUT_SECONDS), then the Kafka client's stop and the
    health endpoint's close: all before the kubelet's SIGKILL."""
    grace = pod_spec(workload(objects, name))["terminationGracePeriodSeconds"]
    assert grace > SHUTDOWN_TIMEOUT_SECONDS
    assert grace > SHUTDOWN_TIMEOUT_SECONDS + CLIENT_STOP_SECONDS + CLOSE_TIMEOUT_SECONDS


def test_the_api_gets_time_to_leave_the_service_and_finish_requests(
    objects: dict[tuple[str, str], Document],
) -> None:
    spec = pod_spec(objects["Deployment", "orderflow-api"])
    command = main_container(objects["Deployment", "orderflow-api"])["lifecycle"]["preStop"][
        "exec"
    ]["command"]
    assert command[0] == "sleep"
    delay = float(command[1])
    assert delay > 0
    assert spec["terminationGracePeriodSeconds"] > delay + API_SHUTDOWN_TIMEOUT_SECONDS


# -- configuration and credentials ---------------------------------------------------------


def test_every_variable_named_is_one_orderflow_reads(
    objects: dict[tuple[str, str], Document], config: dict[str, str]
) -> None:
    known = settings_variables()
    # The recorder sees the tables and the variables read one by one.
    assert {"DATABASE_URL", "ORDERFLOW_METRICS_PORT", "ORDERFLOW_PARK_TIMEOUT_S"} <= known
    assert {"ORDERFLOW_LOG_FORMAT", "KAFKA_SASL_PASSWORD", "ORDERFLOW_DB_SSLMODE"} <= known

    assert set(config) <= known, f"unknown: {sorted(set(config) - known)}"
    for name, spec in every_pod_spec(objects):
        for container in containers(spec):
            named = {entry["name"] for entry in container.get("env", [])}
            assert named <= known, f"{name}/{container['name']}: {sorted(named - known)}"
    # Also those named in comments and in the example Secret, where the command line's own
    # variables may be spoken of: a typo there misleads too.
    readable = known | cli_variables()
    assert "ORDERFLOW_API_PORT" in readable
    for path in BASE.rglob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        mentioned = set(re.findall(r"\b(?:ORDERFLOW|KAFKA|DATABASE)_[A-Z0-9_]*[A-Z0-9]\b", text))
        assert mentioned <= readable, f"{path.name}: {sorted(mentioned - readable)}"


def test_the_configmap_is_a_valid_configuration(config: dict[str, str]) -> None:
    assert all(isinstance(value, str) for value in config.values())
    settings = Settings.from_env({**config, "DATABASE_URL": "postgresql://u:p@db:5432/orders"})
    assert settings.require_kafka()
    assert listen_port(settings) == int(config["ORDERFLOW_METRICS_PORT"])
    assert settings.log_format == "json"
    assert "ORDERFLOW_PARK_TIMEOUT_S" in config


def test_credentials_come_from_the_secret_and_are_never_embedded(
    base: list[Document], objects: dict[tuple[str, str], Document], config: dict[str, str]
) -> None:
    assert not [doc for doc in base if doc["kind"] == "Secret"], "a Secret in the base"
    for variable in SECRET_VARIABLES:
        assert variable not in config
    assert not [key for key in config if "PASSWORD" in key]

    referenced: set[str] = set()
    environments = []
    for name, spec in every_pod_spec(objects):
        for container in containers(spec):
            where = f"{name}/{container['name']}"
            env = {entry["name"]: entry for entry in container.get("env", [])}
            assert container.get("envFrom") == [{"configMapRef": {"name": CONFIGMAP}}], where
            database = env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
            assert database["name"] == SECRET, where
            assert not database.get("optional", False), where
            for variable, entry in env.items():
                if variable in SECRET_VARIABLES or "PASSWORD" in variable:
                    assert "value" not in entry, f"{where}: {variable} is written out"
                    reference = entry["valueFrom"]["secretKeyRef"]
                    assert reference["name"] == SECRET, where
                    referenced.add(reference["key"])
            environments.append((container.get("envFrom"), container.get("env")))
    # One environment for every container: none of them misses a setting the others have.
    assert all(environment == environments[0] for environment in environments)

    (example,) = load_documents(EXAMPLE_SECRET)
    assert example["kind"] == "Secret"
    assert example["metadata"]["name"] == SECRET
    keys = set(example.get("stringData", {})) | set(example.get("data", {}))
    assert "DATABASE_URL" in keys
    assert keys <= referenced


def test_the_readme_creates_the_secret_the_pods_read() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "kubectl apply -k deploy/kubernetes" in readme
    created = re.findall(
        r"kubectl create secret generic (\S+)((?:\s+\\?\s*--from-literal=\w+)+)", readme
    )
    assert created, "the README does not say how to create the Secret"
    for name, options in created:
        assert name == SECRET
        keys = set(re.findall(r"--from-literal=(\w+)", options))
        assert "DATABASE_URL" in keys
        assert keys <= set(SECRET_VARIABLES)


# -- replicas, disruption budgets, scheduling -------------------------------------------------


def disruption_budget(objects: dict[tuple[str, str], Document], name: str) -> Document:
    """The one PodDisruptionBudget selecting the Deployment's pods, which selects no other's."""
    labels = pod_labels(objects["Deployment", name])
    budgets = [
        doc
        for (kind, _), doc in objects.items()
        if kind == "PodDisruptionBudget" and selects(doc["spec"]["selector"]["matchLabels"], labels)
    ]
    assert len(budgets) == 1, f"{len(budgets)} disruption budgets cover {name}"
    others = [
        doc for (kind, other), doc in objects.items() if kind == "Deployment" and other != name
    ]
    for other in others:
        assert not selects(budgets[0]["spec"]["selector"]["matchLabels"], pod_labels(other))
    return budgets[0]


def test_consumers_are_no_more_than_the_partitions(
    objects: dict[tuple[str, str], Document],
) -> None:
    replicas = objects["Deployment", "orderflow-consume"]["spec"]["replicas"]
    partitions = parse_cli(["topics", "create"]).params["partitions"]
    # More members than partitions would be idle standbys.
    assert 2 <= replicas <= partitions
    budget = disruption_budget(objects, "orderflow-consume")
    assert budget["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in budget["spec"]


def test_two_or_three_relays_and_one_always_up(objects: dict[tuple[str, str], Document]) -> None:
    replicas = objects["Deployment", "orderflow-relay"]["spec"]["replicas"]
    assert replicas in {2, 3}
    budget = disruption_budget(objects, "orderflow-relay")
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["minAvailable"] < replicas


def test_the_api_keeps_a_replica_through_disruptions(
    objects: dict[tuple[str, str], Document],
) -> None:
    replicas = objects["Deployment", "orderflow-api"]["spec"]["replicas"]
    budget = disruption_budget(objects, "orderflow-api")
    assert budget["spec"]["maxUnavailable"] < replicas


def test_selectors_match_their_pods(objects: dict[tuple[str, str], Document]) -> None:
    for (kind, name), document in objects.items():
        if kind != "Deployment":
            continue
        labels = pod_labels(document)
        assert selects(document["spec"]["selector"]["matchLabels"], labels), name
        assert labels["app.kubernetes.io/component"] == WORKLOADS[name]
        for constraint in pod_spec(document).get("topologySpreadConstraints", []):
            assert selects(constraint["labelSelector"]["matchLabels"], labels), name


# -- security and resources ----------------------------------------------------------------


def dockerfile_uid() -> int:
    match = re.search(r"useradd\b[^\n]*--uid (\d+)", (ROOT / "Dockerfile").read_text("utf-8"))
    assert match, "the Dockerfile creates no user with a fixed uid"
    return int(match.group(1))


def test_pods_run_locked_down(objects: dict[tuple[str, str], Document]) -> None:
    uid = dockerfile_uid()
    for name, spec in every_pod_spec(objects):
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True, name
        # The image's USER is a name, which the kubelet cannot check as non-root.
        assert security["runAsUser"] == uid, name
        assert security["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        # Service links would put ORDERFLOW_API_PORT=tcp://... into the environment.
        assert spec["enableServiceLinks"] is False, name
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        for container in containers(spec):
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert not context["capabilities"].get("add"), where
            assert context.get("privileged", False) is False, where
            # A writable /tmp on the read-only root, for what an operator runs in the pod.
            tmp = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/tmp"]
            assert tmp, f"{where} has no writable /tmp"
            assert "emptyDir" in volumes[tmp[0]["name"]], where


def quantity(text: str | int) -> float:
    """A Kubernetes quantity (``500m``, ``192Mi``, ``1``) as a number."""
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(text))
    assert match, f"not a quantity: {text!r}"
    assert match.group(2) in {"", *suffixes}, f"unknown unit in {text!r}"
    return float(match.group(1)) * suffixes.get(match.group(2), 1)


def test_every_container_requests_what_it_needs(objects: dict[tuple[str, str], Document]) -> None:
    for name, spec in every_pod_spec(objects):
        for container in containers(spec):
            where = f"{name}/{container['name']}"
            resources = container["resources"]
            requests, limits = resources["requests"], resources.get("limits", {})
            assert quantity(requests["cpu"]) > 0, where
            # orderflow's processes hold about 80-90 MiB once loaded (measured).
            assert quantity(requests["memory"]) >= 128 * 2**20, where
            assert quantity(limits["memory"]) >= quantity(requests["memory"]), where
    consume = main_container(objects["Deployment", "orderflow-consume"])["resources"]
    relay = main_container(objects["Deployment", "orderflow-relay"])["resources"]
    # The consumer spends about three times the relay's CPU per event.
    assert quantity(consume["requests"]["cpu"]) > quantity(relay["requests"]["cpu"])


# -- Prometheus --------------------------------------------------------------------------


def test_the_podmonitor_scrapes_what_the_pods_serve_under_the_alerts_job_names(
    objects: dict[tuple[str, str], Document],
) -> None:
    (monitor,) = assemble(OPTIONAL)
    assert monitor["kind"] == "PodMonitor"
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text("utf-8"))
    job_names = {job["job_name"] for job in prometheus["scrape_configs"]}

    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = set()
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["path"] == METRICS_PATH
        (relabel,) = endpoint["relabelings"]
        assert relabel["targetLabel"] == "job"
        (source,) = relabel["sourceLabels"]
        label = source.removeprefix("__meta_kubernetes_pod_label_")
        for name in WORKLOADS:
            document = workload(objects, name)
            labels = pod_labels(document)
            if not selects(selector, labels):
                continue
            if endpoint["port"] not in {
                p.get("name") for p in main_container(document).get("ports", [])
            }:
                continue
            value = next(v for k, v in labels.items() if re.sub(r"[^a-zA-Z0-9]", "_", k) == label)
            job = relabel["replacement"].replace("$1", value)
            assert job in job_names, f"{name} scraped as job {job}"
            scraped.add(name)
    assert scraped == {"orderflow-consume", "orderflow-relay", "orderflow-api"}
