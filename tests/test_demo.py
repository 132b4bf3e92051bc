"Tests of patchfm.demo: the deterministic phantom dataset that needs context to segment."
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from patchfm.demo import (DEMO_CLASSES, DEMO_INTENSITIES, LOCAL_VIEW_MM, MARKER_THICKNESS_MM, make_demo_dataset,
                          make_demo_volume)

TI = DEMO_INTENSITIES
CLEAN = dict(noise_std=0, bias_strength=0)  # exact phantom values, to read the geometry back


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    "The default demo set, written once for the module."
    root = tmp_path_factory.mktemp('demo')
    return root, make_demo_dataset(root)


def world(ijk, affine):
    "World (RAS+) coordinates of voxel indices `ijk` (N, 3)."
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def load(path):
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img


def marker_x(image, label, affine):
    "World x of the marker in a clean volume: body voxels brighter than tissue that are not lesions."
    ijk = np.argwhere((image > TI.tissue + 1e-3) & (label == 0))
    assert len(ijk), 'no marker voxels found'
    return world(ijk, affine)[:, 0]


# ---------------------------------------------------------------- make_demo_volume

def test_volume_types_shapes_affine():
    image, label, affine = make_demo_volume((61, 67, 49), (1.5, 1.5, 2.0), 'LPS', seed=3)
    assert image.dtype == np.float32 and label.dtype == np.uint8 and affine.dtype == np.float64
    assert image.shape == label.shape == (61, 67, 49) and affine.shape == (4, 4)
    assert image.flags.c_contiguous and label.flags.c_contiguous
    assert ''.join(nib.aff2axcodes(affine)) == 'LPS'
    np.testing.assert_allclose(nib.affines.voxel_sizes(affine), (1.5, 1.5, 2.0))
    centre = world(np.array([[60, 66, 48]]) / 2, affine)[0]
    np.testing.assert_allclose(centre, 0, atol=1e-9)  # the volume centre is the world origin
    assert set(np.unique(label)) == {0, 1, 2} and len(DEMO_CLASSES) == 3


def test_volume_deterministic_and_seed_dependent():
    a = make_demo_volume(seed=7)
    b = make_demo_volume(seed=7)
    c = make_demo_volume(seed=8)
    for x, y in zip(a, b): assert x.tobytes() == y.tobytes()
    assert a[0].tobytes() != c[0].tobytes() and a[1].tobytes() != c[1].tobytes()


@pytest.mark.parametrize('code', ['LPS', 'LAS', 'RPI', 'lai'])
def test_flipped_orientation_is_same_world_content(code):
    ras_img, ras_lbl, ras_aff = make_demo_volume((63, 64, 50), (1.5, 1.5, 1.5), 'RAS', seed=11)
    img, lbl, aff = make_demo_volume((63, 64, 50), (1.5, 1.5, 1.5), code, seed=11)
    assert ''.join(nib.aff2axcodes(aff)) == code.upper()
    flips = tuple(ax for ax, c in enumerate(code.upper()) if c not in 'RAS')
    np.testing.assert_array_equal(img, np.flip(ras_img, flips))
    np.testing.assert_array_equal(lbl, np.flip(ras_lbl, flips))
    can = nib.as_closest_canonical(nib.Nifti1Image(lbl, aff))
    np.testing.assert_array_equal(np.asanyarray(can.dataobj), ras_lbl)
    np.testing.assert_allclose(can.affine, ras_aff)


@pytest.mark.parametrize('seed,orientation,spacing,shape', [
    (0, 'RAS', (1.5, 1.5, 1.5), (64, 64, 48)), (1, 'LPS', (1.5, 1.5, 1.5), (67, 55, 61)),
    (2, 'LPS', (1.25, 1.25, 2.5), (77, 60, 48)), (3, 'RAS', (1.25, 1.25, 2.0), (75, 80, 49)),
    (4, 'LPS', (1.0, 1.0, 1.0), (96, 80, 40)), (5, 'RAS', (2.0, 2.0, 2.0), (48, 40, 30))])
def test_class_rule_in_world_coordinates(seed, orientation, spacing, shape):
    "Class 1 lies on the subject's right of the marker (+x in RAS), class 2 on the left, never touching it."
    image, label, affine = make_demo_volume(shape, spacing, orientation, seed, **CLEAN)
    mx = marker_x(image, label, affine)
    assert mx.max() - mx.min() <= MARKER_THICKNESS_MM + spacing[0] + 1e-6  # a thin sheet
    x1 = world(np.argwhere(label == 1), affine)[:, 0]
    x2 = world(np.argwhere(label == 2), affine)[:, 0]
    assert len(x1) and len(x2)
    assert x1.min() > mx.max() and x2.max() < mx.min()
    # lesion centres: 14-21 mm from the marker plane (a small patch can't see it, a 64-voxel one can)
    mid = (mx.max() + mx.min()) / 2
    comps, n = ndimage.label(label > 0)
    for c in range(1, n + 1):
        ijk = np.argwhere(comps == c)
        cls = set(np.unique(label[comps == c]))
        assert len(cls) == 1
        d = world(ijk, affine)[:, 0].mean() - mid
        assert (d > 0) == (cls == {1})
        assert 14 - spacing[0] <= abs(d) <= 21 + spacing[0]
        assert abs(d) - MARKER_THICKNESS_MM / 2 > 8 * 1.5   # a 16-voxel patch at 1.5 mm misses the marker
        assert abs(d) + MARKER_THICKNESS_MM / 2 < 32 * 1.0  # a 64-voxel patch at 1 mm reaches it


@pytest.mark.parametrize('seed,orientation,spacing,shape', [
    (0, 'RAS', (1.5, 1.5, 1.5), (64, 64, 48)), (21, 'LPS', (1.25, 1.25, 2.5), (77, 70, 48)),
    (22, 'LPS', (1.5, 1.5, 2.0), (62, 50, 50)), (23, 'RAS', (1.25, 1.25, 1.25), (80, 58, 64))])
def test_local_view_holds_only_tissue_and_lesion(seed, orientation, spacing, shape):
    "The 24 mm cube around every lesion centre shows no marker and no body edge, whatever the class."
    image, label, affine = make_demo_volume(shape, spacing, orientation, seed, **CLEAN)
    comps, n = ndimage.label(label > 0)
    seen = set()
    for c in range(1, n + 1):
        centre = np.argwhere(comps == c).mean(0)  # voxel units; within a fraction of a voxel of the true centre
        reach = (LOCAL_VIEW_MM / 2 - 0.5) / np.asarray(spacing)
        box = tuple(slice(max(math.ceil(ci - r), 0), math.floor(ci + r) + 1) for ci, r in zip(centre, reach))
        values = set(np.unique(image[box]).tolist())
        assert values <= {TI.tissue, TI.lesion}, values
        seen.add(int(label[tuple(centre.round().astype(int))]))
    assert seen == {1, 2}


def test_classes_share_intensity_statistics():
    "Without bias field the two lesion classes have the same intensity distribution, set by the noise."
    vals = {1: [], 2: []}
    for seed in range(6):
        image, label, _ = make_demo_volume(seed=seed, bias_strength=0)
        for c in vals: vals[c].append(image[label == c])
    for c, v in vals.items():
        v = np.concatenate(vals[c])
        assert abs(v.mean() - TI.lesion) < 4 * 8.0 / math.sqrt(v.size)
        assert 7.5 < v.std() < 8.5
    a, b = np.concatenate(vals[1]), np.concatenate(vals[2])
    assert abs(a.mean() - b.mean()) < 1.0 and abs(a.std() / b.std() - 1) < 0.1


def test_noise_and_bias_field():
    image, label, affine = make_demo_volume(seed=4, noise_std=0, bias_strength=0.15)
    tissue = image[(label == 0) & (image > 50) & (image < 150)]
    assert tissue.std() > 1  # the field varies ...
    assert np.exp(-0.15) * TI.tissue - 1e-3 <= tissue.min() and tissue.max() <= np.exp(0.15) * TI.tissue + 1e-3
    flat, _, _ = make_demo_volume(seed=4, noise_std=0, bias_strength=0)
    assert set(np.unique(flat[(flat > 50) & (flat < 150)]).tolist()) == {TI.tissue}
    noisy, _, _ = make_demo_volume(seed=4, noise_std=8, bias_strength=0)
    air = noisy[flat == TI.background]
    assert abs(air.mean()) < 1 and 7.6 < air.std() < 8.4


def test_lesion_count_and_size():
    for seed in range(5):
        _, label, _ = make_demo_volume(seed=seed, n_lesions=(3, 5), **CLEAN)
        comps, n = ndimage.label(label > 0)
        assert 3 <= n <= 5
        sizes = ndimage.sum_labels(np.ones_like(label), comps, range(1, n + 1)) * 1.5 ** 3
        radii = (3 * sizes / (4 * np.pi)) ** (1 / 3)
        assert np.all((radii > 2.5) & (radii < 6.5)), radii


@pytest.mark.parametrize('kwargs,match', [
    (dict(shape=(64, 64)), 'shape must be 3 integers'),
    (dict(shape=(64, 64, 0)), 'shape must be >= 1'),
    (dict(shape=(64, 64.5, 48)), 'shape must be 3 integers'),
    (dict(shape=(64, 'a', 48)), 'shape must be 3 integers'),
    (dict(shape=64), 'shape must be a sequence'),
    (dict(shape=(40, 64, 48)), r'shape\[0\] \* spacing\[0\] = 40 \* 1.5 = 60.0 mm is too small'),
    (dict(shape=(64, 40, 48)), r'axis 1 \(at least 47 voxels'),
    (dict(spacing=(1.5, 0, 1.5)), 'spacing must be > 0'),
    (dict(spacing=(1.5, -1, 1.5)), 'spacing must be > 0'),
    (dict(orientation='RSA'), 'orientation must be 3 letters'),
    (dict(orientation=None), 'orientation must be 3 letters'),
    (dict(seed=-1), 'seed must be a non-negative integer'),
    (dict(seed=1.5), 'seed must be a non-negative integer'),
    (dict(n_lesions=(1, 3)), 'n_lesions must satisfy 2 <= low <= high'),
    (dict(n_lesions=(4, 3)), 'n_lesions must satisfy'),
    (dict(n_lesions=3), r'n_lesions must be a \(low, high\) pair'),
    (dict(lesion_radius=(0, 3)), 'lesion_radius must satisfy'),
    (dict(marker_distance=(8.0, 21.0)), 'marker_distance must start at >= 14'),
    (dict(noise_std=-1), 'noise_std must be a finite number >= 0'),
    (dict(bias_strength=1.0), 'bias_strength must be < 1'),
    (dict(n_lesions=(40, 40)), 'could not place 40 lesions')])
def test_volume_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match): make_demo_volume(**kwargs)


# ---------------------------------------------------------------- make_demo_dataset

def test_dataset_frame_and_files(demo):
    root, df = demo
    assert list(df.columns) == ['case', 'image', 'label', 'shape', 'spacing', 'orientation', 'seed']
    assert len(df) == 12 and df.case.tolist() == [f'case_{i:03d}' for i in range(12)]
    assert df.orientation.tolist() == ['RAS', 'LPS'] * 6
    iso = [s[0] == s[1] == s[2] for s in df.spacing]
    assert iso == [True, True, False, False] * 3
    for row in df.itertuples():
        assert Path(row.image) == root / 'images' / f'{row.case}.nii.gz'
        assert Path(row.label) == root / 'labels' / f'{row.case}.nii.gz'
        assert Path(row.image).is_absolute() and isinstance(row.image, str)
        image, img = load(row.image)
        label, lbl = load(row.label)
        assert image.shape == label.shape == row.shape
        assert all(48 <= n <= 80 for n in row.shape)
        assert tuple(float(z) for z in img.header.get_zooms()) == row.spacing
        assert tuple(float(z) for z in lbl.header.get_zooms()) == row.spacing
        assert ''.join(nib.aff2axcodes(img.affine)) == ''.join(nib.aff2axcodes(lbl.affine)) == row.orientation
        np.testing.assert_allclose(img.affine, lbl.affine)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert int(img.header['qform_code']) == int(img.header['sform_code']) == 1
        assert set(np.unique(label)) == {0, 1, 2}
    assert not list(root.rglob('.tmp-*'))  # no temporary files left behind


def test_dataset_varies(demo):
    _, df = demo
    assert df['shape'].nunique() == len(df)
    assert any(n % 2 for s in df['shape'] for n in s)  # odd sizes too
    assert {(1.5, 1.5, 1.5), (1.25, 1.25, 1.25)} & set(df.spacing)
    assert any(s[2] >= 2 * s[0] for s in df.spacing)  # anisotropic, e.g. 1.25 x 1.25 x 2.5


def test_dataset_rows_rebuild_in_memory(demo):
    _, df = demo
    for i in (0, 3):
        row = df.iloc[i]
        image, label, affine = make_demo_volume(row['shape'], row['spacing'], row['orientation'], row['seed'])
        np.testing.assert_array_equal(load(row['image'])[0], image)
        np.testing.assert_array_equal(load(row['label'])[0], label)
        np.testing.assert_allclose(nib.load(row['image']).affine, affine)


def test_dataset_deterministic(demo, tmp_path):
    _, df = demo
    again = make_demo_dataset(tmp_path / 'again', n_cases=4)
    other = make_demo_dataset(tmp_path / 'other', n_cases=4, seed=43)
    cols = ['case', 'shape', 'spacing', 'orientation', 'seed']
    pd.testing.assert_frame_equal(again[cols], df[cols].iloc[:4])  # case i depends only on (seed, i)
    for a, b, c in zip(again.itertuples(), df.itertuples(), other.itertuples()):
        for col in ('image', 'label'):
            assert load(getattr(a, col))[0].tobytes() == load(getattr(b, col))[0].tobytes()
        assert load(c.image)[0].tobytes() != load(a.image)[0].tobytes()
    assert other.seed.tolist() != again.seed.tolist()


def test_dataset_class_rule_after_reorientation(demo):
    "Read back, reoriented to RAS: class 1 right of the marker, class 2 left of it, in RAS and LPS files alike."
    _, df = demo
    for row in df.itertuples():
        img = nib.as_closest_canonical(nib.load(row.image))
        lbl = nib.as_closest_canonical(nib.load(row.label))
        assert nib.aff2axcodes(img.affine) == ('R', 'A', 'S')
        image, label = img.get_fdata(dtype=np.float32), np.asanyarray(lbl.dataobj)
        # the marker is the brightest sagittal plane: mean intensity of non-lesion body voxels per x index
        body = (image > TI.tissue / 2) & (label == 0)
        profile = np.where(body.any((1, 2)), (image * body).sum((1, 2)) / np.maximum(body.sum((1, 2)), 1), 0)
        mx = world(np.array([[profile.argmax(), 0, 0]]), img.affine)[0, 0]
        x1 = world(np.argwhere(label == 1), img.affine)[:, 0]
        x2 = world(np.argwhere(label == 2), img.affine)[:, 0]
        assert x1.min() > mx + MARKER_THICKNESS_MM / 2, row.case
        assert x2.max() < mx - MARKER_THICKNESS_MM / 2, row.case


def test_dataset_class_statistics_match(demo):
    "Over the set, lesion voxels of both classes look alike (noise plus a mild bias field)."
    _, df = demo
    vals = {1: [], 2: []}
    for row in df.itertuples():
        image, label = load(row.image)[0], load(row.label)[0]
        for c in vals: vals[c].append(image[label == c])
    a, b = np.concatenate(vals[1]), np.concatenate(vals[2])
    assert abs(a.mean() - b.mean()) < 0.03 * TI.lesion
    assert abs(np.median(a) - np.median(b)) < 0.03 * TI.lesion
    assert abs(a.std() / b.std() - 1) < 0.25


@pytest.mark.parametrize('kwargs,match', [
    (dict(n_cases=0), 'n_cases must be an integer >= 1'),
    (dict(n_cases=-2), 'n_cases must be an integer >= 1'),
    (dict(n_cases=2.5), 'n_cases must be an integer >= 1'),
    (dict(n_cases=True), 'n_cases must be an integer >= 1'),
    (dict(seed=-1), 'seed must be a non-negative integer'),
    (dict(size_range=(80, 48)), 'size_range must satisfy'),
    (dict(size_range=(20, 40)), r'size_range=\(20, 40\) is too small'),
    (dict(size_range=64), r'size_range must be a \(low, high\) pair'),
    (dict(noise=3), r"unexpected keyword argument\(s\) \['noise'\]"),
    (dict(shape=(64, 64, 64)), r"unexpected keyword argument\(s\) \['shape'\]"),
    (dict(lesion_radius=(3, 2)), 'lesion_radius must satisfy')])
def test_dataset_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match): make_demo_dataset(tmp_path / 'd', **kwargs)
    assert not (tmp_path / 'd').exists()  # arguments are checked before anything is written


def test_dataset_path_is_a_file(tmp_path):
    f = tmp_path / 'file.txt'
    f.write_text('x')
    with pytest.raises(NotADirectoryError, match='file.txt'): make_demo_dataset(f, n_cases=1)


def test_dataset_forwards_volume_options(tmp_path):
    df = make_demo_dataset(tmp_path, n_cases=2, n_lesions=(4, 4), **CLEAN)
    for row in df.itertuples():
        label = load(row.label)[0]
        assert ndimage.label(label > 0)[1] == 4
        assert set(np.unique(load(row.image)[0]).tolist()) >= {TI.background, TI.tissue, TI.lesion}
