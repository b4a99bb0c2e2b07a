"""Real servers on 127.0.0.1 for the tests: nginx for shards, a deliberately flaky one, and an
MLflow tracking server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class Nginx:
    """nginx serving ``root`` on 127.0.0.1; ``errors`` maps paths to HTTP status codes."""

    def __init__(self, root: Path, workdir: Path, errors: dict[str, int] | None = None) -> None:
        self.binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        error_locations = "".join(f"location = {path} {{ return {code}; }}\n" for path, code in (errors or {}).items())
        user = "user root;" if os.geteuid() == 0 else ""  # as root, workers would drop to nobody
        self.config = workdir / "nginx.conf"
        self.config.write_text(f"""
{user}
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    server {{
        listen 127.0.0.1:{self.port};
        root {root};
        {error_locations}
    }}
}}
""")
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Nginx":
        self.process = subprocess.Popen([self.binary, "-c", str(self.config), "-p", str(self.workdir)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.process.kill()
            raise RuntimeError(f"nginx did not start: {self.process.stderr.read().decode()}") from None
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class FlakyServer:
    """Serves files from ``root`` but cuts the connection halfway through the body of the
    paths in ``drops`` (path -> how many requests to cut; -1: every one)."""

    def __init__(self, root: Path, drops: dict[str, int]) -> None:
        self.root, self.drops, self.requests = root, dict(drops), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append(self.path)
                file = server.root / self.path.lstrip("/")
                if not file.is_file():
                    self.send_error(404)
                    return
                body = file.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                remaining = server.drops.get(self.path, 0)
                if remaining != 0:
                    server.drops[self.path] = remaining - 1 if remaining > 0 else -1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-shard
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "FlakyServer":
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class MlflowServer:
    """``argv`` (an ``mlflow server`` command listening on 127.0.0.1:``port``) as a real process,
    ready once ``/health`` answers. It runs in its own process group: the server forks workers,
    and they end with it."""

    def __init__(self, argv: list[str], port: int, log: Path, env: dict | None = None, timeout: float = 180) -> None:
        self.argv, self.port, self.log, self.env, self.timeout = argv, port, log, env, timeout
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "MlflowServer":
        with open(self.log, "ab") as out:  # a server started again adds to its log
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)  # fmt: skip
        # Importing mlflow and creating the SQLite schema take a while on a busy 2-core machine.
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.process.returncode}):\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(f"mlflow server not healthy after {self.timeout} s:\n{self.log.read_text()[-4000:]}")

    def __exit__(self, *exc) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:  # the whole group has ended already
            return
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def start(self) -> "MlflowServer":
        """``with`` for a server a test stops and starts again (the same port and store)."""
        return self.__enter__()

    def stop(self) -> None:
        if self.process is not None:
            self.__exit__()
            self.process = None

    def kill(self) -> None:
        """Gone at once (SIGKILL to the whole group), as in a crash or a lost machine: nothing
        answers from here on, not even the requests already in flight."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)
            self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def local_mlflow_server(store: Path, port: int | None = None, env: dict | None = None) -> MlflowServer:
    """``mlflow server`` (not started) on 127.0.0.1, a SQLite backend and the artifacts under
    ``store``, one worker, no job runner (it only costs start-up time on a busy machine)."""
    import sys

    port = port or free_port()
    store.mkdir(parents=True, exist_ok=True)
    argv = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts"),
            "--workers", "1"]  # fmt: skip
    env = {**(env if env is not None else os.environ), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return MlflowServer(argv, port, log=store / "server.log", env=env)
