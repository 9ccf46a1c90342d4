"""A blade artifact as a KServe model: Open Inference Protocol (v2) tensors in and out, checked, dynamically batched."""
from __future__ import annotations

import time

import numpy as np
import torch

from blade.errors import BackendError, BladeError
from blade.serve import metrics
from blade.serve.batching import Batcher, batch_dim
from blade.serve.kserve_import import kserve
from blade.serve.options import ServeOptions

V2_DTYPES = {torch.float32: "FP32", torch.float16: "FP16", torch.float64: "FP64", torch.int64: "INT64",
             torch.int32: "INT32", torch.int16: "INT16", torch.int8: "INT8", torch.uint8: "UINT8",
             torch.bool: "BOOL"}


def tensor_spec(name: str, meta) -> dict:
    """A v2 metadata entry: name, datatype, shape with -1 where the dim is dynamic."""
    if meta.dtype not in V2_DTYPES:
        raise BackendError(f"tensor {name} is {meta.dtype}, which the Open Inference Protocol cannot carry "
                           "(bfloat16 has no v2 datatype here); compile with float32 inputs and outputs "
                           "(keep_output_dtype=True, the default)")
    return {"name": name, "datatype": V2_DTYPES[meta.dtype],
            "shape": [d if isinstance(d, int) else -1 for d in meta.shape]}


class ArtifactModel(kserve.Model):
    """Serves the blade artifact at `path` under `name`; loads it with blade.load (no model code, no pickle)."""

    def __init__(self, name: str, path, options: ServeOptions | None = None, executor=None, concurrency: int = 1):
        super().__init__(name)
        self.path = path
        self.options = options or ServeOptions()
        self.executor, self.concurrency = executor, concurrency
        self.ready = False
        self.compiled = None
        self.batcher: Batcher | None = None
        self.notes: list[str] = []

    def load(self) -> bool:
        import blade

        compiled = blade.load(self.path)
        graph = compiled.graph
        if graph.mutations:
            raise BackendError(f"{self.path} writes back into {graph.mutations} (inputs it mutates, or state it "
                               "keeps): concurrent requests share no tensors, so it cannot be served; make the new "
                               "values outputs of the model instead")
        for i, out in enumerate(graph.outputs):
            if not hasattr(getattr(out, "val", None), "shape"):
                raise BackendError(f"output {i} of {graph.name} is not a tensor ({out!r}); the server returns "
                                   "tensors only — return it as a tensor from the model")
        self.inputs = [tensor_spec(n.name, n.val) for n in graph.user_inputs]
        self.outputs = [tensor_spec(f"output_{i}", out.val) for i, out in enumerate(graph.outputs)]
        dim, why_not = batch_dim(graph, self.options.batch_dim)
        if why_not:
            self.notes.append(why_not)
        max_rows = self._max_rows(graph, dim)
        self.batcher = Batcher(compiled.run_flat, batched=dim is not None, max_rows=max_rows,
                               max_delay=self.options.max_delay_ms / 1000, executor=self.executor,
                               on_batch=lambda requests, rows: metrics.batch_done(self.name, requests, rows),
                               concurrency=self.concurrency)
        for _ in range(self.options.warmup):
            compiled.run_flat(list(compiled.example_inputs))
        self.compiled = compiled
        self.ready = True
        return True

    def _max_rows(self, graph, dim: str | None) -> int:
        if dim is None:
            return 1
        high = graph.dims[dim].max
        asked = self.options.max_batch
        if asked is None:
            return min(int(high), 64) if high is not None else 64
        if asked < 1 or (high is not None and asked > high):
            raise BackendError(f"--max-batch {asked} is outside the artifact's range for {dim}: "
                               f"[1, {'inf' if high is None else high}]")
        return asked

    def get_input_types(self) -> list[dict]:
        return self.inputs if self.ready else []

    def get_output_types(self) -> list[dict]:
        return self.outputs if self.ready else []

    async def predict(self, payload, headers=None, response_headers=None):
        started = time.perf_counter()
        try:
            tensors = self._request_tensors(payload)
            try:
                outputs = await self.batcher.submit(tensors)
            except BladeError as exc:
                raise kserve.errors.InvalidInput(str(exc)) from None
            except RuntimeError as exc:
                if "shutting down" in str(exc):
                    raise kserve.errors.ServerNotReady(str(exc)) from None
                raise kserve.errors.InferenceError(f"{self.name}: the backend failed on this batch: {exc}") from None
            except Exception as exc:
                raise kserve.errors.InferenceError(f"{self.name}: the backend failed on this batch: {exc}") from None
            response = self._response(payload, outputs)
        except kserve.errors.InvalidInput:
            metrics.request_done(self.name, "invalid", time.perf_counter() - started)
            raise
        except Exception:
            metrics.request_done(self.name, "error", time.perf_counter() - started)
            raise
        metrics.request_done(self.name, "ok", time.perf_counter() - started)
        return response

    def _request_tensors(self, payload) -> list[torch.Tensor]:
        """The request's inputs as the artifact's flat tensors, every name, dtype and dim checked."""
        if not isinstance(payload, kserve.InferRequest):
            raise kserve.errors.InvalidInput(f"model {self.name} takes Open Inference Protocol (v2) requests "
                                             "({'inputs': [{name, shape, datatype, data}]}), not v1 instances")
        expected = {spec["name"]: spec for spec in self.inputs}
        given, size = {}, 0
        for item in payload.inputs:
            if item.name not in expected:
                raise kserve.errors.InvalidInput(f"model {self.name} has no input {item.name!r}; its inputs are "
                                                 f"{list(expected)}")
            if item.name in given:
                raise kserve.errors.InvalidInput(f"input {item.name!r} is given twice")
            want = expected[item.name]["datatype"]
            if item.datatype != want:
                raise kserve.errors.InvalidInput(f"input {item.name!r}: datatype {item.datatype}, but model "
                                                 f"{self.name} takes {want}")
            try:
                array = item.as_numpy()
            except kserve.errors.InvalidInput:
                raise
            except Exception as exc:  # wrong element count for the shape, or data of the wrong kind
                raise kserve.errors.InvalidInput(f"input {item.name!r}: its data does not match shape {item.shape} "
                                                 f"and datatype {item.datatype} ({exc})") from None
            size += array.nbytes
            if size > self.options.max_request_bytes:
                raise kserve.errors.InvalidInput(f"the request's tensors exceed the server's limit of "
                                                 f"{self.options.max_request_bytes} bytes; split it")
            given[item.name] = torch.from_numpy(np.ascontiguousarray(array))
        try:
            return self.compiled.named_inputs(given, source=f"the request to {self.name}")
        except BladeError as exc:
            raise kserve.errors.InvalidInput(str(exc)) from None

    def _response(self, payload, outputs: list[torch.Tensor]):
        requested = payload.request_outputs or []
        names = [spec["name"] for spec in self.outputs]
        unknown = [r.name for r in requested if r.name not in names]
        if unknown:
            raise kserve.errors.InvalidInput(f"model {self.name} has no output(s) {unknown}; its outputs are {names}")
        chosen = {r.name for r in requested} or set(names)
        infer_outputs = []
        for spec, value in zip(self.outputs, outputs):
            if spec["name"] not in chosen:
                continue
            array = value.detach().cpu().contiguous().numpy()
            out = kserve.InferOutput(name=spec["name"], shape=list(array.shape), datatype=spec["datatype"])
            out.set_data_from_numpy(array, binary_data=payload.use_binary_outputs)
            infer_outputs.append(out)
        return kserve.InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=infer_outputs,
                                    from_grpc=payload.from_grpc, use_binary_outputs=payload.use_binary_outputs,
                                    requested_outputs=payload.request_outputs or None)
