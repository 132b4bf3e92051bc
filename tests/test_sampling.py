"Tests of what training and validation patches are made of: delivered class balance, whole-volume validation tiles, flip axes"
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchio as tio

from patchfm.config import PatchConfig
from patchfm.core import write_nifti
from patchfm.data import MedPatchDataLoaders, PatchDataLoader
from patchfm.subjects import PatchSubjects, n_tiles
from patchfm.sampling import draw_centres, tile_starts
from patchfm.preprocess import flip_axes
from patchfm.metrics import AccumulatedDice

SHAPE = (32, 32, 32)

def make_case(d: Path, name: str, seed: int, shape=SHAPE):
    "An image whose foreground (a box and a ball) is 50 brighter than the background, and its mask"
    rng = np.random.default_rng(seed)
    m = np.zeros(shape, np.uint8)
    lo = rng.integers(2, 10, 3); m[lo[0]:lo[0] + 12, lo[1]:lo[1] + 9, lo[2]:lo[2] + 14] = 1
    g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing='ij'), -1)
    m[((g - np.array(shape) * 0.7) ** 2).sum(-1) < 25] = 1
    x = (rng.normal(100, 10, shape) + 50 * m).astype(np.float32)
    return str(write_nifti(x, np.eye(4), d / f'{name}.nii.gz')), str(write_nifti(m, np.eye(4), d / f'{name}_seg.nii.gz'))

@pytest.fixture(scope='module')
def cases(tmp_path_factory):
    d = tmp_path_factory.mktemp('sampling')
    rows = [make_case(d, f'c{i}', i) for i in range(4)]
    return pd.DataFrame(dict(image=[r[0] for r in rows], label=[r[1] for r in rows], is_valid=[False, False, True, True]))

CFG = PatchConfig(patch_size=16, samples_per_volume=6, queue_length=12, sampler_type='label', label_probabilities={0: 0.3, 1: 0.7})

# ---------------------------------------------------------------- delivered class balance
def test_label_sampler_delivers_three_class_frequencies():
    m = np.zeros((1, 40, 40, 40), np.uint8); m[0, 10:20, 10:20, 10:20] = 1; m[0, 22:26, 5:35, 20:30] = 2
    probs = {0: 0.2, 1: 0.3, 2: 0.5}
    c = draw_centres(4000, np.random.default_rng(0), (40, 40, 40), (16, 16, 16), 'label', m, probs)
    freq = np.bincount(m[0][tuple(c.T)], minlength=3) / len(c)
    assert np.allclose(freq, [0.2, 0.3, 0.5], atol=0.03), freq
    assert (c >= 8).all() and (c <= 40 - 16 + 8).all()  # every patch lies inside the volume

def test_training_batches_deliver_label_probabilities(cases):
    "Centre voxels of the patches a training loader delivers follow label_probabilities"
    cfg = CFG.replace(samples_per_volume=200, queue_length=400)
    dls = MedPatchDataLoaders.from_df(cases, 'image', 'label', valid_col='is_valid', patch_config=cfg, bs=50, seed=3, num_workers=0)
    ys = torch.cat([b[1] for b in dls.train])
    fg = (ys[:, 0, 8, 8, 8] > 0).float().mean().item()  # the centre voxel (index size // 2) of each patch
    # a voxel drawn within half a patch of a border is not the centre of its (shifted) patch: a few percent move
    assert len(ys) == 400 and abs(fg - 0.7) < 0.08, fg
    assert (ys.flatten(1).amax(1) > 0).float().mean().item() >= 0.7  # patches drawn for the foreground contain it

def test_label_sampler_reaches_every_labelled_voxel():
    "Foreground within half a patch of a border, or off the middle slice of a volume as thin as the patch, is sampled"
    shape, size = (40, 40, 16), (16, 16, 16)
    m = np.zeros((1, *shape), np.uint8); m[0, 0:3, 30:40, 1:3] = 1  # a corner object on slices 1-2 of 16
    c = draw_centres(500, np.random.default_rng(1), shape, size, 'label', m, {0: 0.0, 1: 1.0})
    lo, hi = c - 8, c + 8
    assert (lo >= 0).all() and (hi <= np.array(shape)).all()  # patches stay inside the volume
    assert all(m[0, a:d, b:e, z:f].any() for (a, b, z), (d, e, f) in zip(lo, hi))  # and each holds the object
    assert set(np.unique(c[:, 0])) == {8} and set(np.unique(c[:, 2])) == {8}  # shifted inward from the corner
    assert set(np.unique(c[:, 1])) == {30, 31, 32}  # y 30-31 are valid centres, 32-39 shift to 32
    bg = draw_centres(500, np.random.default_rng(2), shape, size, 'label', m, {0: 1.0, 1: 0.0})
    assert np.unique(bg[:, 0]).size > 10  # background anywhere: many positions, border ones included
    assert (bg[:, 0] == 8).mean() > 0.15 and (bg[:, 0] == 32).mean() > 0.15  # the border slabs get their share

# ---------------------------------------------------------------- whole-volume validation tiles
@pytest.mark.parametrize('shape', [(32, 32, 32), (33, 17, 16), (16, 40, 23)])
def test_tile_starts_cover_every_voxel_once_or_at_the_border(shape):
    size = (16, 16, 16)
    st = tile_starts(shape, size)
    assert len(st) == math.prod(math.ceil(s / p) for s, p in zip(shape, size))
    hits = np.zeros(shape, int)
    for a, b, c in st: hits[a:a + 16, b:b + 16, c:c + 16] += 1
    assert hits.min() == 1 and (st >= 0).all() and (st + 16 <= np.array(shape)).all()
    if all(s % 16 == 0 for s in shape): assert hits.max() == 1  # an exact tiling counts every voxel once

def test_validation_tiles_whole_volumes(cases):
    dls = MedPatchDataLoaders.from_df(cases, 'image', 'label', valid_col='is_valid', patch_config=CFG, bs=4, seed=0, num_workers=0)
    assert dls.valid.tiles and not dls.train.tiles
    assert n_tiles(dls.valid.subjects_dataset, CFG) == 2 * 8 and len(dls.valid) == 16 // 4
    ys = torch.cat([b[1] for b in dls.valid])
    masks = [np.asarray(tio.LabelMap(p).data) for p in cases.label[cases.is_valid]]
    assert len(ys) == 16 and int(ys.sum()) == sum(int(m.sum()) for m in masks)  # every foreground voxel once

def test_sampled_validation_on_request(cases):
    dls = MedPatchDataLoaders.from_df(cases, 'image', 'label', valid_col='is_valid', patch_config=CFG, bs=4, seed=0,
                                      num_workers=0, valid_tiles=False)
    assert not dls.valid.tiles and len(dls.valid) == math.ceil(2 * 6 / 4)

def test_tiled_accumulated_dice_is_the_whole_volume_dice(cases):
    "AccumulatedDice over a tiled validation pass equals the Dice of the same voxelwise rule on the whole volumes"
    dls = MedPatchDataLoaders.from_df(cases, 'image', 'label', valid_col='is_valid', patch_config=CFG, bs=4, seed=0, num_workers=0)
    rule = lambda x: torch.cat([125 - x, x - 125], 1)  # logits of a threshold at 125
    metric = AccumulatedDice(n_classes=2); metric.reset()
    for x, y in dls.valid: metric.update(rule(x), y)
    tp = fp = fn = 0
    for ip, mp in zip(cases.image[cases.is_valid], cases.label[cases.is_valid]):
        p, t = np.asarray(tio.ScalarImage(ip).data) > 125, np.asarray(tio.LabelMap(mp).data) > 0
        tp += (p & t).sum(); fp += (p & ~t).sum(); fn += (~p & t).sum()
    assert metric.value == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-6)

def test_tiles_are_for_validation_loaders(cases):
    subjects = PatchSubjects(cases.image.tolist(), cases.label.tolist())
    with pytest.raises(ValueError, match='tiles=True is for validation'): PatchDataLoader(subjects, CFG, train=True, tiles=True)
    dl = PatchDataLoader(subjects, CFG, train=False, shuffle=False, tiles=True, bs=8)
    assert len(dl) == 4 * 8 // 8 and dl.new(shuffle=False).tiles  # fastai's `new` (get_preds) keeps the tiling

# ---------------------------------------------------------------- flip axes (what test-time mirroring may use)
@pytest.mark.parametrize('tfms, reorder, expected', [
    ([tio.RandomFlip()], True, (0,)),
    ([tio.RandomFlip(axes=(0, 2))], True, (0, 2)),
    ([tio.RandomFlip(axes=('LR', 'IS'))], True, (0, 2)),
    ([tio.RandomFlip(axes=('AP',))], False, ()),  # anatomical names need the RAS+ frame
    ([tio.Compose([tio.RandomAffine(), tio.RandomFlip(axes=(1,))])], True, (1,)),
    ([tio.RandomFlip(axes=(0,), flip_probability=0.0)], True, ()),
    ([tio.RandomAffine()], True, ()),
    (None, True, ()),
], ids=['default', 'ints', 'anatomical', 'anatomical-no-reorder', 'in-compose', 'never-flips', 'no-flip', 'none'])
def test_flip_axes(tfms, reorder, expected):
    assert flip_axes(tfms, reorder) == expected


def test_patch_sampler_is_abstract():
    "A sampler must define `centres`: the base class cannot be used by itself"
    import pytest
    from patchfm.sampling import PatchSampler, UniformSampler
    with pytest.raises(TypeError, match='centres'): PatchSampler()
    assert UniformSampler()(4, __import__('numpy').random.default_rng(0), (10, 10, 10), (4, 4, 4)).shape == (4, 3)
