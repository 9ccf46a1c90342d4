"""A server's life: 503 while its model loads, refusals at start, and a SIGTERM that drains in-flight requests."""
import signal
import threading
import time

import numpy as np
import pytest
import tritonclient.http as httpclient

import blade
import blade.models
from tests.helpers import run_cli
from tests.serve.conftest import Server, get
from tests.serve.test_server import infer


def test_loading_answers_503_then_serves_and_sigterm_drains_in_flight_requests(zoo_artifacts, tmp_path):
    # a long warm-up keeps the model loading for a while after the server is live
    server = Server([zoo_artifacts["bert"], "--warmup", "3000", "--max-delay-ms", "400", "--no-grpc"],
                    tmp_path / "server.log")
    try:
        server.wait_live()
        body = (b'{"inputs": [{"name": "input_ids", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]},'
                b'{"name": "attention_mask", "shape": [1, 4], "datatype": "INT64", "data": [1, 1, 1, 1]}]}')
        statuses = []
        while True:
            statuses.append(_post_status(server, body))
            if statuses[-1] == 200:
                break
            assert statuses[-1] == 503, (statuses, server.tail())
            time.sleep(0.05)
        assert statuses[0] == 503, f"never saw the model loading: {statuses}"

        compiled = blade.load(zoo_artifacts["bert"])
        requests = [blade.models.sample_inputs("bert", batch=1, seq=6, seed=i) for i in range(6)]
        results, errors = {}, []

        def client_thread(i):
            try:
                client = httpclient.InferenceServerClient(server.url, network_timeout=60)
                results[i] = infer(httpclient, client, "bert", ["input_ids", "attention_mask"], requests[i])
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        time.sleep(0.15)  # they are in the 400 ms batching window now
        server.process.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        assert not errors, f"in-flight requests lost at shutdown: {errors}\n{server.tail()}"
        for i, result in results.items():
            assert np.array_equal(result.as_numpy("output_1"), compiled.run_flat(list(requests[i]))[1].numpy())
        assert server.process.wait(60) == 0, server.tail()
    finally:
        server.stop()


def _post_status(server, body: bytes) -> int:
    import urllib.request

    request = urllib.request.Request(f"http://{server.url}/v2/models/bert/infer", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_serve_refuses_what_it_cannot_serve(tmp_path):
    result = run_cli("serve")
    assert result.returncode == 1 and "nothing to serve" in result.stderr
    result = run_cli("serve", tmp_path / "missing.blade")
    assert result.returncode == 1 and "not a blade artifact" in result.stderr
    result = run_cli("serve", tmp_path / "a.blade", tmp_path / "b.blade", "--name", "x")
    assert result.returncode == 1 and ("one name per artifact" in result.stderr or "not a blade artifact" in
                                       result.stderr)


def test_an_artifact_that_mutates_state_is_refused_at_load(tmp_path):
    import torch

    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(1))

        def forward(self, x):
            self.seen.add_(1)
            return x * 2

    path = tmp_path / "counter.blade"
    blade.compile(Counter(), (torch.ones(2, 3),), backend="eager").save(path)
    server = Server([path, "--no-grpc"], tmp_path / "server.log")
    try:
        assert server.process.wait(120) == 1
        assert "writes back into" in server.tail() and "outputs of the model" in server.tail()
    finally:
        server.stop()
