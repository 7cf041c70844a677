"""The shipping files: Dockerfile, entry point, compose stack and Kubernetes manifests are checked and run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy.process.build import build
from proxy.settings import SERVE_OPTIONS
from tests.conftest import ROOT, free_port, wait_for_port

DEPLOY = ROOT / "deploy"
ENV_NAMES = {option.env for option in SERVE_OPTIONS} | {"SAGEMAKER_PROXY_MODEL_COMMAND"}
BUILD_ENV_NAMES = {"SAGEMAKER_PROXY_COMPILE"}  # setup.py's, read at install time
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A linter from the test extras, next to this Python, or on PATH."""
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing; .ci/run installs it")
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return str(path)


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_a_healthcheck_on_healthz() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)
    assert re.search(r"^EXPOSE 8080 9090$", text, re.M)
    assert re.search(r'^CMD \["serve"\]$', text, re.M)
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (ROOT / source).exists(), source
    for name in re.findall(r"\b(SAGEMAKER_PROXY_[A-Z_]+)=", text):
        assert name in ENV_NAMES | BUILD_ENV_NAMES, name


def test_dockerfile_installs_the_compiled_build_with_build_tools_in_the_build_stage_only() -> None:
    text = (ROOT / "Dockerfile").read_text()
    build_stage, final_stage = text.split("\nFROM ", 2)[1:]
    assert "SAGEMAKER_PROXY_COMPILE=1 /opt/venv/bin/pip install" in build_stage and "gcc" in build_stage
    assert "COPY pyproject.toml setup.py" in build_stage
    assert "gcc" not in final_stage and "apt-get" not in final_stage


# Users and groups of Debian's base-passwd (/usr/share/base-passwd/*.master) and apt's _apt: in every Debian base.
DEBIAN_BASE_NAMES = {
    "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp", "proxy", "www-data", "backup",
    "list", "irc", "gnats", "nobody", "nogroup", "_apt", "adm", "tty", "disk", "kmem", "dialout", "fax", "voice", "cdrom",
    "floppy", "tape", "sudo", "audio", "dip", "operator", "src", "shadow", "utmp", "video", "sasl", "plugdev", "staff", "users",
}


def test_dockerfile_user_does_not_collide_with_the_base_images_users() -> None:
    """`useradd proxy` exits 9 on python:3.11-slim-bookworm: Debian's base already has a user proxy (uid 13)."""
    text = (ROOT / "Dockerfile").read_text()
    useradd = re.search(r"useradd (.*?)(?:\n(?!\s)|$)", text.replace("\\\n", " "), re.S)
    assert useradd, "the Dockerfile creates its user with useradd"
    words = useradd.group(1).split()
    assert words[words.index("--uid") + 1] == "10001"
    assert words[-1] not in DEBIAN_BASE_NAMES, words[-1]
    groupadd = re.search(r"groupadd .*--gid 10001 (\S+)", text)
    assert groupadd and groupadd.group(1) not in DEBIAN_BASE_NAMES


def test_dockerfile_entry_point_is_the_proxy_with_an_optional_pip_ca_secret() -> None:
    text = (ROOT / "Dockerfile").read_text()
    # SageMaker runs `<image> serve`; serve itself starts SAGEMAKER_PROXY_MODEL_COMMAND.
    assert re.search(r'^ENTRYPOINT \["sagemaker-metrics-proxy"\]$', text, re.M)
    # The CA bundle for a TLS-inspecting mirror: a build secret (never in a layer), used only when given.
    assert re.search(r"^RUN --mount=type=secret,id=pip_ca\b", text, re.M)
    assert "if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi" in text
    assert "pip_ca" not in re.sub(r"^#.*$", "", text.split("RUN --mount=type=secret,id=pip_ca", 1)[0], flags=re.M)


def test_image_test_is_wired_into_make_and_ci() -> None:
    """`make image-test` (deploy/image-test.sh) builds and runs the image; it needs root, so .ci/run runs it, not pytest."""
    script = DEPLOY / "image-test.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True).returncode == 0
    assert re.search(r"^image-test:\n\tbash deploy/image-test\.sh$", (ROOT / "Makefile").read_text(), re.M)
    assert re.search(r"^make image-test\b", (ROOT / ".ci" / "run").read_text(), re.M)
    text = script.read_text()
    assert "buildah build --format docker" in text  # HEALTHCHECK survives only in the docker format
    assert '--secret "id=pip_ca,' in text


def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    files = sorted(str(p) for p in (DEPLOY / "kubernetes").glob("*.yaml"))
    assert files
    result = subprocess.run([tool("kubernetes-validate"), "--strict", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_sidecar_probes_and_scrape_annotations_match_the_proxy() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "model-with-proxy.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]
    proxy = next(c for c in pod["spec"]["containers"] if c["name"] == "proxy")
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports == {"http": 8080, "metrics": 9090}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    for env in proxy["env"]:
        assert env["name"] in ENV_NAMES, env["name"]


def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_services_ports_and_mounted_files_exist() -> None:
    services = compose()["services"]
    assert {"model", "proxy", "prometheus", "grafana"} <= set(services)
    assert "8080:8080" in services["proxy"]["ports"] and "9090:9090" in services["proxy"]["ports"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            host_path = volume.split(":")[0]
            assert (DEPLOY / host_path).exists(), f"{name} mounts {host_path}, which does not exist"
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).exists()
    for key in services["proxy"]["environment"]:
        assert key in ENV_NAMES, key
    upstream = services["proxy"]["environment"]["SAGEMAKER_PROXY_UPSTREAM"]
    assert upstream == "http://model:8081" and "--port" in services["model"]["entrypoint"]


def test_compose_prometheus_scrapes_the_proxy_admin_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert "proxy:9090" in targets


@pytest.mark.e2e
def test_a_clean_install_starts_the_console_script(tmp_path: Path) -> None:
    """What the Dockerfile's build stage does (pip install . into a new venv), here without a container daemon."""
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(target)
    python = target / "bin" / "python"
    # The build this suite runs on: compiled (pip compiles at install time; about a minute) or pure Python.
    which = build()
    env = {**os.environ, "SAGEMAKER_PROXY_COMPILE": "1" if which == "compiled" else "0"}
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True, timeout=600, env=env)
    assert install.returncode == 0, install.stdout + install.stderr
    version = subprocess.run([str(target / "bin" / "sagemaker-metrics-proxy"), "--version"], cwd=tmp_path, capture_output=True, text=True)
    assert ("compiled build" if which == "compiled" else "pure-Python build") in version.stdout, version
    model_port, port, metrics_port = free_port(), free_port(), free_port()
    # Run from an empty directory, so only the installed package can be imported.
    model = subprocess.Popen([str(python), "-m", "example_model", "--host", "127.0.0.1", "--port", str(model_port)], cwd=tmp_path)
    proxy = subprocess.Popen(
        [str(target / "bin" / "sagemaker-metrics-proxy"), "serve", "--upstream", f"http://127.0.0.1:{model_port}", "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", str(metrics_port), "--endpoint-name", "installed"],
        cwd=tmp_path,
    )
    try:
        wait_for_port(model_port, model)
        wait_for_port(port, proxy)
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/healthz").json() == {"status": "ok"}
        assert httpx.post(f"http://127.0.0.1:{port}/invocations", json={"instances": [[5.1, 3.5, 1.4, 0.2]]}).status_code == 200
        assert "sagemaker_invocations_total" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    finally:
        for proc in (proxy, model):
            proc.terminate()
            proc.wait(10)
