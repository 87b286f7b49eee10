#!/usr/bin/env bash
# Build the local base image that `mlflow models build-docker --env-manager local` starts
# FROM, i.e. `python:<X.Y.Z>-slim` with X.Y.Z = the version of $PYTHON.
#
# Nothing can be pulled from a registry here, so the image is made from a Debian bookworm
# debootstrap + `docker import`, then mlflow and friends are pre-installed at the exact
# versions $PYTHON has. MLflow's generated Dockerfile then finds everything it installs
# ("Requirement already satisfied", nginx already installed), so later model image builds
# are fast and need no network for their RUN steps.
#
# Env:
#   PYTHON                    interpreter whose versions to mirror (default python3)
#   MLFLOW_PREPROC_STATE_DIR  lock file location (default /tmp/mlflow-preproc)
#   BASE_IMAGE_TAG            override the final tag (default python:<X.Y.Z>-slim)
#   BASE_IMAGE_REBUILD=1      rebuild even if the tags exist (also redoes debootstrap)
#   DEBIAN_MIRROR             override the Debian mirror URL
#   BASE_IMAGE_EXTRA_PIP      extra pip requirements to pre-install (space separated)
#   BASE_IMAGE_PULL=1         start from the official python:<X.Y.Z>-slim (docker pull) instead
#                             of a local Debian rootfs, on a machine that can pull images
#
# The tag is the one MLflow asks for, but the local rootfs has Debian's Python (3.11.2 on
# bookworm), not X.Y.Z: the real version is recorded in the label
# org.mlflow-preproc.python-version and printed.
#
# Requires a running engine (see docker-engine.sh start).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
STATE_DIR="${MLFLOW_PREPROC_STATE_DIR:-/tmp/mlflow-preproc}"
SUITE=bookworm
RAW_TAG="mlflow-preproc/debian-raw:$SUITE"
REBUILD="${BASE_IMAGE_REBUILD:-0}"
# Where the host's CA bundle lives inside the image. The standard path means curl, apt
# over https and Python's default SSL context all trust the local CA without extra config.
IMAGE_CA=/etc/ssl/certs/ca-certificates.crt
HOST_CA=/etc/ssl/certs/ca-certificates.crt
IMAGE_PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin

log() { printf '[base-image] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

T0=$SECONDS
phase_start=
phase() { # print how long the previous phase took, then announce the next one
    [[ -n "$phase_start" ]] && log "  ($((SECONDS - phase_start))s)"
    phase_start=$SECONDS
    log "$*"
}

command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON not found"
timeout 10 docker info >/dev/null 2>&1 \
    || die "no Docker engine answers; run docker-engine.sh start first"

# --- what to mirror from $PYTHON -------------------------------------------------------
# One interpreter call: the version for the tag, pinned requirements for the packages the
# project needs at serve time, and a constraints file pinning every other distribution so
# transitive deps (pandas, numpy, ...) match too. Packages installed from a directory, VCS
# or file URL are left out of the constraints: those versions may not exist on any index.
WORK="$(mktemp -d "${TMPDIR:-/var/tmp}/mlflow-preproc-base.XXXXXX")"
ROOT="$WORK/rootfs"
cleanup() {
    # debootstrap mounts proc/sys inside the target; an interrupted run can leave them
    # mounted, and rm -rf through a mounted /proc or /sys would be very bad.
    if [[ -d "$ROOT" ]]; then
        local m
        while read -r m; do
            as_root umount -l "$m" 2>/dev/null || true
        done < <(awk -v r="$ROOT" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r)
    fi
    as_root rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
# Make Ctrl-C / CI cancellation go through the EXIT trap too.
trap 'exit 130' INT TERM

"$PYTHON" - "$WORK" <<'EOF'
import importlib.metadata as md, json, platform, sys
work = sys.argv[1]
# What a preprocessing model's requirements.txt names, so image builds need no download.
from mlflow_preproc.runtime.flavor import COLUMNAR_PACKAGES, RUNTIME_EXTRAS, RUNTIME_PACKAGES
wanted = ["mlflow", *RUNTIME_PACKAGES, *COLUMNAR_PACKAGES, "gunicorn", "wheel"]
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
if version("mlflow") is None:
    sys.exit(f"[base-image] ERROR: mlflow is not installed for {sys.executable}")
reqs = []
for name in wanted:
    v = version(name)
    # gunicorn[gevent]: mlflow's container runs `pip install gunicorn[gevent]` at build time.
    spec = "gunicorn[gevent]" if name == "gunicorn" else \
        f"{name}[{RUNTIME_EXTRAS[name]}]" if name in RUNTIME_EXTRAS else name
    reqs.append(f"{spec}=={v}" if v else spec)
constraints = {}
for dist in md.distributions():
    name = dist.metadata["Name"]
    if not name or dist.read_text("direct_url.json"):
        continue
    if name.lower() in ("pip", "setuptools", "wheel"):
        continue  # installed separately, see the Dockerfile
    constraints[name.lower()] = f"{name}=={dist.version}"
with open(f"{work}/constraints.txt", "w") as f:
    f.write("\n".join(sorted(constraints.values())) + "\n")
with open(f"{work}/info.sh", "w") as f:
    f.write(f"PY_VERSION={platform.python_version()}\n")
    f.write(f"PY_MINOR={sys.version_info[0]}.{sys.version_info[1]}\n")
    f.write(f"MLFLOW_VERSION={version('mlflow')}\n")
    f.write(f"PIP_VERSION={version('pip') or ''}\n")
    f.write(f"SETUPTOOLS_VERSION={version('setuptools') or ''}\n")
    f.write("REQS=(" + " ".join(f"'{r}'" for r in reqs) + ")\n")
EOF
# shellcheck source=/dev/null
source "$WORK/info.sh"
# shellcheck disable=SC2206  # word splitting is the point
REQS+=(${BASE_IMAGE_EXTRA_PIP:-})
TAG="${BASE_IMAGE_TAG:-python:${PY_VERSION}-slim}"
# Recorded as a label so a stale base (e.g. after an mlflow upgrade) can be spotted.
STAMP="pip==$PIP_VERSION setuptools==$SETUPTOOLS_VERSION ${REQS[*]}"

# Serialise concurrent runs (parallel test workers): the second one waits, then hits the cache.
mkdir -p "$STATE_DIR"
exec 9>"$STATE_DIR/base-image.lock"
flock 9

label_of() { docker image inspect -f "{{index .Config.Labels \"$2\"}}" "$1" 2>/dev/null || true; }
if [[ "$REBUILD" != 1 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    have="$(label_of "$TAG" org.mlflow-preproc.pinned)"
    if [[ "$have" == "$STAMP" && -n "$(label_of "$TAG" org.mlflow-preproc.python-version)" ]]; then
        log "$TAG already exists (its Python: $(label_of "$TAG" org.mlflow-preproc.python-version)); nothing to do"
        exit 0
    fi
    # A stale base would make offline builds (stock build-docker) fail: rebuild its pip layer.
    log "$TAG was built for: ${have:-unknown}"
    log "\$PYTHON now has:      $STAMP; rebuilding the pip layer"
fi

# Said before anything is added: the engine may be the user's own (Docker Desktop, a shared
# host), and the images stay there for the model image builds.
engine="$(docker context inspect -f '{{.Endpoints.docker.Host}}' 2>/dev/null || true)"
log "adding $TAG and $RAW_TAG (about 1.1 GB) to the Docker engine at ${DOCKER_HOST:-${engine:-its default socket}};" \
    "docker rmi $TAG $RAW_TAG removes them (MLFLOW_PREPROC_SKIP_DOCKER=1 bash scripts/dev.sh test runs without Docker)"

FROM_IMAGE="$RAW_TAG"
if [[ "${BASE_IMAGE_PULL:-0}" == 1 ]]; then
    if timeout 600 docker pull "$TAG" >&2; then
        FROM_IMAGE="$(docker image inspect -f '{{.Id}}' "$TAG")"
        log "pulled the official $TAG"
    else
        log "cannot pull $TAG; building a local Debian rootfs instead"
    fi
fi

# --- raw Debian image ------------------------------------------------------------------
if [[ "$FROM_IMAGE" != "$RAW_TAG" ]]; then
    :  # the official image is the base
elif [[ "$REBUILD" == 1 ]] || ! docker image inspect "$RAW_TAG" >/dev/null 2>&1; then
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "debootstrap not found; installing it"
        as_root apt-get update
        # The keyring matters on non-Debian hosts (e.g. Ubuntu CI) to verify bookworm's Release.
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap debian-archive-keyring
    fi
    [[ -r "$HOST_CA" ]] || die "host CA bundle $HOST_CA not found"

    mirror="${DEBIAN_MIRROR:-}"
    if [[ -z "$mirror" && -r /etc/apt/sources.list.d/debian.sources ]]; then
        mirror="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
    fi
    if [[ -z "$mirror" && -r /etc/apt/sources.list ]]; then
        # Older-style Debian hosts; only trust a line that is clearly a Debian mirror.
        mirror="$(awk '$1=="deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list)"
    fi
    mirror="${mirror:-http://deb.debian.org/debian}"

    keyring_opt=()
    [[ -r /usr/share/keyrings/debian-archive-keyring.gpg ]] \
        && keyring_opt=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)

    phase "debootstrap $SUITE from $mirror (this is the slow part, ~1-2 min)"
    # nginx: mlflow's generated Dockerfile apt-installs it; having it here makes that a no-op.
    as_root debootstrap --variant=minbase "${keyring_opt[@]}" \
        --include=python3,python3-venv,python3-pip,ca-certificates,nginx \
        "$SUITE" "$ROOT" "$mirror" >"$WORK/debootstrap.log" 2>&1 || {
        tail -n 30 "$WORK/debootstrap.log" >&2
        die "debootstrap failed"
    }

    phase "adjusting rootfs"
    img_python="$(readlink "$ROOT/usr/bin/python3")"   # e.g. python3.11
    if [[ "$img_python" != "python$PY_MINOR" ]]; then
        log "WARNING: image has $img_python but \$PYTHON is $PY_VERSION; tag $TAG will hold $img_python"
    fi
    # The official python:*-slim images have these in /usr/local/bin; mlflow's Dockerfile
    # and entrypoint call plain `python` and `pip`.
    as_root ln -sf /usr/bin/python3 "$ROOT/usr/local/bin/python"
    as_root ln -sf /usr/bin/python3 "$ROOT/usr/local/bin/python3"
    as_root ln -sf /usr/bin/pip3 "$ROOT/usr/local/bin/pip"
    # PEP 668 marker: without removing it every `pip install` in the build is refused.
    as_root rm -f "$ROOT"/usr/lib/python3*/EXTERNALLY-MANAGED
    # HTTPS goes through a local CA here. The second copy survives any later
    # update-ca-certificates run inside the image (it regenerates the bundle from it).
    as_root cp "$HOST_CA" "$ROOT$IMAGE_CA"
    as_root cp "$HOST_CA" "$ROOT/usr/local/share/ca-certificates/mlflow-preproc-host-bundle.crt"
    # Keep the package lists: then mlflow's `apt-get update` failing offline still leaves
    # apt a view of what is installed. Drop only the downloaded .debs.
    as_root rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/log/*.log

    phase "docker import -> $RAW_TAG"
    as_root tar -C "$ROOT" --numeric-owner --exclude=./proc --exclude=./sys --exclude=./dev -c . \
        | docker import \
            -c "ENV PATH=$IMAGE_PATH" \
            -c "ENV LANG=C.UTF-8" \
            -c "ENV PIP_CERT=$IMAGE_CA" \
            -c "ENV REQUESTS_CA_BUNDLE=$IMAGE_CA" \
            -c "ENV SSL_CERT_FILE=$IMAGE_CA" \
            -c 'CMD ["python3"]' \
            - "$RAW_TAG" >/dev/null
else
    log "reusing $RAW_TAG (BASE_IMAGE_REBUILD=1 to redo debootstrap)"
fi

# --- pre-install mlflow & co ------------------------------------------------------------
# --network none: nothing to reach, and no bridge may be created on this machine.
REAL_PY="$(docker run --rm --network none "$FROM_IMAGE" python3 -c \
    'import platform; print(platform.python_version())')"
phase "pre-installing into $TAG: pip==$PIP_VERSION setuptools==$SETUPTOOLS_VERSION ${REQS[*]}"
CTX="$WORK/ctx"
mkdir -p "$CTX"
cp "$WORK/constraints.txt" "$CTX/constraints.txt"
pin() { [[ -n "$2" ]] && echo "$1==$2" || echo "$1"; }
{
    echo "FROM $FROM_IMAGE"
    echo "COPY constraints.txt /tmp/constraints.txt"
    # Debian's pip/setuptools/wheel have no RECORD files, so upstream pip cannot uninstall
    # them; --ignore-installed puts the pinned copies in /usr/local, which wins on sys.path.
    # Pinned to $PYTHON's versions because the model's python_env.yaml pins exactly these.
    echo "RUN python -m pip install --no-cache-dir --ignore-installed" \
        "'$(pin pip "$PIP_VERSION")' '$(pin setuptools "$SETUPTOOLS_VERSION")' wheel"
    printf 'RUN pip install --no-cache-dir -c /tmp/constraints.txt'
    printf " '%s'" "${REQS[@]}"
    echo " && rm /tmp/constraints.txt"
    echo "LABEL org.mlflow-preproc.pinned=\"$STAMP\" org.mlflow-preproc.python-version=\"$REAL_PY\""
} >"$CTX/Dockerfile"
# --network host: the engine has no bridge, and pip needs PyPI (through the local CA).
# DOCKER_BUILDKIT=0: no buildx plugin is installed; be explicit rather than rely on fallback.
DOCKER_BUILDKIT=0 docker build --network host -t "$TAG" "$CTX" >"$WORK/build.log" 2>&1 || {
    tail -n 40 "$WORK/build.log" >&2
    die "docker build of $TAG failed"
}

phase "done"
log "built $TAG in $((SECONDS - T0))s total ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
log "the tag names Python $PY_VERSION (what MLflow asks for); the image's Python is $REAL_PY"
