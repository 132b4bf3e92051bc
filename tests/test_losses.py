"Tests for patchfm.losses: CustomLoss target handling, activation/decodes, default_loss, fastai integration."
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from fastai.torch_core import TensorBase
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
import fastai.callback.progress  # noqa: F401  (Learner.no_bar, as in a normal fastai session)
from monai.losses import DiceCELoss, DiceLoss, DiceFocalLoss, FocalLoss

from patchfm.losses import CustomLoss, default_loss

SP = (6, 5, 4)


@pytest.fixture
def softmax_case():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, *SP, generator=g)
    targ = torch.randint(0, 3, (2, 1, *SP), generator=g)
    return pred, targ


@pytest.fixture
def sigmoid_case():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 1, *SP, generator=g)
    targ = torch.randint(0, 2, (2, 1, *SP), generator=g)
    return pred, targ


DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.float32, torch.float64, torch.float16]


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('squeeze', [False, True])
def test_softmax_loss_matches_monai_for_all_target_shapes_and_dtypes(softmax_case, dtype, squeeze):
    pred, targ = softmax_case
    raw = DiceCELoss(to_onehot_y=True, softmax=True)(pred, targ.float())
    t = targ.to(dtype)
    if squeeze: t = t[:, 0]
    got = CustomLoss(DiceCELoss(to_onehot_y=True, softmax=True))(pred, t)
    assert torch.allclose(got, raw, atol=1e-6)


@pytest.mark.parametrize('dtype', DTYPES + [torch.bool])
@pytest.mark.parametrize('squeeze', [False, True])
def test_sigmoid_loss_matches_monai_for_all_target_shapes_and_dtypes(sigmoid_case, dtype, squeeze):
    pred, targ = sigmoid_case
    raw = DiceCELoss(sigmoid=True)(pred, targ.float())
    t = targ.to(dtype)
    if squeeze: t = t[:, 0]
    got = CustomLoss(DiceCELoss(sigmoid=True))(pred, t)
    assert torch.allclose(got, raw, atol=1e-6)


def test_one_hot_target_accepted_without_to_onehot(softmax_case):
    pred, targ = softmax_case
    onehot = torch.nn.functional.one_hot(targ[:, 0], 3).permute(0, 4, 1, 2, 3).to(torch.uint8)
    raw = DiceLoss(softmax=True)(pred, onehot.float())
    assert torch.allclose(CustomLoss(DiceLoss(softmax=True))(pred, onehot), raw)
    # the same one-hot target gives the same value as the label map through to_onehot_y
    lm = CustomLoss(DiceLoss(softmax=True, to_onehot_y=True))(pred, targ)
    assert torch.allclose(lm, raw, atol=1e-6)


def test_fastai_tensor_subclasses_are_stripped(softmax_case):
    pred, targ = softmax_case
    loss = CustomLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    out = loss(TensorBase(pred), TensorBase(targ))
    assert type(out) is torch.Tensor
    assert torch.allclose(out, loss(pred, targ))


def test_gradient_flows(softmax_case):
    pred, targ = softmax_case
    pred = pred.clone().requires_grad_()
    CustomLoss(DiceCELoss(to_onehot_y=True, softmax=True))(pred, targ).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_error_on_multichannel_target_where_label_map_expected(softmax_case):
    pred, _ = softmax_case
    loss = CustomLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    with pytest.raises(ValueError, match=r'target has 3 channels, expected 1 channel \(a label map\)'):
        loss(pred, torch.zeros(2, 3, *SP))
    with pytest.raises(ValueError, match='target has 2 channels'):
        CustomLoss(DiceLoss(softmax=True))(pred, torch.zeros(2, 2, *SP))
    with pytest.raises(ValueError, match='target has 2 channels'):
        CustomLoss(DiceCELoss(sigmoid=True))(pred[:, :1], torch.zeros(2, 2, *SP))


def test_error_on_shape_mismatch(softmax_case):
    pred, targ = softmax_case
    loss = CustomLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    with pytest.raises(ValueError, match='spatial size'):
        loss(pred, targ[..., :-1])
    with pytest.raises(ValueError, match='batch or spatial'):
        loss(pred, targ[:1])
    with pytest.raises(ValueError, match=r'\(B,1,\*spatial\) or \(B,\*spatial\)'):
        loss(pred, targ[:, 0, 0])


def test_error_on_labels_out_of_range(softmax_case, sigmoid_case):
    pred, targ = softmax_case
    with pytest.raises(ValueError, match=r'\[0, 2\].*found values in \[0, 3\]'):
        CustomLoss(DiceCELoss(to_onehot_y=True, softmax=True))(pred, targ + (targ == 2).long())
    with pytest.raises(ValueError, match=r'\[0, 2\].*\[-1, 2\]'):
        CustomLoss(DiceCELoss(to_onehot_y=True, softmax=True))(pred, targ - (targ == 0).long())
    p1, t1 = sigmoid_case
    with pytest.raises(ValueError, match=r'\[0, 1\] for a 1-channel sigmoid'):
        CustomLoss(DiceCELoss(sigmoid=True))(p1, t1 * 2)


def test_constructor_validation():
    with pytest.raises(TypeError, match='callable'): CustomLoss(3)
    with pytest.raises(ValueError, match='activation_type'): CustomLoss(DiceLoss(), activation_type='relu')
    with pytest.raises(ValueError, match='threshold'): CustomLoss(DiceLoss(), threshold=1.5)


def test_activation_read_from_loss_flags_and_channel_count():
    x2, x1 = torch.randn(2, 2, *SP), torch.randn(2, 1, *SP)
    assert CustomLoss(DiceCELoss(softmax=True, to_onehot_y=True)).kind(x2) == 'softmax'
    assert CustomLoss(DiceCELoss(sigmoid=True)).kind(x2) == 'sigmoid'  # multi-label sigmoid model
    assert CustomLoss(DiceFocalLoss(softmax=True, to_onehot_y=True)).kind(x2) == 'softmax'
    assert CustomLoss(DiceFocalLoss(sigmoid=True)).kind(x2) == 'sigmoid'
    assert CustomLoss(FocalLoss(use_softmax=True, to_onehot_y=True)).kind(x2) == 'softmax'
    assert CustomLoss(FocalLoss()).kind(x2) == 'sigmoid'  # MONAI's sigmoid focal loss
    assert CustomLoss(DiceLoss()).kind(x2) == 'softmax'
    assert CustomLoss(DiceLoss()).kind(x1) == 'sigmoid'
    assert CustomLoss(DiceLoss(softmax=True), activation_type='none').kind(x2) == 'none'


def test_softmax_activation_and_decodes(softmax_case):
    pred, _ = softmax_case
    loss = CustomLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    probs = loss.activation(pred)
    assert probs.shape == pred.shape
    assert torch.allclose(probs, torch.softmax(pred, 1))
    dec = loss.decodes(probs)
    assert dec.shape == (2, 1, *SP) and dec.dtype == torch.long
    assert torch.equal(dec, pred.argmax(1, keepdim=True))


def test_sigmoid_activation_and_decodes_threshold_not_argmax():
    pred = torch.full((2, 1, *SP), 2.0)  # all foreground: argmax over one channel would say all background
    pred[0, 0, 0] = -2.0
    loss = CustomLoss(DiceCELoss(sigmoid=True))
    probs = loss.activation(pred)
    assert torch.allclose(probs, torch.sigmoid(pred))
    dec = loss.decodes(probs)
    assert dec.shape == (2, 1, *SP)
    assert dec.sum() == dec.numel() - SP[1] * SP[2]
    assert dec[0, 0, 0].sum() == 0
    # a custom threshold moves the decision
    strict = CustomLoss(DiceCELoss(sigmoid=True), threshold=0.95)
    assert strict.decodes(strict.activation(pred)).sum() == 0


def test_multilabel_sigmoid_decodes_keep_channels():
    x = torch.tensor([-1., 1.]).view(1, 2, 1, 1, 1).expand(1, 2, 2, 2, 2)
    loss = CustomLoss(DiceCELoss(sigmoid=True))
    dec = loss.decodes(loss.activation(x))
    assert dec.shape == (1, 2, 2, 2, 2)
    assert dec[:, 0].sum() == 0 and dec[:, 1].sum() == 8


def test_identity_activation_for_probability_models():
    probs = torch.softmax(torch.randn(2, 3, *SP), 1)
    loss = CustomLoss(DiceLoss(to_onehot_y=True), activation_type='none')
    assert torch.equal(loss.activation(probs), probs)
    assert torch.equal(loss.decodes(probs), probs.argmax(1, keepdim=True))


def test_default_loss():
    l1, l3 = default_loss(1), default_loss(3)
    assert isinstance(l1, CustomLoss) and isinstance(l1.loss_func, DiceCELoss)
    assert l1.activation_type == 'sigmoid' and not l1.label_map_target
    assert l3.activation_type == 'softmax' and l3.label_map_target
    p, t = torch.randn(2, 3, *SP), torch.randint(0, 3, (2, *SP))
    assert torch.allclose(l3(p, t), DiceCELoss(to_onehot_y=True, softmax=True)(p, t[:, None].float()))
    # kwargs reach DiceCELoss: no CE term leaves the Dice loss
    dice_only = default_loss(3, lambda_ce=0.0)
    assert torch.allclose(dice_only(p, t), DiceLoss(to_onehot_y=True, softmax=True)(p, t[:, None].float()))
    for bad in (0, -1, 2.0, True, '2'):
        with pytest.raises(ValueError, match='n_classes'): default_loss(bad)


def test_loss_with_buffers_is_moved_to_prediction_device():
    class Recording(nn.Module):  # pretends its class weights live on a GPU
        def __init__(self): super().__init__(); self.moved = []
        def buffers(self, recurse=True): yield SimpleNamespace(device=torch.device('cuda', 0))
        def to(self, *args, **kwargs): self.moved.append(args); return self
        def forward(self, p, t): return p.mean()
    rec = Recording()
    CustomLoss(rec)(torch.randn(1, 2, *SP), torch.zeros(1, 1, *SP))
    assert rec.moved == [(torch.device('cpu'),)]
    weighted = CustomLoss(DiceCELoss(to_onehot_y=True, softmax=True, weight=torch.tensor([0.2, 0.8])))
    assert torch.isfinite(weighted(torch.randn(1, 2, *SP), torch.randint(0, 2, (1, 1, *SP))))


def _tiny_learner(n_out, loss, tmp_path):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(8, 1, 8, 8, 8, generator=g)
    ys = (xs > 0.3).to(torch.uint8)
    ds = list(zip(xs, ys))
    dls = DataLoaders(DataLoader(ds, bs=2, shuffle=True), DataLoader(ds[:4], bs=2), device='cpu')
    torch.manual_seed(0)
    return Learner(dls, nn.Conv3d(1, n_out, 3, padding=1), loss_func=loss, path=tmp_path)


@pytest.mark.parametrize('n_out', [1, 2])
def test_learner_get_preds_with_decoded(n_out, tmp_path):
    learn = _tiny_learner(n_out, default_loss(n_out), tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    with learn.no_bar(): probs, targs, dec = learn.get_preds(with_decoded=True)
    assert probs.shape == (4, n_out, 8, 8, 8)
    assert float(probs.min()) >= 0 and float(probs.max()) <= 1
    assert dec.shape == (4, 1, 8, 8, 8) == targs.shape
    expected = probs.argmax(1, keepdim=True) if n_out > 1 else (probs > 0.5).long()
    assert torch.equal(dec, expected)


def test_per_item_loss_when_fastai_asks_for_it(softmax_case):
    pred, targ = softmax_case
    loss = CustomLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    loss.reduction = 'none'
    per_item = loss(pred, targ)
    assert per_item.shape == (2,)
    raw = DiceCELoss(to_onehot_y=True, softmax=True)
    assert torch.allclose(per_item, torch.stack([raw(pred[i:i + 1], targ[i:i + 1].float()) for i in range(2)]))
    loss.reduction = 'mean'
    assert torch.allclose(per_item.mean(), loss(pred, targ), atol=1e-6)


def test_learner_get_preds_with_loss(tmp_path):
    learn = _tiny_learner(2, default_loss(2), tmp_path)
    with learn.no_bar(): probs, targs, losses = learn.get_preds(with_loss=True)
    assert losses.shape == (4,)
    assert learn.loss_func.reduction == 'mean'  # restored by fastai
    with learn.no_bar(): val_loss = learn.validate()[0]
    assert float(losses.mean()) == pytest.approx(val_loss, rel=1e-5)
