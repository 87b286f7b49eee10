"""Image builds: `mlflow deployments create -t preproc` against stock `mlflow models build-docker`.

For the same registered preprocessing model, in one run on the local Docker engine:

- cold: a build without Docker's layer cache (the base image exists),
- warm: the rebuild after a new model version (new code, same requirements) is registered,
- the image size of each.

"preproc create" is the full CLI command (build, start, health check); "preproc build" is
the image build step alone, comparable with build-docker. Needs a Docker engine and the local
base image: `bash scripts/docker-engine.sh start && bash scripts/base-image.sh`.

    python benchmarks/image_build.py
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker
import mlflow

BIN = Path(sys.executable).parent


def version_1(record):
    return {"objectId": record["objectId"], "mag": record["magpsf"]}


def version_2(record):
    return {"objectId": record["objectId"], "mag": round(record["magpsf"], 2), "v": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def size_mb(client, reference: str) -> float:
    return client.images.get(reference).attrs["Size"] / 1e6


def main() -> None:
    client = docker.from_env()
    workdir = Path(tempfile.mkdtemp(prefix="bench-image-"))
    os.chdir(workdir)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    name = f"bench-prep-{os.getpid()}"
    rows = []

    def register(fn) -> str:
        with mlflow.start_run():
            info = mlflow.preproc.log_model(fn, name="p", registered_model_name=name)
        return f"models:/{name}/{info.registered_model_version}"

    uris = [register(version_1)]
    created = []
    try:
        # preproc target: the build alone (the same code path create uses), then the full CLI.
        from mlflow_preproc.deploy.target import PreprocDeploymentClient

        target = PreprocDeploymentClient("preproc")
        start = time.perf_counter()
        ours_v1, _ = target.build_image(uris[0], {"no_cache": "true"})
        rows.append(("preproc build", "cold (v1)", time.perf_counter() - start,
                     size_mb(client, ours_v1)))

        uris.append(register(version_2))
        start = time.perf_counter()
        ours_v2, _ = target.build_image(uris[1])
        rows.append(("preproc build", "warm (v2)", time.perf_counter() - start,
                     size_mb(client, ours_v2)))

        deployment = f"bench{os.getpid()}"
        seconds = timed([str(BIN / "mlflow"), "deployments", "create", "-t", "preproc",
                         "--name", deployment, "-m", uris[1], "-C", f"port={free_port()}"])
        created.append(deployment)
        rows.append(("preproc create (CLI)", "warm (v2)", seconds, size_mb(client, ours_v2)))

        # Stock, cold: the CLI has no --no-cache, so build the Dockerfile it generates, uncached.
        context = workdir / "stock-context"
        start = time.perf_counter()
        subprocess.run([str(BIN / "mlflow"), "models", "generate-dockerfile", "-m", uris[0],
                        "-d", str(context), "--env-manager", "local"], check=True,
                       capture_output=True)
        for _ in client.api.build(path=str(context), tag=f"stock-{name}-1", nocache=True,
                                  rm=True, decode=True):
            pass
        rows.append(("stock build-docker", "cold (v1)", time.perf_counter() - start,
                     size_mb(client, f"stock-{name}-1")))
        seconds = timed([str(BIN / "mlflow"), "models", "build-docker", "-m", uris[1],
                         "-n", f"stock-{name}-2", "--env-manager", "local"])
        rows.append(("stock build-docker", "warm (v2)", seconds, size_mb(client, f"stock-{name}-2")))
    finally:
        for deployment in created:
            subprocess.run([str(BIN / "mlflow"), "deployments", "delete", "-t", "preproc",
                            "--name", deployment], capture_output=True)
        for reference in [f"preprocessing-{name}-1:latest", f"preprocessing-{name}-2:latest",
                          f"stock-{name}-1", f"stock-{name}-2"]:
            try:
                client.images.remove(reference, force=True)
            except docker.errors.ImageNotFound:
                pass

    print(f"\nImage builds on {os.cpu_count()} CPUs, base image from scripts/base-image.sh\n")
    print(f"{'builder':<22} {'build':<11} {'seconds':>8} {'image MB':>9}")
    print("-" * 53)
    for builder, kind, seconds, mb in rows:
        print(f"{builder:<22} {kind:<11} {seconds:>8.1f} {mb:>9.0f}")
    ours_warm = next(r for r in rows if r[0] == "preproc build" and r[1] == "warm (v2)")
    stock_warm = next(r for r in rows if r[0] == "stock build-docker" and r[1] == "warm (v2)")
    print(f"\nwarm rebuild after a new version: {ours_warm[2]:.1f} s (goal < 15 s); "
          f"image {ours_warm[3]:.0f} MB vs stock {stock_warm[3]:.0f} MB "
          f"(goal: no larger)")


if __name__ == "__main__":
    main()
