# cxr-triage serving image: FastAPI + ONNX Runtime (CUDA when the host lends a GPU, else CPU).
#
#   docker build -t cxr-triage .
#   docker run --gpus all -p 8000:8000 cxr-triage
#
# Two stages from the same base: the builder makes a virtualenv with the base dependencies only
# (no torch: serving never imports it), the runtime copies that venv and the default model and
# runs as an unprivileged user. The CUDA 13 and cuDNN 9 user-space libraries come from NVIDIA's
# pip wheels through onnxruntime-gpu's own extras, so the host needs only the NVIDIA driver and
# the NVIDIA Container Toolkit (see docs/deployment.md for why not an nvidia/cuda base).
#
# Build arguments:
#   BASE_IMAGE   any Debian/Ubuntu-like image with python3 (>= 3.10) and its venv module
#   ORT_EXTRAS   onnxruntime-gpu extras: "cuda,cudnn" (default) bundles the GPU libraries;
#                "" makes a CPU-only image about 2 GB smaller (0.7 GB instead of 2.7 GB)
#   MODEL_DIR    model folder in the build context baked in as the default model

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ARG ORT_EXTRAS=cuda,cudnn
# Lets scripts prune this stage's leftover image without touching anyone else's.
LABEL cxr-triage.stage=builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
WORKDIR /src
# Dependencies first, from pyproject.toml alone (installed from a stub copy of the project, so
# no stale build/ output can leak into the real one), so code edits do not re-download ~3 GB.
COPY pyproject.toml README.md /tmp/stub/
RUN mkdir -p /tmp/stub/app /tmp/stub/training \
    && touch /tmp/stub/app/__init__.py /tmp/stub/training/__init__.py \
    && /opt/venv/bin/pip install /tmp/stub "onnxruntime-gpu[${ORT_EXTRAS}]" \
    && /opt/venv/bin/pip uninstall --yes cxr-triage \
    && rm -rf /tmp/stub
COPY pyproject.toml README.md ./
COPY app ./app
COPY training ./training
# The check runs from / so it imports the installed package, not /src: /docs and /redoc need
# their Swagger UI and ReDoc files in it (package data), since the image serves them itself.
RUN /opt/venv/bin/pip install --no-deps . \
    && cd / && /opt/venv/bin/python -c "import app.main, app.cli; from app.api.docs import STATIC_DIR as s; \
assert all((s / f).is_file() for f in ('swagger-ui/swagger-ui-bundle.js', 'swagger-ui/swagger-ui.css', \
'redoc/redoc.standalone.js')), 'docs assets missing from the installed package'"
# Where the NVIDIA wheels put their shared libraries, for the runtime's dynamic loader.
RUN /opt/venv/bin/python -c "import glob, sysconfig; \
print('\n'.join(sorted(glob.glob(sysconfig.get_paths()['purelib'] + '/nvidia/*/lib'))))" \
    > /opt/venv/nvidia-ld.conf

FROM ${BASE_IMAGE} AS runtime
ARG MODEL_DIR=models/default
LABEL org.opencontainers.image.title="cxr-triage" \
      org.opencontainers.image.description="Chest X-ray triage service (NIH ChestX-ray14 ViT over ONNX Runtime). Not a medical device." \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 cxr \
    && useradd --system --uid 10001 --gid cxr --home-dir /var/lib/cxr-triage \
       --no-create-home --shell /usr/sbin/nologin cxr \
    && mkdir -p /var/lib/cxr-triage /models \
    && chown cxr:cxr /var/lib/cxr-triage
COPY --from=builder /opt/venv /opt/venv
RUN cp /opt/venv/nvidia-ld.conf /etc/ld.so.conf.d/zz-cxr-nvidia-wheels.conf && ldconfig
COPY ${MODEL_DIR} /opt/cxr-triage/models/default
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    CXR_MODEL_DIR=/opt/cxr-triage/models/default \
    CXR_AUDIT_DB=/var/lib/cxr-triage/audit.sqlite \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /var/lib/cxr-triage
USER 10001:10001
# 8000: HTTP; 11112: the DICOM C-STORE SCP (CXR_DICOM_PORT), when CXR_PACS_ENABLED
EXPOSE 8000 11112
# Ready means the model is loaded and warmed up; no curl in the image, so Python asks.
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request as r; sys.exit(r.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PORT', '8000'), timeout=4).status != 200)"]
CMD ["cxr-triage", "serve"]
