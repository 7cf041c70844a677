#!/bin/sh
# Entry point of the proxy image. SageMaker runs `<image> serve`; `serve` and every other
# argument go to sagemaker-metrics-proxy. With SAGEMAKER_PROXY_MODEL_COMMAND set, the model
# server runs in this container too, and stopping the container stops both.
set -eu

if [ -z "${SAGEMAKER_PROXY_MODEL_COMMAND:-}" ]; then
    exec sagemaker-metrics-proxy "$@"
fi

# exec: the PID we signal is the model server itself, not a shell around it.
sh -c "exec $SAGEMAKER_PROXY_MODEL_COMMAND" &
model=$!
sagemaker-metrics-proxy "$@" &
proxy=$!
trap 'kill -TERM "$proxy" "$model" 2>/dev/null' TERM INT
# Whichever exits first takes the other down: a proxy without its model is not a healthy container.
while kill -0 "$proxy" 2>/dev/null && kill -0 "$model" 2>/dev/null; do
    sleep 1
done
kill -TERM "$proxy" "$model" 2>/dev/null || true
wait "$proxy"
status=$?
wait "$model" || true
exit "$status"
