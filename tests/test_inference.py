"patch_inference: geometry ceiling, identity aggregation, files written, resume, failures, conditional models."
import warnings
import numpy as np, nibabel as nib, pytest, torch
from patchfm.config import PatchConfig
from patchfm.core import MedMask, write_nifti, read_header
from patchfm.inference import patch_inference, predict_volume, keep_largest_component


class Oracle(torch.nn.Module):
    "A perfect model for phantoms whose foreground is brighter than 50: one-hot logits"
    def __init__(self): super().__init__(); self.w = torch.nn.Parameter(torch.zeros(1))
    def forward(self, x):
        fg = (x[:, :1] > 50).float()
        return torch.cat([1 - fg, fg], 1) * 20 - 10


class Identity(torch.nn.Module):
    def __init__(self): super().__init__(); self.w = torch.nn.Parameter(torch.zeros(1))
    def forward(self, x): return x


def _head(tmp_path, name='case', orient='LPS', spacing=(0.77, 0.77, 2.9), shape=(180, 170, 48)):
    "A head-sized ellipsoid with a smaller inner structure (two labels)"
    g = np.indices(shape).astype(np.float32)
    c = np.array(shape) / 2
    mm = [(g[i] - c[i]) * spacing[i] for i in range(3)]
    outer = (mm[0] / 60) ** 2 + (mm[1] / 55) ** 2 + (mm[2] / 50) ** 2 < 1
    lab = outer.astype(np.uint8)
    aff = np.diag([*spacing, 1.0]); aff[:3, 3] = [30, -20, 10]
    if orient == 'LPS': aff[0, 0] *= -1; aff[1, 1] *= -1
    write_nifti(lab.astype(np.float32) * 100, aff, tmp_path / f'{name}.nii.gz')
    return lab, aff


def _dice(a, b): return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_geometry_ceiling_probability_restore(tmp_path):
    "A perfect model pushed through resampling to 1.5 mm and back: Dice >= 0.99 on the original grid"
    lab, aff = _head(tmp_path)
    cfg = PatchConfig(patch_size=(48, 48, 48), target_spacing=(1.5, 1.5, 1.5), patch_overlap=0.25)
    res = patch_inference(Oracle(), cfg, [tmp_path / 'case.nii.gz'], save_dir=tmp_path / 'out', progress=False,
                          return_predictions=False)
    assert not res.failed and len(res.paths) == 1
    img = nib.load(res.paths[0])
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    assert img.shape == lab.shape and img.get_data_dtype() == np.uint8
    d = _dice(np.asarray(img.dataobj) > 0, lab > 0)
    assert d >= 0.99, d


@pytest.mark.parametrize('mode', ['hann', 'gaussian', 'average', 'crop'])
@pytest.mark.parametrize('overlap', [0, 0.25, 0.5])
def test_identity_model_reproduces_input(mode, overlap):
    x = torch.randn(2, 37, 29, 21)
    out = predict_volume(Identity(), x, (16, 24, 8), overlap, mode, batch_size=3, activation=None)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def test_identity_small_image_padded_and_cropped():
    x = torch.randn(1, 10, 30, 7)
    out = predict_volume(Identity(), x, (16, 16, 16), 0.5, 'hann', activation=None)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def test_tta_flips_batched_identity():
    x = torch.randn(1, 20, 20, 20)
    out = predict_volume(Identity(), x, (16, 16, 16), 0.5, 'gaussian', activation=None, tta='all')
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def test_skip_existing_overwrite_and_failures(tmp_path):
    _head(tmp_path, 'a', shape=(40, 36, 20), spacing=(1.5, 1.5, 2.0))
    _head(tmp_path, 'b', orient='RAS', shape=(40, 36, 20), spacing=(1.5, 1.5, 2.0))
    (tmp_path / 'bad.nii.gz').write_bytes(b'garbage' * 50)
    cfg = PatchConfig(patch_size=(32, 32, 16), patch_overlap=0.5)
    files = [tmp_path / 'a.nii.gz', tmp_path / 'bad.nii.gz', tmp_path / 'missing.nii.gz', tmp_path / 'b.nii.gz']
    with pytest.warns(RuntimeWarning, match='bad.nii.gz'):
        res = patch_inference(Oracle(), cfg, files, save_dir=tmp_path / 'out', progress=False)
    assert set(res.failed) == {str(files[1]), str(files[2])}
    assert res[1] is None and res[2] is None
    assert isinstance(res[0], MedMask) and isinstance(res[3], MedMask)
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['a_pred.nii.gz', 'b_pred.nii.gz']
    mtime = (tmp_path / 'out' / 'a_pred.nii.gz').stat().st_mtime_ns
    res2 = patch_inference(Oracle(), cfg, [files[0]], save_dir=tmp_path / 'out', progress=False)
    assert (tmp_path / 'out' / 'a_pred.nii.gz').stat().st_mtime_ns == mtime and res2.timings == []  # skipped
    patch_inference(Oracle(), cfg, [files[0]], save_dir=tmp_path / 'out', progress=False, overwrite=True)
    assert (tmp_path / 'out' / 'a_pred.nii.gz').stat().st_mtime_ns != mtime
    for name in ('a', 'b'):  # written on the original grid
        g, h = read_header(tmp_path / f'{name}.nii.gz'), read_header(tmp_path / 'out' / f'{name}_pred.nii.gz')
        assert g.same_grid(h, atol=1e-5)


def test_predictions_in_model_frame_match_gt(tmp_path):
    "Returned label maps live in the preprocessed frame, comparable with MedMask.create(gt, ...) as in the tutorial"
    lab, aff = _head(tmp_path, shape=(60, 50, 20), spacing=(1.2, 1.2, 3.0))
    write_nifti(lab, aff, tmp_path / 'gt.nii.gz')
    cfg = PatchConfig(patch_size=(32, 32, 32), target_spacing=(2.0, 2.0, 2.0))
    pred = patch_inference(Oracle(), cfg, [tmp_path / 'case.nii.gz'], progress=False)[0]
    gt = MedMask.create(tmp_path / 'gt.nii.gz', apply_reorder=cfg.apply_reorder, target_spacing=cfg.target_spacing)
    assert pred.shape == gt.shape
    np.testing.assert_allclose(pred.affine, gt.affine, atol=1e-5)
    assert _dice(pred.numpy() > 0, gt.numpy() > 0) > 0.97


def test_conditional_model_gets_patch_size(tmp_path):
    seen = []
    class Cond(Identity):
        conditions_on_patch_size = True
        def forward(self, x, patch_size=None):
            seen.append(tuple(patch_size)); return x
    x = torch.randn(1, 20, 20, 12)
    predict_volume(Cond(), x, (16, 16, 8), 0.5, 'hann', activation=None)
    assert seen and set(seen) == {(16, 16, 8)}


def test_probabilities_and_keep_largest(tmp_path):
    _head(tmp_path, shape=(40, 40, 20), spacing=(1.5, 1.5, 2.0))
    cfg = PatchConfig(patch_size=(32, 32, 16))
    p = patch_inference(Oracle(), cfg, [tmp_path / 'case.nii.gz'], progress=False, return_probabilities=True)[0]
    assert p.shape[0] == 2 and torch.allclose(p.sum(0), torch.ones(p.shape[1:]), atol=1e-5)
    lab = torch.zeros(10, 10, 10, dtype=torch.uint8); lab[1:4, 1:4, 1:4] = 1; lab[7, 7, 7] = 1; lab[6:9, 0:2, 0:2] = 2
    k = keep_largest_component(lab)
    assert k[7, 7, 7] == 0 and k[2, 2, 2] == 1 and (k == 2).sum() == 12


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match='PatchConfig'):
        patch_inference(Oracle(), {'patch_size': 3}, [])
    with pytest.raises(ValueError, match='tta'):
        predict_volume(Identity(), torch.zeros(1, 8, 8, 8), (8, 8, 8), tta='sometimes')
    with pytest.raises(ValueError, match=r'\(C,X,Y,Z\)'):
        predict_volume(Identity(), torch.zeros(8, 8, 8), (8, 8, 8))


def test_background_reader_uses_one_openmp_thread(tmp_path, monkeypatch):
    "The reader thread runs PyTorch on one thread (a second OpenMP team slows the model); the caller's count is kept"
    import threading
    import patchfm.inference as inf
    seen, orig = [], inf.preprocess_for_inference
    def spy(*a):
        seen.append((threading.current_thread() is threading.main_thread(), torch.get_num_threads()))
        return orig(*a)
    monkeypatch.setattr(inf, 'preprocess_for_inference', spy)
    for k in range(2): write_nifti(np.full((20, 20, 12), 100. * k, np.float32), np.eye(4), tmp_path / f'c{k}.nii.gz')
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # so that one thread in the reader is a difference
    try:
        res = patch_inference(Oracle(), PatchConfig(patch_size=(16, 16, 8)), [tmp_path / 'c0.nii.gz', tmp_path / 'c1.nii.gz'], progress=False)
        assert torch.get_num_threads() == 2
    finally: torch.set_num_threads(before)
    assert seen == [(False, 1), (False, 1)]
    assert [int(r.data.max()) for r in res] == [0, 1]


# ---------------------------------------------------------------- test-time mirroring follows the training flips
class _Lopsided(torch.nn.Module):
    "Foreground where the voxel is brighter than its neighbour one step further along X: not mirror-symmetric"
    def __init__(self): super().__init__(); self.w = torch.nn.Parameter(torch.zeros(1))
    def forward(self, x):
        d = x[:, :1] - torch.roll(x[:, :1], -1, 2)
        return torch.cat([-d, d], 1)

class _Loaders:
    def __init__(self, tfms): self.patch_tfms, self.pre_patch_tfms = tfms, None

class _Learner:
    "What patch_inference reads off a fastai Learner: the model and its loaders' transforms"
    def __init__(self, model, tfms): self.model, self.dls = model, _Loaders(tfms)

def test_tta_flips_follow_training_flips():
    import torchio as tio
    from patchfm.inference import tta_flips
    cfg = PatchConfig(patch_size=16)
    assert tta_flips(_Learner(_Lopsided(), [tio.RandomFlip()]), cfg) == [(), (2,)]
    assert tta_flips(_Learner(_Lopsided(), [tio.RandomFlip(axes=('LR', 'AP'))]), cfg) == [(), (2,), (3,), (2, 3)]
    assert tta_flips(_Learner(_Lopsided(), [tio.RandomAffine()]), cfg) == [()]
    assert tta_flips(_Lopsided(), cfg) == [()]  # a bare module: nothing known about its training

def test_patch_inference_mirrors_by_default_as_trained(tmp_path):
    import torchio as tio
    rng = np.random.default_rng(0)
    write_nifti(rng.normal(0, 1, (24, 20, 18)).astype(np.float32), np.eye(4), tmp_path / 'x.nii.gz')
    cfg = PatchConfig(patch_size=16, patch_overlap=0.5)
    learner = _Learner(_Lopsided(), [tio.RandomFlip(axes=(0,))])
    run = lambda m, **kw: patch_inference(m, cfg, [tmp_path / 'x.nii.gz'], progress=False, return_probabilities=True, **kw)[0]
    auto, plain, explicit = run(learner), run(learner, tta=None), run(learner, tta=[(), (2,)])
    torch.testing.assert_close(auto, explicit)
    assert not torch.allclose(auto, plain, atol=1e-3)  # the lopsided model disagrees with its mirror image
    torch.testing.assert_close(run(learner.model), plain)  # bare module: no mirroring
    with pytest.raises(ValueError, match="tta must be 'auto'"): run(learner, tta='yes')
