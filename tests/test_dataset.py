"Dataset analysis: geometry table, summary, spacing rule, size statistics, patch-size suggestion, errors."
import itertools
import numpy as np, pandas as pd, pytest, torchio as tio
from patchfm.core import MedImage, MedMask, MedicalImageError, GridInfo, resampled_grid, write_nifti
from patchfm.config import PatchConfig
from patchfm.dataset import *


def _affine(spacing, orientation='RAS', origin=(3.5, -20.25, 11.0)):
    "Axis-aligned affine whose voxel axes point along `orientation` (e.g. 'LPS', 'ASR')"
    dirs = {'R': (0, 1), 'L': (0, -1), 'A': (1, 1), 'P': (1, -1), 'S': (2, 1), 'I': (2, -1)}
    a = np.zeros((4, 4)); a[3, 3] = 1; a[:3, 3] = origin
    for j, (code, s) in enumerate(zip(orientation, spacing)):
        row, sign = dirs[code]
        a[row, j] = sign * s
    return a


def _write(path, shape, spacing, orientation='RAS', data=None, dtype=None):
    data = np.zeros(shape, np.uint8) if data is None else data
    return str(write_nifti(data, _affine(spacing, orientation), path, dtype=dtype))


def _mask(shape, counts):
    "uint8 mask of `shape` holding exactly `counts[label]` voxels of each label, the rest 0"
    flat = np.zeros(int(np.prod(shape)), np.uint8)
    i = 0
    for lab, n in counts.items(): flat[i:i + n] = lab; i += n
    return np.random.default_rng(0).permutation(flat).reshape(shape)


KNOWN = [  # shape, spacing, orientation, label counts
    ((20, 18, 7), (0.75, 0.75, 5.0), 'RAS', {1: 40, 2: 7}),
    ((16, 22, 9), (0.77, 0.77, 2.9), 'LPS', {1: 100}),
    ((9, 14, 12), (4.0, 1.25, 1.25), 'ASR', {2: 13, 5: 2}),
    ((11, 10, 8), (1.5, 1.5, 1.5), 'LAS', {}),
]


@pytest.fixture
def known(tmp_path):
    return [_write(tmp_path / f'm{i}.nii.gz', s, sp, o, _mask(s, c)) for i, (s, sp, o, c) in enumerate(KNOWN)]


@pytest.mark.parametrize('dtype', [MedImage, MedMask])
def test_known_geometry_comes_back_exactly(known, dtype):
    ds = MedDataset(img_list=known, dtype=dtype, max_workers=2, progress=False)
    df = ds.df
    assert len(ds) == len(KNOWN) == len(df)
    assert df.path.tolist() == known
    for (_, r), (shape, sp, orient, counts) in zip(df.iterrows(), KNOWN):
        assert (r.dim_0, r.dim_1, r.dim_2) == shape
        assert [r.voxel_0, r.voxel_1, r.voxel_2] == list(sp)  # rounded to 6 decimals: float32 0.77 reads 0.77
        assert r.orientation == orient
        assert r.n_channels == 1
        assert r.voxel_ml == pytest.approx(np.prod(sp) / 1000)
    if dtype is MedMask:
        assert ds.label_values == [0, 1, 2, 5]
        for (_, r), (shape, _, _, counts) in zip(df.iterrows(), KNOWN):
            expect = {k: counts.get(k, 0) for k in (1, 2, 5)}
            expect[0] = int(np.prod(shape)) - sum(counts.values())
            assert {k: r[f'label_{k}'] for k in (0, 1, 2, 5)} == expect
        assert df[['label_0', 'label_1', 'label_2', 'label_5']].dtypes.eq(np.int64).all()
        assert 'labels=[0, 1, 2, 5]' in repr(ds)
    else:
        assert ds.label_values is None
        assert not any(c.startswith('label_') for c in df.columns)
    assert repr(ds).startswith(f"MedDataset(4 {'masks' if dtype is MedMask else 'images'}, 4 distinct geometries")


def test_multichannel_image(tmp_path):
    p = str(write_nifti(np.zeros((3, 6, 7, 8), np.float32), _affine((1, 1, 2)), tmp_path / 'mc.nii.gz'))
    r = MedDataset(img_list=[p], progress=False).df.iloc[0]
    assert (r.dim_0, r.dim_1, r.dim_2, r.n_channels) == (6, 7, 8, 3)


def test_non_integer_mask_names_file(tmp_path):
    p = _write(tmp_path / 'soft.nii.gz', (5, 5, 5), (1, 1, 1), data=np.full((5, 5, 5), 0.5, np.float32))
    with pytest.raises(MedicalImageError, match='soft.nii.gz'): MedDataset(img_list=[p], dtype=MedMask, progress=False)
    assert MedDataset(img_list=[p], progress=False).df.dim_0.tolist() == [5]  # as an image it is fine


def test_summary_groups_and_counts(tmp_path):
    geos = [((10, 10, 5), (1, 1, 3), 'RAS')] * 3 + [((12, 10, 5), (1, 1, 3), 'RAS')] * 2 + [((10, 10, 5), (1, 1, 3), 'LPS')]
    paths = [_write(tmp_path / f'g{i}.nii.gz', *g) for i, g in enumerate(geos)]
    s = MedDataset(img_list=paths, progress=False).summary()
    assert s['count'].tolist() == [3, 2, 1]
    assert s[['dim_0', 'orientation']].values.tolist() == [[10, 'RAS'], [12, 'RAS'], [10, 'LPS']]
    assert s.example_path.tolist() == [paths[0], paths[3], paths[5]]
    assert list(s.columns) == ['dim_0', 'dim_1', 'dim_2', 'voxel_0', 'voxel_1', 'voxel_2', 'orientation', 'count', 'example_path']


THICK = [2.5, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.5, 6.0, 7.0]


def test_anisotropic_thick_axis_gets_10th_percentile(tmp_path):
    paths = [_write(tmp_path / f'a{i}.nii.gz', (40, 40, 8), (0.8, 0.8, z)) for i, z in enumerate(THICK)]
    s = MedDataset(img_list=paths, progress=False).get_suggestion()
    assert s['anisotropic'] and s['thick_axis'] == 2
    assert s['median_spacing'] == [0.8, 0.8, 5.0]
    assert s['target_spacing'] == pytest.approx([0.8, 0.8, np.percentile(THICK, 10)])
    assert s['target_spacing'][2] == pytest.approx(2.95)


def test_isotropic_set_gets_median(tmp_path):
    sps = [(1.0, 1.0, 1.2), (1.1, 0.9, 1.0), (1.3, 1.0, 1.1)]
    paths = [_write(tmp_path / f'i{i}.nii.gz', (12, 12, 12), sp) for i, sp in enumerate(sps)]
    s = MedDataset(img_list=paths, progress=False).get_suggestion()
    assert not s['anisotropic'] and s['thick_axis'] is None
    assert s['target_spacing'] == pytest.approx(np.median(sps, 0).tolist())


def test_anisotropic_spacing_without_few_slices_keeps_median(tmp_path):
    "nnU-Net also requires the thick axis to have few voxels: 40 slices of 5 mm vs 40x40 in-plane is not it"
    paths = [_write(tmp_path / f'a{i}.nii.gz', (40, 40, 40), (0.8, 0.8, z)) for i, z in enumerate(THICK)]
    s = MedDataset(img_list=paths, progress=False).get_suggestion()
    assert s['anisotropic_spacing'] and not s['anisotropic_voxels'] and not s['anisotropic']
    assert s['target_spacing'] == pytest.approx([0.8, 0.8, 5.0])


def test_thick_target_never_below_in_plane(tmp_path):
    thick = [0.5, 0.5, 5, 5, 5, 5, 5, 5, 5, 5]
    paths = [_write(tmp_path / f'a{i}.nii.gz', (40, 40, 8), (0.8, 0.8, z)) for i, z in enumerate(thick)]
    s = MedDataset(img_list=paths, progress=False).get_suggestion()
    assert s['anisotropic'] and s['target_spacing'] == pytest.approx([0.8, 0.8, 0.8])


def test_suggestion_is_in_pipeline_frame(tmp_path):
    "A sagittal file ('ASR') has its thick first axis along y after reorientation to RAS+"
    paths = [_write(tmp_path / f's{i}.nii.gz', (8, 40, 40), (z, 0.8, 0.8), 'ASR') for i, z in enumerate(THICK)]
    ras = MedDataset(img_list=paths, progress=False)
    assert ras.get_suggestion()['thick_axis'] == 1
    assert ras.get_suggestion()['target_spacing'] == pytest.approx([0.8, np.percentile(THICK, 10), 0.8])
    raw = MedDataset(img_list=paths, progress=False, apply_reorder=False)
    assert raw.get_suggestion()['thick_axis'] == 0
    assert ras.df.dim_0.tolist() == raw.df.dim_0.tolist() == [8] * 10  # the table describes the files as stored
    with pytest.raises(ValueError, match='anisotropy_threshold'): ras.get_suggestion(anisotropy_threshold=1)


@pytest.mark.parametrize('orient', ['RAS', 'LPS', 'ASR', 'PIL', 'SLA'])
def test_pipeline_grid_matches_torchio_to_canonical(orient):
    g = GridInfo((5, 7, 9), _affine((0.9, 1.7, 3.1), orient))
    shape, affine = pipeline_grid(g)
    img = tio.ToCanonical()(tio.ScalarImage(tensor=np.zeros((1, 5, 7, 9), np.float32), affine=g.affine))
    assert shape == img.spatial_shape
    np.testing.assert_allclose(affine, img.affine, atol=1e-9)


def test_size_statistics_match_real_pipeline(tmp_path):
    geos = [((31, 29, 13), (0.77, 0.77, 2.9), 'LPS'), ((40, 36, 11), (0.7, 0.7, 3.3), 'RAS'),
            ((9, 33, 30), (2.5, 0.9, 0.8), 'ASR'), ((25, 27, 14), (0.8, 0.8, 3.0), 'LAS'),
            ((28, 28, 10), (0.75, 0.75, 2.5), 'RAS')]
    paths = [_write(tmp_path / f'c{i}.nii.gz', *g) for i, g in enumerate(geos)]
    ds = MedDataset(img_list=paths, dtype=MedMask, progress=False)
    ts = ds.get_suggestion()['target_spacing']
    stats = ds.get_size_statistics(target_spacing=ts)
    real = np.array([MedMask.create(p, apply_reorder=True, target_spacing=ts).shape[1:] for p in paths])
    np.testing.assert_array_equal(ds.shapes(ts), real)
    assert stats['min'] == real.min(0).tolist() and stats['max'] == real.max(0).tolist()
    for k, q in (('median', 50), ('p5', 5), ('p95', 95)):
        assert stats[k] == pytest.approx(np.percentile(real, q, axis=0).tolist())
    assert stats['target_spacing'] == pytest.approx(ts)
    # without reorientation: resampled_grid on each file's own grid
    raw = MedDataset(img_list=paths, progress=False, apply_reorder=False)
    expect = [resampled_grid(g[0], _affine(g[1], g[2]), (1.0, 1.0, 1.0))[0] for g in geos]
    np.testing.assert_array_equal(raw.shapes((1, 1, 1)), expect)
    # no target spacing: the stored shapes (in RAS+ axis order)
    assert raw.get_size_statistics()['max'] == np.max([g[0] for g in geos], 0).tolist()
    assert ds.get_size_statistics()['max'][0] == 40 and ds.get_size_statistics()['target_spacing'] is None
    with pytest.raises(ValueError, match='target_spacing'): ds.get_size_statistics(target_spacing=(1, 0, 1))


@pytest.fixture(scope='module')
def shape_sets(tmp_path_factory):
    "Datasets with large median shapes (zero-filled, so cheap to write) and their (median shape, spacing)"
    root = tmp_path_factory.mktemp('sets')
    sets = {'iso': ([(200, 190, 210), (220, 200, 180), (210, 205, 200)], (1, 1, 1)),
            'aniso': ([(400, 400, 40), (380, 420, 44), (410, 400, 36)], (0.8, 0.8, 4.0)),
            'small': ([(20, 70, 9), (24, 60, 11), (22, 66, 10)], (1.2, 0.6, 3.0)),
            'odd': ([(97, 131, 57), (101, 129, 61), (99, 133, 59)], (0.9, 0.7, 1.6))}
    out = {}
    for name, (shapes, sp) in sets.items():
        paths = [_write(root / f'{name}{i}.nii.gz', s, sp) for i, s in enumerate(shapes)]
        out[name] = (MedDataset(img_list=paths, progress=False), np.median(shapes, 0), np.array(sp, float))
    return out


def test_suggest_patch_size_known_values(shape_sets):
    assert suggest_patch_size(shape_sets['iso'][0]) == [128, 128, 128]
    assert suggest_patch_size(shape_sets['iso'][0], memory_budget=512 ** 3) == [208, 192, 192]
    assert suggest_patch_size(shape_sets['aniso'][0]) == [256, 256, 32]  # in-plane axes span more mm: shrunk first
    assert suggest_patch_size(shape_sets['small'][0]) == [16, 64, 16]  # below the divisor: at least the divisor
    assert suggest_patch_size(shape_sets['small'][0], min_size=20) == [32, 64, 32]  # min_size rounds up


@pytest.mark.parametrize('name', ['iso', 'aniso', 'small', 'odd'])
def test_suggest_patch_size_properties(shape_sets, name):
    ds, median_shape, spacing = shape_sets[name]
    for divisor, budget, ts, min_size in itertools.product([1, 8, 16, 32], [32 ** 3, 96 ** 3, 128 ** 3, 10 ** 7],
                                                           [None, (1.0, 1.0, 1.0)], [None, 40]):
        if budget < divisor ** 3: continue
        lo = np.full(3, divisor) if min_size is None else np.full(3, -(-min_size // divisor) * divisor)
        if np.prod(lo) > budget: continue
        ps = np.array(suggest_patch_size(ds, target_spacing=ts, divisor=divisor, memory_budget=budget, min_size=min_size))
        med = np.median(ds.shapes(ts), 0)
        start = np.maximum(lo, med // divisor * divisor)
        sp = np.array(ts) if ts else spacing
        ctx = f"{name} divisor={divisor} budget={budget} ts={ts} min_size={min_size}: {ps.tolist()}"
        assert (ps % divisor == 0).all() and (ps >= lo).all(), ctx
        assert np.prod(ps) <= budget, ctx
        assert (ps <= start).all(), ctx
        if np.prod(start) <= budget: assert (ps == start).all(), ctx
        for i in np.flatnonzero(ps < start):  # a shrunk axis was the longest in mm when last shrunk
            for j in np.flatnonzero(ps > lo):
                assert (ps[i] + divisor) * sp[i] >= ps[j] * sp[j] - 1e-9, ctx


def test_suggest_patch_size_errors(shape_sets):
    ds = shape_sets['iso'][0]
    for bad in (0, -16, 2.5, True):
        with pytest.raises(ValueError, match='divisor'): suggest_patch_size(ds, divisor=bad)
    with pytest.raises(ValueError, match=r'memory_budget.*4096'): suggest_patch_size(ds, memory_budget=4095)
    with pytest.raises(ValueError, match='memory_budget'): suggest_patch_size(ds, memory_budget=1e6)
    with pytest.raises(ValueError, match='min_size'): suggest_patch_size(ds, memory_budget=32 ** 3, min_size=33)
    with pytest.raises(ValueError, match='min_size'): suggest_patch_size(ds, min_size=(16, 16))
    assert suggest_patch_size(ds, divisor=16, memory_budget=16 ** 3) == [16, 16, 16]


def test_patch_config_from_dataset(shape_sets):
    ds = shape_sets['aniso'][0]
    cfg = PatchConfig.from_dataset(ds, samples_per_volume=4)
    assert cfg.target_spacing == pytest.approx(ds.get_suggestion()['target_spacing'])
    assert list(cfg.patch_size) == suggest_patch_size(ds, target_spacing=cfg.target_spacing)
    assert cfg.samples_per_volume == 4
    small = PatchConfig.from_dataset(ds, divisor=32, memory_budget=64 ** 3)
    assert all(p % 32 == 0 for p in small.patch_size) and np.prod(small.patch_size) <= 64 ** 3


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    good = _write(tmp_path / 'good.nii.gz', (4, 4, 4), (1, 1, 1))
    corrupt = tmp_path / 'corrupt.nii.gz'; corrupt.write_bytes(b'this is not a NIfTI file' * 20)
    missing = str(tmp_path / 'missing.nii.gz')
    for dtype in (MedImage, MedMask):
        with pytest.raises(MedicalImageError, match='missing.nii.gz'): MedDataset(img_list=[good, missing], dtype=dtype, progress=False)
        with pytest.raises(MedicalImageError, match='corrupt.nii.gz'): MedDataset(img_list=[str(corrupt), good], dtype=dtype, progress=False)
        with pytest.raises(MedicalImageError) as e: MedDataset(img_list=[missing, good, str(corrupt)], dtype=dtype, progress=False)
        assert '2 of 3 files' in str(e.value) and 'missing.nii.gz' in str(e.value) and 'corrupt.nii.gz' in str(e.value)
    with pytest.raises(MedicalImageError, match='nowhere'): MedDataset(path=tmp_path / 'nowhere', progress=False)


def test_bad_arguments(tmp_path):
    good = _write(tmp_path / 'good.nii.gz', (4, 4, 4), (1, 1, 1))
    with pytest.raises(ValueError, match='empty'): MedDataset(img_list=[], progress=False)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no image files'): MedDataset(path=tmp_path / 'empty', progress=False)
    with pytest.raises(ValueError, match='exactly one'): MedDataset(progress=False)
    with pytest.raises(ValueError, match='exactly one'): MedDataset(path=tmp_path, img_list=[good], progress=False)
    with pytest.raises(TypeError, match='single path'): MedDataset(img_list=good, progress=False)
    with pytest.raises(ValueError, match=r'img_list\[1\]'): MedDataset(img_list=[good, None], progress=False)
    with pytest.raises(TypeError, match='dtype'): MedDataset(img_list=[good], dtype='mask', progress=False)
    for w in (0, 1.5, True):
        with pytest.raises(ValueError, match='max_workers'): MedDataset(img_list=[good], max_workers=w, progress=False)
    df = pd.DataFrame({'image': [good, np.nan]})
    with pytest.raises(ValueError, match=r"df\['image'\]\[1\]"): MedDataset.from_df(df, 'image', progress=False)
    with pytest.raises(ValueError, match="'label' not in df"): MedDataset.from_df(df, 'label', progress=False)
    with pytest.raises(ValueError, match='col='): MedDataset(df=df, progress=False)


def test_parallel_result_order_equals_input_order(tmp_path):
    sizes = [(21 - i, 3 + i % 4, 5) for i in range(12)]
    made = [_write(tmp_path / f'o{i:02d}.nii.gz', s, (1, 1, 1 + i / 10), data=_mask(s, {1 + i % 3: i + 1}))
            for i, s in enumerate(sizes)]
    idx = [7, 2, 11, 0, 5, 9, 1, 10, 3, 8, 6, 4]  # not the sorted order
    paths = [made[i] for i in idx]
    par = MedDataset(img_list=paths, dtype=MedMask, max_workers=4, progress=False)
    ser = MedDataset(img_list=paths, dtype=MedMask, max_workers=1, progress=False)
    assert par.df.path.tolist() == paths
    pd.testing.assert_frame_equal(par.df, ser.df)
    assert par.df.dim_0.tolist() == [sizes[i][0] for i in idx]
    assert par.df.voxel_2.tolist() == pytest.approx([1 + i / 10 for i in idx])
    assert [par.df.loc[k, f'label_{1 + i % 3}'] for k, i in enumerate(idx)] == [i + 1 for i in idx]


def test_dataframe_and_folder_forms(tmp_path):
    paths = [_write(tmp_path / f'case{i}_img.nii.gz', (6 + i, 5, 4), (1, 1, 2)) for i in range(3)]
    _write(tmp_path / 'case0_seg.nii.gz', (6, 5, 4), (1, 1, 2))
    (tmp_path / 'notes.txt').write_text('not an image')
    df = pd.DataFrame({'image': paths, 'age': [30, 40, 50]}, index=['c', 'a', 'b'])
    a = MedDataset.from_df(df, 'image', progress=False)
    b = MedDataset(df=df, col='image', progress=False)
    pd.testing.assert_frame_equal(a.df, b.df)
    assert a.df.index.tolist() == ['c', 'a', 'b'] and a.df.dim_0.tolist() == [6, 7, 8]
    assert df.join(a.df).age.tolist() == [30, 40, 50]
    folder = MedDataset(path=tmp_path, postfix='_img', progress=False)
    assert folder.df.path.tolist() == sorted(paths)
    assert len(MedDataset(path=tmp_path, progress=False)) == 4  # .txt ignored
    assert MedDataset(path=paths[1], progress=False).df.dim_0.tolist() == [7]  # a single file


def test_progress_bar_runs(tmp_path, capsys):
    paths = [_write(tmp_path / f'p{i}.nii.gz', (4, 4, 4), (1, 1, 1)) for i in range(3)]
    assert len(MedDataset(img_list=paths, progress=True)) == 3


def test_label_counts():
    assert label_counts(np.array([[0, 0, 2], [2, 2, 7]], np.uint8)) == {0: 2, 2: 3, 7: 1}
    assert label_counts(np.array([-3, 100000, -3], np.int32)) == {-3: 2, 100000: 1}
    assert label_counts(np.arange(100) % 7, chunk=9) == {k: len(range(k, 100, 7)) for k in range(7)}
    assert label_counts(np.zeros((0,), np.uint8)) == {}
    assert label_counts(np.array([True, False, True])) == {0: 1, 1: 2}
    with pytest.raises(TypeError, match='integer'): label_counts(np.array([0.5]))
