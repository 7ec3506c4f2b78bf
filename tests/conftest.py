import pytest
import torch

from sdfixtures import make_pipeline, write_layouts

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def hash_cache(tmp_path_factory):
    """minisd's hash cache ($XDG_CACHE_HOME/minisd/hashes.json) in a folder of the test session's, not the home
    folder's: the tests neither read nor leave cached hashes there (train.py processes they start inherit it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def ref_pipe():
    """A small random-weight diffusers StableDiffusionPipeline (the reference)."""
    return make_pipeline()


@pytest.fixture(scope="session")
def layouts(ref_pipe, tmp_path_factory):
    """The reference pipeline written as a diffusers folder, an LDM .safetensors and an LDM lightning .ckpt."""
    return write_layouts(ref_pipe, tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="session")
def lora_sd(layouts):
    """minisd loaded from the reference pipeline's diffusers folder, for the LoRA tests (shared: deep-copy the
    U-Net / text encoder before adapting them)."""
    import minisd
    return minisd.load(layouts["diffusers"])


@pytest.fixture
def single_thread():
    """Run a test on one CPU thread: for tiny tensors threads only add synchronisation, which becomes very slow when
    other processes share the cores (the LoRA tests use it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
