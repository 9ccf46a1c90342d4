"""A real `blade serve` process on localhost over every zoo model (tiny) and a tiny LM, shared by the server tests."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import blade
import blade.models

ZOO = blade.models.names()
LM_FACTORY = "blade.models.hf_lm:gpt2_tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Server:
    """A `python -m blade serve ...` child process and its ports; stop() sends SIGTERM and waits."""

    def __init__(self, args, log_path):
        self.http, self.grpc = free_port(), free_port()
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "blade", "serve", *map(str, args),
                                         "--http-port", str(self.http), "--grpc-port", str(self.grpc)],
                                        stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ})

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http}"

    def wait_live(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited: {self.tail()}"
            try:
                if get(f"http://{self.url}/v2/health/live")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the server never answered liveness: {self.tail()}")

    def wait_ready(self, models, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        for model in models:
            while get(f"http://{self.url}/v2/models/{model}/ready")[0] != 200:
                assert self.process.poll() is None, f"the server exited: {self.tail()}"
                assert time.monotonic() < deadline, f"model {model} never became ready: {self.tail()}"
                time.sleep(0.1)

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def tail(self) -> str:
        self.log.flush()
        return open(self.log_path).read()[-3000:]


@pytest.fixture(scope="session")
def zoo_artifacts(tmp_path_factory):
    """name -> artifact directory, every zoo model at its tiny size (the onnxruntime backend)."""
    root = tmp_path_factory.mktemp("serve-zoo")
    paths = {}
    for name in ZOO:
        model, example_inputs, dynamic_shapes = blade.models.get(name, size="tiny")
        compiled = blade.compile(model, example_inputs, dynamic_shapes=dynamic_shapes, backend="onnxruntime")
        paths[name] = root / f"{name}.blade"
        compiled.save(paths[name])
    return paths


@pytest.fixture(scope="session")
def server(zoo_artifacts, tmp_path_factory):
    """One server hosting the whole zoo and the tiny LM: a 20 ms batching window, a 1 MiB request limit."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    proc = Server([*zoo_artifacts.values(), "--max-delay-ms", "20", "--max-request-mb", "1",
                   "--lm", LM_FACTORY, "--lm-max-batch", "4", "--lm-max-length", "128"], log)
    try:
        proc.wait_live()
        proc.wait_ready([*zoo_artifacts, "lm"])
        yield proc
    finally:
        proc.stop()
