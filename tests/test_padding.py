"One padding rule (issue 15): training's preprocessing and inference pad a volume smaller than the patch alike"
import numpy as np, pytest, torch
from patchfm.config import PatchConfig, PADDING_MODES
from patchfm.core import pad_volume, write_nifti
from patchfm.grid import crop_padding
from patchfm.inference import predict_volume
from patchfm.preprocess import preprocess_subject


class Recorder(torch.nn.Module):
    "Records the patches it is given and predicts zeros for two classes"
    def __init__(self):
        super().__init__()
        self.w, self.seen = torch.nn.Parameter(torch.zeros(())), []
    def forward(self, x):
        self.seen.append(x.detach().clone())
        return torch.zeros(x.shape[0], 2, *x.shape[2:])


@pytest.mark.parametrize('mode', list(PADDING_MODES) + [-3.5])
def test_training_and_inference_pad_alike(tmp_path, mode):
    rng = np.random.default_rng(0)
    write_nifti(rng.normal(5, 2, (7, 5, 9)).astype(np.float32), np.diag([1.2, 0.9, 2.0, 1.0]), tmp_path / 'img.nii.gz')
    cfg = PatchConfig(patch_size=(12, 16, 12), padding_mode=mode)  # odd totals on x and y, wider than the volume on y
    train = preprocess_subject(tmp_path / 'img.nii.gz', cfg)['image']  # what the patch loaders sample from
    x = preprocess_subject(tmp_path / 'img.nii.gz', cfg, pad=False)['image']  # what inference starts from
    assert tuple(train.shape[1:]) == (12, 16, 12) and tuple(x.shape[1:]) == (7, 5, 9)
    net = Recorder()
    out = predict_volume(net, x, cfg.patch_size, overlap=0, mode='average', batch_size=1, padding_mode=mode)
    assert len(net.seen) == 1 and torch.equal(net.seen[0][0], train)  # one patch: the whole padded volume, as in training
    assert tuple(out.shape[1:]) == tuple(x.shape[1:])  # crop_padding undid the padding


@pytest.mark.parametrize('mode', ['constant', 'edge', 'reflect', 'symmetric'])
@pytest.mark.parametrize('shape', [(1, 4, 6), (3, 2, 5), (6, 6, 6)])
def test_pad_volume_is_np_pad(mode, shape):
    x = torch.arange(2 * np.prod(shape), dtype=torch.float32).reshape(2, *shape)
    y, pad = pad_volume(x, (7, 11, 6), mode)
    assert np.array_equal(y.numpy(), np.pad(x.numpy(), [(0, 0), *pad], mode=mode))
    assert torch.equal(crop_padding(y, pad), x)


def test_pad_volume_statistics_per_channel():
    x = torch.stack([torch.arange(8.).reshape(2, 2, 2), 10 + torch.arange(8.).reshape(2, 2, 2)])
    for mode, want in (('mean', (3.5, 13.5)), ('median', (3.5, 13.5)), ('minimum', (0., 10.)), ('maximum', (7., 17.)), (2, (2., 2.))):
        y, pad = pad_volume(x, (3, 2, 2), mode)
        assert pad == ((0, 1), (0, 0), (0, 0)) and y[:, 2].flatten(1).tolist() == [[want[0]] * 4, [want[1]] * 4], mode
    with pytest.raises(ValueError, match='padding_mode'): pad_volume(x, (3, 2, 2), 'wrap')


@pytest.mark.parametrize('mode', list(PADDING_MODES) + [7])
def test_pad_to_patch_pads_as_torchio_did(mode):
    "Training is unchanged: PadToPatch (now `pad_volume`) gives what TorchIO's Pad gave, voxels and affine"
    import torchio as tio
    from patchfm.config import PadToPatch
    rng = np.random.default_rng(1)
    aff = np.array([[0, -1.5, 0, 3], [1.2, 0, 0, -4], [0, 0, 2, 5], [0, 0, 0, 1]])
    img = tio.ScalarImage(tensor=torch.from_numpy(rng.normal(0, 1, (1, 5, 4, 3)).astype(np.float32)), affine=aff)
    lab = tio.LabelMap(tensor=torch.from_numpy(rng.integers(0, 3, (1, 5, 4, 3)).astype(np.int64)), affine=aff)
    t = PadToPatch((8, 11, 3), padding_mode=mode)
    pads = t.padding_for((5, 4, 3))
    got = t(tio.Subject(image=img, mask=lab))
    want_i = tio.Pad(pads, padding_mode=mode)(img)
    want_l = tio.Pad(pads, padding_mode=0)(lab)
    assert torch.allclose(got['image'].data, want_i.data, rtol=0, atol=1e-6) and torch.equal(got['mask'].data, want_l.data)
    assert np.allclose(got['image'].affine, want_i.affine) and np.allclose(got['mask'].affine, want_l.affine)
