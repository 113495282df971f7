# The lab's ServerApp / ClientApp executor: the official flwr/superexec image at the pinned Flower
# version, with the lab's dependencies installed. compose.yaml passes FLWR_VERSION (it is generated
# by `fl-lab deploy compose` from the exact flwr pin in pyproject.toml, the one source of truth).
# The app code itself arrives with each run (`flwr run` ships it as a FAB); the image needs what
# that code imports, and carries the lab too for the offline jobs (`fl-lab invert|verify|unlearn`).
#
# Build arguments:
#   SUPEREXEC_IMAGE   the base, official flwr/superexec by default (docker/e2e.sh tags a stand-in
#                     with the same name where Docker Hub is out of reach)
#   TORCH_INDEX       where torch comes from: PyTorch's CPU wheel index by default. PyPI's torch is
#                     the CUDA build (about 5 GB with its nvidia-* wheels), for an image that runs
#                     on CPUs, the offline jobs' optional GPU aside.
#   TORCH_FIND_LINKS  a wheelhouse URL searched first (docker/e2e.sh serves the host's own CPU
#                     wheel on loopback: nothing is downloaded twice and no wheel stays in a layer)
#   TORCH_PACKAGES    the requirement, e.g. "torch==X.Y.Z+cpu torchvision==A.B.C"
ARG FLWR_VERSION
ARG SUPEREXEC_IMAGE=flwr/superexec
FROM ${SUPEREXEC_IMAGE}:${FLWR_VERSION}
ARG FLWR_VERSION
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
ARG TORCH_PACKAGES="torch torchvision"

WORKDIR /app
# Torch first, alone: the largest layer, cached across changes of the lab's code.
RUN python -m pip install --no-cache-dir --index-url "${TORCH_INDEX}" \
      ${TORCH_FIND_LINKS:+--find-links "${TORCH_FIND_LINKS}"} ${TORCH_PACKAGES}

# Then the lab's other dependencies (cached until pyproject.toml changes). flwr is already in the
# base image: it is left out of the list (its [simulation] extra would pull Ray) and pinned, so pip
# can never move the image off the pinned version. torch and torchvision come from the layer above
# only: from PyPI they would be the CUDA builds. The lab itself is installed with --no-deps, its
# metadata unchanged (fl-lab checks the exact flwr pin there).
COPY --chown=app:app pyproject.toml ./
RUN python -c "import re, tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); \
print('\n'.join(r for r in d['project']['dependencies'] if not re.match(r'(torch|torchvision|flwr)([\[<>=!~ ;]|$)', r)))" \
      > /tmp/requirements.txt \
 && python -m pip install --no-cache-dir -r /tmp/requirements.txt "flwr==${FLWR_VERSION}"

COPY --chown=app:app README.md ./
COPY --chown=app:app lab lab
COPY --chown=app:app commands commands
COPY --chown=app:app strategies strategies
COPY --chown=app:app byzantine byzantine
COPY --chown=app:app server server
COPY --chown=app:app client client
COPY --chown=app:app inversion inversion
COPY --chown=app:app unlearning unlearning
COPY --chown=app:app experiments experiments
RUN python -m pip install --no-cache-dir --no-deps --no-build-isolation . && rm -rf build *.egg-info

# Captures, checkpoints and metrics go to the mounted /app/runs (run-config output-dir).
ENTRYPOINT ["flower-superexec"]
