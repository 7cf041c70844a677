# sagemaker-metrics-proxy: the proxy as a SageMaker-style container (`serve`) or as a sidecar.
#
#   docker build -t sagemaker-metrics-proxy .
#   docker run -p 8080:8080 -p 9090:9090 -e SAGEMAKER_PROXY_UPSTREAM=http://model:8081 \
#       -e SAGEMAKER_PROXY_ENDPOINT_NAME=my-endpoint sagemaker-metrics-proxy serve
#
# With SAGEMAKER_PROXY_MODEL_COMMAND set, the entry point also starts that command (the model
# server) in this container and forwards to it; without it, the model is another container.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY metrics ./metrics
COPY example_model ./example_model
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ".[gpu]"

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin proxy
COPY --from=build /opt/venv /opt/venv
COPY deploy/entrypoint.sh /usr/local/bin/entrypoint.sh
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SAGEMAKER_PROXY_PORT=8080 \
    SAGEMAKER_PROXY_METRICS_PORT=9090
USER 10001
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
CMD ["serve"]
