"PatchConfig: every validation rule, JSON round trip, immutability, and the preprocessing pipeline."
import json, pickle, warnings
import numpy as np, pytest, torch, torchio as tio
from patchfm.config import *
from patchfm.core import write_nifti, MedImage


def test_defaults_and_seed_call():
    c = PatchConfig(patch_size=[128, 128, 64], samples_per_volume=8, sampler_type='label',
                    label_probabilities={0: 0.2, 1: 0.8}, patch_overlap=0.5, keep_largest_component=True,
                    target_spacing=[1.25, 1.25, 1.37], aggregation_mode='hann')
    assert c.patch_size == (128, 128, 64) and c.apply_reorder is True
    assert c.target_spacing == (1.25, 1.25, 1.37)
    assert c.overlap_voxels == (64, 64, 32)
    assert PatchConfig(patch_size=64).patch_size == (64, 64, 64)


@pytest.mark.parametrize('kwargs,field', [
    (dict(patch_size=[64, 64]), 'patch_size'),  # wrong length
    (dict(patch_size=[64, 64, 0]), 'patch_size'),  # non-positive
    (dict(patch_size=[64, 64, -8]), 'patch_size'),
    (dict(patch_size=[64, 64, 31.5]), 'patch_size'),  # non-integer
    (dict(patch_size=[64, 64, '64']), 'patch_size'),
    (dict(patch_size=None), 'patch_size'),
    (dict(target_spacing=[1, 0, 1]), 'target_spacing'),  # zero spacing
    (dict(target_spacing=[1, -1, 1]), 'target_spacing'),  # negative
    (dict(target_spacing=[1, 1]), 'target_spacing'),
    (dict(target_spacing=[1, float('nan'), 1]), 'target_spacing'),
    (dict(patch_size=[32] * 3, patch_overlap=32), 'patch_overlap'),  # overlap >= patch
    (dict(patch_size=[32] * 3, patch_overlap=40), 'patch_overlap'),
    (dict(patch_overlap=1.0), 'patch_overlap'),  # fraction must be < 1
    (dict(patch_overlap=-0.1), 'patch_overlap'),
    (dict(patch_overlap=-2), 'patch_overlap'),
    (dict(patch_size=[32, 32, 8], patch_overlap=(4, 4, 8)), 'patch_overlap'),
    (dict(patch_overlap=(4, 4)), 'patch_overlap'),
    (dict(samples_per_volume=0), 'samples_per_volume'),
    (dict(samples_per_volume=2.5), 'samples_per_volume'),
    (dict(samples_per_volume=16, queue_length=8), 'queue_length'),
    (dict(queue_length=0), 'queue_length'),
    (dict(queue_num_workers=-1), 'queue_num_workers'),
    (dict(sampler_type='random'), 'sampler_type'),
    (dict(aggregation_mode='max'), 'aggregation_mode'),
    (dict(padding_mode='wrapx'), 'padding_mode'),
    (dict(sampler_type='label', label_probabilities={0: -0.1, 1: 1}), 'label_probabilities'),  # negative
    (dict(sampler_type='label', label_probabilities={0: 0, 1: 0}), 'label_probabilities'),  # all zero
    (dict(sampler_type='label', label_probabilities={'a': 1}), 'label_probabilities'),
    (dict(sampler_type='label', label_probabilities={}), 'label_probabilities'),
    (dict(sampler_type='uniform', label_probabilities={0: 1}), 'label_probabilities'),
    (dict(keep_largest_component='yes'), 'keep_largest_component'),
    (dict(apply_reorder=1), 'apply_reorder'),
    (dict(patch_size_range=(64, 32, 8)), 'patch_size_range'),
    (dict(patch_size_range=(32, 64)), 'patch_size_range'),
    (dict(seed=1.5), 'seed'),
])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f'PatchConfig.{field}'):
        PatchConfig(**kwargs)


def test_valid_variants():
    assert PatchConfig(patch_overlap=8).overlap_voxels == (8, 8, 8)
    assert PatchConfig(patch_size=(32, 32, 16), patch_overlap=(0.5, 0.25, 4)).overlap_voxels == (16, 8, 4)
    assert PatchConfig(padding_mode='reflect').padding_mode == 'reflect'


def test_overlap_voxels_agrees_with_the_grid():
    "PatchConfig and patchfm.grid turn a fraction into the same voxels (rounded up, capped at patch - 1)"
    from patchfm.grid import overlap_voxels
    for p in (7, 24, 25, 48, 96, 97):
        for f in (0.0, 0.1, 0.25, 0.3, 0.31, 1 / 3, 0.5, 0.75, 0.99):
            cfg = PatchConfig(patch_size=(p, p, p), patch_overlap=f)
            assert cfg.overlap_voxels == overlap_voxels((p, p, p), f), (p, f)
    assert PatchConfig(patch_size=(24, 24, 24), patch_overlap=0.31).overlap_voxels == (8, 8, 8)  # 7.44 -> 8
    assert PatchConfig(sampler_type='label', label_probabilities={'0': 1, 2: 3}).label_probabilities == {0: 1.0, 2: 3.0}
    assert PatchConfig(patch_size_range=(32, 96, 16)).patch_size_range == ((32, 96, 16),) * 3
    assert PatchConfig(target_spacing=1.5).target_spacing == (1.5, 1.5, 1.5)



_OVERLAPS = [0, 1, 3, 7, 8, 15, 16, 31, 32, 40, -1, -2, 0.0, 0.1, 0.25, 0.31, 1 / 3, 0.5, 0.75, 0.99, 0.999, 1.0, 1.5,
             2.0, -0.1, float('nan'), float('inf'), True, False, None, '0.5', b'1', np.int64(4), np.float64(0.5),
             (0.5, 8, 0.25), (4, 4, 8), (0, 0, 0), (0.5, 0.5), (4, 4), (1, 2, 3, 4), (), [0.5, 2, 0.9], (0.5, None, 1),
             np.array([2, 3, 4]), torch.tensor(0.25), (True, 0, 0), (1.0, 0, 0)]
_SIZES = [(1, 1, 1), (2, 2, 2), (8, 8, 8), (7, 24, 25), (16, 24, 8), (32, 32, 1), (48, 96, 97)]

@pytest.mark.parametrize('patch_size', _SIZES)
def test_overlap_rule_is_one_rule(patch_size):
    "PatchConfig and patchfm.grid accept and refuse the same overlaps and agree on the voxels (the rule of patchfm.core)"
    from patchfm.grid import overlap_voxels
    for o in _OVERLAPS:
        try: grid = overlap_voxels(patch_size, o)
        except ValueError as e: grid = ('error', str(e))
        try: cfg = PatchConfig(patch_size=patch_size, patch_overlap=o).overlap_voxels
        except ValueError as e:
            assert 'PatchConfig.patch_overlap' in str(e), (patch_size, o, e)
            cfg = ('error', str(e).removeprefix('PatchConfig.patch_overlap: '))
        assert cfg == grid, (patch_size, o, cfg, grid)

def test_frozen_and_replace():
    c = PatchConfig()
    with pytest.raises(Exception):
        c.patch_size = (1, 2, 3)
    d = c.replace(patch_size=(64, 64, 32))
    assert c.patch_size == (96, 96, 96) and d.patch_size == (64, 64, 32)
    with pytest.raises(ValueError, match='patch_overlap'):
        c.replace(patch_overlap=200)
    with pytest.raises(TypeError, match='nope'):
        c.replace(nope=1)


def test_json_round_trip(tmp_path):
    c = PatchConfig(patch_size=(64, 48, 32), sampler_type='label', label_probabilities={0: 0.2, 1: 0.4, 2: 0.4},
                    patch_overlap=(0.5, 8, 0.25), target_spacing=(0.8, 0.8, 2.0), padding_mode='edge',
                    patch_size_range=((16, 64, 16), (16, 48, 16), (8, 32, 8)), seed=3)
    p = c.save(tmp_path / 'cfg.json')
    d = json.loads(p.read_text())
    assert d['patch_size'] == [64, 48, 32] and d['label_probabilities'] == {'0': 0.2, '1': 0.4, '2': 0.4}
    assert PatchConfig.load(p) == c


def test_load_rejects_bad_files(tmp_path):
    (tmp_path / 'p.pkl').write_bytes(pickle.dumps({'patch_size': [1, 2, 3]}))
    with pytest.raises(ValueError, match='p.pkl.*pickle'):
        PatchConfig.load(tmp_path / 'p.pkl')
    (tmp_path / 'x.json').write_text('{"patch_size": [64, 64, 64], "patch_sise": 3}')
    with pytest.raises(ValueError, match='x.json.*patch_sise'):
        PatchConfig.load(tmp_path / 'x.json')
    (tmp_path / 'y.json').write_text('{not json')
    with pytest.raises(ValueError, match='y.json'):
        PatchConfig.load(tmp_path / 'y.json')
    (tmp_path / 'z.json').write_text('{"patch_size": [64, 0, 64]}')
    with pytest.raises(ValueError, match='patch_size'):
        PatchConfig.load(tmp_path / 'z.json')
    with pytest.raises(FileNotFoundError, match='missing.json'):
        PatchConfig.load(tmp_path / 'missing.json')


def test_store_patch_variables_writes_json(tmp_path):
    with pytest.warns(UserWarning, match='JSON'):
        p = store_patch_variables(pkl_fn=tmp_path / 'patch_config.pkl', patch_size=[32, 32, 16], patch_overlap=0.5,
                                  aggregation_mode='gaussian', apply_reorder=True, target_spacing=[1, 1, 2],
                                  sampler_type='label', label_probabilities={0: 0.5, 1: 0.5},
                                  samples_per_volume=4, queue_length=16, queue_num_workers=0,
                                  keep_largest_component=False)
    raw = p.read_bytes()
    assert raw[:1] == b'{' and json.loads(raw)['aggregation_mode'] == 'gaussian'
    c = load_patch_variables(p)
    assert c.patch_size == (32, 32, 16) and c.target_spacing == (1.0, 1.0, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        store_patch_variables(tmp_path / 'cfg.json', patch_size=[8, 8, 8])  # no warning for .json


def test_preprocessing_pipeline(tmp_path):
    img = np.random.default_rng(0).normal(5, 2, (20, 12, 6)).astype(np.float32)
    aff = np.diag([-1.0, -1.0, 3.0, 1.0])
    write_nifti(img, aff, tmp_path / 'i.nii.gz')
    lab = np.zeros((20, 12, 6), np.uint8); lab[5:9, 3:6, 2:4] = 1
    write_nifti(lab, aff, tmp_path / 'l.nii.gz')
    c = PatchConfig(patch_size=(16, 16, 16), target_spacing=(1.0, 1.0, 1.5), padding_mode=-7)
    pipe = c.preprocessing([tio.ZNormalization()])
    s = pipe(tio.Subject(image=tio.ScalarImage(tmp_path / 'i.nii.gz'), mask=tio.LabelMap(tmp_path / 'l.nii.gz')))
    # resampled: x 20 -> 20, y 12 -> 12 < 16 so padded to 16, z 6*3/1.5 = 12 -> padded to 16
    assert s['image'].spatial_shape == (20, 16, 16) and s['mask'].spatial_shape == (20, 16, 16)
    assert tuple(round(v, 6) for v in s['image'].spacing) == (1.0, 1.0, 1.5)
    im = s['image'].data[0]
    assert im[:, 0, :].eq(-7).all() and im[:, :, 0].eq(-7).all()  # intensity padding with padding_mode, after normalisation
    assert s['mask'].data[0][:, 0, :].eq(0).all()
    inner = im[:, 2:14, 2:14]
    assert abs(float(inner.mean())) < 1e-3  # ZNormalization saw the unpadded volume
    assert s['mask'].data.sum() > 0 and set(s['mask'].data.unique().tolist()) == {0, 1}
    # inference uses the same geometry without padding
    m = MedImage.create(tmp_path / 'i.nii.gz', apply_reorder=c.apply_reorder, target_spacing=c.target_spacing)
    np.testing.assert_allclose(m.affine, s['image'].affine[:], atol=10)  # same frame up to the padding offset
    assert c.preprocessing(pad=False)(tio.ScalarImage(tmp_path / 'i.nii.gz')).spatial_shape == (20, 12, 12)


def test_transform_specs():
    for t in [tio.ZNormalization(), tio.RescaleIntensity(out_min_max=(0, 1), percentiles=(1, 99)),
              tio.Clamp(out_min=-100, out_max=200), PadToPatch((8, 8, 8), padding_mode=3)]:
        spec = transform_to_spec(t)
        json.dumps(spec)
        t2 = transform_from_spec(spec)
        assert type(t2) is type(t) and transform_to_spec(t2) == spec
    with pytest.raises(ValueError, match='os.system'):
        transform_from_spec({'name': 'os.system', 'kwargs': {}})
    with pytest.raises(ValueError, match='Path'):
        transform_from_spec({'name': 'Path', 'kwargs': {}})
    with pytest.raises(TypeError):
        transform_to_spec(lambda x: x)


def test_from_dataset_on_demo(tmp_path):
    from patchfm.demo import make_demo_dataset
    from patchfm.dataset import MedDataset, suggest_patch_size
    from patchfm.core import MedMask
    df = make_demo_dataset(tmp_path, n_cases=4, seed=1)
    ds = MedDataset(img_list=df.label.tolist(), dtype=MedMask, max_workers=2, progress=False)
    c = PatchConfig.from_dataset(ds, sampler_type='label', label_probabilities={0: 0.2, 1: 0.4, 2: 0.4})
    ts = ds.get_suggestion()['target_spacing']
    assert c.target_spacing == tuple(float(s) for s in ts)
    assert list(c.patch_size) == list(suggest_patch_size(ds, target_spacing=ts))
    assert all(p % 16 == 0 for p in c.patch_size) and c.sampler_type == 'label'
    with pytest.raises(ValueError, match='apply_reorder'):
        PatchConfig.from_dataset(ds, apply_reorder=False)
