# The lab's ServerApp / ClientApp executor: the official flwr/superexec image at the pinned Flower
# version, with the lab's dependencies installed. compose.yaml passes FLWR_VERSION (it is generated
# by `fl-lab deploy compose` from the exact flwr pin in pyproject.toml, the one source of truth).
# The app code itself arrives with each run (`flwr run` ships it as a FAB); the image only needs
# what that code imports.
ARG FLWR_VERSION
FROM flwr/superexec:${FLWR_VERSION}
ARG FLWR_VERSION

WORKDIR /app
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app lab lab
COPY --chown=app:app commands commands
COPY --chown=app:app strategies strategies
COPY --chown=app:app byzantine byzantine
COPY --chown=app:app server server
COPY --chown=app:app client client
COPY --chown=app:app inversion inversion
COPY --chown=app:app unlearning unlearning
COPY --chown=app:app experiments experiments

# CPU torch from PyTorch's CPU wheel index: the default PyPI wheels are CUDA builds (GBs). flwr is
# already in the base image: drop it from the dependencies (its [simulation] extra would pull Ray)
# and pin it, so pip can never move the image off the pinned version.
RUN python -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch torchvision \
 && sed -i '/"flwr\[simulation\]/d' pyproject.toml \
 && python -m pip install --no-cache-dir . "flwr==${FLWR_VERSION}"

# Captures, checkpoints and metrics go to the mounted /app/runs (run-config output-dir).
ENTRYPOINT ["flower-superexec"]
