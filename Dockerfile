# ctr-serve: the prediction service and its bundled default model. The image holds
# the serving dependencies only (pyproject.toml's dependencies, not the "train" extra).
#
#   docker build -t ctr-serve .
#   docker run -p 8000:8000 ctr-serve                       (memory store, no Redis)
#   docker run -p 8000:8000 -e CTR_REDIS_URL=redis://host:6379/0 ctr-serve
#
# torch comes from PyTorch's CPU index, or, for a build without it (air-gapped), from
# a wheel in wheels/: `pip download --no-deps -d wheels torch==2.13.0` on the host
# first (README "Run with Docker Compose").
#
# Settings are CTR_* environment variables (README "Configuration"). By default the
# server runs a worker per CPU the container may use (its cpuset and its --cpus quota),
# sharing one copy of the model; CTR_WORKERS and CTR_TORCH_THREADS set them by hand.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# -- build: a virtualenv with the project and its pinned serving dependencies
FROM ${PYTHON_IMAGE} AS build
# pyproject.toml's pin; a test holds the two equal.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# PyTorch's CPU build (PyPI's torch carries CUDA: gigabytes), in a layer of its own.
# A wheel in wheels/ wins, and must be the pinned version; without one, PyTorch's index.
# Its dependencies come with the others, below. Its C++ tests, test binaries and
# headers serve no purpose at run time (about 190 MB).
COPY wheels ./wheels
RUN if ls wheels/torch-*.whl >/dev/null 2>&1; then \
        pip install --no-cache-dir --no-deps --no-index --find-links wheels "torch==${TORCH_VERSION}"; \
    else \
        pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    fi \
    && torch=$(python -c "import os, sysconfig; print(os.path.join(sysconfig.get_path('purelib'), 'torch'))") \
    && rm -rf "$torch/test" "$torch/include" \
    && find "$torch/bin" -type f ! -name torch_shm_manager -delete
# The other serving dependencies, pinned in pyproject.toml, in a layer of their own: a
# code change does not reinstall them. The "train" extra (pyarrow, scikit-learn,
# matplotlib, tqdm) stays out.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt
COPY app ./app
COPY model ./model
RUN pip install --no-cache-dir --no-deps .

# -- runtime: the virtualenv, the bundled model, a user and group without privileges
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CTR_HOST=0.0.0.0 \
    CTR_PORT=8000 \
    CTR_MODEL_DIR=/app/models/default
RUN groupadd --system --gid 10001 ctr \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ctr
COPY --from=build /opt/venv /opt/venv
COPY models/default /app/models/default
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "app.healthcheck"]
CMD ["python", "-m", "app"]
