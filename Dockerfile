# sagemaker-metrics-proxy: the proxy as a SageMaker-style container (`serve`) or as a sidecar.
#
#   docker build -t sagemaker-metrics-proxy .
#   buildah build --format docker -t sagemaker-metrics-proxy .   # or podman build --format docker
#   docker run -p 8080:8080 -p 9090:9090 -e SAGEMAKER_PROXY_UPSTREAM=http://model:8081 \
#       -e SAGEMAKER_PROXY_ENDPOINT_NAME=my-endpoint sagemaker-metrics-proxy serve
#
# Behind a TLS-inspecting package mirror, pass its CA bundle as the build secret pip_ca:
#   docker build --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt -t sagemaker-metrics-proxy .
#
# With SAGEMAKER_PROXY_MODEL_COMMAND set, `serve` also starts that command (the model server) in
# this container as its child and forwards to it; without it, the model is another container.

FROM python:3.11-slim-bookworm AS build
# A C compiler for the compiled build (mypyc, setup.py), in this stage only; Python's headers come with the
# python image (Debian's own python, as in the image test's stand-in base, needs python3-dev for them).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && if [ ! -e "$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then \
        apt-get install -y --no-install-recommends python3-dev; fi \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
COPY metrics ./metrics
COPY example_model ./example_model
# The secret is mounted only for this step and never lands in a layer; without it, pip uses its own CAs.
# SAGEMAKER_PROXY_COMPILE=1: the compiled build or a failed build, never a silent fallback to pure Python.
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && python -m venv /opt/venv \
    && SAGEMAKER_PROXY_COMPILE=1 /opt/venv/bin/pip install --no-cache-dir ".[gpu]" \
    && case "$(/opt/venv/bin/sagemaker-metrics-proxy --version)" in *"compiled build"*) ;; *) exit 1 ;; esac

FROM python:3.11-slim-bookworm
# Not `proxy`: Debian's base-passwd already has a system user of that name (uid 13).
RUN groupadd --system --gid 10001 smproxy \
    && useradd --system --uid 10001 --gid smproxy --no-create-home --shell /usr/sbin/nologin smproxy
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SAGEMAKER_PROXY_PORT=8080 \
    SAGEMAKER_PROXY_METRICS_PORT=9090
USER 10001
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]
# SageMaker runs `<image> serve`.
ENTRYPOINT ["sagemaker-metrics-proxy"]
CMD ["serve"]
