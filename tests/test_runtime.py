"cpu_heap_cache: page faults saved, memory handed back, nesting, threads, exceptions; patch_inference with and without it."
import resource, threading
import numpy as np, pytest, torch
from patchfm import runtime
from patchfm.runtime import cpu_heap_cache, heap_cache_available, release_cached_memory
from patchfm.config import PatchConfig
from patchfm.core import write_nifti, read_header
from patchfm.inference import patch_inference

glibc = pytest.mark.skipif(not heap_cache_available(), reason="needs Linux with glibc")


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(16, 2, 1)).eval()


def _faults(net, x, n=4) -> int:
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.no_grad():
        for _ in range(n): net(x)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def _rss_mib() -> float:
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@glibc
def test_fewer_page_faults_inside_and_restored_after():
    net, x = _net(), torch.randn(2, 1, 64, 64, 64)  # 32 MiB activations: above glibc's mmap threshold
    _faults(net, x, 1)
    outside = _faults(net, x)
    with cpu_heap_cache() as active:
        assert active is True
        inside = _faults(net, x)
    assert inside < outside / 4, (inside, outside)
    assert _faults(net, x) > outside / 2  # settings restored: every pass faults again
    assert runtime._heap_cache.depth == 0


@glibc
def test_memory_handed_back_at_exit_and_on_release():
    with cpu_heap_cache():
        ts = [torch.ones(6 * 2**20) for _ in range(10)]; del ts  # 240 MiB freed but kept
        kept = _rss_mib()
        with cpu_heap_cache():
            ts = [torch.ones(6 * 2**20) for _ in range(10)]; del ts
        assert _rss_mib() > kept - 50  # the inner exit does not trim: the outer block is still caching
        release_cached_memory()
        assert _rss_mib() < kept - 200
        ts = [torch.ones(6 * 2**20) for _ in range(10)]; del ts
        kept = _rss_mib()
    assert _rss_mib() < kept - 200


def test_disabled_and_exceptions_and_threads():
    with cpu_heap_cache(False) as active: assert active is False
    release_cached_memory()  # outside a block: does nothing, raises nothing
    with pytest.raises(KeyError):
        with cpu_heap_cache(): raise KeyError('x')
    assert runtime._heap_cache.depth == 0
    errors, barrier = [], threading.Barrier(4)
    def work():
        try:
            with cpu_heap_cache():
                barrier.wait(); torch.ones(2**20).sum()
        except Exception as e: errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert not errors and runtime._heap_cache.depth == 0


def test_without_glibc_it_does_nothing(monkeypatch):
    monkeypatch.setattr(runtime._heap_cache, 'libc', None)
    assert not heap_cache_available()
    with cpu_heap_cache() as active: assert active is False
    release_cached_memory()


def test_patch_inference_same_result_with_and_without(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.normal(0, 1, (40, 36, 30)).astype(np.float32)
    write_nifti(arr, np.diag([1.2, 1.0, 2.0, 1.0]), tmp_path / 'a.nii.gz')
    net = _net()
    cfg = PatchConfig(patch_size=(24, 24, 16), patch_overlap=0.5)
    on = patch_inference(net, cfg, [tmp_path / 'a.nii.gz'], progress=False, return_probabilities=True, heap_cache=True)
    off = patch_inference(net, cfg, [tmp_path / 'a.nii.gz'], progress=False, return_probabilities=True, heap_cache=False)
    assert on[0].shape == (2, 40, 36, 30)
    assert torch.equal(on[0], off[0])
    assert runtime._heap_cache.depth == 0
