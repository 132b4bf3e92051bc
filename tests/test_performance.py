import copy, math, warnings

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.callback.schedule import fit_one_cycle  # noqa: F401 (patches Learner.fit_one_cycle)
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import set_seed

from patchfm.config import PatchConfig
from patchfm.core import write_nifti
from patchfm.data import MedPatchDataLoaders
from patchfm.subjects import PatchSubjects
from patchfm.serialisation import SavedModel
from patchfm.performance import (
    MEASURES, NoPatchesSeenError, OverlapSuggestion, PatchPerformance, PatchPerformanceCallback,
    PatchPerformanceTracker, TorchPatchPerformance, distance_to_faces, get_measure, performance_profile,
    WHERE, foreground_where, get_where, record_performance_map, suggest_overlap,
    windows_for_overlap)
from patchfm.plot import plot_patch_performance


def _bce_batch(bs, shape=(4, 4, 4)):
    pred = torch.full((bs, 1, *shape), 0.5)
    pred[:, :, :2] = 0.9
    return pred, torch.ones_like(pred)


# ---------------------------------------------------------------- the original's semantics

def test_numeric_example_bce():
    loss = PatchPerformance.track(nn.BCELoss(), measure='binary_cross_entropy')
    for bs in (4, 2): loss(*_bce_batch(bs))
    assert loss.n_patches_seen == 6
    pmap = loss.calculate_performance()
    assert pmap.shape == (1, 4, 4, 4)
    assert torch.allclose(pmap[0, :2], torch.tensor(0.1054), atol=1e-4)
    assert torch.allclose(pmap[0, 2:], torch.tensor(0.6931), atol=1e-4)
    assert torch.allclose(pmap[0, :2], torch.tensor(-math.log(0.9)))


def test_alias_and_defaults():
    assert TorchPatchPerformance is PatchPerformance
    pp = TorchPatchPerformance.track(nn.CrossEntropyLoss())
    assert pp.measure == 'cross_entropy' and PatchPerformance(nn.CrossEntropyLoss()).measure == 'cross_entropy'
    logits, targ = torch.randn(2, 3, 4, 4, 4), torch.randint(0, 3, (2, 4, 4, 4))
    pp(logits, targ)  # the default measure works on multi-class logits
    assert pp.calculate_performance().shape == (1, 4, 4, 4)


@pytest.mark.parametrize('make_loss,measure,n_cls', [
    (lambda: nn.BCEWithLogitsLoss(), 'binary_cross_entropy_with_logits', 1),
    (lambda: CrossEntropyLossFlat(axis=1), 'cross_entropy', 3),
    (lambda: __import__('monai.losses', fromlist=['DiceCELoss']).DiceCELoss(to_onehot_y=True, softmax=True), 'dice_error', 3),
])
def test_loss_and_gradients_bit_identical(make_loss, measure, n_cls):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 6, 6, 6)
    targ = torch.rand(2, 1, 6, 6, 6).round() if n_cls == 1 else torch.randint(0, n_cls, (2, 1, 6, 6, 6))
    net = nn.Conv3d(1, n_cls, 3, padding=1)
    grads, values = [], []
    for tracked in (False, True):
        net.zero_grad()
        loss = make_loss()
        if tracked: loss = PatchPerformance.track(loss, measure=measure)
        value = loss(net(x), targ)
        value.backward()
        values.append(value.detach().clone())
        grads.append([p.grad.clone() for p in net.parameters()])
        if tracked: assert loss.n_patches_seen == 2
    assert torch.equal(values[0], values[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_returns_what_the_loss_returns():
    sentinel = object()
    pp = PatchPerformance(lambda pred, targ: sentinel, measure='l1')
    assert pp(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)) is sentinel
    pp2 = PatchPerformance(lambda input, target: (input - target).abs().sum(), measure='l1')
    assert pp2(input=torch.zeros(1, 1, 2, 2), target=torch.ones(1, 1, 2, 2)).item() == 4
    assert torch.equal(pp2.calculate_performance(), torch.ones(1, 2, 2))
    lenient = PatchPerformance(lambda *args, **kwargs: 0.0, measure='l1')
    with pytest.raises(TypeError, match='prediction, target'): lenient(torch.zeros(1, 1, 2, 2))
    with pytest.raises(TypeError, match='callable'): PatchPerformance(3)


def test_attribute_fall_through_and_deepcopy():
    base = CrossEntropyLossFlat(axis=1)
    pp = PatchPerformance.track(base)
    logits = torch.randn(2, 3, 4, 4)
    assert torch.equal(pp.activation(logits), base.activation(logits))
    assert torch.equal(pp.decodes(logits), base.decodes(logits))
    assert pp.reduction == 'mean'
    pp.reduction = 'none'  # written through to the wrapped loss (fastai's `loss_not_reduced` does this)
    assert base.reduction == 'none' and 'reduction' not in pp.__dict__
    pp.reduction = 'mean'
    with pytest.raises(AttributeError): pp.no_such_attribute
    with pytest.raises(AttributeError): pp.measure = 'l1'  # the measure is fixed at construction
    pp(logits, torch.randint(0, 3, (2, 4, 4)))
    clone = copy.deepcopy(pp)
    assert clone.n_patches_seen == 2 and clone.loss is not base
    assert torch.equal(clone.calculate_performance(), pp.calculate_performance())


def test_usable_as_learner_loss_func():
    set_seed(0)
    loss = PatchPerformance.track(CrossEntropyLossFlat(axis=1), measure='cross_entropy')
    learn = Learner(_tiny_dls(), _tiny_model(), loss_func=loss)
    with learn.no_logging(): learn.fit(1, 1e-2)
    assert loss.n_patches_seen == 8 + 4  # training and validation batches
    with learn.loss_not_reduced(): assert loss.loss.reduction == 'none'  # written through to the wrapped loss
    assert loss.reduction == 'mean'
    preds, targs, losses = learn.get_preds(with_loss=True)
    per_voxel = -preds.gather(1, targs.long()).log()  # unreduced CE from the activated predictions
    assert torch.allclose(losses, per_voxel.flatten(1).mean(1), atol=1e-5)
    assert torch.allclose(preds.sum(1), torch.ones(4, 8, 8, 8), atol=1e-5)  # softmax activation fell through
    assert loss.n_patches_seen == 16


def test_error_before_any_call_and_reset():
    pp = PatchPerformance.track(nn.BCELoss(), measure='binary_cross_entropy')
    with pytest.raises(NoPatchesSeenError, match='no patches seen'): pp.calculate_performance()
    assert issubclass(NoPatchesSeenError, RuntimeError)
    pp(*_bce_batch(3))
    assert pp.n_patches_seen == 3
    pp.reset()
    assert pp.n_patches_seen == 0 and pp.performance_maps() == {}
    with pytest.raises(NoPatchesSeenError): pp.calculate_performance()
    pp(*_bce_batch(1))
    assert pp.n_patches_seen == 1
    assert torch.allclose(pp.calculate_performance()[0, 0], torch.tensor(-math.log(0.9)))


# ---------------------------------------------------------------- measures

def test_measure_values_on_hand_made_tensors():
    p = torch.tensor([[[0.9, 0.5, 0.2]]])  # (B=1, C=1, 3)
    t = torch.tensor([[[1.0, 1.0, 0.0]]])
    assert torch.allclose(MEASURES['binary_cross_entropy'](p, t), torch.tensor([[[-math.log(.9), math.log(2), -math.log(.8)]]]))
    logit = torch.logit(p)
    assert torch.allclose(MEASURES['binary_cross_entropy_with_logits'](logit, t), MEASURES['binary_cross_entropy'](p, t), atol=1e-6)
    assert torch.allclose(MEASURES['l1'](p, t), torch.tensor([[[0.1, 0.5, 0.2]]]))
    assert torch.equal(MEASURES['l2'](p, t), MEASURES['l1'](p, t))  # the original's 'l2' is |t - p|
    assert torch.allclose(MEASURES['l2_with_logits'](logit, t), torch.tensor([[[0.1, 0.5, 0.2]]]), atol=1e-6)
    # a target without its channel axis is accepted when C = 1
    assert torch.allclose(MEASURES['l1'](p, t[:, 0]), MEASURES['l1'](p, t))


def test_l2_alias_tracked_equals_l1():
    a, b = PatchPerformance(nn.L1Loss(), 'l2'), PatchPerformance(nn.L1Loss(), 'l1')
    pred, targ = torch.rand(3, 2, 4, 4, 4), torch.rand(3, 2, 4, 4, 4)
    a(pred, targ); b(pred, targ)
    assert torch.equal(a.calculate_performance(), b.calculate_performance())
    assert torch.allclose(a.calculate_performance(), (targ - pred).abs().mean(0))


def test_cross_entropy_int_and_one_hot():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 0.0]]).T.reshape(1, 2, 2, 1)  # (B, C=2, 2, 1)
    idx = torch.tensor([[1, 0]]).reshape(1, 1, 2, 1)
    ce = MEASURES['cross_entropy'](logits, idx)
    # voxel 0: logits (0, ln 3) -> p(class 1) = 3/4; voxel 1: logits (2, 0) -> p(class 0) = e^2/(1+e^2)
    expected = torch.tensor([-math.log(0.75), -math.log(math.exp(2) / (1 + math.exp(2)))]).reshape(1, 1, 2, 1)
    assert ce.shape == (1, 1, 2, 1)
    assert torch.allclose(ce, expected)
    assert torch.allclose(MEASURES['cross_entropy'](logits, idx[:, 0]), expected)
    one_hot = F.one_hot(idx[:, 0], 2).movedim(-1, 1)
    assert torch.allclose(MEASURES['cross_entropy'](logits, one_hot), expected)
    assert torch.allclose(MEASURES['cross_entropy'](logits, one_hot.float()), expected)


def test_cross_entropy_bad_input():
    with pytest.raises(ValueError, match='C >= 2'): MEASURES['cross_entropy'](torch.randn(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match='target shape'): MEASURES['cross_entropy'](torch.randn(1, 3, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match='target shape'): MEASURES['binary_cross_entropy'](torch.rand(1, 2, 4, 4), torch.ones(1, 1, 4, 4))


def test_dice_error_definition():
    from monai.losses import DiceLoss
    torch.manual_seed(1)
    logits, idx = torch.randn(3, 3, 5, 5, 5), torch.randint(0, 3, (3, 1, 5, 5, 5))
    de = MEASURES['dice_error'](logits, idx)
    assert de.shape == logits.shape and (de >= 0).all()
    ref = DiceLoss(to_onehot_y=True, softmax=True, reduction='none')(logits, idx).reshape(3, 3)
    assert torch.allclose(de.mean((2, 3, 4)), ref, atol=1e-5)
    # hand-made: one channel, sigmoid; perfect prediction -> 0, empty truth and empty prediction -> 0
    big = torch.full((1, 1, 2, 2), 50.0)
    assert torch.allclose(MEASURES['dice_error'](big, torch.ones(1, 1, 2, 2)), torch.zeros(1, 1, 2, 2), atol=1e-6)
    assert torch.allclose(MEASURES['dice_error'](-big, torch.zeros(1, 1, 2, 2)), torch.zeros(1, 1, 2, 2), atol=1e-6)
    # p = 0.5 everywhere, t = (1, 0, 0, 0): sum p + sum t = 3; numerators 0.5 each -> e = 4 * 0.5 / 3
    t = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert torch.allclose(MEASURES['dice_error'](torch.zeros(1, 1, 2, 2), t), torch.full((1, 1, 2, 2), 2 / 3), atol=1e-5)


def test_callable_measure_and_invalid_measures():
    pp = PatchPerformance(nn.MSELoss(), measure=lambda p, t: (p - t) ** 2)
    pred, targ = torch.full((2, 1, 3, 3), 0.5), torch.zeros(2, 1, 3, 3)
    pp(pred, targ)
    assert torch.allclose(pp.calculate_performance(), torch.full((1, 3, 3), 0.25))
    # an element-wise result without a channel axis gets one
    pp = PatchPerformance(nn.MSELoss(), measure=lambda p, t: ((p - t) ** 2)[:, 0])
    pp(pred, targ)
    assert pp.calculate_performance().shape == (1, 3, 3)
    bad = PatchPerformance(nn.MSELoss(), measure=lambda p, t: ((p - t) ** 2).mean())
    with pytest.raises(ValueError, match='element-wise'): bad(pred, targ)
    with pytest.raises(ValueError, match='must be one of'): PatchPerformance(nn.MSELoss(), measure='dice')
    with pytest.raises(ValueError, match='must be one of'): get_measure(None)
    with pytest.raises(ValueError, match=r'\(B, C, \*spatial\)'): PatchPerformance(nn.MSELoss(), 'l1')(torch.zeros(4), torch.zeros(4))
    with pytest.raises(TypeError, match='single tensors'):
        PatchPerformance(lambda p, t: 0.0, 'l1')([torch.zeros(1, 1, 2, 2)], torch.zeros(1, 1, 2, 2))


def test_measure_never_touches_the_graph():
    seen = {}
    def spy(p, t):
        seen['grad'] = torch.is_grad_enabled(); seen['requires_grad'] = p.requires_grad
        return (p - t).abs()
    pred = torch.rand(1, 1, 2, 2, requires_grad=True)
    PatchPerformance(nn.L1Loss(), spy)(pred, torch.zeros(1, 1, 2, 2))
    assert seen == {'grad': False, 'requires_grad': False}


# ---------------------------------------------------------------- per-size maps

def test_one_map_per_patch_size():
    pp = PatchPerformance.track(nn.BCELoss(), measure='binary_cross_entropy')
    pp(*_bce_batch(2, (4, 4, 4)))
    pp(*_bce_batch(3, (6, 4, 4)))
    pp(*_bce_batch(2, (6, 4, 4)))
    assert pp.n_patches_seen == 7
    assert pp.counts == {(4, 4, 4): 2, (6, 4, 4): 5}
    assert pp.patch_sizes == [(6, 4, 4), (4, 4, 4)]
    assert pp.calculate_performance().shape == (1, 6, 4, 4)  # the most-seen size
    assert pp.calculate_performance((4, 4, 4)).shape == (1, 4, 4, 4)
    assert pp.calculate_performance([4, 4, 4]).shape == (1, 4, 4, 4)
    maps = pp.performance_maps()
    assert list(maps) == [(6, 4, 4), (4, 4, 4)]
    for m in maps.values(): assert torch.allclose(m[0, 2:], torch.tensor(math.log(2)))
    with pytest.raises(NoPatchesSeenError, match=r'\(8, 8, 8\)'): pp.calculate_performance((8, 8, 8))


def test_channel_mismatch_for_same_size_is_an_error():
    tr = PatchPerformanceTracker(measure=lambda p, t: (p - t).abs())
    tr.update(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match='channels'): tr.update(torch.zeros(1, 3, 3, 3), torch.zeros(1, 3, 3, 3))


# ---------------------------------------------------------------- callback

def _tiny_dls(n_train=8, n_valid=4, size=8, bs=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_valid, 1, size, size, size, generator=g)
    ds = list(zip(x, (x > 0.5).long()))
    return DataLoaders(DataLoader(ds[:n_train], bs=bs, shuffle=True), DataLoader(ds[n_train:], bs=bs), device='cpu')

def _tiny_model(): return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))


class _EpochSpy:
    "Callable measure recording in which epoch/mode it was called (through the learner)"
    def __init__(self): self.calls, self.learn = [], None
    def __call__(self, p, t):
        self.calls.append((self.learn.epoch, self.learn.training))
        return F.cross_entropy(p, t[:, 0].long(), reduction='none')


def _fit(cbs, n_epoch=3, seed=0):
    set_seed(seed)
    learn = Learner(_tiny_dls(), _tiny_model(), loss_func=CrossEntropyLossFlat(axis=1), cbs=cbs)
    with learn.no_logging(): learn.fit(n_epoch, 1e-2)
    return learn


def test_callback_records_last_epoch_validation_only():
    spy = _EpochSpy()
    cb = PatchPerformanceCallback(measure=spy)
    set_seed(0)
    learn = Learner(_tiny_dls(), _tiny_model(), loss_func=CrossEntropyLossFlat(axis=1), cbs=[cb])
    spy.learn = learn
    with learn.no_logging(): learn.fit(3, 1e-2)
    assert spy.calls and set(spy.calls) == {(2, False)}  # last epoch, validation batches
    assert cb.n_patches_seen == 4
    assert list(cb.maps) == [(8, 8, 8)]
    assert cb.calculate_performance().shape == (1, 8, 8, 8)
    assert cb.calculate_performance().device.type == 'cpu'
    assert learn.patch_performance is cb and learn.patch_performance.maps is cb.maps
    # a second fit starts from an empty map
    with learn.no_logging(): learn.fit(1, 1e-2)
    assert cb.n_patches_seen == 4


def test_callback_chosen_epoch_and_training_batches():
    spy = _EpochSpy()
    cb = PatchPerformanceCallback(measure=spy, epochs=[0], on='train')
    set_seed(0)
    learn = Learner(_tiny_dls(), _tiny_model(), loss_func=CrossEntropyLossFlat(axis=1), cbs=[cb])
    spy.learn = learn
    with learn.no_logging(): learn.fit(3, 1e-2)
    assert spy.calls and set(spy.calls) == {(0, True)}
    assert cb.n_patches_seen == 8
    assert cb.calculate_performance().shape == (1, 8, 8, 8)
    # 'both' and 'all': every batch of every epoch, accumulated into one map
    cb2 = PatchPerformanceCallback(measure='dice_error', epochs='all', on='both')
    _fit([cb2], n_epoch=2)
    assert cb2.n_patches_seen == 2 * (8 + 4)
    assert cb2.calculate_performance((8, 8, 8)).shape == (2, 8, 8, 8)
    with pytest.raises(NoPatchesSeenError): cb2.calculate_performance((4, 4, 4))


def test_callback_does_not_change_the_loss():
    plain = _fit([])
    cb = PatchPerformanceCallback(epochs='all', on='both')
    tracked = _fit([cb])
    assert cb.n_patches_seen == 3 * 12
    assert [float(v) for v in plain.recorder.losses] == [float(v) for v in tracked.recorder.losses]
    assert plain.recorder.values == tracked.recorder.values
    for a, b in zip(plain.model.parameters(), tracked.model.parameters()): assert torch.equal(a, b)


def test_callback_bad_arguments():
    with pytest.raises(ValueError, match="'valid', 'train' or 'both'"): PatchPerformanceCallback(on='validation')
    with pytest.raises(ValueError, match='epochs'): PatchPerformanceCallback(epochs='last')
    with pytest.raises(ValueError, match='must be one of'): PatchPerformanceCallback(measure='nope')
    cb = PatchPerformanceCallback(epochs=[5])
    with pytest.raises(ValueError, match='not an epoch of this 2-epoch fit'): _fit([cb], n_epoch=2)
    with pytest.raises(NoPatchesSeenError, match='recorded no patches'): PatchPerformanceCallback().calculate_performance()


def test_callback_negative_epoch_index():
    spy = _EpochSpy()
    cb = PatchPerformanceCallback(measure=spy, epochs=-2)
    set_seed(0)
    learn = Learner(_tiny_dls(), _tiny_model(), loss_func=CrossEntropyLossFlat(axis=1), cbs=[cb])
    spy.learn = learn
    with learn.no_logging(): learn.fit(3, 1e-2)
    assert set(spy.calls) == {(1, False)}


# ---------------------------------------------------------------- profile, overlap, windows

def test_distance_to_faces_and_profile():
    d = distance_to_faces((5, 6))
    assert d[0].tolist() == [0] * 6 and d[2].tolist() == [0, 1, 2, 2, 1, 0]
    assert distance_to_faces((5, 5, 5)).max() == 2
    pmap = torch.from_numpy(distance_to_faces((7, 7, 7))).float()[None] * 2 + 1
    dist, means = performance_profile(pmap)
    assert dist.tolist() == [0, 1, 2, 3] and np.allclose(means, [1, 3, 5, 7])
    two = torch.stack([torch.zeros(7, 7, 7), torch.ones(7, 7, 7)])
    assert np.allclose(performance_profile(two)[1], 0.5)
    assert np.allclose(performance_profile(two, channel=1)[1], 1.0)
    with pytest.raises(ValueError, match='channel'): performance_profile(two, channel=2)
    with pytest.raises(ValueError, match='channel-first'): performance_profile(torch.zeros(5))


def _bordered(b, size=16, border=1.0, plateau=0.2):
    d = torch.from_numpy(distance_to_faces((size,) * 3))
    return torch.where(d < b, torch.tensor(border), torch.tensor(plateau))[None]


def test_suggest_overlap_rule():
    flat = suggest_overlap(torch.full((1, 16, 16, 16), 0.3))
    assert isinstance(flat, OverlapSuggestion)
    assert flat.border == 0 and flat.overlap == 0 and flat.overlap_per_axis == (0, 0, 0)
    s3 = suggest_overlap(_bordered(3))
    assert s3.border == 3 and s3.overlap == 6 and s3.overlap_per_axis == (6, 6, 6)
    assert s3.fraction == (6 / 16,) * 3 and math.isclose(s3.plateau, 0.2, rel_tol=1e-6)
    wide = suggest_overlap(_bordered(5))
    assert wide.overlap == 10 > s3.overlap > flat.overlap
    # small deviations within the tolerance do not count; relative vs absolute tolerance
    mild = _bordered(2, border=0.205)
    assert suggest_overlap(mild, tolerance=0.05).overlap == 0
    assert suggest_overlap(mild, tolerance=0.001, relative=False).overlap == 4
    assert suggest_overlap(mild, tolerance=0.01, relative=False).overlap == 0
    assert math.isclose(suggest_overlap(mild, tolerance=0.05).tolerance, 0.05 * 0.2, rel_tol=1e-6)


def test_suggest_overlap_is_one_sided():
    better = _bordered(4, border=0.05)  # faces better than the interior (e.g. label-centred patches)
    s = suggest_overlap(better)
    assert s.border == 0 and s.overlap == 0 and s.settled
    worse = _bordered(4, border=0.35)
    assert suggest_overlap(worse).border == 4
    # a score (higher is better): a rim with lower values is the degraded one
    assert suggest_overlap(better, higher_is_worse=False).border == 4
    assert suggest_overlap(worse, higher_is_worse=False).border == 0
    # mixed: better at d = 0, worse at d = 2 -> only the worse part sets b
    d = torch.from_numpy(distance_to_faces((16,) * 3))
    mixed = torch.full((16,) * 3, 0.2); mixed[d == 0] = 0.0; mixed[d == 2] = 0.5
    assert suggest_overlap(mixed[None]).border == 3


def test_suggest_overlap_absolute_floor():
    d = torch.from_numpy(distance_to_faces((16,) * 3))
    wiggle = torch.tensor([0.0005, 0.0002, 0.0006, 0.0003, 0.0004, 0.0002, 0.0004, 0.0004])  # per distance, nats
    good = wiggle[d][None]
    plateau = float(good[0][d >= 6].mean())
    s = suggest_overlap(good)  # tol = max(5 % of 0.0004, 1e-3) = 1e-3
    assert s.overlap == 0 and math.isclose(s.tolerance, 1e-3) and math.isclose(s.plateau, plateau, rel_tol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert suggest_overlap(good, atol=0).border == 3  # d = 2 is 0.0002 above the plateau: 'degraded' noise
    assert math.isclose(suggest_overlap(good, atol=0, tolerance=1.0).tolerance, abs(plateau))
    rim = torch.where(d < 2, good + 0.01, good)  # a real rim, 0.01 nats worse
    assert suggest_overlap(rim).border == 2
    assert suggest_overlap(rim, atol=0.02).border == 0
    for bad in (-1e-3, float('nan'), float('inf')):
        with pytest.raises(ValueError, match='atol'): suggest_overlap(good, atol=bad)
    with pytest.raises(ValueError, match='infinite'): suggest_overlap(torch.full((1, 8, 8, 8), float('inf')))


def test_suggest_overlap_warns_when_profile_never_settles():
    settled = _bordered(3)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no warning for a map with a flat interior
        assert suggest_overlap(settled).settled
    sloped = (0.2 + 0.2 * (7 - torch.from_numpy(distance_to_faces((16,) * 3)).float()))[None]
    with pytest.warns(UserWarning, match='never settles') as rec:
        s = suggest_overlap(sloped)
    assert not s.settled and 'settled=False' in repr(s)
    assert f'border {s.border}' in str(rec[0].message) and s.border == 6 and s.overlap == 12  # up to the plateau (d >= 6)


def test_suggest_overlap_caps_and_anisotropy():
    # degraded everywhere outside the plateau distances (d >= 6): b stops at 6 and the rule warns
    m = _bordered(7, size=16)
    with pytest.warns(UserWarning, match='never settles'): s = suggest_overlap(m)
    assert s.border == 6 and s.overlap == 12 and not s.settled and s.overlap < 16
    # worst at the very centre, faces best: no degraded rim at all, and the interior's own spread sets nothing
    centre = torch.from_numpy(distance_to_faces((16,) * 3)).float()[None]
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert suggest_overlap(centre).overlap == 0
    noisy_centre = _bordered(3).clone(); noisy_centre[0, 7:9, 7:9, 7:9] = 5.0  # 8 hot voxels at d = 7
    assert suggest_overlap(noisy_centre, tolerance=0.05).border == 3  # plateau (d >= 6) 0.8: the rim (1.0) is still worse
    assert suggest_overlap(noisy_centre, tolerance=0.5).border == 0  # a looser tolerance absorbs it
    assert suggest_overlap(_bordered(6, size=16), plateau_fraction=0.1).overlap == 12
    aniso = torch.from_numpy(distance_to_faces((16, 16, 8))).float()[None]
    aniso = torch.where(aniso < 3, 1.0, 0.2)
    with pytest.warns(UserWarning, match='never settles'): s = suggest_overlap(aniso)  # the rim reaches d0 = 3
    assert s.patch_size == (16, 16, 8) and s.border == 3
    assert s.overlap_per_axis == (6, 6, 6) and s.overlap == 6 and s.fraction == (6 / 16, 6 / 16, 6 / 8)
    with pytest.raises(ValueError, match='tolerance'): suggest_overlap(m, tolerance=-1)
    with pytest.raises(ValueError, match='image_shape'): suggest_overlap(_bordered(3), image_shape=(64, 64))


def test_suggest_overlap_table():
    s = suggest_overlap(_bordered(3), image_shape=(100, 100, 40))
    t = s.table
    assert isinstance(t, pd.DataFrame)
    assert {'overlap', 'fraction', 'expected_measure', 'suggested', 'windows', 'relative_cost'} <= set(t.columns)
    assert t.loc[t.suggested, 'overlap'].tolist() == [6]
    assert t.overlap.tolist() == sorted(t.overlap) and 0 in t.overlap.tolist()
    for _, row in t.iterrows():
        assert row.windows == windows_for_overlap((100, 100, 40), (16, 16, 16), int(row.overlap))
    assert t.windows.is_monotonic_increasing and t.relative_cost.iloc[0] == 1.0
    # keeping the inner voxels reaches the plateau once overlap // 2 >= b
    assert math.isclose(t.loc[t.overlap == 6, 'expected_measure'].item(), 0.2, rel_tol=1e-6)
    assert t.loc[t.overlap == 0, 'expected_measure'].item() > 0.2
    no_shape = suggest_overlap(_bordered(3), candidates=[0, 2, 40])
    assert 'windows' not in no_shape.table.columns and no_shape.table.overlap.tolist() == [0, 2, 6, 15]  # + suggested, capped


def test_windows_for_overlap_values():
    assert windows_for_overlap((100,), (32,), 0) == 4          # ceil(68/32) + 1
    assert windows_for_overlap((100,), (32,), 16) == 6         # ceil(68/16) + 1
    assert windows_for_overlap((32,), (32,), 16) == 1          # fits in one patch
    assert windows_for_overlap((20, 40), (32, 32), 0) == 2     # 1 * (ceil(8/32) + 1)
    assert windows_for_overlap((256, 256, 128), (128, 128, 64)) == 8
    assert windows_for_overlap((256, 256, 128), (128, 128, 64), 0.5) == 27
    assert windows_for_overlap((256, 256, 128), (128, 128, 64), (64, 64, 32)) == 27
    assert windows_for_overlap((100, 100), (32, 32), (0, 16)) == 4 * 6
    # fractions are rounded to voxels like PatchConfig.overlap_voxels (0.3 * 25 = 7.5 -> 8)
    assert windows_for_overlap((100,), (25,), 0.3) == windows_for_overlap((100,), (25,), PatchConfig(
        patch_size=[25] * 3, patch_overlap=0.3).overlap_voxels[0]) == math.ceil(75 / 17) + 1
    with pytest.raises(ValueError, match='overlap 32 on axis 0'): windows_for_overlap((100,), (32,), 32)
    with pytest.raises(ValueError, match='same number of axes'): windows_for_overlap((100, 100), (32,), 0)
    with pytest.raises(ValueError, match='one value per axis'): windows_for_overlap((100, 100), (32, 32), (1, 2, 3))
    with pytest.raises(ValueError, match='fraction'): windows_for_overlap((100,), (32,), 1.5)


def _images(fig): return [im for a in fig.axes for im in a.images]

def test_plot_patch_performance():
    s = suggest_overlap(_bordered(3))
    fig = plot_patch_performance(_bordered(3), suggestion=s)
    assert isinstance(fig, plt.Figure)
    axes = [a for a in fig.axes if a.get_label() != '<colorbar>']
    assert len(axes) == 4
    line = axes[3].lines[0]
    assert np.allclose(line.get_ydata(), s.profile)
    # the profile's axis labels are inside the figure (not clipped)
    fig.canvas.draw()
    fig_box = fig.bbox
    for lab in (axes[3].xaxis.label, axes[3].yaxis.label):
        bb = lab.get_window_extent()
        assert lab.get_text() and bb.x0 >= fig_box.x0 - 1 and bb.y0 >= fig_box.y0 - 1 and bb.x1 <= fig_box.x1 + 1
    plt.close(fig)
    fig2 = plot_patch_performance(torch.rand(2, 6, 6), channel=0)
    assert len([a for a in fig2.axes if a.get_label() != '<colorbar>']) == 2
    plt.close(fig2)
    with pytest.raises(ValueError, match='2D or 3D'): plot_patch_performance(torch.rand(1, 3, 3, 3, 3))


def test_plot_colour_scale_robust_to_hot_voxels():
    m = _bordered(3, border=0.4, plateau=0.2)
    m[0, 8, 8, 8] = 50.0  # one hot voxel on the mid-planes
    fig = plot_patch_performance(m)
    clim = _images(fig)[0].get_clim()
    assert math.isclose(clim[1], 0.4, rel_tol=1e-6) and math.isclose(clim[0], 0.2, rel_tol=1e-6)  # 1st-99th percentile
    cbar = [a for a in fig.axes if a.get_label() == '<colorbar>']
    assert len(cbar) == 1
    assert _images(fig)[-1].colorbar.extend == 'max'
    plt.close(fig)
    fig = plot_patch_performance(m, clip=None)
    assert np.allclose(_images(fig)[0].get_clim(), (0.2, 50.0)) and _images(fig)[-1].colorbar.extend == 'neither'
    plt.close(fig)
    fig = plot_patch_performance(torch.full((1, 6, 6, 6), 0.3))  # constant map: percentiles coincide
    assert np.allclose(_images(fig)[0].get_clim(), 0.3)
    plt.close(fig)
    with pytest.raises(ValueError, match='clip'): plot_patch_performance(m, clip=(99, 1))


def test_suggestion_feeds_patch_config():
    from patchfm.config import PatchConfig
    s = suggest_overlap(_bordered(3))
    cfg = PatchConfig(patch_size=list(s.patch_size), patch_overlap=s.overlap)
    assert cfg.patch_overlap == 6


# ---------------------------------------------------------------- validation: border effects of patch models
# The label of a voxel is the sign of a smoothing of the image over a 7^3 neighbourhood (receptive-field radius
# R = 3) computed on the whole volume; a patch model with zero padding cannot see the neighbours outside its patch,
# so its predictions are wrong more often within R voxels of the patch faces: the effect patch maps are meant to show.

_R = 3


def _box_stack(k=1000.0, padding=1):
    "Three 3^3 mean filters (receptive-field radius 3) and a head giving logits (-k m, k m) of the smoothed image m"
    convs = [nn.Conv3d(1, 1, 3, padding=padding, bias=False) for _ in range(_R)]
    for c in convs: nn.init.constant_(c.weight, 1 / 27)
    head = nn.Conv3d(1, 2, 1)
    with torch.no_grad(): head.weight.copy_(torch.tensor([-k, k]).view(2, 1, 1, 1, 1)); head.bias.zero_()
    return nn.Sequential(*convs, head)


def _context_patches(n, seed, size=40, patch=16):
    "`n` (image, label) patches of one noise volume; labels from the full volume (real context beyond the patch)"
    g = torch.Generator().manual_seed(seed)
    vol = torch.randn(1, 1, size, size, size, generator=g)
    with torch.no_grad(): smooth = _box_stack(padding=0)[:_R](vol)[0, 0]  # valid part: voxel i <-> vol[i + R]
    items = []
    for _ in range(n):
        s = torch.randint(_R, size - _R - patch + 1, (3,), generator=g).tolist()
        x = vol[0, :, s[0]:s[0] + patch, s[1]:s[1] + patch, s[2]:s[2] + patch].clone()
        y = smooth[s[0] - _R:s[0] - _R + patch, s[1] - _R:s[1] - _R + patch, s[2] - _R:s[2] - _R + patch] > 0
        items.append((x, y.long()[None]))
    return items


def _context_dls(n_train, n_valid, bs, **kw):
    return DataLoaders(DataLoader(_context_patches(n_train, 1, **kw), bs=bs, shuffle=True),
                       DataLoader(_context_patches(n_valid, 2, **kw), bs=bs), device='cpu')


def test_border_effect_model_map_and_overlap():
    "A model without context beyond its patch: exact inside, wrong near the faces; the map and the rule find R"
    cb = PatchPerformanceCallback()  # cross-entropy, validation batches of the last epoch
    loss = PatchPerformance.track(CrossEntropyLossFlat(axis=1))
    learn = Learner(_context_dls(4, 8, bs=4), _box_stack(), loss_func=loss, cbs=[cb])
    with learn.no_logging(): learn.fit(1, 0.0)  # lr 0: the fixed model is not changed
    pmap = cb.calculate_performance()
    assert pmap.shape == (1, 16, 16, 16) and cb.n_patches_seen == 8
    # the same map through the wrapped loss during `validate` (same model, same validation patches)
    loss.reset()
    with learn.no_logging(): learn.validate()
    assert loss.n_patches_seen == 8 and torch.allclose(loss.calculate_performance(), pmap, atol=1e-5)
    dist, prof = performance_profile(pmap)
    assert dist.tolist() == list(range(8))
    # the model is exact at distance >= R (only near-zero smoothed values cost anything) and wrong at d < R
    assert prof[_R:].max() < 0.02
    assert prof[0] > prof[1] > prof[2] > 10 * prof[_R:].max()
    s = suggest_overlap(pmap, tolerance=0.05, relative=False, image_shape=(40, 40, 40))
    assert s.border == _R and s.overlap == 2 * _R and s.overlap_per_axis == (6, 6, 6)
    flat = suggest_overlap(torch.full_like(pmap, float(pmap.mean())), tolerance=0.05, relative=False)
    assert flat.overlap == 0 < s.overlap
    with pytest.warns(UserWarning, match='never settles'):  # 8 patches: the near-zero costs of d >= 3 are noisy
        assert suggest_overlap(pmap).overlap > suggest_overlap(torch.full_like(pmap, float(pmap.mean()))).overlap
    t = s.table.set_index('overlap')
    assert t.loc[6, 'expected_measure'] < 0.02 < t.loc[0, 'expected_measure']
    assert t.loc[6, 'windows'] > t.loc[0, 'windows'] == windows_for_overlap((40,) * 3, (16,) * 3, 0) == 27


def test_trained_model_map_worse_at_faces(context_volumes):
    "A conv net trained on patches of that task learns the interior better than the faces"
    set_seed(0)
    cb = PatchPerformanceCallback()
    learn = Learner(_context_dls(32, 8, bs=8, size=24, patch=12), nn.Conv3d(1, 2, 7, padding=3),
                    loss_func=CrossEntropyLossFlat(axis=1), cbs=[cb])
    with learn.no_logging(): learn.fit_one_cycle(15, 5e-2)
    pmap = cb.calculate_performance()
    dist, prof = performance_profile(pmap)
    assert pmap.shape == (1, 12, 12, 12) and cb.n_patches_seen == 8
    centre = prof[_R:].mean()
    assert prof[0] > 2.5 * centre and prof[1] > 1.3 * centre and prof[0] > prof[1] > prof[2]
    flat = torch.full_like(pmap, float(pmap.mean()))
    # 8 validation patches leave the centre noisy; uniform patches of two held-out volumes give a settled profile
    rec = record_performance_map(learn, context_volumes, patch_config=PatchConfig(patch_size=[12] * 3), n_patches=96, bs=8)
    held_out = rec.calculate_performance()
    prof = performance_profile(held_out)[1]
    assert prof[0] > 2 * prof[2:].mean() and prof[0] > prof[1] > prof[2:].max()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        s = suggest_overlap(held_out)
    assert s.settled and 1 <= s.border <= _R
    assert s.overlap > suggest_overlap(flat).overlap == 0


# ---------------------------------------------------------------- record_performance_map: uniform patches of volumes

def _write_context_volumes(folder, n=2, size=40, seed=0):
    "Noise volumes and labels from the whole-volume smoothing (the box stack's truth), as NIfTI pairs"
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        vol = torch.randn(1, 1, size, size, size, generator=g)
        with torch.no_grad(): truth = (_box_stack()[:_R](vol) > 0)[0, 0].to(torch.uint8)  # zero padding at the volume faces
        img, lbl = folder / f'img{i}.nii.gz', folder / f'lbl{i}.nii.gz'
        write_nifti(vol[0, 0], np.eye(4), img); write_nifti(truth, np.eye(4), lbl)
        pairs.append((img, lbl))
    return pairs


@pytest.fixture(scope='module')
def context_volumes(tmp_path_factory):
    return _write_context_volumes(tmp_path_factory.mktemp('perf_volumes'))


_CFG16 = PatchConfig(patch_size=[16] * 3)


def test_record_map_shape_count_and_border_effect(context_volumes):
    rec = record_performance_map(_box_stack(k=1e5), context_volumes, patch_config=_CFG16, n_patches=21, bs=8, seed=0)
    assert isinstance(rec, PatchPerformanceTracker) and rec.n_patches_seen == 21  # 11 + 10: the surplus is dropped
    pmap = rec.calculate_performance()
    assert pmap.shape == (1, 16, 16, 16) and rec.measure_name == 'cross_entropy'
    dist, prof = performance_profile(pmap)
    assert prof[0] > prof[1] > prof[2] > 10 * prof[_R:].max()  # wrong within R of the faces, exact inside
    s = suggest_overlap(pmap)
    assert s.border == _R and s.overlap == 2 * _R and s.settled
    two = record_performance_map(_box_stack(), context_volumes, patch_config=_CFG16, n_patches=4, measure='dice_error')
    assert two.calculate_performance().shape == (2, 16, 16, 16) and two.n_patches_seen == 4


def test_record_map_deterministic_for_a_seed(context_volumes):
    run = lambda seed: record_performance_map(_box_stack(), context_volumes, patch_config=_CFG16, n_patches=8, bs=3,
                                              seed=seed).calculate_performance()
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b) and not torch.equal(a, c)


class _Spy(nn.Module):
    "Records mode, grad state and the inputs' range; predicts 2-class logits from the box stack"
    def __init__(self):
        super().__init__()
        self.net, self.drop, self.calls = _box_stack(k=1e5), nn.Dropout(0.5), []
    def forward(self, x):
        self.calls.append(dict(training=self.training, grad=torch.is_grad_enabled(), shape=tuple(x.shape),
                               lo=float(x.min()), hi=float(x.max())))
        return self.net(self.drop(x))


def test_record_map_eval_mode_no_grad_and_restores_mode(context_volumes):
    spy = _Spy().train()
    rec = record_performance_map(spy, context_volumes, patch_config=_CFG16, n_patches=10, bs=4)
    assert spy.training  # restored
    assert [c['shape'][0] for c in spy.calls] == [4, 4, 2]  # 5 patches per volume, in order
    assert all(not c['training'] and not c['grad'] for c in spy.calls)
    assert rec.n_patches_seen == 10
    # eval mode: dropout off, so the border-effect map is as without it
    ref = record_performance_map(_box_stack(k=1e5), context_volumes, patch_config=_CFG16, n_patches=10, bs=4)
    assert torch.allclose(rec.calculate_performance(), ref.calculate_performance())


def test_record_map_uniform_vs_label_sampler(tmp_path):
    "Uniform centres ignore the labels; the label sampler centres patches on foreground"
    vol = torch.randn(48, 48, 48, generator=torch.Generator().manual_seed(0))
    lbl = torch.zeros(48, 48, 48, dtype=torch.uint8); lbl[30:38, 10:18, 20:28] = 1  # 0.6 % foreground
    write_nifti(vol, np.eye(4), tmp_path / 'i.nii.gz'); write_nifti(lbl, np.eye(4), tmp_path / 'l.nii.gz')
    pairs = [(tmp_path / 'i.nii.gz', tmp_path / 'l.nii.gz')]
    centre_fg = []
    def centre_label(p, t):
        centre_fg.append(t[:, 0, 8, 8, 8].float())
        return F.cross_entropy(p, t[:, 0].long(), reduction='none')
    cfg = PatchConfig(patch_size=[16] * 3, sampler_type='label', label_probabilities={0: 0.0, 1: 1.0})
    record_performance_map(_box_stack(), pairs, patch_config=cfg, n_patches=40, bs=8, measure=centre_label)
    uniform = torch.cat(centre_fg).mean().item(); centre_fg.clear()  # the default sampler is 'uniform'
    record_performance_map(_box_stack(), pairs, patch_config=cfg, n_patches=40, bs=8, measure=centre_label, sampler='label')
    label = torch.cat(centre_fg).mean().item()
    assert label == 1.0 and uniform < 0.2


def test_record_map_uses_learner_and_saved_model_defaults(tmp_path, context_volumes):
    import torchio as tio
    df = pd.DataFrame(dict(image=[str(p[0]) for p in context_volumes], label=[str(p[1]) for p in context_volumes]))
    cfg = PatchConfig(patch_size=[16] * 3, samples_per_volume=2, queue_num_workers=0)
    dls = MedPatchDataLoaders.from_df(df, img_col='image', mask_col='label', valid_pct=0.5, patch_config=cfg, bs=2,
                                      pre_patch_tfms=[tio.RescaleIntensity(out_min_max=(100, 101))], device='cpu', seed=0)
    spy = _Spy()
    learn = Learner(dls, spy, loss_func=CrossEntropyLossFlat(axis=1))
    rec = record_performance_map(learn, df, n_patches=4, bs=4)  # patch_config and pre_patch_tfms from learn.dls
    assert rec.calculate_performance().shape == (1, 16, 16, 16)
    assert spy.calls and all(100 - 1e-4 <= c['lo'] and c['hi'] <= 101 + 1e-4 for c in spy.calls)
    spy.calls.clear()
    saved = SavedModel(spy, cfg.replace(patch_size=(12, 12, 12)), [tio.RescaleIntensity(out_min_max=(-5, -4))], {})
    rec = record_performance_map(saved, df, n_patches=2)
    assert rec.calculate_performance().shape == (1, 12, 12, 12)
    assert all(-5 - 1e-4 <= c['lo'] and c['hi'] <= -4 + 1e-4 for c in spy.calls)
    # explicit arguments win over the learner's
    spy.calls.clear()
    record_performance_map(learn, df, patch_config=cfg.replace(patch_size=(8, 8, 8)), pre_patch_tfms=[], n_patches=2)
    assert all(c['shape'][2:] == (8, 8, 8) for c in spy.calls) and min(c['lo'] for c in spy.calls) < 0
    # the DataFrame may use other column names; PatchSubjects work too
    other = df.rename(columns=dict(image='img', label='seg'))
    assert record_performance_map(learn, other, img_col='img', mask_col='seg', n_patches=2).n_patches_seen == 2
    subj = PatchSubjects(df.image.tolist(), df.label.tolist())
    assert record_performance_map(learn, subj, n_patches=2).n_patches_seen == 2


def test_record_map_bad_input(tmp_path, context_volumes):
    m = _box_stack()
    with pytest.raises(ValueError, match='patch_config'): record_performance_map(m, context_volumes)
    with pytest.raises(TypeError, match='PatchConfig'): record_performance_map(m, context_volumes, patch_config={'patch_size': 16})
    with pytest.raises(ValueError, match="sampler must be 'uniform' or 'label'"):
        record_performance_map(m, context_volumes, patch_config=_CFG16, sampler='grid')
    for k, v in (('n_patches', 0), ('bs', 0), ('n_patches', 2.5)):
        with pytest.raises(ValueError, match=k): record_performance_map(m, context_volumes, patch_config=_CFG16, **{k: v})
    with pytest.raises(ValueError, match='seed'): record_performance_map(m, context_volumes, patch_config=_CFG16, seed=-1)
    with pytest.raises(ValueError, match='must be one of'): record_performance_map(m, context_volumes, patch_config=_CFG16, measure='nope')
    with pytest.raises(KeyError, match="'label'"):
        record_performance_map(m, pd.DataFrame(dict(image=['a.nii.gz'])), patch_config=_CFG16)
    with pytest.raises(TypeError, match=r'\(image, mask\) path pairs'): record_performance_map(m, ['a.nii.gz'], patch_config=_CFG16)
    with pytest.raises(TypeError, match='DataFrame'): record_performance_map(m, 'a.nii.gz', patch_config=_CFG16)
    with pytest.raises(ValueError, match='no volumes'): record_performance_map(m, [], patch_config=_CFG16)
    with pytest.raises(TypeError, match='Learner'): record_performance_map(object(), context_volumes, patch_config=_CFG16)
    missing = tmp_path / 'missing.nii.gz'
    with pytest.raises(Exception, match='missing.nii.gz'):
        record_performance_map(m, [(missing, context_volumes[0][1])], patch_config=_CFG16)


def test_record_map_warns_about_narrow_volumes(tmp_path):
    pairs = _write_context_volumes(tmp_path, n=1, size=24)  # 24 < 2 x 16
    with pytest.warns(UserWarning, match='less than two patches'):
        rec = record_performance_map(_box_stack(), pairs, patch_config=_CFG16, n_patches=2)
    assert rec.n_patches_seen == 2
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        record_performance_map(_box_stack(), pairs, patch_config=PatchConfig(patch_size=[12] * 3), n_patches=2)


# ---------------------------------------------------------------- where: which voxels a position's mean is over

def test_where_foreground_hand_made():
    p = torch.tensor([[[0.6, 0.9, 0.0, 0.0]], [[0.8, 0.0, 0.0, 0.3]]])
    t = torch.tensor([[[1.0, 1.0, 0.0, 0.0]], [[1.0, 0.0, 0.0, 0.0]]])
    tr = PatchPerformanceTracker('l1', where='foreground')
    tr.update(p, t)
    m = tr.calculate_performance()
    assert torch.allclose(m[0, :2], torch.tensor([0.3, 0.1])) and m[0, 2:].isnan().all()
    assert tr.n_patches_seen == 2 and tr.where == 'foreground' and "where='foreground'" in repr(tr)
    assert torch.allclose(tr.weight_sums[(4,)], torch.tensor([[2.0, 1.0, 0.0, 0.0]]))
    # a second batch adds to both sums: position 2 gets its first object voxel
    tr.update(torch.tensor([[[0.0, 0.0, 0.5, 0.0]]]), torch.tensor([[[0.0, 0.0, 1.0, 0.0]]]))
    assert torch.allclose(tr.calculate_performance()[0, :3], torch.tensor([0.3, 0.1, 0.5]))
    d, prof = performance_profile(tr.calculate_performance())  # nan positions are left out of the profile
    assert d.tolist() == [0, 1] and np.allclose(prof, [0.3, (0.1 + 0.5) / 2])


def test_foreground_where_target_forms():
    logits = torch.randn(2, 3, 4, 4)
    idx = torch.randint(0, 3, (2, 1, 4, 4))
    fg = (idx != 0).float()
    assert torch.equal(foreground_where(logits, idx), fg)
    assert torch.equal(foreground_where(logits, idx[:, 0]), fg)
    one_hot = F.one_hot(idx[:, 0], 3).movedim(-1, 1)
    assert torch.equal(foreground_where(logits, one_hot), fg)
    soft = torch.rand(2, 1, 4, 4)
    assert torch.equal(foreground_where(torch.randn(2, 1, 4, 4), soft), soft)  # one sigmoid channel: the target
    with pytest.raises(ValueError, match='target shape'): foreground_where(logits, torch.zeros(2, 2, 4, 4))
    assert set(WHERE) == {'foreground'} and get_where(None) == (None, None)
    with pytest.raises(ValueError, match='where must be'): get_where('background')


def test_where_cross_entropy_equals_masked_mean():
    torch.manual_seed(0)
    tr = PatchPerformanceTracker('cross_entropy', where='foreground')
    preds, targs = [], []
    for _ in range(3):
        p, t = torch.randn(4, 3, 5, 5, 5), torch.randint(0, 3, (4, 1, 5, 5, 5))
        tr.update(p, t); preds.append(p); targs.append(t)
    p, t = torch.cat(preds), torch.cat(targs)
    ce = F.cross_entropy(p, t[:, 0], reduction='none')[:, None]
    w = (t > 0).float()
    assert torch.allclose(tr.calculate_performance(), (ce * w).sum(0) / w.sum(0), atol=1e-6)


def test_where_callable_and_bad_weights():
    tr = PatchPerformanceTracker('l1', where=lambda p, t: torch.full_like(t, 2.0))  # a constant weight: the plain mean
    p, t = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    tr.update(p, t)
    assert torch.allclose(tr.calculate_performance(), (t - p).abs().mean(0), atol=1e-6)
    for bad, err in [(lambda p, t: torch.ones(3, 1, 2, 2), 'weights'), (lambda p, t: -torch.ones_like(t), 'negative'),
                     (lambda p, t: 1.0, 'tensor')]:
        with pytest.raises((ValueError, TypeError), match=err): PatchPerformanceTracker('l1', where=bad).update(p, t)


def test_wrapper_where_does_not_shadow_loss_attributes():
    w = torch.tensor([1.0, 2.0, 3.0])
    pp = PatchPerformance.track(nn.CrossEntropyLoss(weight=w), where='foreground')
    assert torch.equal(pp.weight, w)  # the loss's class weights fall through
    logits, targ = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    assert torch.equal(pp(logits, targ), nn.CrossEntropyLoss(weight=w)(logits, targ))
    assert pp.where == 'foreground' and pp.weight_sums and "where='foreground'" in repr(pp)


def test_callback_where_foreground():
    cb = PatchPerformanceCallback(where='foreground')
    _fit([cb], n_epoch=1)
    m = cb.calculate_performance()
    assert cb.tracker.where == 'foreground' and m.shape == (1, 8, 8, 8)
    # targets are x > 0.5 on noise (about 30 % of voxels): over 4 patches most positions saw an object voxel
    assert m.isnan().float().mean() < 0.5 and (m[~m.isnan()] >= 0).all()


def test_nan_maps_in_profile_suggestion_and_plot():
    m = _bordered(3).clone(); m[0, 5, 5, 5] = float('nan')  # one position never weighted
    s = suggest_overlap(m)
    assert s.border == 3 and math.isclose(s.plateau, 0.2, rel_tol=1e-6)
    fig = plot_patch_performance(m, suggestion=s); plt.close(fig)
    hole = _bordered(3).clone(); hole[0][torch.from_numpy(distance_to_faces((16,) * 3)) == 7] = float('nan')
    with pytest.raises(ValueError, match=r'distance\(s\) \[7\]'): suggest_overlap(hole)
    with pytest.raises(ValueError, match='nan everywhere'): plot_patch_performance(torch.full((1, 4, 4, 4), float('nan')))


def test_record_map_where_foreground(context_volumes):
    kw = dict(patch_config=_CFG16, n_patches=16, bs=8, seed=0)
    plain = record_performance_map(_box_stack(k=1e5), context_volumes, **kw)
    fg = record_performance_map(_box_stack(k=1e5), context_volumes, where='foreground', **kw)
    frac = record_performance_map(_box_stack(k=1e5), context_volumes, measure=lambda p, t: (t > 0).float(), **kw)
    # the plain mean = object fraction x mean over object voxels + the background's share (>= 0)
    assert fg.where == 'foreground' and fg.n_patches_seen == 16
    fgm, fr = fg.calculate_performance(), frac.calculate_performance()
    ok = ~fgm.isnan()
    assert ok.float().mean() > 0.9 and (fgm[ok] * fr[ok] <= plain.calculate_performance()[ok] * (1 + 1e-5) + 1e-6).all()
    assert performance_profile(fgm)[1][0] > 10 * performance_profile(fgm)[1][_R:].max()
