"""Bad inputs and faults (issue 14): every case says what is wrong and asserts the exception type and that the
message names the file or field, or the exact behaviour that is accepted."""
import gzip, json, os, signal, stat, subprocess, sys, textwrap, time, types, warnings
from pathlib import Path

import nibabel as nib, numpy as np, pandas as pd, pytest, torch, torchio as tio

from patchfm.core import (MedicalImageError, MedImage, MedMask, TEMP_MARK, atomic_path, case_name, check_payload,
                          load_volume, read_header, remap_labels, remove_stale_temps, write_nifti)
from patchfm.config import PatchConfig, transform_from_spec
from patchfm.core import atomic_write_text
from patchfm.dataset import MedDataset
from patchfm.inference import patch_inference
from patchfm.learner import patch_learner
from patchfm.serialisation import build_model, load_model, save_model
from patchfm.cli import main

AFF = np.diag([1.5, 1.5, 2.0, 1.0])


def _img(path, shape=(20, 20, 20), dtype=np.float32, fill=None, seed=0):
    a = np.random.default_rng(seed).random(shape).astype(dtype) * 100 if fill is None else np.full(shape, fill, dtype)
    write_nifti(a, AFF, path, dtype=dtype)
    return Path(path)

def _cut(path, keep):
    b = Path(path).read_bytes(); Path(path).write_bytes(b[:keep(len(b))]); return Path(path)


class Bright(torch.nn.Module):
    "Two-class 'model': foreground where the intensity is high"
    def __init__(self): super().__init__(); self.w = torch.nn.Parameter(torch.zeros(1))
    def forward(self, x): fg = (x[:, :1] > 50).float(); return torch.cat([1 - fg, fg], 1) * 20 - 10

CFG = PatchConfig(patch_size=(16, 16, 16))
def _infer(paths, out, **kw): return patch_inference(Bright(), CFG, paths, save_dir=out, progress=False, **kw)


# ---------------------------------------------------------------- files: what is checked on read
def f_truncated_gz(d):  return _cut(_img(d / 'a.nii.gz'), lambda n: n // 2)
def f_truncated_gz_tail(d): return _cut(_img(d / 'a.nii.gz'), lambda n: n - 12)
def f_truncated_nii(d): return _cut(_img(d / 'a.nii'), lambda n: n - 100)
def f_header_only_nii(d): return _cut(_img(d / 'a.nii'), lambda n: 352)
def f_empty_file(d): (d / 'a.nii.gz').write_bytes(b''); return d / 'a.nii.gz'
def f_garbage(d): (d / 'a.nii.gz').write_bytes(os.urandom(3000)); return d / 'a.nii.gz'
def f_text_named_nii(d): (d / 'a.nii').write_text('not an image\n' * 50); return d / 'a.nii'
def f_missing(d): return d / 'nothere.nii.gz'
def f_nan(d):
    a = np.ones((12, 12, 12), np.float32); a[1, 2, 3] = np.nan; a[0, 0, 0] = 0
    write_nifti(a, AFF, d / 'a.nii.gz'); return d / 'a.nii.gz'
def f_inf(d):
    a = np.ones((12, 12, 12), np.float32); a[1, 2, 3] = np.inf; a[4, 4, 4] = -np.inf
    write_nifti(a, AFF, d / 'a.nii'); return d / 'a.nii'
def f_nan_float64(d):
    a = np.zeros((12, 12, 12)); a[5, 5, 5] = np.nan
    write_nifti(a, AFF, d / 'a.nii.gz', dtype=np.float64); return d / 'a.nii.gz'
def f_image_2d(d):
    nib.save(nib.Nifti1Image(np.ones((16, 16), np.float32), np.eye(4)), d / 'a.nii.gz'); return d / 'a.nii.gz'
def f_empty_dicom_folder(d): (d / 'dcm').mkdir(); return d / 'dcm'

BAD_FILES = {
    'truncated_nii_gz_half': (f_truncated_gz, 'truncated'),
    'truncated_nii_gz_last_bytes': (f_truncated_gz_tail, 'truncated'),
    'truncated_nii_uncompressed': (f_truncated_nii, 'truncated'),
    'nii_header_without_voxels': (f_header_only_nii, 'truncated'),
    'empty_file': (f_empty_file, ''),
    'random_bytes_named_nii_gz': (f_garbage, ''),
    'text_file_named_nii': (f_text_named_nii, ''),
    'missing_file': (f_missing, 'no such file'),
    'nan_voxel': (f_nan, '1 of'),
    'inf_and_minus_inf_voxels': (f_inf, '2 of'),
    'nan_voxel_float64_all_zero_otherwise': (f_nan_float64, 'NaN'),
    'image_2d_not_3d': (f_image_2d, '3D'),
    'folder_without_dicom_series': (f_empty_dicom_folder, 'DICOM'),
}

@pytest.mark.parametrize('reader', ['load_volume', 'MedImage.create'])
@pytest.mark.parametrize('case', list(BAD_FILES))
def test_bad_file_is_refused_naming_it(tmp_path, case, reader):
    make, what = BAD_FILES[case]
    p = make(tmp_path)
    read = load_volume if reader == 'load_volume' else MedImage.create
    with pytest.raises(MedicalImageError) as e: read(p)
    assert str(p) in str(e.value) and what in str(e.value)


@pytest.mark.parametrize('case', ['truncated_nii_gz_half', 'truncated_nii_uncompressed', 'image_2d_not_3d', 'missing_file'])
def test_read_header_refuses(tmp_path, case):
    p = BAD_FILES[case][0](tmp_path)
    with pytest.raises(MedicalImageError, match=str(p)): read_header(p)


@pytest.mark.parametrize('policy,value', [('zero', 0.0), (-5, -5.0), (2.5, 2.5)])
def test_nonfinite_opt_in_replaces(tmp_path, policy, value):
    p = f_nan(tmp_path)
    m = MedImage.create(p, apply_reorder=False, nonfinite=policy)
    assert torch.isfinite(m).all() and float(m[0, 1, 2, 3]) == value and float(m[0, 0, 0, 0]) == 0 and float(m[0, 5, 5, 5]) == 1


@pytest.mark.parametrize('policy', ['nan', 'ignore', float('nan'), float('inf'), True, None])
def test_nonfinite_policy_validated(tmp_path, policy):
    with pytest.raises(ValueError, match='nonfinite'): load_volume(_img(tmp_path / 'a.nii.gz'), nonfinite=policy)


def test_multi_member_gzip_is_sound(tmp_path):
    "Accepted: a .nii.gz of two gzip members (the trailer holds only the last member's length)"
    p = _img(tmp_path / 'a.nii.gz')
    raw = gzip.decompress(p.read_bytes())
    q = tmp_path / 'b.nii.gz'; q.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    check_payload(q)
    torch.testing.assert_close(load_volume(q)[0], load_volume(p)[0])


def test_trailing_bytes_after_voxels_accepted(tmp_path):
    p = _img(tmp_path / 'a.nii'); ref = load_volume(p)[0]
    with open(p, 'ab') as f: f.write(b'\0' * 64)
    torch.testing.assert_close(load_volume(p)[0], ref)


def test_mask_with_nan_refused(tmp_path):
    a = np.zeros((12, 12, 12), np.float32); a[2, 2, 2] = np.nan; a[3, 3, 3] = 1
    write_nifti(a, AFF, tmp_path / 'm.nii.gz')
    with pytest.raises(MedicalImageError, match='m.nii.gz.*NaN'): MedMask.create(tmp_path / 'm.nii.gz')


def test_channels_of_different_grids_refused(tmp_path):
    a, b = _img(tmp_path / 'a.nii.gz'), _img(tmp_path / 'b.nii.gz', shape=(20, 20, 21))
    with pytest.raises(MedicalImageError, match='b.nii.gz'): load_volume([a, b])


# ---------------------------------------------------------------- datasets
def test_meddataset_names_truncated_mask(tmp_path):
    good = _img(tmp_path / 'g.nii.gz', dtype=np.uint8, fill=1)
    bad = _cut(_img(tmp_path / 'b.nii.gz', dtype=np.float32), lambda n: n // 2)
    with pytest.raises(MedicalImageError, match='b.nii.gz'): MedDataset(img_list=[good, bad], dtype=MedMask, progress=False)


def test_meddataset_folder_skips_hidden_temp_files(tmp_path):
    _img(tmp_path / 'a.nii.gz')
    (tmp_path / f'.b.nii.gz{TEMP_MARK}99999-x.nii.gz').write_bytes(b'partial')
    (tmp_path / '.hidden.nii.gz').write_bytes(b'partial')
    ds = MedDataset(path=tmp_path, progress=False)
    assert [Path(p).name for p in ds.paths] == ['a.nii.gz']


@pytest.mark.parametrize('stray', [255, 300, 99])
def test_meddataset_reports_stray_label_with_file(tmp_path, stray):
    a = np.zeros((10, 10, 10), np.uint16); a[2:4, 2:4, 2:4] = 1
    b = a.copy(); b[6, 6, 6] = stray
    write_nifti(a, AFF, tmp_path / 'ok.nii.gz'); write_nifti(b, AFF, tmp_path / 'odd.nii.gz')
    with pytest.warns(UserWarning, match=f'label {stray} in 1 file.*odd.nii.gz'):
        ds = MedDataset(path=tmp_path, dtype=MedMask, progress=False)
    assert list(ds.label_issues()['stray']) == [stray]
    assert ds.label_issues({stray: 0}) == {}  # an explicit mapping resolves it


def test_remap_labels(tmp_path):
    t = torch.tensor([0, 1, 255, 300])
    assert remap_labels(t, {255: 0, 300: 2}).tolist() == [0, 1, 0, 2]


# ---------------------------------------------------------------- config fields
@pytest.mark.parametrize('kw,field', [
    (dict(patch_size='96'), 'patch_size'),
    (dict(patch_size='969'), 'patch_size'),
    (dict(target_spacing='1.5'), 'target_spacing'),
    (dict(target_spacing='abc'), 'target_spacing'),
    (dict(target_spacing=[1, 'a', 2]), 'target_spacing'),
    (dict(nonfinite='nan'), 'nonfinite'),
    (dict(nonfinite=float('inf')), 'nonfinite'),
    (dict(label_map={'a': 1}), 'label_map'),
    (dict(label_map={255: -1}), 'label_map'),
    (dict(label_map=[(255, 0)]), 'label_map'),
    (dict(patch_size=(0, 16, 16)), 'patch_size'),
])
def test_config_field_refused(kw, field):
    with pytest.raises(ValueError, match=f'PatchConfig.{field}'): PatchConfig(**kw)


def test_config_label_map_json_round_trip(tmp_path):
    c = PatchConfig(label_map={255: 0}, nonfinite='zero')
    c.save(tmp_path / 'c.json')
    assert PatchConfig.load(tmp_path / 'c.json') == c


# ---------------------------------------------------------------- atomic writes follow the umask
@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)

@pytest.mark.parametrize('mask,mode', [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
@pytest.mark.parametrize('writer', ['write_nifti', 'atomic_write_text', 'PatchConfig.save'])
def test_written_files_follow_umask(tmp_path, umask, mask, mode, writer):
    umask(mask)
    p = {'write_nifti': lambda: write_nifti(np.zeros((4, 4, 4), np.uint8), AFF, tmp_path / 'x.nii.gz'),
         'atomic_write_text': lambda: atomic_write_text(tmp_path / 'x.txt', 'hi'),
         'PatchConfig.save': lambda: CFG.save(tmp_path / 'c.json')}[writer]()
    assert stat.S_IMODE(os.stat(p).st_mode) == mode
    assert not [f for f in tmp_path.iterdir() if f.name.startswith('.')]


def _unet(in_ch=1, out_ch=2):
    from monai.networks.nets import UNet
    return UNet(spatial_dims=3, in_channels=in_ch, out_channels=out_ch, channels=(4, 8), strides=(2,), num_res_units=0)

def test_save_model_files_follow_umask(tmp_path, umask):
    umask(0o022)
    p = save_model(_unet(), tmp_path / 'm', config=CFG)
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in p.iterdir()} == \
        {'model.safetensors': '0o644', 'config.json': '0o644', 'model.json': '0o644'}


def test_atomic_path_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / 'x.bin') as tmp: tmp.write_bytes(b'half'); raise RuntimeError('killed')
    assert list(tmp_path.iterdir()) == []


def test_remove_stale_temps_only_of_dead_writers(tmp_path):
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f'.x.nii.gz{TEMP_MARK}{dead}-abc.nii.gz'; stale.write_bytes(b'x')
    live = tmp_path / f'.y.nii.gz{TEMP_MARK}{os.getpid()}-abc.nii.gz'; live.write_bytes(b'x')
    assert remove_stale_temps(tmp_path) == [stale] and live.exists()


# ---------------------------------------------------------------- batch inference
@pytest.mark.parametrize('names', [('a/ct.nii.gz', 'b/ct.nii.gz'), ('x.nii', 'x.nii.gz'), ('s.nii.gz', 's.nii.gz')],
                         ids=['same_name_two_folders', 'nii_and_nii_gz', 'same_file_twice'])
def test_colliding_outputs_refused_before_predicting(tmp_path, names):
    paths = []
    for n in names:
        p = tmp_path / n; p.parent.mkdir(exist_ok=True)
        paths.append(p if p.exists() else _img(p))
    with pytest.raises(ValueError) as e: _infer(paths, tmp_path / 'out')
    assert str(paths[0]) in str(e.value) and str(paths[1]) in str(e.value)
    assert not (tmp_path / 'out').exists() or not list((tmp_path / 'out').iterdir())


def test_dotted_names_keep_their_case_name(tmp_path):
    p = _img(tmp_path / 'pt.4.v1.nii.gz'); q = _img(tmp_path / 'pt.4.v2.nii.gz', seed=1)
    res = _infer([p, q], tmp_path / 'out', return_predictions=False)
    assert [o.name for o in res.outputs] == ['pt.4.v1_pred.nii.gz', 'pt.4.v2_pred.nii.gz']
    assert case_name(p) == 'pt.4.v1' and case_name([q]) == 'pt.4.v2'


@pytest.mark.parametrize('bad', ['truncated', 'nan', 'image_2d', 'all_zero_znorm', 'missing'])
def test_bad_file_in_batch_goes_to_failed_rest_runs(tmp_path, bad):
    good1, good2 = _img(tmp_path / 'g1.nii.gz'), _img(tmp_path / 'g2.nii.gz', seed=2)
    b = {'truncated': lambda: f_truncated_gz(tmp_path), 'nan': lambda: f_nan(tmp_path), 'image_2d': lambda: f_image_2d(tmp_path),
         'all_zero_znorm': lambda: _img(tmp_path / 'a.nii.gz', fill=0), 'missing': lambda: f_missing(tmp_path)}[bad]()
    with pytest.warns(RuntimeWarning):
        res = patch_inference(Bright(), CFG, [good1, b, good2], save_dir=tmp_path / 'out', progress=False,
                              pre_inference_tfms=[tio.ZNormalization()] if bad == 'all_zero_znorm' else None)
    assert list(res.failed) == [str(b)] and str(b) in res.failed[str(b)]
    assert res.outputs[1] is None and res.outputs[0].exists() and res.outputs[2].exists()
    assert not (tmp_path / 'out' / f'{case_name(b)}_pred.nii.gz').exists()


def _corrupt(kind, out, tmp_path):
    if kind == 'garbage': out.write_bytes(os.urandom(500))
    elif kind == 'truncated': _cut(out, lambda n: n // 2)
    elif kind == 'wrong_shape': write_nifti(np.zeros((5, 5, 5), np.uint8), AFF, out)
    elif kind == 'wrong_affine': write_nifti(np.zeros((20, 20, 20), np.uint8), np.diag([1., 1., 1., 1.]), out)
    elif kind == 'empty': out.write_bytes(b'')

@pytest.mark.parametrize('return_predictions', [False, True])
@pytest.mark.parametrize('kind', ['garbage', 'truncated', 'wrong_shape', 'wrong_affine', 'empty'])
def test_resume_repredicts_a_bad_existing_output(tmp_path, kind, return_predictions):
    p, q = _img(tmp_path / 'a.nii.gz'), _img(tmp_path / 'b.nii.gz', seed=3)
    first = _infer([p, q], tmp_path / 'out', return_predictions=False)
    good = nib.load(first.outputs[0]).get_fdata().copy()
    _corrupt(kind, first.outputs[0], tmp_path)
    mtime_b = first.outputs[1].stat().st_mtime_ns
    res = _infer([p, q], tmp_path / 'out', return_predictions=return_predictions)
    assert not res.failed and np.array_equal(nib.load(res.outputs[0]).get_fdata(), good)
    assert res.outputs[1].stat().st_mtime_ns == mtime_b  # the sound one is reused, not predicted again
    if return_predictions: assert all(isinstance(r, MedMask) for r in res)


@pytest.mark.parametrize('kw,field', [(dict(tta='yes'), 'tta'), (dict(batch_size=0), 'batch_size'), (dict(batch_size=1.5), 'batch_size'),
                                      (dict(threshold=2), 'threshold')])
def test_inference_arguments_validated_up_front(tmp_path, kw, field):
    p = _img(tmp_path / 'a.nii.gz')
    with pytest.raises(ValueError, match=field): _infer([p], tmp_path / 'out', **kw)
    assert not (tmp_path / 'out').exists() or not list((tmp_path / 'out').iterdir())


@pytest.mark.parametrize('model,cfg,what', [
    (lambda: _unet(in_ch=2), PatchConfig(patch_size=(16, 16, 16)), 'input channel'),
    (lambda: _unet(out_ch=5), PatchConfig(patch_size=(16, 16, 16), sampler_type='label', label_probabilities={0: .5, 1: .3, 2: .2}), 'output channel'),
], ids=['two_input_channels_for_one_channel_image', 'five_class_model_three_class_config'])
def test_model_must_fit_config_before_first_file(tmp_path, model, cfg, what):
    p = _img(tmp_path / 'a.nii.gz')
    with pytest.raises(ValueError, match=what) as e:
        patch_inference(model(), cfg, [p], save_dir=tmp_path / 'out', progress=False)
    assert not (tmp_path / 'out' / 'a_pred.nii.gz').exists()


# ---------------------------------------------------------------- model loading
def test_model_kwargs_that_download_are_refused():
    spec = dict(model_class='monai.networks.nets.DenseNet121', model_kwargs=dict(spatial_dims=3, in_channels=1, out_channels=2, pretrained=True))
    with pytest.raises(ValueError, match='pretrained=True'): build_model(spec)

def test_model_kwargs_with_url_are_refused():
    spec = dict(model_class='monai.networks.nets.UNet', model_kwargs=dict(spatial_dims=3, in_channels=1, out_channels=2,
                channels=[4, 8], strides=[2], act='https://example.com/x'))
    with pytest.raises(ValueError, match='example.com'): build_model(spec)

def test_no_download_while_building():
    from patchfm.serialisation import _no_unsafe_loading
    import torch.hub
    with _no_unsafe_loading():
        with pytest.raises(PermissionError, match='download'): torch.hub.load_state_dict_from_url('https://example.com/w.pth')
    assert torch.hub.load_state_dict_from_url.__name__ == 'load_state_dict_from_url'

@pytest.mark.parametrize('spec,what', [
    (dict(name='Lambda', kwargs=dict(function='os.system')), 'Lambda'),
    (dict(name='HistogramStandardization', kwargs=dict(landmarks='landmarks.pt')), 'landmarks'),
    (dict(name='HistogramStandardization', kwargs=dict(landmarks={'image': '/tmp/x.npy'})), 'landmarks'),
    (dict(name='Resample', kwargs=dict(target='/data/ref.nii.gz')), 'target'),
    (dict(name='NotATransform', kwargs={}), 'NotATransform'),
    (dict(name='ZNormalization', kwargs=[1]), 'kwargs'),
], ids=['lambda_callable', 'histogram_landmarks_file', 'histogram_landmarks_nested_path', 'resample_to_file', 'unknown_class', 'kwargs_not_object'])
def test_unsafe_transform_specs_refused(spec, what):
    with pytest.raises(ValueError, match=what): transform_from_spec(spec)

def test_histogram_landmarks_values_accepted():
    t = transform_from_spec(dict(name='HistogramStandardization', kwargs=dict(landmarks={'image': list(np.linspace(0, 100, 13))})))
    assert isinstance(t, tio.HistogramStandardization)

def _saved(tmp_path):
    return save_model(_unet(), tmp_path / 'm', config=CFG)

@pytest.mark.parametrize('damage,what', [
    ('pickle', 'pickle'), ('truncated', 'safetensors'), ('garbage', 'safetensors'),
    ('shape', 'shape'), ('model_json_pickle', 'pickle'), ('model_json_not_json', 'JSON'), ('transform_lambda', 'Lambda'),
    ('pretrained_kwarg', 'pretrained'),
])
def test_damaged_model_folder_refused_naming_file(tmp_path, damage, what):
    p = _saved(tmp_path)
    w, mj = p / 'model.safetensors', p / 'model.json'
    desc = json.loads(mj.read_text())
    if damage == 'pickle': torch.save(_unet().state_dict(), w)
    elif damage == 'truncated': _cut(w, lambda n: n // 2)
    elif damage == 'garbage': w.write_bytes(b'{"x": 1}' + os.urandom(100))
    elif damage == 'shape': desc['model_kwargs']['channels'] = [4, 16]; mj.write_text(json.dumps(desc))
    elif damage == 'model_json_pickle': mj.write_bytes(b'\x80\x04K\x01.')
    elif damage == 'model_json_not_json': mj.write_text('{nope')
    elif damage == 'transform_lambda': desc['pre_patch_tfms'] = [dict(name='Lambda', kwargs={})]; mj.write_text(json.dumps(desc))
    elif damage == 'pretrained_kwarg': desc['model_kwargs']['pretrained'] = True; mj.write_text(json.dumps(desc))
    with pytest.raises(ValueError, match=what) as e: load_model(p, device='cpu')
    assert str(p) in str(e.value)


def test_trusted_load_allows_file_arguments(tmp_path):
    p = _saved(tmp_path)
    desc = json.loads((p / 'model.json').read_text())
    desc['pre_patch_tfms'] = [dict(name='Resample', kwargs=dict(target=str(tmp_path / 'ref.nii.gz')))]
    (p / 'model.json').write_text(json.dumps(desc))
    with pytest.raises(ValueError): load_model(p, device='cpu')
    assert isinstance(load_model(p, device='cpu', trusted=True).pre_patch_tfms[0], tio.Resample)


@pytest.mark.parametrize('probs', [{0: .2, 1: .4, 99: .4}, {0: .5, 255: .5}, {0: .5, 2: .5}],
                         ids=['stray_class_99', 'ignore_value_255', 'gap_at_1'])
def test_patch_learner_refuses_noncontiguous_classes(probs):
    dls = types.SimpleNamespace(patch_config=PatchConfig(sampler_type='label', label_probabilities=probs), n_channels=1)
    with pytest.raises(ValueError, match='label_probabilities'): patch_learner(dls)


# ---------------------------------------------------------------- CLI: one line, exit 2
def _csv(tmp_path, text):
    (tmp_path / 'c.csv').write_text(text); return str(tmp_path / 'c.csv')

CLI_CASES = {
    'predict_missing_model_folder': (lambda t: ['predict', '--model', str(t / 'none'), '--input', 'x.nii.gz', '--output', str(t / 'o')], 'model.safetensors'),
    'demo_missing_csv': (lambda t: ['demo', '--csv', str(t / 'no.csv'), '--output', str(t / 'o')], 'no.csv'),
    'demo_header_only_csv': (lambda t: ['demo', '--csv', _csv(t, 'image,label\n'), '--output', str(t / 'o')], 'no rows'),
    'demo_blank_cell': (lambda t: ['demo', '--csv', _csv(t, 'image,label\na.nii.gz,\n'), '--output', str(t / 'o')], "column 'label'"),
    'demo_negative_spacing': (lambda t: ['demo', '--spacing', '-1', '--output', str(t / 'o')], '--spacing'),
    'demo_patch_size_zero': (lambda t: ['demo', '--patch-size', '0', '0', '0', '--output', str(t / 'o')], '--patch-size'),
    'demo_bad_label_map': (lambda t: ['demo', '--label-map', '255=0', '--output', str(t / 'o')], '--label-map'),
    'analyze_missing_file': (lambda t: ['analyze', str(t / 'none.nii.gz'), '--quiet', '--output', str(t / 'o')], 'none.nii.gz'),
    'analyze_empty_csv': (lambda t: ['analyze', _csv(t, ''), '--quiet', '--output', str(t / 'o')], 'c.csv'),
}

@pytest.mark.parametrize('case', list(CLI_CASES))
def test_cli_user_error_is_one_line(tmp_path, capsys, case):
    argv, what = CLI_CASES[case]
    assert main(argv(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('patchfm: error:') and what in err and len(err.splitlines()) == 1 and 'Traceback' not in err


def test_cli_analyze_stray_label_names_file(tmp_path, capsys):
    a = np.zeros((10, 10, 10), np.uint8); a[2:5, 2:5, 2:5] = 1; a[7, 7, 7] = 255
    write_nifti(a, AFF, tmp_path / 'odd.nii.gz')
    with pytest.warns(UserWarning):
        assert main(['analyze', str(tmp_path / 'odd.nii.gz'), '--quiet', '--output', str(tmp_path / 'o')]) == 2
    err = capsys.readouterr().err
    assert 'label 255' in err and 'odd.nii.gz' in err and not (tmp_path / 'o' / 'patch_config.json').exists()
    with pytest.warns(UserWarning):
        assert main(['analyze', str(tmp_path / 'odd.nii.gz'), '--quiet', '--output', str(tmp_path / 'o'), '--label-map', '255:0']) == 0
    assert PatchConfig.load(tmp_path / 'o' / 'patch_config.json').label_map == {255: 0}


def test_cli_subprocess_exit_code_and_debug(tmp_path):
    cmd = [sys.executable, '-m', 'patchfm.cli']
    r = subprocess.run(cmd + ['predict', '--model', str(tmp_path / 'none'), '--input', 'x', '--output', str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith('patchfm: error:') and 'Traceback' not in r.stderr
    r = subprocess.run(cmd + ['--debug', 'predict', '--model', str(tmp_path / 'none'), '--input', 'x', '--output', str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0 and 'Traceback' in r.stderr


def test_cli_demo_csv_with_dotted_names_trains_and_evaluates(tmp_path):
    "`patchfm demo --csv` with names like pt.4.v1.nii.gz: the held-out predictions are found and evaluated"
    from patchfm.demo import make_demo_dataset
    df = make_demo_dataset(tmp_path / 'd', n_cases=4, seed=3, size_range=(72, 76))
    for c in ('image', 'label'):
        new = []
        for i, p in enumerate(df[c]):
            q = Path(p).with_name(f'pt.{i}.v1.nii.gz'); Path(p).rename(q); new.append(str(q))
        df[c] = new
    df[['image', 'label']].to_csv(tmp_path / 'cases.csv', index=False)
    r = subprocess.run([sys.executable, '-m', 'patchfm.cli', 'demo', '--csv', str(tmp_path / 'cases.csv'), '--output', str(tmp_path / 'o'),
                        '--n-test', '1', '--epochs', '1', '--spacing', '4', '--patch-size', '16', '16', '16',
                        '--samples-per-volume', '2', '--divisor', '8'], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m = pd.read_csv(tmp_path / 'o' / 'metrics.csv')
    assert len(m) and all('pt.' in Path(p).name for p in m.pred_path)
    assert '\r' not in r.stdout  # not a terminal: lines, not bar redraws


# ---------------------------------------------------------------- loader workers
def test_worker_error_reaches_main_process_with_file(tmp_path):
    from patchfm.data import MedPatchDataLoaders
    rows = []
    for i in range(4):
        img = _img(tmp_path / f'i{i}.nii.gz', shape=(24, 24, 24), seed=i)
        lab = tmp_path / f'l{i}.nii.gz'; write_nifti((np.asarray(nib.load(img).dataobj) > 50).astype(np.uint8), AFF, lab)
        rows.append(dict(image=str(img), label=str(lab)))
    bad = np.asarray(nib.load(rows[1]['image']).dataobj).copy(); bad[3, 3, 3] = np.nan
    write_nifti(bad, AFF, rows[1]['image'])
    df = pd.DataFrame(rows); df['is_valid'] = [False, False, False, True]
    dls = MedPatchDataLoaders.from_df(df, 'image', 'label', valid_col='is_valid', bs=2, num_workers=2, seed=0,
                                      patch_config=PatchConfig(patch_size=(16, 16, 16), samples_per_volume=2, queue_length=4))
    try:
        with pytest.raises(Exception) as e:
            for _ in range(3):
                for _ in dls.train: pass
        assert rows[1]['image'] in str(e.value) or rows[1]['image'] in ''.join(map(str, e.value.__notes__ if hasattr(e.value, '__notes__') else []))
    finally: dls.release()


# ---------------------------------------------------------------- MLflow UI server dies with its parent
def test_mlflow_ui_server_dies_with_sigkilled_parent(tmp_path):
    "The server (here: a stand-in that answers /health) is stopped when the Python process that started it is SIGKILLed"
    (tmp_path / 'health').write_text('ok')
    script = textwrap.dedent(f"""
        import sys, time
        from patchfm.mlflow_ui import MLflowUIManager
        class Fake(MLflowUIManager):
            def command(self, port): return [sys.executable, '-m', 'http.server', str(port), '--bind', '127.0.0.1', '--directory', {str(tmp_path)!r}]
        m = Fake(backend_store_uri={(tmp_path / 'store').as_uri()!r}, timeout=60)
        m.start_ui(); print(m.proc.pid, flush=True); time.sleep(120)
    """)
    p = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, text=True)
    try:
        server = int(p.stdout.readline())
        os.kill(server, 0)  # running
        p.kill(); p.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try: os.kill(server, 0)
            except ProcessLookupError: break
            time.sleep(0.2)
        else: pytest.fail(f"server {server} outlived its SIGKILLed parent")
    finally:
        if p.poll() is None: p.kill()


# ---------------------------------------------------------------- kill test: no partial outputs, rerun completes
KILL_JOB = """
import sys, time, torch
from pathlib import Path
from patchfm.config import PatchConfig
from patchfm.inference import patch_inference
class Slow(torch.nn.Module):
    def __init__(self): super().__init__(); self.w = torch.nn.Parameter(torch.zeros(1))
    def forward(self, x):
        time.sleep(0.02); fg = (x[:, :1] > 50).float(); return torch.cat([1 - fg, fg], 1) * 20 - 10
d = Path(sys.argv[1])
res = patch_inference(Slow(), PatchConfig(patch_size=(16, 16, 16), patch_overlap=0.5), sorted(d.glob('in/*.nii.gz')),
                      save_dir=d / 'out', progress=False, return_predictions=False, batch_size=1)
print('done', len(res.paths), len(res.failed))
"""

def test_sigkill_mid_batch_leaves_no_partial_output_and_rerun_completes(tmp_path):
    (tmp_path / 'in').mkdir()
    for i in range(6): _img(tmp_path / 'in' / f'c{i}.nii.gz', shape=(40, 40, 40), seed=i)
    script = tmp_path / 'job.py'; script.write_text(KILL_JOB)
    run = lambda: subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def check_outputs():
        for f in (tmp_path / 'out').glob('*_pred.nii.gz'):
            check_payload(f)
            assert np.asarray(nib.load(f).dataobj).shape == (40, 40, 40)
    killed = 0
    for delay in (2.5, 4.0, 5.5, 7.0):
        p = run(); time.sleep(delay)
        if p.poll() is None: p.send_signal(signal.SIGKILL); killed += 1
        p.wait()
        if (tmp_path / 'out').exists(): check_outputs()
    assert killed >= 1
    p = run(); out, err = p.communicate(timeout=600)
    assert p.returncode == 0 and out.split()[:2] == ['done', '6'], err[-2000:]
    check_outputs()
    assert sorted(f.name for f in (tmp_path / 'out').iterdir()) == [f'c{i}_pred.nii.gz' for i in range(6)]


# ---------------------------------------------------------------- item 9: a mask value the model cannot predict names its file
@pytest.mark.parametrize('via', ['from_df', 'patch_learner'])
def test_mask_value_outside_model_classes_names_the_file(tmp_path, via):
    import pandas as pd
    from patchfm.core import write_nifti
    from patchfm.config import PatchConfig
    from patchfm.core import MedicalImageError
    from patchfm.data import MedPatchDataLoaders
    from patchfm.learner import patch_learner
    rng = np.random.default_rng(0)
    rows = []
    for i, top in enumerate([1, 3]):  # the second mask holds a 3: a 2-class model cannot predict it
        m = np.zeros((20, 20, 20), np.uint8); m[5:12, 5:12, 5:12] = top
        rows.append((str(write_nifti(rng.normal(0, 1, m.shape).astype(np.float32), np.eye(4), tmp_path / f'i{i}.nii.gz')),
                     str(write_nifti(m, np.eye(4), tmp_path / f'm{i}.nii.gz'))))
    df = pd.DataFrame(dict(image=[r[0] for r in rows], label=[r[1] for r in rows], is_valid=[False, False]))
    cfg = PatchConfig(patch_size=16, samples_per_volume=2, queue_length=4)  # uniform sampler
    kw = dict(valid_col='is_valid', patch_config=cfg, bs=2, seed=0, num_workers=0)
    if via == 'from_df': dls = MedPatchDataLoaders.from_df(df, 'image', 'label', n_classes=2, **kw)
    else:
        dls = MedPatchDataLoaders.from_df(df, 'image', 'label', **kw)
        patch_learner(dls, n_classes=2, model=torch.nn.Conv3d(1, 2, 1))
        assert dls.train.n_classes == 2
    with pytest.raises(MedicalImageError, match=r"m1\.nii\.gz: label value\(s\) \[3\] outside \[0, 2\)"): list(dls.train)


def test_safetensors_whose_header_starts_like_a_pickle_loads(tmp_path):
    "A safetensors header of exactly 128 bytes begins with 0x80, the first byte of a pickle: still loaded"
    m = torch.nn.Conv3d(2, 3, 1)
    save_model(m, tmp_path / 'm', config=PatchConfig(patch_size=8))
    assert (tmp_path / 'm' / 'model.safetensors').read_bytes()[:1] == b'\x80'
    got = load_model(tmp_path / 'm', device='cpu').model
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), got.state_dict().values()))
    torch.save(m.state_dict(), tmp_path / 'm' / 'model.safetensors')  # a real torch.save file is still refused
    with pytest.raises(ValueError, match='pickle'): load_model(tmp_path / 'm', device='cpu')


def test_parallel_reads_leave_warnings_alone(tmp_path):
    "MedDataset reads files in threads; afterwards a warning raised in the main thread is still shown"
    import warnings
    for i in range(6): write_nifti(np.zeros((6, 6, 6), np.uint8), AFF, tmp_path / f'm{i}.nii.gz')
    for _ in range(5):
        MedDataset(path=tmp_path, dtype=MedMask, progress=False, max_workers=4)
        with pytest.warns(UserWarning, match='still here'): warnings.warn('still here', UserWarning)


def test_label_report_compresses_missing_labels(tmp_path):
    "A 0/255 mask: the report names 255 with its file and the missing classes as one run, not 254 numbers"
    a = np.zeros((8, 8, 8), np.uint8); a[2:4, 2:4, 2:4] = 255
    write_nifti(a, AFF, tmp_path / 'm.nii.gz')
    with pytest.warns(UserWarning, match='label 255 in 1 file'): ds = MedDataset(path=tmp_path, dtype=MedMask, progress=False)
    rep = ds.label_report()
    assert 'no voxel holds label(s) 1-254' in rep and '2, 3' not in rep and 'm.nii.gz' in rep
