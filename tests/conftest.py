"""Shared fixtures: where ../shared is, a tiny tokenizer that needs no shared assets, and small torch thread counts
for 2-core CI."""
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
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE (~620 ids) with Qwen3's chat markers, built like the demo world's tokenizer
    (`demo_world.train_tokenizer`: Qwen3's pre-tokenizer split, <|im_start|> etc. special, <think> added) over the
    words of the LaMP fixtures. For tests that need *a* chat tokenizer, not Qwen3's vocabulary: a tiny checkpoint
    built with it serves and evaluates like one built with Qwen3's, with no ../shared (CI) and a 640-row embedding.
    Its marker ids are not Qwen3's, so a hard-coded Qwen3 id fails with it."""
    from lamp_fixtures import LAMP_TASKS, make_examples
    from minitagpr.data import demo_world

    texts = []
    for task in LAMP_TASKS:
        examples, golds = make_examples(task, n=4, n_items=6)
        texts += [ex.input for ex in examples] + list(golds.values())
        texts += [" ".join(f"{key}: {value}" for key, value in item.items()) for ex in examples for item in ex.profile]
    # U+FFFD, what decoding a lone byte of a multi-byte character gives, is one id as in Qwen3's vocabulary: the text
    # of n random ids then re-encodes to about n ids, not 3 per stray byte
    texts += ["\ufffd"] * 2
    return demo_world.train_tokenizer(texts, tmp_path_factory.mktemp("tiny_tokenizer"), vocab_size=1024)


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
