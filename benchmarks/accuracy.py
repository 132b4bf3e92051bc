"""Accuracy on real scans: patchfm and fastMONAI trained and run through the same calls, scored on the original grid.

The protocol is the fastMONAI patch tutorial's (../shared/seeds/004): `MedDataset`-free, a `PatchConfig` with a
label sampler {0: 0.3, 1: 0.7}, `MedPatchDataLoaders.from_df` with `ZNormalization` before patching and
`RandomAffine` + `RandomFlip` on the patches, a MONAI UNet (16, 32, 64, 128), strides 2, one residual unit, instance
norm, `CustomLoss(DiceCELoss)`, Adam, `fit_one_cycle`, then `patch_inference` (hann, overlap 0.5) writing NIfTI that
is scored here against the label on the file's own grid. Each (library, task, seed) runs in its own process; the
fastMONAI runs use the interpreter given by `--fastmonai-python` (a separate virtualenv with `pip install fastMONAI`:
never a dependency of patchfm).

Data: `bash ../shared/realdata/fetch.sh DIR` (about 75 MB; never commit the files). Few cases per task is the reality
here, so each task is cut from one scan into a training region and a disjoint test region (the validation row of the
tutorial's split is the training region again):

| task | scan (publisher, licence) | structure | split |
|---|---|---|---|
| ct_organs | TotalSegmentator 2.18.0 test reference `example_ct` (Apache-2.0), 3 mm CT, 122 x 101 x 112 | all 61 labelled structures as one (organs, bones, muscles, vessels: 25 % of the volume, the kind of large object brain extraction is) | train on the patient's left half, test on the right half |
| mr_organs | TotalSegmentator 2.18.0 `example_mr_sm` (Apache-2.0), 3 mm MR, 117 x 91 x 20 (thinner than a patch: padding is exercised) | all 23 labelled structures as one (21 %) | as ct_organs |
| cta_heart | TotalSegmentator 2.18.0 `aorta_report/example_ct` with `heart.nii.gz` (Apache-2.0), 1.5 mm CTA, 233 x 167 x 191 | heart | train on the patient's right part of the heart, test on the left |
| ct_kidneys, mr_kidneys (not run by default) | as ct_organs, mr_organs | kidneys (labels 2, 3) | one kidney to train on, the other to test |

Each split is at the middle of the structure's extent along the left-right axis, so both regions hold part of it
and the flip augmentation of the protocol makes the two sides alike without making them the same.

(TotalSegmentator's reference labels are that model's predictions, reviewed only by its tests.) Head MRIs with brain
masks are deliberately absent: they are kept for an independent check.

    .venv/bin/python benchmarks/accuracy.py --data DIR --fastmonai-python /path/to/fmvenv/bin/python
    .venv/bin/python benchmarks/accuracy.py --data DIR --quick                  # smoke run: 1 task, 1 seed, 3 epochs
    .venv/bin/python benchmarks/accuracy.py --data DIR --libraries patchfm --set tta=none   # one factor switched

Prints mean +- sd of Dice, HD95 (mm), precision, recall, volume ratio and connected components per library and task,
then patchfm - fastMONAI differences; `--json-out FILE` keeps every raw number. Default settings: 12 minutes on a
quiet 2-core machine for both libraries (measured 2026-12-06: patchfm 7 min with `--variants base,no_pp`, fastMONAI
5 min). A script, not a test: it
asserts nothing.

`--set KEY=VALUE` switches one patchfm factor for an ablation (see `PATCHFM_FACTORS`), `--variants` runs inference
variants of each trained model (mirroring, largest component) without training again, `--save-best` keeps the
epoch with the best validation Dice as the tutorial does.

Ablation of 2026-12-06 (the post-processing rows: a second run the same evening, `--variants base,no_pp`; defaults above: 30 epochs, 32^3 patches at 3 mm, spv 16, bs 2; seeds 42, 7, 1; "before"
is patchfm at fb4b709, "now" after the label-sampler and mirroring changes; each factor switched alone; Dice,
HD95 (mm), precision, recall, predicted / true volume as mean +- sd over the seeds). The machine was shared with
other jobs: single runs took 22-600 s, the whole comparison about 80 min; on a quiet machine single runs took
20-100 s, about 25 min for the default run.

| task | pipeline | seeds | Dice | HD95 (mm) | precision | recall | volume / truth |
|---|---|---|---|---|---|---|---|
| ct_organs | fastMONAI 0.12, its defaults | 3 | 0.744 ± 0.033 | 30.4 ± 14.8 | 0.69 ± 0.05 | 0.81 ± 0.01 | 1.16 ± 0.09 |
| ct_organs | fastMONAI + the same mirroring (tta) | 3 | 0.767 ± 0.022 | 29.3 ± 16.5 | 0.73 ± 0.04 | 0.81 ± 0.01 | 1.11 ± 0.07 |
| ct_organs | fastMONAI + keep_largest_component | 3 | 0.752 ± 0.027 | 21.3 ± 5.8 | 0.71 ± 0.04 | 0.80 ± 0.01 | 1.14 ± 0.07 |
| ct_organs | patchfm before this work | 3 | 0.732 ± 0.035 | 46.9 ± 14.6 | 0.66 ± 0.07 | 0.82 ± 0.03 | 1.25 ± 0.18 |
| ct_organs | patchfm before + mirroring only | 3 | 0.762 ± 0.032 | 42.7 ± 18.7 | 0.71 ± 0.07 | 0.83 ± 0.03 | 1.19 ± 0.18 |
| ct_organs | patchfm before + keep_largest_component | 3 | 0.736 ± 0.038 | 38.5 ± 22.0 | 0.67 ± 0.08 | 0.82 ± 0.03 | 1.23 ± 0.19 |
| ct_organs | patchfm: new label sampler + mirroring, no post-processing | 3 | 0.785 ± 0.006 | 20.4 ± 9.7 | 0.76 ± 0.02 | 0.82 ± 0.03 | 1.08 ± 0.07 |
| ct_organs | patchfm now (defaults: + post-processing chosen on validation, which cleaned) | 3 | 0.788 ± 0.009 | 15.4 ± 3.5 | 0.76 ± 0.01 | 0.82 ± 0.03 | 1.07 ± 0.06 |
| ct_organs | patchfm before + new label sampler only | 3 | 0.767 ± 0.007 | 24.8 ± 11.1 | 0.73 ± 0.03 | 0.81 ± 0.03 | 1.12 ± 0.08 |
| ct_organs | patchfm before + SaveModelCallback, validation tiles | 3 | 0.729 ± 0.032 | 47.9 ± 14.0 | 0.66 ± 0.07 | 0.82 ± 0.03 | 1.25 ± 0.17 |
| ct_organs | patchfm before + SaveModelCallback, sampled validation | 3 | 0.732 ± 0.035 | 46.9 ± 14.6 | 0.66 ± 0.07 | 0.82 ± 0.03 | 1.25 ± 0.18 |
| ct_organs | patchfm before + augmentation in voxel frame | 2 | 0.693 ± 0.019 | 41.6 ± 19.6 | 0.62 ± 0.08 | 0.79 ± 0.08 | 1.29 ± 0.30 |
| mr_organs | fastMONAI 0.12, its defaults | 3 | 0.640 ± 0.058 | 66.8 ± 3.0 | 0.73 ± 0.03 | 0.57 ± 0.08 | 0.79 ± 0.09 |
| mr_organs | fastMONAI + the same mirroring (tta) | 3 | 0.677 ± 0.045 | 47.2 ± 22.9 | 0.82 ± 0.06 | 0.58 ± 0.08 | 0.72 ± 0.14 |
| mr_organs | fastMONAI + keep_largest_component | 3 | 0.580 ± 0.064 | 62.5 ± 1.7 | 0.93 ± 0.02 | 0.42 ± 0.07 | 0.46 ± 0.07 |
| mr_organs | patchfm before this work | 3 | 0.599 ± 0.012 | 55.9 ± 29.4 | 0.78 ± 0.07 | 0.49 ± 0.02 | 0.63 ± 0.08 |
| mr_organs | patchfm before + mirroring only | 3 | 0.615 ± 0.010 | 49.9 ± 25.8 | 0.84 ± 0.03 | 0.48 ± 0.02 | 0.57 ± 0.06 |
| mr_organs | patchfm before + keep_largest_component | 3 | 0.505 ± 0.013 | 63.4 ± 2.6 | 0.92 ± 0.01 | 0.35 ± 0.01 | 0.38 ± 0.01 |
| mr_organs | patchfm now (defaults: new label sampler + mirroring; post-processing declined on validation) | 3 | 0.749 ± 0.011 | 14.4 ± 3.2 | 0.87 ± 0.02 | 0.66 ± 0.03 | 0.75 ± 0.05 |
| mr_organs | patchfm before + new label sampler only | 3 | 0.726 ± 0.024 | 45.3 ± 23.8 | 0.82 ± 0.04 | 0.65 ± 0.03 | 0.79 ± 0.05 |
| mr_organs | patchfm before + augmentation in voxel frame | 3 | 0.591 ± 0.042 | 62.4 ± 17.1 | 0.76 ± 0.08 | 0.49 ± 0.04 | 0.64 ± 0.09 |
| cta_heart | fastMONAI 0.12, its defaults | 3 | 0.707 ± 0.040 | 109.5 ± 18.4 | 0.66 ± 0.11 | 0.77 ± 0.05 | 1.18 ± 0.24 |
| cta_heart | fastMONAI + the same mirroring (tta) | 3 | 0.710 ± 0.033 | 100.6 ± 2.0 | 0.67 ± 0.08 | 0.76 ± 0.03 | 1.15 ± 0.16 |
| cta_heart | fastMONAI + keep_largest_component | 3 | 0.792 ± 0.021 | 29.0 ± 6.8 | 0.83 ± 0.11 | 0.77 ± 0.06 | 0.94 ± 0.17 |
| cta_heart | patchfm before this work | 3 | 0.660 ± 0.063 | 111.4 ± 13.2 | 0.59 ± 0.11 | 0.76 ± 0.03 | 1.31 ± 0.25 |
| cta_heart | patchfm before + mirroring only | 3 | 0.665 ± 0.059 | 110.5 ± 8.6 | 0.60 ± 0.11 | 0.76 ± 0.04 | 1.31 ± 0.27 |
| cta_heart | patchfm before + keep_largest_component | 3 | 0.810 ± 0.038 | 21.7 ± 8.5 | 0.87 ± 0.05 | 0.76 ± 0.03 | 0.87 ± 0.01 |
| cta_heart | patchfm: new label sampler + mirroring, no post-processing | 3 | 0.715 ± 0.058 | 111.1 ± 4.7 | 0.69 ± 0.09 | 0.75 ± 0.01 | 1.11 ± 0.13 |
| cta_heart | patchfm before + new label sampler only | 3 | 0.703 ± 0.062 | 108.6 ± 2.9 | 0.67 ± 0.10 | 0.75 ± 0.01 | 1.14 ± 0.17 |
| cta_heart | patchfm now (defaults: + post-processing chosen on validation, which cleaned) | 3 | 0.799 ± 0.040 | 25.2 ± 10.2 | 0.86 ± 0.08 | 0.75 ± 0.01 | 0.88 ± 0.07 |
"""
from __future__ import annotations
import argparse, json, math, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

TASKS = {  # case folder of fetch.sh, labels merged into the foreground (None: every label), split axis, side trained on
    'ct_organs': dict(case='ts_abdomen_ct', labels=None, axis='R', train='low'),
    'mr_organs': dict(case='ts_abdomen_mr', labels=None, axis='R', train='low'),
    'cta_heart': dict(case='ts_thorax_cta', labels=[1], axis='R', train='high'),
    'ct_kidneys': dict(case='ts_abdomen_ct', labels=[2, 3], axis='R', train='low'),
    'mr_kidneys': dict(case='ts_abdomen_mr', labels=[2, 3], axis='R', train='low'),
}
DEFAULT_TASKS = ['ct_organs', 'mr_organs', 'cta_heart']

# inference variants run on each trained model (no retraining): name -> patch_inference keywords
VARIANTS = {'base': {}, 'tta_x': dict(tta=[(), (2,)]), 'lcc': dict(keep_largest=True), 'no_pp': dict(keep_largest=False),
            'tta_none': dict(tta=None)}

# patchfm factors an ablation can switch (worker side): name -> (default, meaning)
PATCHFM_FACTORS = {
    'tta': ('default', "patch_inference tta: 'default' (the library's), 'none', 'x' (the flip the protocol trains with), 'all'"),
    'padding': ('default', "PatchConfig.padding_mode: 'default' (the library's), a number, 'minimum', 'edge', ..."),
    'keep_largest': ('default', "patch_inference keep_largest: 'default', 'auto', 'true', 'false'"),
    'aug_affine': ('world', "patch augmentation frame: 'world' (patch affine) or 'identity' (fastMONAI: 1 mm voxels)"),
    'valid_tiles': ('default', "MedPatchDataLoaders.from_df valid_tiles: 'default', 'true' (validation tiles whole volumes), 'false' (sampled patches)"),
    'probs': ('0.3,0.7', "label_probabilities of background and foreground"),
    'overlap': ('0.5', "patch_overlap at inference"),
}

# ---------------------------------------------------------------- task files
def _axis_of(affine, code: str) -> int:
    "The voxel axis most aligned with world axis R (code 'R') or S (code 'S')"
    w = {'R': 0, 'S': 2}[code]
    return int(np.argmax(np.abs(np.asarray(affine)[w, :3])))

def make_task(data: Path, task: str, out: Path) -> dict:
    "Cut the task's scan into train/test regions (NIfTI with translated affines); reused when present"
    import nibabel as nib
    spec = TASKS[task]
    out.mkdir(parents=True, exist_ok=True)
    files = {k: out / f'{k}.nii.gz' for k in ('train_image', 'train_label', 'test_image', 'test_label')}
    if all(f.exists() for f in files.values()): return {k: str(v) for k, v in files.items()}
    case = data / spec['case']
    im = nib.load(str(next(case.glob('image.*')))); lb = nib.load(str(next(case.glob('label.*'))))
    a, L = np.asarray(im.dataobj), np.asarray(lb.dataobj)
    fg = (L > 0 if spec['labels'] is None else np.isin(L, spec['labels'])).astype(np.uint8)
    ax = _axis_of(im.affine, spec['axis'])
    idx = np.flatnonzero(fg.sum(axis=tuple(i for i in range(3) if i != ax)))
    cut = int((idx[0] + idx[-1] + 1) // 2)
    lo, hi = (slice(0, cut), slice(cut, a.shape[ax]))
    # 'low'/'high' are in world terms: flip when the voxel axis runs against the world axis
    w = {'R': 0, 'S': 2}[spec['axis']]
    increasing = im.affine[w, ax] > 0
    train_sl, test_sl = (lo, hi) if (spec['train'] == 'low') == increasing else (hi, lo)
    for name, sl in (('train', train_sl), ('test', test_sl)):
        s = [slice(None)] * 3; s[ax] = sl
        start = np.zeros(3); start[ax] = sl.start
        aff = im.affine.copy(); aff[:3, 3] = im.affine[:3, :3] @ start + im.affine[:3, 3]
        img = nib.Nifti1Image(a[tuple(s)].astype(np.float32), aff); img.set_qform(aff, 1); img.set_sform(aff, 1)
        lab = nib.Nifti1Image(fg[tuple(s)], aff); lab.set_qform(aff, 1); lab.set_sform(aff, 1)
        nib.save(img, str(files[f'{name}_image'])); nib.save(lab, str(files[f'{name}_label']))
    return {k: str(v) for k, v in files.items()}

# ---------------------------------------------------------------- scoring (numpy/scipy only: neutral to both libraries)
def score(pred_path, label_path) -> dict:
    "Dice, HD95 (mm), precision, recall, volume ratio and components of a binary prediction on the label's grid"
    import nibabel as nib
    from scipy import ndimage
    p_img, t_img = nib.load(str(pred_path)), nib.load(str(label_path))
    p, t = np.asarray(p_img.dataobj) > 0, np.asarray(t_img.dataobj) > 0
    if p.shape != t.shape or not np.allclose(p_img.affine, t_img.affine, atol=1e-3):
        raise ValueError(f"{pred_path}: grid {p.shape} differs from the label's {t.shape}")
    sp = np.sqrt((t_img.affine[:3, :3] ** 2).sum(0))
    tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
    dice = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    def surface(m): return m & ~ndimage.binary_erosion(m, structure=np.ones((3, 3, 3)))
    if p.any() and t.any():
        sp_, st_ = surface(p), surface(t)
        d_pt = ndimage.distance_transform_edt(~st_, sampling=sp)[sp_]
        d_tp = ndimage.distance_transform_edt(~sp_, sampling=sp)[st_]
        hd95 = float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))
    else: hd95 = float('nan')
    return dict(dice=dice, hd95=hd95, precision=tp / (tp + fp) if tp + fp else float('nan'),
                recall=tp / (tp + fn) if tp + fn else float('nan'), volume_ratio=(tp + fp) / max(tp + fn, 1),
                components=int(ndimage.label(p, structure=np.ones((3, 3, 3)))[1]))

# ---------------------------------------------------------------- workers (run in the library's own interpreter)
def _common(lib, args):
    import random, torch, torchio as tio
    random.seed(args.seed); np.random.seed(args.seed); torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    pre = [tio.ZNormalization()]
    aug = [tio.RandomAffine(scales=(0.95, 1.3), degrees=15, translation=5, p=0.5), tio.RandomFlip(p=0.5)]
    return pre, aug

def _model():
    from monai.networks.nets import UNet
    from monai.networks.layers import Norm
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                num_res_units=1, norm=Norm.INSTANCE)

def _save_best(args) -> list:
    "The tutorial's SaveModelCallback on the validation accumulated_dice (the best epoch is loaded after fit)"
    if not args.save_best: return []
    from fastai.callback.tracker import SaveModelCallback
    return [SaveModelCallback(monitor='accumulated_dice', comp=np.greater, fname='best', with_opt=False)]

def _df(files):
    import pandas as pd
    return pd.DataFrame(dict(image=[files['train_image']] * 2, label=[files['train_label']] * 2, is_valid=[False, True]))

def worker_patchfm(args, files, out: Path) -> str:
    from patchfm.all import PatchConfig, MedPatchDataLoaders, CustomLoss, AccumulatedDice, patch_inference
    from fastai.learner import Learner
    from fastai.optimizer import Adam
    from monai.losses import DiceCELoss
    f = dict((k, v[0]) for k, v in PATCHFM_FACTORS.items()); f.update(args.factors)
    pre, aug = _common('patchfm', args)
    if f['aug_affine'] == 'identity':  # what fastMONAI does: patches augmented as 1 mm voxels at the origin
        import patchfm.stream as pd_
        orig = pd_.PatchSource._augment
        pd_.PatchSource._augment = lambda self, x, y, affine: orig(self, x, y, np.eye(4))
    p0, p1 = (float(v) for v in f['probs'].split(','))
    pad = {} if f['padding'] == 'default' else dict(padding_mode=float(f['padding']) if f['padding'][:1].isdigit() or f['padding'][:1] == '-' else f['padding'])
    cfg = PatchConfig(patch_size=[args.patch] * 3, samples_per_volume=args.spv, sampler_type='label',
                      label_probabilities={0: p0, 1: p1}, queue_length=64, queue_num_workers=2,
                      patch_overlap=float(f['overlap']), aggregation_mode='hann', target_spacing=[args.spacing] * 3, **pad)
    vt = {} if f['valid_tiles'] == 'default' else dict(valid_tiles=f['valid_tiles'] == 'true')
    dls = MedPatchDataLoaders.from_df(_df(files), img_col='image', mask_col='label', valid_col='is_valid',
                                      patch_config=cfg, pre_patch_tfms=pre, patch_tfms=aug, bs=args.bs, seed=args.seed, **vt)
    learn = Learner(dls, _model(), loss_func=CustomLoss(loss_func=DiceCELoss(to_onehot_y=True, softmax=True, include_background=True)),
                    opt_func=Adam, metrics=[AccumulatedDice(n_classes=2)], path=out)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(args.epochs, args.lr, cbs=_save_best(args))
    dls.release()
    kw = {}
    if f['tta'] != 'default': kw['tta'] = {'none': None, 'x': [(), (2,)], 'auto': 'auto', 'all': 'all'}[f['tta']]
    if f['keep_largest'] != 'default': kw['keep_largest'] = 'auto' if f['keep_largest'] == 'auto' else f['keep_largest'] == 'true'
    preds = {}
    for v in args.variants:  # inference variants of the same trained model
        kv = dict(kw, **VARIANTS[v]); d = out / v
        res = patch_inference(learn, cfg, [files['test_image']], pre_inference_tfms=pre, save_dir=str(d), progress=False, **kv)
        if res.failed: raise RuntimeError(str(res.failed))
        preds[v] = str(res.paths[0])
        print(f"{v}: largest component kept for classes {res.keep_largest}", file=sys.stderr, flush=True)
    return preds

def worker_fastmonai(args, files, out: Path) -> str:
    from fastMONAI.vision_all import PatchConfig, MedPatchDataLoaders, CustomLoss, AccumulatedDice, patch_inference
    from fastai.learner import Learner
    from fastai.optimizer import Adam
    from monai.losses import DiceCELoss
    pre, aug = _common('fastmonai', args)
    cfg = PatchConfig(patch_size=[args.patch] * 3, samples_per_volume=args.spv, sampler_type='label',
                      label_probabilities={0: 0.3, 1: 0.7}, queue_length=64, queue_num_workers=2, patch_overlap=0.5,
                      aggregation_mode='hann', target_spacing=[args.spacing] * 3)
    dls = MedPatchDataLoaders.from_df(_df(files), img_col='image', mask_col='label', valid_col='is_valid',
                                      patch_config=cfg, pre_patch_tfms=pre, patch_tfms=aug, bs=args.bs, seed=args.seed)
    learn = Learner(dls, _model(), loss_func=CustomLoss(loss_func=DiceCELoss(to_onehot_y=True, softmax=True, include_background=True)),
                    opt_func=Adam, metrics=[AccumulatedDice(n_classes=2)], path=out)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(args.epochs, args.lr, cbs=_save_best(args))
    preds = {}
    for v in args.variants:
        kv, d = dict(VARIANTS[v]), out / v
        if kv.get('tta'): kv['tta'] = kv['tta'] if isinstance(kv['tta'], list) else True
        if kv.pop('keep_largest', False): cfg.keep_largest_component = True
        patch_inference(learn, cfg, [files['test_image']], pre_inference_tfms=pre, save_dir=str(d), progress=False, **kv)
        cfg.keep_largest_component = False
        found = sorted(d.glob('*.nii*'))
        if not found: raise RuntimeError(f"fastMONAI wrote no prediction in {d}")
        preds[v] = str(found[0])
    return preds

def run_worker(args):
    files = json.loads(args.files)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    preds = (worker_patchfm if args.worker == 'patchfm' else worker_fastmonai)(args, files, out)
    print('RESULT ' + json.dumps(dict(preds=preds, seconds=time.perf_counter() - t0)), flush=True)

# ---------------------------------------------------------------- driver
def summarise(rows, libs, tasks):
    keys = ['dice', 'hd95', 'precision', 'recall', 'volume_ratio', 'components']
    ms = lambda v: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
    table = {}
    print(f"\n{'task':12s} {'library':18s} {'n':>2s} " + ' '.join(f'{k:>17s}' for k in keys))
    for t in tasks:
        for lib in libs:
            rs = [r for r in rows if r['task'] == t and r['library'] == lib and 'dice' in r]
            if not rs: continue
            table[(t, lib)] = {k: ms([r[k] for r in rs]) for k in keys}
            print(f"{t:12s} {lib:18s} {len(rs):2d} " + ' '.join(f"{m:8.3f} +- {s:6.3f}" for m, s in table[(t, lib)].values()))
    pairs = [(a, b) for a in libs if a.startswith('patchfm') for b in libs if b.startswith('fastmonai') and b[9:] == a[7:]]
    if pairs:
        print("\npatchfm - fastMONAI, same inference variant (mean Dice difference; Dice sd; HD95 ratio; precision; recall)")
    for la, lb in pairs:
        for t in tasks:
            a, b = table.get((t, la)), table.get((t, lb))
            if a and b:
                print(f"{t:12s} {la:18s} dDice {a['dice'][0] - b['dice'][0]:+.3f}  sd {a['dice'][1]:.3f} vs {b['dice'][1]:.3f}  "
                      f"HD95 x{a['hd95'][0] / b['hd95'][0]:.2f}  precision {a['precision'][0]:.3f} vs {b['precision'][0]:.3f}  "
                      f"recall {a['recall'][0]:.3f} vs {b['recall'][0]:.3f}")
    return table

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--data', default=os.environ.get('PATCHFM_REALDATA', str(Path.home() / '.cache/patchfm-realdata')))
    ap.add_argument('--tasks', default=','.join(DEFAULT_TASKS))
    ap.add_argument('--libraries', default='patchfm,fastmonai')
    ap.add_argument('--fastmonai-python', default=os.environ.get('FASTMONAI_PYTHON'))
    ap.add_argument('--seeds', default='42,7,1')
    ap.add_argument('--epochs', type=int, default=30)
    ap.add_argument('--patch', type=int, default=32)
    ap.add_argument('--spacing', type=float, default=3.0)
    ap.add_argument('--spv', type=int, default=16)
    ap.add_argument('--bs', type=int, default=2)
    ap.add_argument('--lr', type=float, default=3e-3)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--save-best', action='store_true', help="keep the epoch with the best validation accumulated_dice, as the tutorial does")
    ap.add_argument('--variants', default='base', help=f'inference variants of each trained model, among {sorted(VARIANTS)}')
    ap.add_argument('--set', action='append', default=[], help='patchfm factor KEY=VALUE (see PATCHFM_FACTORS)')
    ap.add_argument('--work', default=None, help='folder for task files and predictions (default: a temporary one)')
    ap.add_argument('--quick', action='store_true', help='smoke run: one task, one seed, 3 epochs')
    ap.add_argument('--json-out', default=None)
    ap.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--files', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--out', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--seed', type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument('--factors', default='{}', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.factors, args.variants = json.loads(args.factors), args.variants.split(',')
        return run_worker(args)
    factors = dict(s.split('=', 1) for s in args.set)
    bad = set(factors) - set(PATCHFM_FACTORS)
    if bad: ap.error(f"unknown factor(s) {sorted(bad)}; known: {sorted(PATCHFM_FACTORS)}")
    data = Path(args.data)
    if not (data / 'cases.csv').exists():
        print(f"no real data in {data}: run `bash ../shared/realdata/fetch.sh {data}` first", file=sys.stderr); return 2
    tasks, seeds = args.tasks.split(','), [int(s) for s in args.seeds.split(',')]
    if args.quick: tasks, seeds, args.epochs = tasks[:1], seeds[:1], 3
    libs = [l for l in args.libraries.split(',') if l]
    if 'fastmonai' in libs and not args.fastmonai_python:
        print("fastMONAI skipped: give --fastmonai-python (a venv with `pip install fastMONAI`)", file=sys.stderr)
        libs.remove('fastmonai')
    work = Path(args.work or tempfile.mkdtemp(prefix='patchfm-accuracy-'))
    rows = []
    print(f"settings: tasks {tasks}, seeds {seeds}, epochs {args.epochs}, patch {args.patch}, spacing {args.spacing} mm, "
          f"spv {args.spv}, bs {args.bs}, lr {args.lr}, save_best {args.save_best}, patchfm factors {factors or 'defaults'}; work {work}", flush=True)
    for t in tasks:
        files = make_task(data, t, work / 'tasks' / t)
        for seed in seeds:
            for lib in libs:
                out = work / 'runs' / f'{t}_{lib}_{seed}_{abs(hash(json.dumps(factors, sort_keys=True))) % 10**6}'
                py = sys.executable if lib == 'patchfm' else args.fastmonai_python
                cmd = [py, __file__, '--worker', lib, '--files', json.dumps(files), '--out', str(out), '--seed', str(seed),
                       '--epochs', str(args.epochs), '--patch', str(args.patch), '--spacing', str(args.spacing),
                       '--spv', str(args.spv), '--bs', str(args.bs), '--lr', str(args.lr), '--threads', str(args.threads),
                       *(['--save-best'] if args.save_best else []),
                       '--factors', json.dumps(factors if lib == 'patchfm' else {}), '--variants', args.variants]
                env = dict(os.environ, PYTHONPATH=str(ROOT) if lib == 'patchfm' else '', MPLBACKEND='Agg')
                p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                res = [l for l in p.stdout.splitlines() if l.startswith('RESULT ')]
                if p.returncode or not res:
                    err = (p.stderr or p.stdout)[-2000:]
                    print(f"{t} {lib} seed {seed}: FAILED\n{err}", flush=True)
                    rows.append(dict(task=t, library=lib, seed=seed, error=err)); continue
                r = json.loads(res[-1][7:])
                for v, pred in r['preds'].items():
                    name = lib if v == 'base' else f'{lib}+{v}'
                    row = dict(task=t, library=name, seed=seed, factors=factors if lib == 'patchfm' else {},
                               seconds=r['seconds'], **score(pred, files['test_label']))
                    print(f"{t:12s} {name:18s} seed {seed:3d}: Dice {row['dice']:.3f} HD95 {row['hd95']:6.1f} mm "
                          f"precision {row['precision']:.3f} recall {row['recall']:.3f} vol x{row['volume_ratio']:.2f} "
                          f"components {row['components']} ({row['seconds']:.0f} s)", flush=True)
                    rows.append(row)
    names = sorted({r['library'] for r in rows}, key=lambda n: (n.split('+')[0] != 'patchfm', n))
    summarise(rows, names, tasks)
    if args.json_out: Path(args.json_out).write_text(json.dumps(dict(settings=vars(args) | {'factors': factors}, rows=rows), indent=1, default=str))

if __name__ == '__main__':
    sys.exit(main())
