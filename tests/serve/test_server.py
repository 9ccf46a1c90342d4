"""`blade serve` as a client sees it: tritonclient over REST and gRPC against a real server process."""
import json
import socket
import threading
import urllib.request

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import blade
import blade.models
from tests.serve.conftest import ZOO, get

V2 = {torch.float32: "FP32", torch.int64: "INT64", torch.int32: "INT32", torch.bool: "BOOL"}


def infer(client_module, client, model: str, names, tensors, **kwargs):
    inputs = []
    for name, tensor in zip(names, tensors):
        item = client_module.InferInput(name, list(tensor.shape), V2[tensor.dtype])
        item.set_data_from_numpy(tensor.numpy())
        inputs.append(item)
    return client.infer(model, inputs, **kwargs)


def batch_kwargs(name: str, batch: int, seed: int) -> dict:
    return {} if name == "gpt_decode" else {"batch": batch}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_every_zoo_model_answers_what_blade_run_gives(server, zoo_artifacts, protocol):
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.url if protocol == "http" else f"127.0.0.1:{server.grpc}")
    for name in ZOO:
        compiled = blade.load(zoo_artifacts[name])
        names = [n.name for n in compiled.graph.user_inputs]
        tensors = list(blade.models.sample_inputs(name, seed=7, **batch_kwargs(name, 2, 7)))
        expected = compiled.run_flat(tensors)
        result = infer(module, client, name, names, tensors)
        for i, want in enumerate(expected):
            got = result.as_numpy(f"output_{i}")
            assert got is not None and np.array_equal(got, want.numpy()), f"{name} output_{i} differs ({protocol})"


def test_metadata_health_and_metrics(server, zoo_artifacts):
    client = httpclient.InferenceServerClient(server.url)
    assert client.is_server_live() and client.is_server_ready()
    for name in ZOO:
        assert client.is_model_ready(name)
    meta = client.get_model_metadata("bert")
    assert meta["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                              {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}]
    assert [o["name"] for o in meta["outputs"]] == ["output_0", "output_1"] and meta["outputs"][1]["shape"] == [-1, 32]
    grpc_meta = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}").get_model_metadata("mlp")
    assert [list(i.shape) for i in grpc_meta.inputs] == [[-1, 16]]
    status, text = get(f"http://{server.url}/metrics")
    text = text.decode()
    assert status == 200 and 'blade_requests_total{model_name="bert",outcome="ok"}' in text
    assert "blade_batch_rows_bucket" in text and "blade_request_latency_seconds_count" in text


def test_concurrent_requests_are_joined_and_each_gets_its_own_answer(server, zoo_artifacts):
    compiled = blade.load(zoo_artifacts["bert"])
    requests = [blade.models.sample_inputs("bert", batch=1 + i % 3, seq=12, seed=100 + i) for i in range(24)]
    expected = [compiled.run_flat(list(r)) for r in requests]
    before = _metric(server, "blade_batch_requests_sum", "bert"), _metric(server, "blade_batch_requests_count", "bert")
    results, errors = [None] * len(requests), []

    def client_thread(i):
        try:
            client = httpclient.InferenceServerClient(server.url)
            results[i] = infer(httpclient, client, "bert", ["input_ids", "attention_mask"], requests[i])
        except Exception as exc:  # reported below, with its request
            errors.append((i, exc))

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, (result, want) in enumerate(zip(results, expected)):
        for k, tensor in enumerate(want):
            assert np.array_equal(result.as_numpy(f"output_{k}"), tensor.numpy()), f"request {i} output_{k}"
    joined = _metric(server, "blade_batch_requests_sum", "bert") - before[0]
    calls = _metric(server, "blade_batch_requests_count", "bert") - before[1]
    assert joined == len(requests) and calls < len(requests), f"{joined} requests in {calls} calls: none joined"


def _metric(server, name: str, model: str) -> float:
    text = get(f"http://{server.url}/metrics")[1].decode()
    line = next(l for l in text.splitlines() if l.startswith(f'{name}{{model_name="{model}"}}'))
    return float(line.split()[-1])


def _post(server, path: str, body: bytes, content_type="application/json") -> tuple[int, dict]:
    request = urllib.request.Request(f"http://{server.url}{path}", data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _v2_body(inputs) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


GOOD = [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}]
BAD_BODIES = {
    "unknown input name": (_v2_body([{**GOOD[0], "name": "x"}]), "has no input 'x'"),
    "wrong datatype": (_v2_body([{**GOOD[0], "datatype": "INT64", "data": [1] * 16}]), "datatype INT64"),
    "wrong static dim": (_v2_body([{**GOOD[0], "shape": [1, 15], "data": [0.5] * 15}]), "dim 1: expected 16"),
    "batch over the range": (_v2_body([{**GOOD[0], "shape": [65, 16], "data": [0.5] * 16 * 65}]), "65"),
    "data not matching its shape": (_v2_body([{**GOOD[0], "data": [0.5] * 5}]), "input"),
    "missing input": (_v2_body([]), "lacks input"),
    "not JSON": (b"{not json", ""),
    "inputs not a list": (json.dumps({"inputs": {"name": "input"}}).encode(), ""),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_rest_input_gets_400_and_the_server_keeps_serving(server, case):
    body, message = BAD_BODIES[case]
    status, answer = _post(server, "/v2/models/mlp/infer", body)
    assert status in (400, 422), (status, answer)
    assert message in json.dumps(answer), answer
    status, answer = _post(server, "/v2/models/mlp/infer", _v2_body(GOOD))
    assert status == 200 and answer["outputs"][0]["name"] == "output_0"


def test_bad_grpc_input_gets_invalid_argument_and_unknown_models_not_found(server):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT.*dim 1: expected 16"):
        infer(grpcclient, client, "mlp", ["input"], [torch.ones(2, 15)])
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT.*datatype INT64"):
        infer(grpcclient, client, "mlp", ["input"], [torch.ones(2, 16, dtype=torch.int64)])
    with pytest.raises(InferenceServerException, match="NOT_FOUND|not found"):
        infer(grpcclient, client, "no_such_model", ["input"], [torch.ones(2, 16)])
    result = infer(grpcclient, client, "mlp", ["input"], [torch.ones(2, 16)])
    assert result.as_numpy("output_0").shape[0] == 2


def test_payloads_over_the_limit_are_refused(server):
    big = torch.zeros(64, 8192)  # 2 MiB of float32, over the server's 1 MiB limit
    status, answer = _post(server, "/v2/models/mlp/infer",
                           _v2_body([{"name": "input", "shape": [64, 8192], "datatype": "FP32",
                                      "data": [0.0] * big.numel()}]))
    assert status == 413 and "limit" in answer["error"]
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    with pytest.raises(InferenceServerException, match="RESOURCE_EXHAUSTED|larger than max"):
        infer(grpcclient, client, "mlp", ["input"], [big])
    assert _post(server, "/v2/models/mlp/infer", _v2_body(GOOD))[0] == 200


def test_a_request_killed_mid_batch_loses_no_other_request(server, zoo_artifacts):
    compiled = blade.load(zoo_artifacts["bert"])
    requests = [blade.models.sample_inputs("bert", batch=2, seq=10, seed=300 + i) for i in range(8)]
    expected = [compiled.run_flat(list(r)) for r in requests]
    results, errors = {}, {}

    def client_thread(i):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
        try:
            # request 3 gives up after 2 ms: it is dropped while its batch forms (the window is 20 ms)
            timeout = 0.002 if i == 3 else None
            results[i] = infer(grpcclient, client, "bert", ["input_ids", "attention_mask"], requests[i],
                               client_timeout=timeout)
        except InferenceServerException as exc:
            errors[i] = exc

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    _abandoned_http_request(server)  # and a REST client that hangs up mid-request
    for t in threads:
        t.join()
    assert set(errors) <= {3} and "DEADLINE" in str(errors.get(3, "DEADLINE"))
    for i, result in results.items():
        for k, tensor in enumerate(expected[i]):
            assert np.array_equal(result.as_numpy(f"output_{k}"), tensor.numpy()), f"request {i}"
    assert _post(server, "/v2/models/mlp/infer", _v2_body(GOOD))[0] == 200


def _abandoned_http_request(server) -> None:
    body = _v2_body([{"name": "input_ids", "shape": [1, 8], "datatype": "INT64", "data": [1] * 8},
                     {"name": "attention_mask", "shape": [1, 8], "datatype": "INT64", "data": [1] * 8}])
    with socket.create_connection(("127.0.0.1", server.http)) as s:
        s.sendall(b"POST /v2/models/bert/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def test_requested_outputs_and_unknown_output_names(server):
    client = httpclient.InferenceServerClient(server.url)
    inputs = [httpclient.InferInput("input", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(np.ones((1, 16), np.float32))
    result = client.infer("mlp", inputs, outputs=[httpclient.InferRequestedOutput("output_0", binary_data=False)])
    assert result.as_numpy("output_0").shape == (1, 8) or result.as_numpy("output_0").shape[0] == 1
    with pytest.raises(InferenceServerException, match="no output"):
        client.infer("mlp", inputs, outputs=[httpclient.InferRequestedOutput("output_9")])
