"""KServe deployment files from an artifact: an InferenceService manifest (a custom predictor running `blade serve`),
built with the KServe SDK's own models, and a container recipe."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from blade.errors import InputError
from blade.serve.options import checked_artifacts

MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts what STORAGE_URI names
HTTP_PORT = 8080


@dataclass
class KServeExport:
    """What `export_kserve` wrote."""

    directory: Path
    manifest: Path
    dockerfile: Path
    service_name: str
    model_name: str
    baked: bool  # the artifact is copied into the image (no --storage-uri)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in vars(self).items()}


def service_name(model_name: str) -> str:
    """A Kubernetes name (DNS-1035 label) for the InferenceService of `model_name`."""
    name = re.sub(r"[^a-z0-9-]", "-", model_name.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"blade-{name}".rstrip("-")
    return name[:63].rstrip("-")


def export_kserve(artifact, directory, *, name: str | None = None, image: str | None = None,
                  storage_uri: str | None = None, min_replicas: int = 1, max_replicas: int = 1, cpu: str = "2",
                  memory: str = "4Gi", gpus: int | None = None, serve_args: list[str] | None = None) -> KServeExport:
    """Write `directory/inferenceservice.yaml` and `directory/Dockerfile` (and the artifact, unless `storage_uri`
    says where KServe's storage initializer fetches it from)."""
    from blade import __version__
    from blade.runtime.artifact import read_manifest

    [(model_name, root)] = checked_artifacts([artifact], [name] if name else None)
    if not 0 <= min_replicas <= max_replicas or max_replicas < 1:
        raise InputError(f"replicas: need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got "
                         f"{min_replicas} and {max_replicas}")
    device = read_manifest(root)["target"]["device"]
    gpus = gpus if gpus is not None else (1 if device == "cuda" else 0)
    out = Path(directory)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} exists and is not empty; choose a new directory")
    import kubernetes.client as k8s
    import yaml

    from blade.serve.kserve_import import kserve  # after the checks: they need no KServe

    out.mkdir(parents=True, exist_ok=True)
    notes = []
    isvc_name = service_name(model_name)
    image = image or f"blade-serve-{isvc_name}:{__version__}"
    limits = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    env = [k8s.V1EnvVar(name="STORAGE_URI", value=storage_uri)] if storage_uri else None
    args = [MODEL_DIR, "--name", model_name, "--http-port", str(HTTP_PORT), "--no-grpc", *(serve_args or [])]
    probe = lambda path, delay: k8s.V1Probe(http_get=k8s.V1HTTPGetAction(path=path, port=HTTP_PORT),  # noqa: E731
                                            initial_delay_seconds=delay, period_seconds=5)
    container = k8s.V1Container(
        name="kserve-container", image=image, command=["blade", "serve"], args=args, env=env,
        ports=[k8s.V1ContainerPort(container_port=HTTP_PORT, protocol="TCP")],
        resources=k8s.V1ResourceRequirements(requests={"cpu": cpu, "memory": memory}, limits=limits),
        readiness_probe=probe(f"/v2/models/{model_name}/ready", 5), liveness_probe=probe("/v2/health/live", 5))
    service = kserve.V1beta1InferenceService(
        api_version=f"{kserve.constants.KSERVE_GROUP}/v1beta1", kind="InferenceService",
        metadata=k8s.V1ObjectMeta(name=isvc_name, labels={"app.kubernetes.io/managed-by": "blade"}),
        spec=kserve.V1beta1InferenceServiceSpec(predictor=kserve.V1beta1PredictorSpec(
            min_replicas=min_replicas, max_replicas=max_replicas, containers=[container])))
    data = kserve.ApiClient().sanitize_for_serialization(service)
    _round_trip(kserve, data)
    manifest = out / "inferenceservice.yaml"
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    baked = storage_uri is None
    if baked:
        shutil.copytree(root, out / "model.blade")
    else:
        notes.append(f"KServe's storage initializer fetches {storage_uri} into {MODEL_DIR}: upload the artifact "
                     "directory there")
    dockerfile = out / "Dockerfile"
    dockerfile.write_text(_dockerfile(__version__, baked, device))
    notes.append(f"build and push the image: docker build -t {image} {out} && docker push {image}; then "
                 f"kubectl apply -f {manifest}")
    notes.append("the container serves REST (v2) on 8080; KServe routes one port per predictor: for gRPC serve "
                 "a second InferenceService with --grpc-port and a port named h2c")
    return KServeExport(out, manifest, dockerfile, isvc_name, model_name, baked, notes)


def _round_trip(kserve, data: dict) -> None:
    """Read the manifest back into the SDKs' models (KServe's and the Kubernetes client's, whose setters check
    required fields and types): what KServe's client would send."""
    import kubernetes.client.models as k8s_models

    def build(value, kind: str):
        if value is None:
            return None
        if kind.startswith("list["):
            return [build(v, kind[5:-1]) for v in value]
        if kind.startswith("dict("):
            inner = kind[5:-1].split(", ", 1)[1]
            return {k: build(v, inner) for k, v in value.items()}
        model = getattr(kserve.models, kind, None) or getattr(k8s_models, kind, None)
        if model is None:
            return value  # str, int, bool, object
        unknown = set(value) - set(model.attribute_map.values())
        if unknown:
            raise InputError(f"the generated manifest has fields {sorted(unknown)} that KServe's {kind} lacks")
        fields = {attr: build(value[key], model.openapi_types[attr]) for attr, key in model.attribute_map.items()
                  if key in value}
        return model(**fields)

    parsed = build(json.loads(json.dumps(data)), "V1beta1InferenceService")
    assert parsed.kind == "InferenceService" and parsed.spec.predictor.containers[0].name == "kserve-container"


def _dockerfile(version: str, baked: bool, device: str) -> str:
    base = "python:3.11-slim" if device == "cpu" else "nvidia/cuda:12.4.1-runtime-ubuntu22.04"
    torch_index = ("--index-url https://download.pytorch.org/whl/cpu " if device == "cpu" else "")
    lines = [
        "# blade serve for KServe: a custom predictor image (docs/serving.md)",
        f"ARG BASE_IMAGE={base}",
        "FROM ${BASE_IMAGE}",
        "# BLADE_SPEC may name a wheel you copy in, e.g. ./blade_compiler-" + version + "-py3-none-any.whl",
        f'ARG BLADE_SPEC="blade-compiler[serve]=={version}"',
        *(["RUN apt-get update && apt-get install -y --no-install-recommends python3-pip && rm -rf /var/lib/apt/lists/*"]
          if device != "cpu" else []),
        f"RUN pip install --no-cache-dir {torch_index}torch && pip install --no-cache-dir \"${{BLADE_SPEC}}\""
        + ("" if device == "cpu" else " onnxruntime-gpu"),
        *([f"COPY model.blade {MODEL_DIR}"] if baked else []),
        f"EXPOSE {HTTP_PORT}",
        'ENTRYPOINT ["blade", "serve"]',
        f'CMD ["{MODEL_DIR}", "--http-port", "{HTTP_PORT}", "--no-grpc"]',
        "",
    ]
    return "\n".join(lines)
