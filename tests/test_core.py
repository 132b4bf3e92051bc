"Geometry contract of patchfm.core: reading, writing, reorientation, resampling and restoring."
import numpy as np, nibabel as nib, SimpleITK as sitk, torch, pytest
from scipy import ndimage
from patchfm.core import *
from patchfm.regrid import *


def _mask(shape, seed=0):
    "A label volume with two blobs of different sizes and an off-centre cube"
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint8)
    g = np.indices(shape).astype(float)
    c = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
    r = ((g - c[:, None, None, None]) ** 2 / (np.array(shape)[:, None, None, None] / 4) ** 2).sum(0)
    lab[r < 1] = 1
    s = [slice(max(1, n // 8), max(2, n // 8 + n // 6)) for n in shape]
    lab[tuple(s)] = 2
    return lab


def _affine(spacing, orientation='RAS', origin=(12.3, -40.1, 7.7)):
    a = np.diag([*spacing, 1.0])
    if orientation == 'LPS': a[0, 0] *= -1; a[1, 1] *= -1
    a[:3, 3] = origin
    return a


CASES = [  # (shape, spacing, orientation, target_spacing)
    ((31, 29, 13), (0.77, 0.77, 2.9), 'LPS', None),
    ((31, 29, 13), (0.77, 0.77, 2.9), 'RAS', None),
    ((255, 251, 97), (0.77, 0.77, 2.9), 'LPS', (0.77, 0.77, 2.9)),  # spacing already equal to the target
    ((33, 27, 19), (1.0, 1.0, 1.0), 'LPS', (0.5, 0.5, 0.5)),  # integer upsampling: no information lost
    ((33, 27, 19), (1.2, 0.9, 2.0), 'RAS', (0.6, 0.45, 1.0)),
]


@pytest.mark.parametrize('shape,spacing,orient,target', CASES)
def test_round_trip_exact(tmp_path, shape, spacing, orient, target):
    lab = _mask(shape)
    aff = _affine(spacing, orient)
    write_nifti(lab, aff, tmp_path / 'm.nii.gz')
    m = MedMask.create(tmp_path / 'm.nii.gz', apply_reorder=True, target_spacing=target)
    assert m.orientation == 'RAS'
    if target is not None: np.testing.assert_allclose(m.spacing, target, rtol=1e-5)
    back = restore_to_original(m, m.affine, m.source)
    assert tuple(back.shape) == (1, *shape)
    assert torch.equal(back[0], torch.as_tensor(lab)), f"{(back[0].numpy() != lab).sum()} voxels differ"


@pytest.mark.parametrize('orient', ['RAS', 'LPS'])
def test_round_trip_downsampled_anisotropic(tmp_path, orient):
    "0.77 x 0.77 x 2.9 mm to 1.5 mm isotropic: information is lost, but nothing moves"
    shape = (101, 97, 29)
    lab = _mask(shape, seed=3)
    aff = _affine((0.77, 0.77, 2.9), orient)
    write_nifti(lab, aff, tmp_path / 'm.nii.gz')
    m = MedMask.create(tmp_path / 'm.nii.gz', target_spacing=(1.5, 1.5, 1.5))
    back = restore_to_original(m, m.affine, m.source)[0].numpy()
    assert back.shape == shape
    for c in (1, 2):
        a, b = back == c, lab == c
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.9, (c, dice)
        ca, cb = np.array(ndimage.center_of_mass(a)), np.array(ndimage.center_of_mass(b))
        shift_mm = np.abs((ca - cb) * np.array([0.77, 0.77, 2.9]))
        assert (shift_mm < 0.5).all(), shift_mm  # no systematic voxel shift
    # every mismatch lies at a label boundary (within one target voxel of it)
    edge = ndimage.binary_dilation(ndimage.morphological_gradient(lab, size=3) > 0, iterations=2)
    assert not ((back != lab) & ~edge).any()


def test_lps_and_ras_files_agree_in_world(tmp_path):
    "The same anatomy stored as RAS and as LPS gives the same canonical volume"
    lab = _mask((20, 22, 10))
    ras = _affine((1, 1, 2), 'RAS', origin=(0, 0, 0))
    lps = ras.copy(); lps[:2] *= -1  # same voxels seen from the other side...
    flipped = lab[::-1, ::-1].copy()
    lps = np.diag([-1., -1, 2, 1]); lps[:3, 3] = [19, 21, 0]
    write_nifti(lab, ras, tmp_path / 'ras.nii.gz'); write_nifti(flipped, lps, tmp_path / 'lps.nii.gz')
    a, b = MedMask.create(tmp_path / 'ras.nii.gz'), MedMask.create(tmp_path / 'lps.nii.gz')
    assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)


def test_no_class_level_state(tmp_path):
    "Two volumes with different spacings coexist; their affines are per instance"
    lab = _mask((16, 16, 8))
    write_nifti(lab, _affine((1, 1, 2)), tmp_path / 'a.nii.gz')
    a = MedImage.create(tmp_path / 'a.nii.gz', target_spacing=(1, 1, 1))
    b = MedImage.create(tmp_path / 'a.nii.gz', target_spacing=(2, 2, 2))
    assert a.spacing == (1.0, 1.0, 1.0) and b.spacing == (2.0, 2.0, 2.0)
    assert not hasattr(MedImage, 'affine') or not isinstance(getattr(MedImage, 'affine', None), np.ndarray)
    c = a * 2 + 1  # metadata travels through torch ops
    np.testing.assert_array_equal(c.affine, a.affine)


def test_mask_dtype_and_non_integer(tmp_path):
    write_nifti(_mask((8, 8, 8)), np.eye(4), tmp_path / 'm.nii.gz')
    assert MedMask.create(tmp_path / 'm.nii.gz').dtype == torch.uint8
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 0.5, np.float32), np.eye(4)), tmp_path / 'f.nii.gz')
    with pytest.raises(MedicalImageError, match='f.nii.gz.*non-integer'):
        MedMask.create(tmp_path / 'f.nii.gz')


def test_as_label_tensor_unsigned_and_idempotent():
    "uint16/uint32 label maps (torch has no min/max for them) are narrowed, and the function accepts its own output"
    big = torch.tensor([0, 3, 300], dtype=torch.int32).to(torch.uint16)
    out = as_label_tensor(big)
    assert out.dtype == torch.uint16 and out.to(torch.int32).tolist() == [0, 3, 300]
    assert as_label_tensor(out).dtype == torch.uint16  # idempotent
    small = torch.tensor([0, 2, 1], dtype=torch.int64).to(torch.uint32)
    assert as_label_tensor(small).dtype == torch.uint8 and as_label_tensor(small).tolist() == [0, 2, 1]
    assert as_label_tensor(torch.tensor([-1, 5])).dtype == torch.int8
    assert as_label_tensor(torch.tensor([0., 2.])).dtype == torch.uint8
    with pytest.raises(MedicalImageError, match='m.nii.gz.*non-integer'): as_label_tensor(torch.tensor([0.5]), 'm.nii.gz')


@pytest.mark.parametrize('ext', ['.nrrd', '.mha', '.mhd', '.nii'])
def test_read_other_formats(tmp_path, ext):
    arr = np.random.default_rng(0).normal(size=(9, 11, 7)).astype(np.float32)
    img = sitk.GetImageFromArray(arr.transpose(2, 1, 0))  # sitk arrays are (z,y,x)
    img.SetSpacing((0.8, 0.9, 2.5)); img.SetOrigin((1, 2, 3))
    sitk.WriteImage(img, str(tmp_path / f'x{ext}'))
    g = read_header(tmp_path / f'x{ext}')
    assert g.shape == (9, 11, 7)
    np.testing.assert_allclose(g.spacing, (0.8, 0.9, 2.5), rtol=1e-6)
    assert g.orientation == 'LPS'  # ITK's identity direction is LPS
    data, g2 = load_volume(tmp_path / f'x{ext}')
    assert data.shape == (1, 9, 11, 7) and g2.same_grid(g)
    np.testing.assert_allclose(data[0].numpy(), arr, rtol=1e-6)
    m = MedImage.create(tmp_path / f'x{ext}')
    assert m.orientation == 'RAS' and m.shape == (1, 9, 11, 7)


def test_dicom_series(tmp_path):
    arr = (np.arange(6 * 8 * 5).reshape(5, 8, 6) % 97).astype(np.int16)  # (z,y,x)
    d = tmp_path / 'series'; d.mkdir()
    for k in range(arr.shape[0]):  # one file per slice, positions along z
        s = sitk.GetImageFromArray(arr[k:k + 1])
        s.SetSpacing((0.7, 0.7, 2.5)); s.SetOrigin((0.0, 0.0, 2.5 * k))
        for tag, val in [('0008|0060', 'CT'), ('0020|000d', '1.2.3'), ('0020|000e', '1.2.3.4'), ('0020|0013', str(k + 1))]:
            s.SetMetaData(tag, val)
        w = sitk.ImageFileWriter(); w.KeepOriginalImageUIDOn(); w.SetFileName(str(d / f'{k:03d}.dcm')); w.Execute(s)
    g = read_header(d)
    assert g.shape == (6, 8, 5)
    np.testing.assert_allclose(g.spacing, (0.7, 0.7, 2.5), rtol=1e-4)
    data, _ = load_volume(d)
    np.testing.assert_array_equal(data[0].numpy(), arr.transpose(2, 1, 0))


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(MedicalImageError, match='nope.nii.gz'):
        read_header(tmp_path / 'nope.nii.gz')
    with pytest.raises(MedicalImageError, match='nope.nii.gz'):
        MedImage.create(tmp_path / 'nope.nii.gz')
    bad = tmp_path / 'bad.nii.gz'; bad.write_bytes(b'not an image at all' * 10)
    with pytest.raises(MedicalImageError, match='bad.nii.gz'):
        read_header(bad)
    with pytest.raises(MedicalImageError, match='bad.nii.gz'):
        load_volume(bad)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(MedicalImageError, match='no DICOM'):
        read_header(tmp_path / 'empty')


def test_write_nifti_atomic_and_dtype(tmp_path):
    lab = torch.zeros(1, 5, 6, 7, dtype=torch.int64); lab[0, 1, 2, 3] = 3
    p = write_nifti(lab, np.diag([2, 2, 2, 1.]), tmp_path / 'sub' / 'p.nii.gz')
    img = nib.load(p)
    assert img.get_data_dtype() == np.uint8 and img.shape == (5, 6, 7)
    np.testing.assert_array_equal(img.affine, np.diag([2, 2, 2, 1.]))
    assert [f.name for f in (tmp_path / 'sub').iterdir()] == ['p.nii.gz']  # no temporary left behind
    neg = torch.full((4, 4, 4), -300, dtype=torch.int32)
    assert nib.load(write_nifti(neg, np.eye(4), tmp_path / 'n.nii')).get_data_dtype() == np.int16
    with pytest.raises(ValueError, match='.nii or .nii.gz'):
        write_nifti(lab, np.eye(4), tmp_path / 'p.png')


def test_multichannel_load(tmp_path):
    a = np.zeros((6, 7, 8), np.float32); b = np.ones((6, 7, 8), np.float32)
    write_nifti(a, np.eye(4), tmp_path / 'a.nii.gz'); write_nifti(b, np.eye(4), tmp_path / 'b.nii.gz')
    write_nifti(b, np.diag([2, 1, 1, 1.]), tmp_path / 'c.nii.gz')
    data, g = load_volume([tmp_path / 'a.nii.gz', tmp_path / 'b.nii.gz'])
    assert data.shape == (2, 6, 7, 8) and g.n_channels == 2 and data[1].min() == 1
    with pytest.raises(MedicalImageError, match='c.nii.gz'):
        load_volume([tmp_path / 'a.nii.gz', tmp_path / 'c.nii.gz'])


def test_resample_general_affine_matches_separable():
    "The grid_sample fallback agrees with the exact separable path on an axis-aligned case"
    x = torch.rand(2, 12, 10, 8)
    src = np.diag([1.0, 1.0, 2.0, 1.0]); dst = np.diag([0.5, 1.0, 1.0, 1.0]); dst[:3, 3] = [0.25, 0, 0.5]
    fast = resample_to_grid(x, src, dst, (20, 10, 14), 'linear')
    rot = np.eye(4); rot[:2, :2] = [[0, -1], [1, 0]]  # a rotation forces the general path...
    xr = x.permute(0, 2, 1, 3).flip(1)  # ...on data rotated accordingly
    srcr = src @ np.linalg.inv(np.array([[0, -1, 0, 9], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.]]))
    general = resample_to_grid(xr, srcr, dst, (20, 10, 14), 'linear')
    inside = (slice(None), slice(0, 20), slice(0, 10), slice(0, 14))
    torch.testing.assert_close(general[inside][:, 1:-1, 1:-1, 1:-1], fast[inside][:, 1:-1, 1:-1, 1:-1], atol=1e-4, rtol=1e-4)


def test_restore_probabilities_linear():
    "Linear restore of probabilities keeps them in [0,1] and summing to one"
    p = torch.rand(3, 10, 10, 10); p = p / p.sum(0, keepdim=True)
    A = np.diag([1.5, 1.5, 1.5, 1.]); g = GridInfo((15, 15, 15), np.diag([1., 1, 1, 1]))
    r = restore_to_original(p, A, g, mode='linear')
    assert r.shape == (3, 15, 15, 15)
    inside = r[:, :14, :14, :14]
    torch.testing.assert_close(inside.sum(0), torch.ones(14, 14, 14), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match='mode'):
        restore_to_original(p, A, g, mode='cubic')


def test_gridinfo_json_roundtrip():
    g = GridInfo((3, 4, 5), _affine((0.5, 0.5, 3), 'LPS'), 'x.nii.gz', 2)
    h = GridInfo.from_dict(g.to_dict())
    assert h.same_grid(g) and h.path == 'x.nii.gz' and h.n_channels == 2 and h.orientation == 'LPS'
    with pytest.raises(ValueError, match='3 spatial'):
        GridInfo((3, 4), np.eye(4))


def test_is_exact_regrid_and_identity_restore():
    ras = _affine((0.8, 0.8, 2.0), 'RAS'); lps = _affine((0.8, 0.8, 2.0), 'LPS')
    assert is_exact_regrid(ras, ras)
    flipped = ras.copy(); flipped[:3, 0] *= -1; flipped[:3, 3] += ras[:3, 0] * 9  # same grid, x axis reversed
    assert is_exact_regrid(ras, flipped)
    assert not is_exact_regrid(ras, _affine((1.6, 0.8, 2.0), 'RAS'))  # resampled
    half = ras.copy(); half[:3, 3] += [0.4, 0, 0]
    assert not is_exact_regrid(ras, half)  # half-voxel shift needs interpolation
    x = torch.rand(2, 5, 6, 7)
    assert restore_to_original(x, ras, GridInfo((5, 6, 7), ras)) is x  # nothing to do, no copy
