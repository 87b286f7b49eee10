"""The serving image's entrypoint: run and supervise what ``MLFLOW_PREPROC_MODE`` selects.

=========  ====================================================================
``serve``  MLflow's scoring server on ``HOST:PORT`` (``/ping``, ``/invocations``)
``kafka``  ``KAFKA_CONSUMERS`` stream processes (the Kafka consumer mode)
``both``   the scoring server and the consumers side by side (legacy ``KAFKA_ENABLED=true``)
``run``    ``mlflow-preproc run`` from stdin to stdout (``docker run -i``); arguments pass on
``bridge`` ``mlflow-preproc bridge``
=========  ====================================================================

If one child dies the container exits non-zero (an orchestrator restarts it); SIGTERM reaches
every child, consumers commit, and the container exits once they have. Images built by this
package's deployment target use ``python -m mlflow_preproc.image.entrypoint`` as ENTRYPOINT; stock
``mlflow models build-docker`` images reach it through :func:`take_over_stock_entrypoint`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from mlflow_preproc import config as settings

MODEL_PATH = "/opt/ml/model"
_SUPERVISED = "MLFLOW_PREPROC_SUPERVISED"
logger = logging.getLogger("mlflow_preproc")


def resolve_mode(cfg: settings.Config, environ=os.environ) -> str:
    """``MLFLOW_PREPROC_MODE``, else ``both`` when the legacy ``KAFKA_ENABLED`` is true."""
    if environ.get("MLFLOW_PREPROC_MODE"):
        return cfg["MLFLOW_PREPROC_MODE"]
    if settings.parse_bool(environ.get("KAFKA_ENABLED", ""), "KAFKA_ENABLED"):
        return "both"
    return "serve"


def child_commands(mode: str, cfg: settings.Config, model: str, run_args: list[str],
                   metrics_port: int = 0) -> list[list[str]]:
    """The processes a mode runs on ``model`` (a folder, or a model URI outside an image);
    consumer ``j`` serves ``/healthz`` on ``metrics_port + j``."""
    py = sys.executable
    serve = [py, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
             "-h", cfg["HOST"], "-p", str(cfg["PORT"])]
    if cfg["MLFLOW_MODELS_WORKERS"]:
        serve += ["-w", str(cfg["MLFLOW_MODELS_WORKERS"])]
    # A folder is loaded as it is (MODEL_URI then only names it); a URI is resolved.
    stream = [py, "-m", "mlflow_preproc.cli", "stream",
              *(["--model-path", model] if os.path.isdir(model) else ["-m", model])]
    consumers = [stream + (["--metrics-port", str(metrics_port + j)] if metrics_port else [])
                 for j in range(cfg["KAFKA_CONSUMERS"])]
    return {
        "serve": [serve],
        "kafka": consumers,
        "both": [serve, *consumers],
        "run": [[py, "-m", "mlflow_preproc.cli", "run", "-m", model, *run_args]],
        "bridge": [[py, "-m", "mlflow_preproc.cli", "bridge"]],
    }[mode]


def supervise(commands: list[list[str]], env: dict[str, str], shutdown_timeout: float,
              done_when_all_exit: bool = False) -> int:
    """Run ``commands``; stop all when one exits or on SIGTERM/SIGINT. Returns the exit code."""
    # Each child leads its own process group, so a signal reaches its children too
    # (`mlflow models serve` runs uvicorn workers).
    procs = [subprocess.Popen(cmd, env=env, start_new_session=True) for cmd in commands]
    stopping = []

    def on_signal(signum, _frame):
        stopping.append(signum)
        _signal_all(procs, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        exited = [p for p in procs if p.poll() is not None]
        if stopping:
            return _wait_all(procs, shutdown_timeout, clean=True)
        if done_when_all_exit:
            if len(exited) == len(procs):
                return max((p.returncode for p in procs), key=abs)
            failed = [p for p in exited if p.returncode != 0]
        else:
            failed = exited
        if failed:
            first = failed[0]
            logger.error("a child process exited; stopping the container", extra={
                "event": "child_exit", "command": " ".join(first.args[:6]),
                "exit_code": first.returncode})
            _signal_all(procs, signal.SIGTERM)
            _wait_all(procs, shutdown_timeout, clean=False)
            return first.returncode or 1
        time.sleep(0.2)


def _signal_all(procs: list[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def _wait_all(procs: list[subprocess.Popen], timeout: float, clean: bool) -> int:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_all([p], signal.SIGKILL)
            p.wait(5)
    if not clean:
        return 1
    # A child stopped by our SIGTERM (-15) or that exited 0 shut down cleanly.
    return 0 if all(p.returncode in (0, -signal.SIGTERM) for p in procs) else 1


def main(argv: list[str] | None = None) -> int:
    """Run the mode selected by the environment; extra arguments go to ``run`` mode."""
    from mlflow_preproc.streaming.metrics import configure_logging

    cfg = settings.load("image")
    stream_cfg = settings.load("stream")
    configure_logging(stream_cfg["LOG_FORMAT"], stream_cfg["LOG_LEVEL"])
    mode = resolve_mode(cfg)
    model_path = os.environ.get("MLFLOW_PREPROC_MODEL_PATH", MODEL_PATH)
    if not os.path.isdir(model_path) and os.environ.get("MODEL_URI"):
        model_path = os.environ["MODEL_URI"]  # run outside an image, on a registered model
    env = {**os.environ, _SUPERVISED: "1"}
    # `mlflow models serve` starts `uvicorn` from PATH: make it the one beside this Python,
    # also when a virtualenv is used without being activated.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    commands = child_commands(mode, cfg, model_path, list(sys.argv[1:] if argv is None else argv),
                              stream_cfg["METRICS_PORT"])
    logger.info("starting", extra={"event": "entrypoint", "mode": mode,
                                   "processes": len(commands)})
    return supervise(commands, env, stream_cfg["SHUTDOWN_TIMEOUT_S"] + 5,
                     done_when_all_exit=mode == "run")


def take_over_stock_entrypoint() -> None:
    """Run :func:`main` instead of a stock ``mlflow models build-docker`` entrypoint.

    Called from the ``sitecustomize`` module this package puts in a model's ``code/``
    folder. Python imports it at start-up when ``PYTHONPATH=/opt/ml/model/code``, so a stock
    image changes mode with environment variables alone. Only the container's main process
    (the ``C._serve(...)`` command) is taken over, and only for a mode other than ``serve``.
    """
    if os.environ.get(_SUPERVISED) or "_serve(" not in " ".join(getattr(sys, "orig_argv", [])):
        return
    try:
        mode = resolve_mode(settings.load("image"))
    except settings.ConfigError as exc:
        print(f"mlflow-preproc: error: {exc}", file=sys.stderr, flush=True)
        os._exit(2)
    if mode == "serve":
        return  # MLflow's own entrypoint serves exactly as without this package
    code = main([])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
