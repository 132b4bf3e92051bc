"Tests for patchfm.metrics: exact values on hand-made volumes, AccumulatedDice, fastai integration, evaluate."
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.callback.tracker import SaveModelCallback
import fastai.callback.progress  # noqa: F401  (Learner.no_bar, as in a normal fastai session)
from monai.losses import DiceCELoss

from patchfm.core import write_nifti, MedicalImageError
from patchfm.losses import CustomLoss
from patchfm.metrics import (AccumulatedDice, calculate_dsc, calculate_haus, calculate_confusion_metrics,
                             calculate_lesion_detection_rate, calculate_signed_rve, multiclass_metrics, evaluate,
                             dice_from_confusion)


def box(shape=(20, 20, 20), lo=(5, 5, 5), size=(6, 6, 6), dtype=torch.float32):
    "(1,1,X,Y,Z) mask holding one box."
    m = torch.zeros(1, 1, *shape, dtype=dtype)
    m[(0, 0) + tuple(slice(l, l + s) for l, s in zip(lo, size))] = 1
    return m


def nan(x): return bool(torch.isnan(torch.as_tensor(x)).all())


# ---------------------------------------------------------------- Dice
def test_dsc_two_cubes_known_overlap():
    a, b = box(), box(lo=(8, 5, 5))  # 108 of 216 voxels shared
    assert torch.allclose(calculate_dsc(a, b), torch.tensor([[0.5]]))
    c = box(lo=(5, 5, 7), size=(6, 6, 2))  # 72 voxels inside a
    assert calculate_dsc(c, a).item() == pytest.approx(2 * 72 / (72 + 216))
    assert calculate_dsc(a, a).item() == 1.0
    assert calculate_dsc(a, box(lo=(12, 12, 12))).item() == 0.0


def test_dsc_empty_cases():
    e = torch.zeros(1, 1, 5, 5, 5)
    assert nan(calculate_dsc(e, e))
    assert calculate_dsc(e, box((5, 5, 5), (1, 1, 1), (2, 2, 2))).item() == 0.0


def test_dsc_shapes_and_input_types():
    onehot = torch.zeros(2, 3, 4, 4, 4)
    onehot[:, 0] = 1
    onehot[0, 0, :2], onehot[0, 1, :2] = 0, 1
    out = calculate_dsc(onehot, onehot)
    assert out.shape == (2, 3)
    assert out[0, 0] == 1 and out[0, 1] == 1 and nan(out[0, 2]) and nan(out[1, 1])
    a, b = box(), box(lo=(8, 5, 5))
    ref = calculate_dsc(a, b)
    assert torch.equal(calculate_dsc(a.bool(), b.bool()), ref)
    assert torch.equal(calculate_dsc(a.numpy().astype(np.uint8), b.numpy()), ref)
    assert torch.equal(calculate_dsc(a[:, :, :, :, 7], b[:, :, :, :, 7]), torch.tensor([[0.5]]))  # 2D


def test_binary_functions_reject_bad_input():
    a = box()
    lm = a.clone(); lm[0, 0, 0, 0, 0] = 2
    for f in (calculate_dsc, calculate_haus, calculate_lesion_detection_rate, calculate_signed_rve):
        with pytest.raises(ValueError, match=r'binary masks \(0/1\).*multiclass_metrics'): f(lm, a)
        with pytest.raises(ValueError, match='same shape'): f(a, a[..., :-1])
        with pytest.raises(ValueError, match=r'\(B,C,X,Y,Z\)'): f(a[0, 0], a[0, 0])
    with pytest.raises(ValueError, match='targ must hold binary'): calculate_confusion_metrics(a, lm, 'precision')
    with pytest.raises(TypeError): calculate_dsc([[1]], [[1]])


# ---------------------------------------------------------------- Hausdorff
@pytest.mark.parametrize('shift', [1, 3])
@pytest.mark.parametrize('axis', [0, 1, 2])
def test_hd95_of_shifted_cube_is_the_shift(shift, axis):
    lo = [5, 5, 5]; lo[axis] += shift
    a, b = box(), box(lo=tuple(lo))
    assert calculate_haus(a, b).item() == pytest.approx(shift)
    assert calculate_haus(a, b, percentile=None).item() == pytest.approx(shift)
    spacing = [0.8, 0.8, 0.8]; spacing[axis] = 2.5  # anisotropic along the shift
    assert calculate_haus(a, b, spacing=spacing).item() == pytest.approx(shift * 2.5)
    other = [2.5, 2.5, 2.5]; other[axis] = 0.5  # anisotropic across the shift
    assert calculate_haus(a, b, spacing=other).item() == pytest.approx(shift * 0.5)


def test_hd_identical_scalar_spacing_and_batch():
    a, b = box(), box(lo=(7, 5, 5))
    assert calculate_haus(a, a).item() == 0.0
    assert calculate_haus(a, b, spacing=1.5).item() == pytest.approx(3.0)
    batch = calculate_haus(torch.cat([a, a]), torch.cat([a, b]))
    assert batch.shape == (2, 1) and batch[0, 0] == 0 and batch[1, 0] == pytest.approx(2.0)


def test_hd_empty_masks():
    e, a = torch.zeros(1, 1, 20, 20, 20), box()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no MONAI warning leaks out
        assert nan(calculate_haus(e, e))
        assert calculate_haus(e, a).item() == math.inf
        assert calculate_haus(a, e).item() == math.inf
        calculate_haus(a, box(lo=(6, 5, 5)))


def test_hd_bad_arguments():
    a = box()
    with pytest.raises(ValueError, match='spacing'): calculate_haus(a, a, spacing=(1, 1))
    with pytest.raises(ValueError, match='spacing'): calculate_haus(a, a, spacing=(1, 0, 1))
    with pytest.raises(ValueError, match='percentile'): calculate_haus(a, a, percentile=120)


# ---------------------------------------------------------------- confusion metrics
def test_confusion_metrics_exact():
    t = box()  # 216 voxels of 8000
    p = box(lo=(8, 5, 5))  # 108 TP, 108 FP, 108 FN
    n = 20 ** 3
    assert calculate_confusion_metrics(p, t, 'sensitivity').item() == pytest.approx(0.5)
    assert calculate_confusion_metrics(p, t, 'precision').item() == pytest.approx(0.5)
    assert calculate_confusion_metrics(p, t, 'specificity').item() == pytest.approx((n - 216 - 108) / (n - 216))
    assert calculate_confusion_metrics(p, t, 'F1 Score').item() == pytest.approx(0.5)
    assert calculate_confusion_metrics(p, t, 'false_discovery_rate').item() == pytest.approx(0.5)
    out = calculate_confusion_metrics(torch.cat([p, t]), torch.cat([t, t]), 'recall')
    assert out.shape == (2, 1) and torch.allclose(out, torch.tensor([[0.5], [1.0]]))


def test_confusion_metrics_undefined_and_unknown():
    e = torch.zeros(1, 1, 4, 4, 4)
    assert nan(calculate_confusion_metrics(e, e, 'sensitivity'))
    assert nan(calculate_confusion_metrics(e, e, 'precision'))
    with pytest.raises(ValueError, match="unknown metric_name 'dice'"):
        calculate_confusion_metrics(e, e, 'dice')


# ---------------------------------------------------------------- lesion detection
def test_lesion_detection_detected_missed_and_false_positive():
    targ = box(size=(3, 3, 3)) + box(lo=(14, 14, 14), size=(3, 3, 3))  # two lesions
    pred = box(lo=(6, 6, 6), size=(1, 1, 1))  # one voxel inside lesion 1
    assert calculate_lesion_detection_rate(pred, targ).item() == 0.5
    fp = pred + box(lo=(0, 15, 0), size=(2, 2, 2))  # plus a blob touching no lesion
    assert calculate_lesion_detection_rate(fp, targ).item() == 0.5
    assert calculate_lesion_detection_rate(targ, targ).item() == 1.0
    assert calculate_lesion_detection_rate(torch.zeros_like(targ), targ).item() == 0.0
    assert nan(calculate_lesion_detection_rate(pred, torch.zeros_like(targ)))


def test_lesion_detection_uses_26_connectivity():
    targ = torch.zeros(1, 1, 6, 6, 6)
    targ[0, 0, 1, 1, 1] = targ[0, 0, 2, 2, 2] = 1  # touch only by a corner: one lesion
    targ[0, 0, 4, 4, 4] = 1  # a separate lesion
    pred = torch.zeros_like(targ); pred[0, 0, 2, 2, 2] = 1
    assert calculate_lesion_detection_rate(pred, targ).item() == pytest.approx(0.5)


# ---------------------------------------------------------------- volume error
def test_signed_rve():
    t = box()
    assert calculate_signed_rve(box(size=(6, 6, 3)), t).item() == pytest.approx(-0.5)
    assert calculate_signed_rve(box(size=(6, 6, 9)), t).item() == pytest.approx(0.5)
    assert calculate_signed_rve(box(lo=(10, 10, 10)), t).item() == 0.0  # same volume, elsewhere
    assert nan(calculate_signed_rve(t, torch.zeros_like(t)))


# ---------------------------------------------------------------- multiclass
def _two_class_case():
    gt = torch.zeros(20, 20, 20, dtype=torch.uint8)
    gt[5:11, 5:11, 5:11] = 1
    gt[12:18, 12:18, 12:18] = 2
    pr = gt.clone()
    pr[5:8, 5:11, 5:11] = 0  # class 1 loses half its volume
    return pr, gt


def test_multiclass_metrics_values():
    pr, gt = _two_class_case()
    res = multiclass_metrics(pr, gt, spacing=(1.0, 1.0, 2.0))
    assert list(res) == [1, 2]
    assert set(res[1]) == {'DSC', 'HD95', 'Sens', 'Precision', 'LDR', 'RVE'}
    assert res[1]['DSC'] == pytest.approx(2 * 108 / (108 + 216))
    assert res[1]['HD95'] == pytest.approx(3.0)  # removed slab: 3 voxels of 1 mm along x
    assert res[1]['Sens'] == pytest.approx(0.5) and res[1]['Precision'] == pytest.approx(1.0)
    assert res[1]['LDR'] == 1.0 and res[1]['RVE'] == pytest.approx(-0.5)
    assert res[2] == dict(DSC=1.0, HD95=0.0, Sens=1.0, Precision=1.0, LDR=1.0, RVE=0.0)


def test_multiclass_metrics_shapes_labels_and_errors():
    pr, gt = _two_class_case()
    ref = multiclass_metrics(pr, gt)
    assert multiclass_metrics(pr[None], gt[None].float()) == ref
    assert multiclass_metrics(pr[None, None], gt[None, None]) == ref
    res = multiclass_metrics(pr, gt, labels=[2, 3])
    assert list(res) == [2, 3] and all(math.isnan(v) for v in res[3].values())
    with pytest.raises(ValueError, match='integer labels'): multiclass_metrics(pr.float() + 0.5, gt)
    with pytest.raises(ValueError, match='same shape'): multiclass_metrics(pr[:-1], gt)
    with pytest.raises(ValueError, match='labels must be integers'): multiclass_metrics(pr, gt, labels=[1.5])
    with pytest.raises(ValueError, match=r'one label map'): multiclass_metrics(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4))


# ---------------------------------------------------------------- AccumulatedDice
def logits_from_labels(labels, n_classes):
    "(B,C,...) logits whose argmax is `labels` (B,...)."
    return torch.nn.functional.one_hot(labels.long(), n_classes).movedim(-1, 1).float() * 10 - 5


def test_accumulated_dice_equals_dice_of_concatenated_epoch_not_batch_mean():
    t1 = torch.zeros(2, 10, 10, 10, dtype=torch.long); t1[:, 2:8, 2:8, 2:8] = 1  # large structure, well predicted
    p1 = t1.clone(); p1[:, 2:3] = 0
    t2 = torch.zeros(2, 10, 10, 10, dtype=torch.long); t2[:, 0, 0, :2] = 1  # tiny structure, missed
    p2 = torch.zeros_like(t2)
    m = AccumulatedDice(n_classes=2)
    for p, t in ((p1, t1), (p2, t2)): m.update(logits_from_labels(p, 2), t[:, None])
    epoch = calculate_dsc(torch.cat([p1, p2]).flatten()[None, None, :, None, None],
                          torch.cat([t1, t2]).flatten()[None, None, :, None, None]).item()
    batch_mean = np.mean([calculate_dsc(p[:, None].flatten()[None, None, :, None], t.flatten()[None, None, :, None]).item()
                          for p, t in ((p1, t1), (p2, t2))])
    assert m.value == pytest.approx(epoch)
    assert abs(m.value - batch_mean) > 0.3
    tp, fp, fn = 2 * 180, 0, 2 * 36 + 4
    assert m.value == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_accumulated_dice_multiclass_per_class_and_background():
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 3, (4, 6, 6, 6), generator=g)
    p = torch.randint(0, 3, (4, 6, 6, 6), generator=g)
    m = AccumulatedDice(n_classes=3, per_class=True)
    for i in range(0, 4, 2): m.update(logits_from_labels(p[i:i + 2], 3), t[i:i + 2])
    flat = lambda x: x.flatten()[None, None, :, None, None]
    exp = torch.tensor([calculate_dsc(flat(p == k), flat(t == k)).item() for k in range(3)])
    assert m.value.shape == (2,) and torch.allclose(m.value, exp[1:])
    mb = AccumulatedDice(n_classes=3, include_background=True, per_class=True)
    mb.update(logits_from_labels(p, 3), t)
    assert torch.allclose(mb.value, exp)
    mean = AccumulatedDice(n_classes=3)
    mean.update(logits_from_labels(p, 3), t)
    assert isinstance(mean.value, float) and mean.value == pytest.approx(exp[1:].mean().item())


def test_accumulated_dice_binary_sigmoid_thresholds_not_argmax():
    t = torch.zeros(2, 1, 8, 8, 8); t[:, :, 2:6] = 1
    logit = torch.where(t > 0, 3.0, -3.0)  # positive logits where foreground
    m = AccumulatedDice(n_classes=2)
    m.update(logit, t)
    assert m.value == pytest.approx(1.0)  # argmax over the single channel would give 0
    m1 = AccumulatedDice(n_classes=1)  # accepted alias for the binary sigmoid case
    m1.update(logit, t)
    assert m1.value == pytest.approx(1.0)
    edge = AccumulatedDice(n_classes=2, threshold=0.99)  # sigmoid(3) = 0.95 < 0.99: nothing predicted
    edge.update(logit, t)
    assert edge.value == 0.0


def test_accumulated_dice_nan_for_absent_classes():
    t = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long); t[..., :2] = 1  # class 2 never appears
    m = AccumulatedDice(n_classes=3, per_class=True)
    m.update(logits_from_labels(t[:, 0], 3), t)
    assert m.value[0] == 1.0 and nan(m.value[1])
    mean = AccumulatedDice(n_classes=3)
    mean.update(logits_from_labels(t[:, 0], 3), t)
    assert mean.value == 1.0  # NaN class left out of the mean
    empty = AccumulatedDice(n_classes=2)
    empty.update(logits_from_labels(torch.zeros(1, 4, 4, 4), 2), torch.zeros(1, 4, 4, 4))
    assert math.isnan(empty.value)


def test_accumulated_dice_target_forms_reset_and_name():
    t = torch.randint(0, 3, (2, 5, 5, 5), generator=torch.Generator().manual_seed(2))
    p = logits_from_labels(torch.roll(t, 1, 1), 3)
    values = []
    for targ in (t, t[:, None], t[:, None].float(), t[:, None].to(torch.uint8),
                 torch.nn.functional.one_hot(t, 3).movedim(-1, 1)):
        m = AccumulatedDice(n_classes=3)
        m.update(p, targ)
        values.append(m.value)
    assert all(v == pytest.approx(values[0]) for v in values)
    m.reset()
    assert m.value is None and m.confusion is None
    assert m.name == 'accumulated_dice'
    m.update((p, p[:, :, ::2]), t)  # deep-supervision list: first output used
    assert m.value == pytest.approx(values[0])


def test_accumulated_dice_errors():
    with pytest.raises(ValueError, match='n_classes'): AccumulatedDice(n_classes=0)
    with pytest.raises(ValueError, match='threshold'): AccumulatedDice(n_classes=2, threshold=0)
    m = AccumulatedDice(n_classes=3)
    with pytest.raises(ValueError, match='2 channels'): m.update(torch.randn(1, 2, 4, 4, 4), torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match='one-channel'): m.update(torch.randn(1, 1, 4, 4, 4), torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r'\[0, 2\].*found \[3, 3\]'):
        m.update(torch.randn(1, 3, 4, 4, 4), torch.full((1, 4, 4, 4), 3))
    with pytest.raises(ValueError, match='does not match'): m.update(torch.randn(1, 3, 4, 4, 4), torch.zeros(1, 4, 4, 3))
    with pytest.raises(ValueError, match='target has 2 channels'): m.update(torch.randn(1, 3, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))


def test_dice_from_confusion():
    cm = torch.tensor([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    d = dice_from_confusion(cm)
    assert d[0].item() == pytest.approx(10 / (10 + 2 + 1)) and d[1].item() == pytest.approx(6 / (6 + 1 + 2)) and nan(d[2])


# ---------------------------------------------------------------- fastai Learner
@pytest.mark.parametrize('n_out', [1, 2])
def test_learner_fit_records_accumulated_dice(n_out, tmp_path):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(12, 1, 8, 8, 8, generator=g)
    ys = (xs > 0.5).to(torch.uint8)
    ds = list(zip(xs, ys))
    dls = DataLoaders(DataLoader(ds[:8], bs=2, shuffle=True), DataLoader(ds[8:], bs=2), device='cpu')
    torch.manual_seed(0)
    loss = CustomLoss(DiceCELoss(to_onehot_y=True, softmax=True) if n_out == 2 else DiceCELoss(sigmoid=True))
    learn = Learner(dls, nn.Conv3d(1, n_out, 3, padding=1), loss_func=loss, metrics=[AccumulatedDice(n_classes=2)],
                    path=tmp_path)
    save = SaveModelCallback(monitor='accumulated_dice', comp=np.greater, fname='best', with_opt=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2, cbs=[save])
    assert learn.recorder.metric_names[3] == 'accumulated_dice'
    recorded = learn.recorder.values[-1][2]
    assert isinstance(recorded, float) and 0.0 <= recorded <= 1.0
    assert (tmp_path / 'models' / 'best.pth').exists()
    # the recorded value is the Dice of the whole validation set under the final weights
    with learn.no_bar(): probs, targs = learn.get_preds()
    dec = probs.argmax(1, keepdim=True) if n_out == 2 else (probs > 0.5).long()
    assert recorded == pytest.approx(calculate_dsc(dec.flatten()[None, None, :, None, None],
                                                   targs.flatten()[None, None, :, None, None]).item(), abs=1e-6)


# ---------------------------------------------------------------- evaluate
AFF = np.diag([0.8, 0.8, 2.5, 1.0])


@pytest.fixture
def files(tmp_path):
    pr, gt = _two_class_case()
    paths = dict(gt=tmp_path / 'gt_001.nii.gz', pred=tmp_path / 'pred_001.nii.gz',
                 gt2=tmp_path / 'gt_002.nii.gz', pred2=tmp_path / 'pred_002.nii.gz')
    write_nifti(gt[None], AFF, paths['gt']); write_nifti(pr[None], AFF, paths['pred'])
    gt2 = torch.zeros_like(gt); gt2[2:6, 2:6, 2:6] = 1  # class 2 absent in both files of case 2
    pr2 = torch.zeros_like(gt); pr2[2:6, 2:6, 3:7] = 1  # shifted by one slice along z (2.5 mm)
    write_nifti(gt2[None], AFF, paths['gt2']); write_nifti(pr2[None], AFF, paths['pred2'])
    return paths


def test_evaluate_table(files):
    df = evaluate([files['pred'], files['pred2']], [files['gt'], files['gt2']])
    assert list(df.columns) == ['case', 'label', 'DSC', 'HD95', 'Sens', 'Precision', 'LDR', 'RVE', 'pred_path', 'gt_path']
    assert df[['case', 'label']].values.tolist() == [['gt_001.nii.gz', 1], ['gt_001.nii.gz', 2],
                                                       ['gt_002.nii.gz', 1], ['gt_002.nii.gz', 2]]
    assert df.RVE[0] == pytest.approx(-0.5) and df.DSC[1] == 1.0
    assert df.HD95[0] == pytest.approx(3 * 0.8)  # 3 voxels along x at 0.8 mm
    assert df.HD95[2] == pytest.approx(2.5)  # one slice along z at 2.5 mm
    assert df.DSC[2] == pytest.approx(0.75)
    assert df.iloc[3][['DSC', 'HD95', 'Sens', 'Precision', 'LDR', 'RVE']].isna().all()
    assert df.pred_path[0] == str(files['pred'])


def test_evaluate_options(files):
    pairs = ([files['pred'], files['pred2']], [files['gt'], files['gt2']])
    ref = evaluate(*pairs)
    vox = evaluate(*pairs, spacing_from=None)
    assert vox.HD95[0] == pytest.approx(3.0) and vox.HD95[2] == pytest.approx(1.0)
    assert evaluate(*pairs, spacing_from='pred').HD95.equals(ref.HD95)
    pd.testing.assert_frame_equal(evaluate(*pairs, n_workers=2), ref)
    only2 = evaluate(*pairs, labels=[2])
    assert only2.label.tolist() == [2, 2]
    with pytest.raises(ValueError, match='spacing_from'): evaluate(*pairs, spacing_from='image')


def test_evaluate_errors(files, tmp_path):
    missing = tmp_path / 'pred_003.nii.gz'
    with pytest.raises(MedicalImageError, match='pred_003.nii.gz'): evaluate([missing], [files['gt']])
    with pytest.raises(ValueError, match='2 prediction files but 1'): evaluate([files['pred'], files['pred2']], [files['gt']])
    small = tmp_path / 'small.nii.gz'
    write_nifti(torch.zeros(1, 20, 20, 19, dtype=torch.uint8), AFF, small)
    with pytest.raises(ValueError, match=r'small\.nii\.gz.*gt_001\.nii\.gz'): evaluate([small], [files['gt']])
    flipped = tmp_path / 'flipped.nii.gz'
    write_nifti(_two_class_case()[0][None], np.diag([-0.8, 0.8, 2.5, 1.0]), flipped)
    with pytest.raises(ValueError, match='oriented LAS.*RAS'): evaluate([flipped], [files['gt']])
    shifted = tmp_path / 'shifted.nii.gz'
    aff = AFF.copy(); aff[0, 3] = 10
    write_nifti(_two_class_case()[0][None], aff, shifted)
    with pytest.warns(UserWarning, match='different affines'): evaluate([shifted], [files['gt']])
