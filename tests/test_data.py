"Tests of patchfm.data: samplers, padding, splits, determinism, bad input, multi-channel, patch-size augmentation, fastai use"
import gc, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
import torch.nn.functional as F
import torchio as tio
from fastai.callback.core import Callback
from fastai.learner import Learner, load_learner
import fastai.callback.schedule  # Learner.lr_find

from patchfm.config import PatchConfig
from patchfm.core import MedicalImageError, write_nifti
import patchfm.data as pdata, patchfm.preprocess as ppre, patchfm.stream as pstream
from patchfm.data import MedPatchDataLoaders, PatchDataLoader
from patchfm.stream import PatchSource
from patchfm.subjects import PatchSubjects, split_subjects
from patchfm.sampling import draw_centres
from patchfm.preprocess import preprocess_subject

SHAPE = (32, 32, 24)

def ce_loss(out, y): return F.cross_entropy(out, y[:, 0])

def tiny_net(c_in=1, n_cls=2): return torch.nn.Sequential(torch.nn.Conv3d(c_in, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, n_cls, 1))

def make_case(d: Path, name: str, shape=SHAPE, affine=None, seed=0, cube=(10, 18), channels=1, mask_dtype=np.uint8, offset=100.):
    "An image (a list of files when channels > 1) and a mask with a foreground cube labelled 1"
    rng = np.random.default_rng(seed)
    affine = np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine
    m = np.zeros(shape, mask_dtype); lo, hi = cube; m[lo:hi, lo:hi, lo:hi] = 1
    imgs = []
    for c in range(channels):
        x = (rng.normal(offset * (c + 1), 10 * (c + 1), shape) + 50 * m).astype(np.float32)
        imgs.append(str(write_nifti(x, affine, d / f'{name}_c{c}.nii.gz')))
    mp = str(write_nifti(m, affine, d / f'{name}_seg.nii.gz', dtype=mask_dtype))
    return (imgs[0] if channels == 1 else imgs), mp

@pytest.fixture(scope='module')
def cases(tmp_path_factory):
    d = tmp_path_factory.mktemp('cases')
    rows = [make_case(d, f'case{i}', seed=i) for i in range(5)]
    return pd.DataFrame(dict(image=[r[0] for r in rows], label=[r[1] for r in rows]))

CFG = PatchConfig(patch_size=16, samples_per_volume=4, queue_length=8, sampler_type='label', label_probabilities={0: 0.5, 1: 0.5})

def dls_for(df, cfg=CFG, **kw):
    kw = {**dict(valid_pct=0.4, bs=2, seed=0, num_workers=0), **kw}
    return MedPatchDataLoaders.from_df(df, 'image', 'label', patch_config=cfg, **kw)

def children(): return psutil.Process().children(recursive=True)

# ---------------------------------------------------------------- batches
def test_batch_dtypes_shapes_device(cases):
    dls = dls_for(cases)
    assert len(dls.train.subjects_dataset) == 3 and len(dls.valid.subjects_dataset) == 2
    # validation tiles each 32x32x24 volume with 16^3 patches: 2 x 2 x 2 tiles per subject
    assert len(dls.train) == 3 * 4 // 2 and len(dls.valid) == 2 * 8 // 2
    batches = list(dls.train)
    assert len(batches) == len(dls.train)
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (2, 1, 16, 16, 16)
    assert y.dtype == torch.int64 and y.shape == (2, 1, 16, 16, 16)
    assert x.device.type == 'cpu' and y.device.type == 'cpu' and dls.device.type == 'cpu'
    assert set(torch.cat([b[1].flatten() for b in batches]).unique().tolist()) == {0, 1}
    s = dls.valid.subjects_dataset[0]
    assert str(s['image'].path) in cases.image.tolist() and str(s['mask'].path) in cases.label.tolist()
    assert [str(s['mask'].path) for s in dls.valid.subjects_dataset] == dls.valid.subjects_dataset.masks
    xo, yo = dls.one_batch()
    assert xo.shape == (2, 1, 16, 16, 16) and yo.dtype == torch.int64

def test_lazy_creation_reads_no_voxels(cases, monkeypatch):
    calls = []
    real = ppre.load_volume
    monkeypatch.setattr(ppre, 'load_volume', lambda *a, **k: calls.append(a) or real(*a, **k))
    dls = dls_for(cases)
    assert calls == []
    next(iter(dls.train))
    assert len(calls) > 0

# ---------------------------------------------------------------- samplers
def _centre_labels(dls, n_epochs):
    c = dls.patch_config.patch_size[0] // 2
    return torch.cat([b[1][:, 0, c, c, c] for _ in range(n_epochs) for b in dls.train])

def test_label_sampler_frequencies(cases):
    cfg = PatchConfig(patch_size=16, samples_per_volume=20, queue_length=40, sampler_type='label', label_probabilities={0: 0.2, 1: 0.8})
    dls = dls_for(cases, cfg, bs=10)
    lab = _centre_labels(dls, 5)  # 5 epochs x 3 subjects x 20 = 300 patch centres
    assert len(lab) == 300
    assert abs((lab == 1).float().mean().item() - 0.8) < 0.07
    # the same volumes sampled uniformly: the 8^3 cube holds few valid centres, so foreground centres are rare
    uni = dls_for(cases, cfg.replace(sampler_type='uniform', label_probabilities=None), bs=10)
    assert (_centre_labels(uni, 2) == 1).float().mean().item() < 0.35

def test_draw_centres_stay_valid():
    rng = np.random.default_rng(0)
    m = torch.zeros(1, 20, 18, 16, dtype=torch.uint8); m[0, 0:3, 0:3, 0:3] = 1  # foreground only near a corner
    c = draw_centres(200, rng, (20, 18, 16), (8, 8, 8), 'label', m, {0: 0.0, 1: 1.0})
    assert (c >= 4).all() and (c[:, 0] <= 16).all() and (c[:, 1] <= 14).all() and (c[:, 2] <= 12).all()
    # no valid foreground centre: falls back to uniform valid centres instead of failing
    assert draw_centres(5, rng, (20, 18, 16), (8, 8, 8), 'label', m, {0: 0.0, 1: 1.0}).shape == (5, 3)

def test_weighted_sampler(tmp_path):
    img, seg = make_case(tmp_path, 'w')
    w = np.zeros(SHAPE, np.float32); w[20:23, 12:14, 9:11] = 1.0
    wp = str(write_nifti(w, np.eye(4), tmp_path / 'w_map.nii.gz'))
    cfg = PatchConfig(patch_size=8, samples_per_volume=50, queue_length=50, sampler_type='weighted')
    src = PatchSource(PatchSubjects([img], [seg], [wp]), cfg, augment=False)
    centres = src[(0, 7)]['location'][:, :3] + 4
    assert ((centres[:, 0] >= 20) & (centres[:, 0] < 23) & (centres[:, 1] >= 12) & (centres[:, 1] < 14)
            & (centres[:, 2] >= 9) & (centres[:, 2] < 11)).all()
    df = pd.DataFrame(dict(image=[img, img], label=[seg, seg], prob=[wp, wp]))
    dls = MedPatchDataLoaders.from_df(df, 'image', 'label', patch_config=cfg, weight_col='prob', valid_pct=0.5, bs=5, seed=0, num_workers=0)
    assert next(iter(dls.train))[0].shape == (5, 1, 8, 8, 8)
    with pytest.raises(ValueError, match='weight_col'):
        MedPatchDataLoaders.from_df(df, 'image', 'label', patch_config=cfg, valid_pct=0.5)
    with pytest.raises(ValueError, match='weight_col'):
        MedPatchDataLoaders.from_df(df, 'image', 'label', patch_config=CFG, weight_col='prob', valid_pct=0.5)

# ---------------------------------------------------------------- padding
def test_padding_smaller_than_patch(tmp_path):
    img, seg = make_case(tmp_path, 'small', shape=(10, 12, 6), cube=(2, 5))
    df = pd.DataFrame(dict(image=[img, img], label=[seg, seg]))
    cfg = PatchConfig(patch_size=16, samples_per_volume=2, queue_length=4, padding_mode=-5)
    with pytest.warns(UserWarning, match='larger than every image'):
        dls = dls_for(df, cfg, valid_pct=0.5)
    x, y = next(iter(dls.train))
    assert x.shape == (2, 1, 16, 16, 16) and y.shape == (2, 1, 16, 16, 16)
    # (10,12,6) padded symmetrically to 16^3: x 3+3, y 2+2, z 5+5
    assert torch.all(x[:, :, :3] == -5) and torch.all(x[:, :, :, :, :5] == -5) and torch.all(x[:, :, 3:13, 2:14, 5:11] > 0)
    assert torch.all(y[:, :, :3] == 0) and torch.all(y[:, :, :, :, 11:] == 0) and y.sum() > 0

# ---------------------------------------------------------------- splits
def test_split_rules(cases):
    a, b = split_subjects(10, 0.3, seed=1), split_subjects(10, 0.3, seed=1)
    assert a == b and len(a[1]) == 3 and sorted(a[0] + a[1]) == list(range(10))
    assert any(split_subjects(10, 0.3, seed=s)[1] != a[1] for s in range(2, 6))
    assert len(split_subjects(3, 0.05, seed=0)[1]) == 1  # at least one validation case
    assert split_subjects(3, 0.0, seed=0) == ([0, 1, 2], [])
    with pytest.raises(ValueError, match='valid_pct'): split_subjects(3, 1.0)
    d1, d2 = dls_for(cases, seed=3), dls_for(cases, seed=3)
    assert d1.valid.subjects_dataset.masks == d2.valid.subjects_dataset.masks

def test_valid_col(cases):
    df = cases.assign(is_valid=[False, True, False, False, True])
    dls = MedPatchDataLoaders.from_df(df, 'image', 'label', valid_col='is_valid', patch_config=CFG, bs=2, num_workers=0)
    assert dls.valid.subjects_dataset.masks == [cases.label[1], cases.label[4]]
    with pytest.raises(ValueError, match='training split is empty'):
        MedPatchDataLoaders.from_df(df.assign(is_valid=True), 'image', 'label', valid_col='is_valid', patch_config=CFG)
    with pytest.raises(ValueError, match="valid_col 'is_valid'.*'yes'"):
        MedPatchDataLoaders.from_df(df.assign(is_valid='yes'), 'image', 'label', valid_col='is_valid', patch_config=CFG)

def test_valid_pct_zero_trains(cases):
    dls = dls_for(cases, valid_pct=0.0)
    assert len(dls.valid) == 0 and len(dls.valid.subjects_dataset) == 0 and list(dls.valid) == []
    learn = Learner(dls, tiny_net(), loss_func=ce_loss)
    with learn.no_logging(): learn.fit(1, 1e-3)
    assert learn.recorder.losses and np.isfinite(float(learn.recorder.losses[-1]))

# ---------------------------------------------------------------- determinism
def test_validation_patches_identical_across_epochs(cases):
    dls = dls_for(cases, patch_tfms=[tio.RandomNoise(std=1.0)])  # augmentation is for training only
    e1, e2 = list(dls.valid), list(dls.valid)
    assert len(e1) == len(e2) == len(dls.valid) == 8
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(e1, e2))
    assert not torch.equal(e1[0][0], e1[1][0])
    list(dls.train)  # a training epoch in between changes nothing
    assert all(torch.equal(p[0], q[0]) for p, q in zip(e1, list(dls.valid)))

def test_same_seed_same_batches_with_and_without_workers(cases):
    cfg = CFG.replace(samples_per_volume=2, queue_length=4)
    aug = [tio.RandomFlip(axes=(0, 1, 2)), tio.RandomNoise(std=0.5)]
    two_epochs = lambda dl: list(dl) + list(dl)
    b0 = two_epochs(dls_for(cases, cfg, patch_tfms=aug, seed=5).train)
    b0b = two_epochs(dls_for(cases, cfg, patch_tfms=aug, seed=5).train)
    dl2 = dls_for(cases, cfg, patch_tfms=aug, seed=5, num_workers=2).train
    b2 = list(dl2)
    pids = pids_of(children())
    assert len(pids) == 2  # persistent: the workers outlive the epoch, and the buffer carries over
    assert len(dl2.stream.buf) >= 4 - 2
    b2 += list(dl2)
    assert pids_of(children()) == pids  # the second epoch used the same processes
    other = two_epochs(dls_for(cases, cfg, patch_tfms=aug, seed=6).train)
    same = lambda p, q: len(p) == len(q) and all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(p, q))
    assert same(b0, b0b) and same(b0, b2) and not same(b0, other)
    dl2.release()
    assert dl2.stream is None and children() == []
    dl = dls_for(cases, cfg, seed=5).train  # a new epoch draws new patches
    assert not same(list(dl), list(dl))
    assert children() == []

# ---------------------------------------------------------------- worker lifecycle
def pids_of(procs): return sorted(p.pid for p in procs)

def test_workers_persist_across_epochs_and_release(cases):
    dls = dls_for(cases, num_workers=2, valid_pct=0.4)
    dl = dls.train
    assert dl.persistent and not dls.valid.persistent and dl.stream is None
    e1 = list(dl)
    pids = pids_of(children())
    assert len(pids) == 2 and len(e1) == len(dl)
    n1 = dl.stream.n_items
    assert n1 >= len(dl.subjects_dataset)  # the buffer (queue_length patches) is full at the epoch's end...
    assert len(dl.stream.buf) >= CFG.queue_length - dl.bs
    e2 = list(dl)
    assert pids_of(children()) == pids and len(e2) == len(dl)  # ...and the next epoch continues the same stream
    assert dl.stream.n_items - n1 == len(dl.subjects_dataset)  # one visit per subject and epoch
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(e1, e2))
    dls.release()  # workers stop, buffered patches are freed
    assert children() == [] and dl.stream is None
    next(iter(dl))  # the next iteration starts new workers
    assert len(children()) == 2 and pids_of(children()) != pids
    with dls: pass  # leaving a `with` block releases too
    assert children() == []

def test_abandoned_iteration_keeps_training_workers(cases):
    dls = dls_for(cases, num_workers=2)
    it = iter(dls.train); next(it)
    pids = pids_of(children())
    assert len(pids) == 2
    del it; gc.collect()
    assert pids_of(children()) == pids  # an abandoned training epoch (lr_find, a cancelled epoch) keeps the stream
    assert len(list(dls.train)) == len(dls.train) and pids_of(children()) == pids
    fig = dls.train.show_batch(max_n=2, show=False)  # `one_batch` is made in-process
    assert len(fig.axes) == 6 and pids_of(children()) == pids
    del dls; gc.collect()  # garbage collection stops the workers
    assert children() == []

def test_superseded_iteration_raises(cases):
    dl = dls_for(cases).train
    it1 = iter(dl); next(it1)
    it2 = iter(dl); next(it2)
    with pytest.raises(RuntimeError, match='superseded'): next(it1)
    assert len(list(it2)) == len(dl) - 1

def test_validation_workers_per_pass_unless_persistent(cases):
    dls = dls_for(cases, num_workers=2)
    ref = list(dls.valid)
    assert len(ref) == len(dls.valid) and children() == []  # validation workers stop after each pass
    pdl = dls_for(cases, num_workers=2, persistent_workers=True)
    assert pdl.valid.persistent and pdl.train.persistent
    same = lambda p, q: len(p) == len(q) and all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(p, q))
    v1 = list(pdl.valid)
    pids = pids_of(children())
    assert len(pids) == 2
    next(iter(pdl.valid))  # an abandoned validation pass must not shift the next one
    v2 = list(pdl.valid)
    v3 = list(pdl.valid)
    assert same(ref, v1) and same(ref, v2) and same(ref, v3)
    pdl.release()
    assert children() == []
    npd = dls_for(cases, num_workers=2, persistent_workers=False)
    list(npd.train)
    assert children() == [] and npd.train.stream is None

def test_shared_slots_account_for_every_patch(cases, monkeypatch):
    "Workers write patches into shared slots; slots are reused and none leaks, and patches that do not fit travel on their own"
    cfg = CFG.replace(samples_per_volume=2, queue_length=4)
    same = lambda p, q: len(p) == len(q) and all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(p, q))
    rdl = dls_for(cases, cfg, seed=1).train
    ref = [b for _ in range(3) for b in rdl]
    dl = dls_for(cases, cfg, num_workers=2, seed=1).train
    got, in_flight = [], 2 * 2 * cfg.samples_per_volume  # 2 workers x prefetch_factor 2 items x 2 patches
    for _ in range(3):
        got += list(dl)
        slab, buffered = dl.stream.slab, [e[2] for e in dl.stream.buf]
        assert slab is not None and buffered and None not in buffered  # every buffered patch sits in a slot
        assert len(slab.free) + len(buffered) + in_flight == slab.n_slots and not set(slab.free) & set(buffered)
    assert dl.stream.n_items > slab.n_slots // cfg.samples_per_volume  # slots were reused
    assert same(ref, got)
    monkeypatch.setattr(pstream, '_slab_size', lambda subjects, size: (3, *size))  # slots for 3 channels: nothing fits
    fb = dls_for(cases, cfg, num_workers=2, seed=1).train
    got = [b for _ in range(3) for b in fb]
    assert same(ref, got) and all(e[2] is None for e in fb.stream.buf)
    assert len(fb.stream.slab.free) + in_flight == fb.stream.slab.n_slots  # unused slots came back
    fb.release(); dl.release()
    assert children() == []

def test_wide_labels_with_workers(tmp_path):
    "Labels read as uint16 (few torch ops support it) travel as int32 through the slots and come out as int64 with their values"
    rows = []
    for i in range(3):
        img, seg = make_case(tmp_path, f'u{i}', seed=i)
        m = np.zeros(SHAPE, np.int16); m[10:18, 10:18, 10:18] = 300; m[2:6, 2:6, 2:6] = 1
        write_nifti(m, np.eye(4), seg, dtype=np.int16)
        rows.append((img, seg))
    df = pd.DataFrame(dict(image=[r[0] for r in rows], label=[r[1] for r in rows]))
    cfg = CFG.replace(label_probabilities={0: 0.2, 1: 0.3, 300: 0.5})
    b0, b2 = list(dls_for(df, cfg, valid_pct=0.0).train), list(dls_for(df, cfg, valid_pct=0.0, num_workers=2).train)
    assert len(b0) == len(b2) == 6 and all(torch.equal(u[1], v[1]) and torch.equal(u[0], v[0]) for u, v in zip(b0, b2))
    assert b2[0][1].dtype == torch.int64 and 300 in torch.cat([b[1].flatten() for b in b2]).unique().tolist()
    gc.collect()

def test_persistence_defaults_and_arguments(cases):
    dls = dls_for(cases, num_workers=2)
    assert dls.train.persistent and not dls.valid.persistent
    assert not dls.train.new(shuffle=False, drop_last=False).persistent  # fastai's get_preds loader: one pass
    assert dls_for(cases, persistent_workers=True).train.new(shuffle=False).persistent
    with pytest.raises(ValueError, match='prefetch_factor'): dls_for(cases, prefetch_factor=0)
    with pytest.raises(ValueError, match='worker_nice'): dls_for(cases, worker_nice=-1)
    assert dls.train.stream is None and children() == []  # creating loaders starts no process
    it = iter(dls.train); next(it)
    me = psutil.Process().nice()
    assert [p.nice() for p in children()] == [min(19, me + 5)] * 2  # workers yield the CPU to the training loop
    del it; dls.release()
    it = iter(dls_for(cases, num_workers=2, worker_nice=0).train); next(it)
    assert [p.nice() for p in children()] == [me] * 2
    del it; gc.collect()
    assert children() == []

def test_changed_setting_restarts_the_stream(cases):
    dl = dls_for(cases, num_workers=2).train
    list(dl)
    pids = pids_of(children())
    dl.patch_tfms = [tio.RandomFlip(axes=(0,))]  # the workers hold the old transforms: a new stream starts
    next(iter(dl))
    assert len(children()) == 2 and pids_of(children()) != pids
    dl.release()
    assert children() == []

def test_workers_stop_at_interpreter_exit(cases, tmp_path):
    "A script that never releases its loaders leaves no worker behind"
    import subprocess, sys
    script = tmp_path / 'leave.py'
    script.write_text(f"""
import pandas as pd, psutil
from patchfm.config import PatchConfig
from patchfm.data import MedPatchDataLoaders
df = pd.DataFrame(dict(image={cases.image.tolist()!r}, label={cases.label.tolist()!r}))
dls = MedPatchDataLoaders.from_df(df, 'image', 'label', valid_pct=0.4, bs=2, seed=0, num_workers=2,
                                  patch_config=PatchConfig(patch_size=16, samples_per_volume=4, queue_length=8))
it = iter(dls.train); next(it)
print(' '.join(str(p.pid) for p in psutil.Process().children(recursive=True)), flush=True)
""")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and 'Traceback' not in r.stderr and 'Exception ignored' not in r.stderr, r.stderr[-2000:]
    pids = [int(p) for p in r.stdout.split()]
    assert len(pids) == 2
    survivors = []
    for pid in pids:
        try: survivors.append(psutil.Process(pid))
        except psutil.NoSuchProcess: pass
    assert psutil.wait_procs(survivors, timeout=5)[1] == []  # every worker has exited

# ---------------------------------------------------------------- bad input
def test_missing_column_and_file(cases, tmp_path):
    with pytest.raises(KeyError, match="'seg'"): MedPatchDataLoaders.from_df(cases, 'image', 'seg', patch_config=CFG)
    bad = cases.copy(); bad.loc[2, 'label'] = str(tmp_path / 'nope.nii.gz')
    with pytest.raises(MedicalImageError, match='nope.nii.gz'): dls_for(bad)
    with pytest.raises(ValueError, match="column 'image', row 0"): dls_for(cases.assign(image=[None] + cases.image.tolist()[1:]))

def test_grid_mismatch_names_both_files(tmp_path, cases):
    img, _ = make_case(tmp_path, 'a')
    _, seg_shape = make_case(tmp_path, 'b', shape=(32, 32, 20))
    _, seg_aff = make_case(tmp_path, 'c', affine=np.diag([1.0, 1.0, 1.2, 1.0]))
    for seg in (seg_shape, seg_aff):
        df = pd.concat([cases, pd.DataFrame(dict(image=[img], label=[seg]))], ignore_index=True)
        with pytest.raises(MedicalImageError) as e: dls_for(df)
        assert Path(img).name in str(e.value) and Path(seg).name in str(e.value)

def test_channel_count_mismatch(tmp_path, cases):
    imgs, seg = make_case(tmp_path, 'mc', channels=2)
    df = pd.DataFrame(dict(image=cases.image.tolist()[:2] + [imgs], label=cases.label.tolist()[:2] + [seg]))
    with pytest.raises(MedicalImageError, match='channel'): dls_for(df)

def test_non_integer_mask_surfaces_from_worker(tmp_path, cases):
    img, seg = make_case(tmp_path, 'f', mask_dtype=np.float32)
    m = np.zeros(SHAPE, np.float32); m[10:18, 10:18, 10:18] = 0.5
    write_nifti(m, np.eye(4), seg, dtype=np.float32)
    df = pd.DataFrame(dict(image=[img] * 3, label=[seg] * 3))
    dls = dls_for(df, valid_pct=0.0, num_workers=2)
    with pytest.raises(MedicalImageError, match=r'f_seg\.nii\.gz.*non-integer'): list(dls.train)
    gc.collect()
    assert children() == []

def test_label_missing_from_probabilities(tmp_path):
    img, seg = make_case(tmp_path, 'l3')
    m = np.zeros(SHAPE, np.uint8); m[2:6, 2:6, 2:6] = 2; m[10:18, 10:18, 10:18] = 1
    write_nifti(m, np.eye(4), seg)
    df = pd.DataFrame(dict(image=[img] * 2, label=[seg] * 2))
    with pytest.raises(MedicalImageError, match=r'l3_seg\.nii\.gz.*label\(s\) \[2\]'): list(dls_for(df, valid_pct=0.5).train)
    ok = dls_for(df, CFG.replace(label_probabilities={0: 0.5, 1: 0.5, 2: 0.0}), valid_pct=0.5)
    assert next(iter(ok.train))[0].shape == (2, 1, 16, 16, 16)
    fg_only = dls_for(df, CFG.replace(label_probabilities={1: 1.0, 2: 1.0}), valid_pct=0.5)  # a missing 0 is allowed
    assert next(iter(fg_only.train))[1].max() >= 1

def test_bad_transforms_and_args(cases):
    with pytest.raises(TypeError, match=r'pre_patch_tfms\[0\]'): dls_for(cases, pre_patch_tfms=[lambda x: x])
    with pytest.raises(ValueError, match='bs'): dls_for(cases, bs=0)
    with pytest.raises(ValueError, match='valid_pct'): dls_for(cases, valid_pct=1.5)

# ---------------------------------------------------------------- multi-channel
def test_multi_channel(tmp_path):
    rows = [make_case(tmp_path, f'm{i}', channels=2, seed=i) for i in range(3)]
    df = pd.DataFrame(dict(image=[r[0] for r in rows], label=[r[1] for r in rows]))
    v = preprocess_subject(rows[0][0], CFG, [tio.ZNormalization()], mask=rows[0][1])
    assert v['image'].shape == (2, *SHAPE)
    assert torch.allclose(v['image'].mean((1, 2, 3)), torch.zeros(2), atol=1e-4)
    assert torch.allclose(v['image'].std((1, 2, 3)), torch.ones(2), atol=1e-3)
    dls = dls_for(df, pre_patch_tfms=[tio.ZNormalization()], valid_pct=0.34)
    x, y = next(iter(dls.train))
    assert x.shape == (2, 2, 16, 16, 16) and y.shape == (2, 1, 16, 16, 16)
    assert [str(p) for p in dls.valid.subjects_dataset[0]['image'].path] in [r[0] for r in rows]

# ---------------------------------------------------------------- patch-size augmentation
def test_patch_size_augmentation(cases):
    cfg = CFG.replace(samples_per_volume=8, queue_length=8, patch_size_range=((8, 17, 4), (8, 21, 4), (8, 13, 2)))
    choices = [{8, 12, 16}, {8, 12, 16, 20}, {8, 10, 12}]
    dl = dls_for(cases, cfg, valid_pct=0.4).train
    sizes = [s for e in range(6) for s in dl.batch_sizes(e)]
    assert all(s[a] in choices[a] for s in sizes for a in range(3))
    assert all(len({s[a] for s in sizes}) == len(choices[a]) for a in range(3))  # every size occurs
    assert len(set(sizes)) > 12 and any(s[0] != s[1] for s in sizes)  # axes drawn independently
    assert dl.batch_sizes(0) == dls_for(cases, cfg, valid_pct=0.4).train.batch_sizes(0)
    assert dl.batch_sizes(0) != dls_for(cases, cfg, valid_pct=0.4, seed=9).train.batch_sizes(0)
    dl2 = dls_for(cases, cfg, valid_pct=0.4).train
    expected = dl2.batch_sizes(0)
    got = [tuple(x.shape[2:]) for x, y in dl2]  # one size per batch, the drawn one
    assert got == expected and all(x.shape[0] == 2 for x, _ in dl2)
    c = [tuple(s // 2 for s in sz) for sz in got]
    assert dl2.sample_size == (16, 20, 16)
    valid = dls_for(cases, cfg, valid_pct=0.4).valid
    assert {tuple(x.shape[2:]) for x, _ in valid} == {(16, 16, 16)}

def test_patch_size_crop_keeps_centre_label(cases):
    "Label-sampled centres stay in the patch centre after the per-batch crop"
    cfg = CFG.replace(samples_per_volume=8, queue_length=8, label_probabilities={0: 0.0, 1: 1.0}, patch_size_range=(5, 17, 3))
    dl = dls_for(cases, cfg, valid_pct=0.4).train
    for x, y in dl:
        c = [s // 2 for s in x.shape[2:]]
        assert (y[:, 0, c[0], c[1], c[2]] == 1).all()

# ---------------------------------------------------------------- fastai
class WorkerPids(Callback):
    "The worker processes alive at the end of each training epoch"
    def before_fit(self): self.pids = []
    def after_train(self): self.pids.append(pids_of(children()))

def test_plain_learner_keeps_workers_between_fits(cases):
    dls = dls_for(cases, num_workers=2)
    learn = Learner(dls, tiny_net(), loss_func=ce_loss)
    with learn.no_logging(): learn.fit(1, 1e-3)
    pids = pids_of(children())
    assert len(pids) == 2  # like torch's persistent_workers: a second fit starts without waiting for new workers
    with learn.no_logging(): learn.fit(1, 1e-3)
    assert pids_of(children()) == pids
    dls.release()
    assert children() == []

def test_learner_fit_export_no_leaks(cases, tmp_path):
    before = children()
    dls = dls_for(cases, num_workers=2, pre_patch_tfms=[tio.ZNormalization()], patch_tfms=[tio.RandomFlip(axes=(0,))], path=tmp_path)
    seen = WorkerPids()
    learn = Learner(dls, tiny_net(), loss_func=ce_loss, cbs=[seen, pdata.ReleaseWorkersCallback()])
    with learn.no_logging(): learn.fit(2, 1e-3)
    assert len(learn.recorder.values) == 2 and np.isfinite(learn.recorder.values[-1][1])
    assert len(seen.pids) == 2 and len(seen.pids[0]) == 2 and seen.pids[0] == seen.pids[1]  # the same workers, both epochs
    assert children() == before  # ReleaseWorkersCallback stopped them at the end of fit
    preds, targs = learn.get_preds()
    assert preds.shape == (len(dls.valid.subjects_dataset) * 8, 2, 16, 16, 16) and targs.shape[1:] == (1, 16, 16, 16)  # 8 tiles each
    p2, t2 = learn.get_preds()
    assert torch.equal(t2, targs)
    with learn.no_logging(): learn.lr_find(num_it=4, show_plot=False)
    import matplotlib; matplotlib.use('Agg')
    learn.show_results(max_n=2)
    learn.export(tmp_path / 'export.pkl')
    gc.collect()
    assert children() == before
    l2 = load_learner(tmp_path / 'export.pkl')
    assert l2.dls.patch_config == dls.patch_config
    assert [type(t) for t in l2.dls.pre_patch_tfms] == [tio.ZNormalization]
    assert len(l2.dls.train.subjects_dataset) == 0
    assert len(learn.dls.train.subjects_dataset) == 3  # export restored the full loaders

# ---------------------------------------------------------------- cache
def test_cache_gives_the_same_batches(cases, tmp_path):
    cache = tmp_path / 'cache'
    kw = dict(pre_patch_tfms=[tio.ZNormalization()], patch_tfms=[tio.RandomFlip(axes=(0, 1, 2))], seed=3)
    plain = dls_for(cases, **kw)
    cached = dls_for(cases, cache_dir=cache, **kw)
    same = lambda p, q: len(p) == len(q) and all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(p, q))
    for _ in range(2):  # cold (writes the cache), then warm (memory-mapped reads)
        assert same(list(plain.train), list(cached.train)) and same(list(plain.valid), list(cached.valid))
    files = sorted(p.suffix for p in cache.iterdir())
    assert files.count('.json') == len(cases) and files.count('.npy') == 2 * len(cases)
    assert all(np.load(p, allow_pickle=False).ndim == 4 for p in cache.glob('*.npy'))

def test_cache_key_follows_files_and_settings(tmp_path):
    img, seg = make_case(tmp_path, 'k')
    k = ppre.cache_key([img], seg, None, CFG, [tio.ZNormalization()])
    assert k == ppre.cache_key([img], seg, None, CFG, [tio.ZNormalization()])
    assert k != ppre.cache_key([img], seg, None, CFG, [tio.ZNormalization(masking_method='mask')])
    assert k != ppre.cache_key([img], seg, None, CFG.replace(target_spacing=(2, 2, 2)), [tio.ZNormalization()])
    write_nifti(np.ones(SHAPE, np.float32), np.eye(4), img)
    import os; os.utime(img, ns=(1, 1))
    assert k != ppre.cache_key([img], seg, None, CFG, [tio.ZNormalization()])

def test_cache_refuses_random_pre_patch_tfms(cases, tmp_path):
    with pytest.raises(ValueError, match='RandomNoise'):
        dls_for(cases, cache_dir=tmp_path, pre_patch_tfms=[tio.Compose([tio.ZNormalization(), tio.RandomNoise()])])
