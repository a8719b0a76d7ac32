# Three images from one file, built by hack/images.sh (`make images`): the
# sidecar, the operator, and the shop's gRPC example app (example-stock):
#   hack/images.sh            base images, wheels, then the targets
# or by hand, once the base images and .work/wheels exist:
#   docker build --build-arg BASE_IMAGE=... --build-arg BUILD_IMAGE=... \
#     --target sidecar -t natsmesh/sidecar:dev .
#
# BASE_IMAGE is Debian bookworm with python3 and nothing else (mmdebstrap
# --variant=essential: no apt, no pip, no compilers); BUILD_IMAGE is the same
# plus python3-venv. Both are built here by hack/images.sh, so no registry is
# needed. Dependencies are wheels built on the host from the hashed lock files
# (.work/wheels) and installed with --no-index --require-hashes: nothing is
# downloaded inside a build. hack/images.sh writes .work/wheels/<image>.txt,
# the lock's pins each with the hash of the wheel in the wheelhouse (the
# lock's own hashes were checked when the wheels were built: a package
# published only as an sdist becomes a wheel of another hash). Each image
# gets only its own dependencies (the sidecar has no kopf and no Kubernetes
# client). Both run as a numeric non-root user and work with a read-only root
# filesystem: the bytecode is compiled at build time, nothing is written at
# run time.

ARG BASE_IMAGE=natsmesh/base:bookworm
ARG BUILD_IMAGE=natsmesh/build:bookworm
# The base image plus libstdc++6, which grpcio's extension needs (example-stock).
ARG STOCK_BASE_IMAGE=natsmesh/base-cxx:bookworm

FROM ${BUILD_IMAGE} AS build
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY .work/wheels /wheels
# pip runs from Debian's pip wheel and installs into /venv: the venvs carry
# no pip and no setuptools.
RUN ln -s /usr/share/python-wheels/pip-*.whl /pip

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin PYTHONPATH=/app
# A name for the numeric user: getpass.getuser() (kopf's peering identity)
# and friends raise for a uid without a passwd entry.
RUN echo "nonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin" >> /etc/passwd \
    && echo "nonroot:x:65532:" >> /etc/group

# ---- sidecar: nats-py, pydantic, httptools, uvloop ---------------------------
FROM build AS sidecar-deps
RUN python3 -m venv --without-pip /venv && /venv/bin/python /pip/pip install \
      --no-index --find-links /wheels --require-hashes -r /wheels/sidecar.txt
COPY sidecar/natsmesh_sidecar /app/natsmesh_sidecar
RUN python3 -m compileall -q --invalidation-mode unchecked-hash /app

FROM base AS sidecar
COPY --from=sidecar-deps /venv /venv
COPY --from=sidecar-deps /app /app
USER 65532:65532
EXPOSE 15001 15020
ENTRYPOINT ["python3", "-m", "natsmesh_sidecar"]

# ---- operator: kopf, lightkube, nkeys, cryptography + the shared contract ---
FROM build AS operator-deps
RUN python3 -m venv --without-pip /venv && /venv/bin/python /pip/pip install \
      --no-index --find-links /wheels --require-hashes -r /wheels/operator.txt
# The operator imports natsmesh_sidecar.subjects/config: one wire contract.
COPY operator/natsmesh_operator /app/natsmesh_operator
COPY sidecar/natsmesh_sidecar /app/natsmesh_sidecar
RUN python3 -m compileall -q --invalidation-mode unchecked-hash /app

FROM base AS operator
COPY --from=operator-deps /venv /venv
COPY --from=operator-deps /app /app
USER 65532:65532
EXPOSE 8080 9443
ENTRYPOINT ["python3", "-m", "natsmesh_operator.cli"]
CMD ["operator"]

# ---- example-stock: the shop's gRPC example app (examples/apps/stock.py) ----
# Its one dependency, grpcio (and typing-extensions), from its own lock
# (requirements/example-stock.txt); no natsmesh code.
FROM build AS example-stock-deps
RUN python3 -m venv --without-pip /venv && /venv/bin/python /pip/pip install \
      --no-index --find-links /wheels --require-hashes -r /wheels/example-stock.txt
COPY examples/apps/stock.py /app/stock.py
RUN python3 -m compileall -q --invalidation-mode unchecked-hash /app

FROM ${STOCK_BASE_IMAGE} AS example-stock
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin
COPY --from=example-stock-deps /venv /venv
COPY --from=example-stock-deps /app /app
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["python3", "/app/stock.py"]
