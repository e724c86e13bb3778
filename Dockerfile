# ctr-serve: the prediction service and its bundled default model.
#
#   docker build -t ctr-serve .
#   docker run -p 8000:8000 ctr-serve                       (memory store, no Redis)
#   docker run -p 8000:8000 -e CTR_REDIS_URL=redis://host:6379/0 ctr-serve
#
# Settings are CTR_* environment variables (README "Configuration"); CTR_WORKERS
# and CTR_TORCH_THREADS size the server for the container's CPUs.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# -- build: a virtualenv with the project and its pinned dependencies
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# PyTorch's CPU build, from PyTorch's own index: the PyPI wheel carries CUDA (gigabytes).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
# The other dependencies, pinned in pyproject.toml, in a layer of their own: a code
# change does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt
COPY app ./app
COPY model ./model
RUN pip install --no-cache-dir --no-deps .

# -- runtime: the virtualenv, the bundled model, a user without privileges
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CTR_HOST=0.0.0.0 \
    CTR_PORT=8000 \
    CTR_MODEL_DIR=/app/models/default \
    CTR_WORKERS=1
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin ctr
COPY --from=build /opt/venv /opt/venv
COPY models/default /app/models/default
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "app.healthcheck"]
CMD ["python", "-m", "app"]
