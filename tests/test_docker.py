"""Static checks of docker/Dockerfile: hadolint, version pins, build context.

No image is built here (that needs Docker and network access). These checks catch the
mistakes that would otherwise surface only at build or run time on a cloud machine.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"

pytestmark = pytest.mark.timeout(60)


def _hadolint() -> str:
    """Return the hadolint executable, from this interpreter's environment or PATH."""
    candidate = Path(sys.executable).parent / "hadolint"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found; install the test extra (pip install -e '.[test]')")
    return found


def _dockerfile_args() -> dict[str, str]:
    """Return the default value of every ARG in the Dockerfile."""
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE))


def _pyproject_pins() -> dict[str, str]:
    """Return {package: version} for every ``name==version`` dependency in pyproject.toml."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^;\s]+)", requirement.strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def _dockerfile_instructions(keyword: str) -> list[str]:
    """Return the arguments of every instruction ``keyword`` (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return re.findall(rf"^{keyword} (.+)$", text, re.MULTILINE)


def test_hadolint_passes():
    result = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=50
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_torch_pins_match_pyproject():
    args = _dockerfile_args()
    pins = _pyproject_pins()
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHVISION_VERSION"] == pins["torchvision"]


def test_dali_pin_matches_pyproject():
    args = _dockerfile_args()
    pins = _pyproject_pins()
    dali_packages = [name for name in pins if name.startswith("nvidia-dali-")]
    assert dali_packages == ["nvidia-dali-cuda130"]
    assert args["DALI_VERSION"] == pins["nvidia-dali-cuda130"]
    assert '"nvidia-dali-cuda130==${DALI_VERSION}"' in DOCKERFILE.read_text()


def test_cuda_versions_agree():
    # The base image, the torch wheel index and the DALI build must share CUDA 13.
    base_image = _dockerfile_instructions("FROM")[0]
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-\S+", base_image), base_image
    assert _dockerfile_args()["TORCH_CUDA"] == "cu130"


def test_image_runs_as_non_root():
    users = _dockerfile_instructions("USER")
    assert users, "the Dockerfile sets no USER, so training would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_entrypoint_starts_torchrun_script():
    entrypoint = _dockerfile_instructions("ENTRYPOINT")
    assert entrypoint and "/app/launch/torchrun_single_node.sh" in entrypoint[-1]
    assert (REPO_ROOT / "launch" / "torchrun_single_node.sh").exists()


def test_copy_sources_exist():
    for instruction in _dockerfile_instructions("COPY"):
        *sources, _destination = instruction.split()
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"COPY source {source} not found in the repository"


def test_dockerignore_excludes_bulky_paths():
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for path in ("data", "runs", ".venv", "wandb"):
        assert path in patterns, f"{path} is not in .dockerignore"
