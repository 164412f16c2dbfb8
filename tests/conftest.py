"""Shared fixtures: where ../shared is, tiny random checkpoints, and small torch thread counts for 2-core CI."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINITAGPR_SHARED", REPO.parent / "shared"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def shared_path(*parts: str) -> Path:
    """A path inside ../shared, or skip the calling test with the reason."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared assets beside the checkout); set MINITAGPR_SHARED to point elsewhere")
    return path


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    return shared_path("assets", "qwen3-tokenizer")


@pytest.fixture(scope="session")
def qwen3_configs_dir() -> Path:
    return shared_path("assets", "qwen3-configs")


@pytest.fixture(scope="session")
def pgraphrag_dir() -> Path:
    return shared_path("data", "pgraphrag")


@pytest.fixture
def pretend_cuda(monkeypatch) -> list:
    """torch.cuda.is_available() says True, and every `minitagpr.model.load_pretrained` call is recorded as
    (dtype, device) in the returned list while the model itself loads on the CPU: what a GPU machine would load."""
    import minitagpr.model as M

    seen = []
    real = M.load_pretrained
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(M, "load_pretrained", lambda path, dtype=None, device="cpu": seen.append((dtype, device))
                        or real(path, dtype=dtype))
    return seen


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls on a shared 2-core box: one intra-op thread avoids spin-waiting on a busy sibling core (10x).
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
