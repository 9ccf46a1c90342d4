"""`blade export --kserve`: an InferenceService manifest built with KServe's SDK models, a Dockerfile, the artifact.

The export runs as a subprocess: KServe cannot be imported into this process, which has imported
tritonclient.grpc (both register the v2 protobuf messages)."""
import json
import subprocess
import sys

import yaml

from tests.helpers import run_cli


def export(*args):
    return subprocess.run([sys.executable, "-m", "blade", "export", *map(str, args), "--json"], capture_output=True,
                          text=True, timeout=300)


def test_manifest_runs_blade_serve_on_the_artifact_and_reads_back_into_the_sdk(zoo_artifacts, tmp_path):
    out = tmp_path / "deploy"
    result = export(zoo_artifacts["gpt_decode"], "--kserve", out, "--max-replicas", "4", "--max-delay-ms", "3",
                    "--cpu", "4", "--memory", "8Gi")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["service_name"] == "gpt-decode" and info["model_name"] == "gpt_decode" and info["baked"]
    manifest = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    assert manifest["metadata"]["name"] == "gpt-decode"
    predictor = manifest["spec"]["predictor"]
    assert predictor["minReplicas"] == 1 and predictor["maxReplicas"] == 4
    [container] = predictor["containers"]
    assert container["name"] == "kserve-container" and container["command"] == ["blade", "serve"]
    assert container["args"][:3] == ["/mnt/models", "--name", "gpt_decode"] and "--max-delay-ms" in container["args"]
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "8Gi"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/gpt_decode/ready"
    dockerfile = (out / "Dockerfile").read_text()
    assert "COPY model.blade /mnt/models" in dockerfile and 'ENTRYPOINT ["blade", "serve"]' in dockerfile
    assert (out / "model.blade" / "manifest.json").is_file()


def test_storage_uri_leaves_the_artifact_out_and_bad_requests_are_refused(zoo_artifacts, tmp_path):
    out = tmp_path / "deploy"
    result = export(zoo_artifacts["mlp"], "--kserve", out, "--storage-uri", "s3://models/mlp.blade", "--name", "mlp")
    assert result.returncode == 0, result.stderr
    [container] = yaml.safe_load((out / "inferenceservice.yaml").read_text())["spec"]["predictor"]["containers"]
    assert {"name": "STORAGE_URI", "value": "s3://models/mlp.blade"} in container["env"]
    assert not (out / "model.blade").exists() and "COPY" not in (out / "Dockerfile").read_text()
    # refused before KServe is imported, so in this process
    result = run_cli("export", zoo_artifacts["mlp"], "--kserve", out)
    assert result.returncode == 1 and "not empty" in result.stderr
    result = run_cli("export", zoo_artifacts["mlp"], "--kserve", tmp_path / "x", "--min-replicas", "3",
                     "--max-replicas", "2")
    assert result.returncode == 1 and "replicas" in result.stderr
    result = run_cli("export", zoo_artifacts["mlp"])
    assert result.returncode == 1 and "--triton-repo DIR" in result.stderr
