# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target sidecar  -t natsmesh/sidecar:dev .
#   docker build --target operator -t natsmesh/operator:dev .
# Dependencies come from the hashed lock files; each image gets only its own
# (the sidecar has no kopf and no Kubernetes client). Both run as a numeric
# non-root user and work with a read-only root filesystem (no .pyc writes).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ---- sidecar: nats-py, pydantic, prometheus-client, httptools, uvloop ------
FROM base AS sidecar-deps
COPY requirements/sidecar.txt /tmp/requirements.txt
# Expected size: the base (Debian slim + CPython, ~130 MB unpacked) plus a
# 29 MB venv (uvloop 14 MB, pydantic-core 5 MB, PyNaCl 4 MB; measured from
# requirements/sidecar.txt) plus 0.2 MB of our code: about 160 MB, nearly all
# of it the base every Python image shares. No kopf, no Kubernetes client,
# no compilers; setuptools and pip (4 MB) are not needed at run time.
RUN python -m venv /venv && /venv/bin/pip install --require-hashes -r /tmp/requirements.txt \
    && /venv/bin/pip uninstall -y setuptools \
    && find /venv -name '__pycache__' -prune -exec rm -rf {} + \
    && rm -rf /venv/lib/python3.11/site-packages/pip /venv/lib/python3.11/site-packages/pip-*

FROM base AS sidecar
COPY --from=sidecar-deps /venv /venv
COPY sidecar/natsmesh_sidecar /app/natsmesh_sidecar
ENV PATH=/venv/bin:$PATH PYTHONPATH=/app
USER 65532:65532
EXPOSE 15001 15020
ENTRYPOINT ["python", "-m", "natsmesh_sidecar"]

# ---- operator: kopf, lightkube, nkeys, cryptography + the shared contract ---
FROM base AS operator-deps
COPY requirements/operator.txt /tmp/requirements.txt
RUN python -m venv /venv && /venv/bin/pip install --require-hashes -r /tmp/requirements.txt \
    && rm -rf /venv/lib/python3.11/site-packages/pip /venv/lib/python3.11/site-packages/pip-*

FROM base AS operator
COPY --from=operator-deps /venv /venv
# The operator imports natsmesh_sidecar.subjects/config: one wire contract.
COPY operator/natsmesh_operator /app/natsmesh_operator
COPY sidecar/natsmesh_sidecar /app/natsmesh_sidecar
ENV PATH=/venv/bin:$PATH PYTHONPATH=/app
USER 65532:65532
EXPOSE 8080 9443
ENTRYPOINT ["python", "-m", "natsmesh_operator.cli"]
CMD ["operator"]
