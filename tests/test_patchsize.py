"patchsize: AP configs, size checks, hyper_learner training on varying sizes, evaluate_patch_sizes, summaries."
import warnings
import matplotlib
matplotlib.use('Agg')
import numpy as np, pandas as pd, pytest, torch, torchio as tio
from fastai.callback.core import Callback
from matplotlib.figure import Figure

from patchfm.config import PatchConfig
from patchfm.core import MedMask
from patchfm.data import MedPatchDataLoaders
from patchfm.sampling import size_choices
from patchfm.demo import make_demo_dataset, DEMO_CLASSES
from patchfm.inference import patch_inference
from patchfm.metrics import multiclass_metrics
from patchfm.models import HyperUNet, UNet
from patchfm.patchsize import (augmented_config, check_patch_sizes, hyper_learner, evaluate_patch_sizes,
                               patch_size_table, plot_patch_sizes)

warnings.filterwarnings('ignore', message='.*torch.jit.script.*')
PROBS = {0: 0.2, 1: 0.4, 2: 0.4}
TFMS = [tio.ZNormalization()]


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    "Five demo cases; at 4 mm the volumes are about 24 voxels per axis"
    return make_demo_dataset(tmp_path_factory.mktemp('demo'), n_cases=5, seed=11)


def _cfg(**kw):
    d = dict(patch_size=16, samples_per_volume=4, sampler_type='label', label_probabilities=PROBS, queue_length=16,
             queue_num_workers=0, target_spacing=(4., 4., 4.))
    return PatchConfig(**{**d, **kw})


def _dls(df, cfg, seed=0):
    return MedPatchDataLoaders.from_df(df, 'image', 'label', valid_pct=0.25, patch_config=cfg, pre_patch_tfms=TFMS,
                                       bs=2, seed=seed, num_workers=0)


# --- augmented_config / check_patch_sizes -----------------------------------------------------------------------
def test_augmented_config_includes_hi_and_keeps_the_rest():
    cfg = _cfg(patch_size=48)
    ap = augmented_config(cfg, 16, 48, 8)
    assert size_choices(ap.patch_size_range) == [[16, 24, 32, 40, 48]] * 3
    assert ap.patch_size == (48, 48, 48) and ap.replace(patch_size_range=None) == cfg and cfg.patch_size_range is None
    per_axis = augmented_config(cfg, (16, 16, 8), (48, 48, 16), 8)
    assert size_choices(per_axis.patch_size_range) == [[16, 24, 32, 40, 48]] * 2 + [[8, 16]]
    assert size_choices(augmented_config(cfg, 24, 24, 8).patch_size_range) == [[24]] * 3


@pytest.mark.parametrize('args, match', [((16, 50, 8), 'pass hi=48 or 56'), ((32, 16, 8), 'hi must be >= lo'),
                                         ((16, 48, 0), 'step'), ((16, (48, 48), 8), 'hi'), ((16.0, 48, 8), 'lo')])
def test_augmented_config_errors(args, match):
    with pytest.raises(ValueError, match=match): augmented_config(_cfg(), *args)
    with pytest.raises(TypeError, match='PatchConfig'): augmented_config({'patch_size': 16}, 16, 48, 8)


def test_check_patch_sizes():
    ok = _cfg(patch_size=48, patch_size_range=(16, 49, 8))
    assert check_patch_sizes(ok, 8, require_range=True) is ok
    with pytest.raises(ValueError, match=r'axis 0 has \(lo, hi, step\) = \(16, 49, 4\).*multiples of 8'):
        check_patch_sizes(ok.replace(patch_size_range=(16, 49, 4)), 8)
    with pytest.raises(ValueError, match='axis 2'):
        check_patch_sizes(ok.replace(patch_size_range=((16, 49, 8), (16, 49, 8), (12, 49, 8))), 8)
    with pytest.raises(ValueError, match=r'patch_size.*\(48, 48, 36\).*axis 2'):
        check_patch_sizes(ok.replace(patch_size=(48, 48, 36), patch_size_range=None), 8)
    with pytest.raises(ValueError, match='augmented_config'): check_patch_sizes(_cfg(), 8, require_range=True)
    check_patch_sizes(_cfg(), 8)  # no range, not required: fine
    with pytest.raises(ValueError, match='divisor'): check_patch_sizes(ok, 0)


# --- hyper_learner -------------------------------------------------------------------------------------------
class RecordSizes(Callback):
    def before_fit(self): self.seen = []
    def before_batch(self):
        if self.training: self.seen.append(tuple(self.xb[0].shape[2:]))


def test_hyper_learner_trains_on_varying_patch_sizes(demo):
    torch.manual_seed(0)
    dls = _dls(demo, augmented_config(_cfg(), 8, 16, 4))
    learn = hyper_learner(dls, C=4, n_down=2, n_fix=1)
    m = learn.model
    assert isinstance(m, HyperUNet) and (m.in_channels, m.out_channels, m.C, m.n_down, m.n_fix) == (1, 3, 4, 2, 1)
    assert m.size_encoding == 'log2' and m.init_std == 0.1 and m.reference_size == (16., 16., 16.)
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    rec = RecordSizes()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 3e-3, cbs=rec)
    from patchfm.learner import PatchLearner
    assert isinstance(learn, PatchLearner) and learn.fit_count == 1
    assert len(rec.seen) == len(dls.train) >= 4
    assert len(set(rec.seen)) > 1, f"every batch had the same size: {rec.seen}"
    assert all(s in (8, 12, 16) for sh in rec.seen for s in sh)
    assert rec.seen == dls.train.batch_sizes(0)
    train_loss, valid_loss = learn.recorder.values[-1][:2]
    assert np.isfinite(train_loss) and np.isfinite(valid_loss)
    assert any(not torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_hyper_learner_errors(demo):
    with pytest.raises(ValueError, match='multiples of 8'):
        hyper_learner(_dls(demo, _cfg(patch_size_range=(8, 17, 4))), C=2, n_down=3, n_fix=1)
    with pytest.raises(ValueError, match='augmented_config'):
        hyper_learner(_dls(demo, _cfg()), C=2, n_down=2, n_fix=1)
    uniform = _cfg(sampler_type='uniform', label_probabilities=None, patch_size_range=(8, 17, 4))
    with pytest.raises(ValueError, match='n_classes'): hyper_learner(_dls(demo, uniform), C=2, n_down=2, n_fix=1)
    learn = hyper_learner(_dls(demo, uniform), n_classes=3, C=2, n_down=2, n_fix=1, size_encoding='raw')
    assert learn.model.out_channels == 3 and learn.model.init_std == 0.025  # raw keeps HyperUNet's init
    with pytest.raises(ValueError, match='hyper_kwargs'):
        hyper_learner(_dls(demo, uniform), n_classes=3, C=2, n_down=2, hyper_kwargs={'C': 8})
    with pytest.raises(TypeError, match='MedPatchDataLoaders'): hyper_learner(object(), n_classes=3)


# --- evaluate_patch_sizes ------------------------------------------------------------------------------------
class Constant(torch.nn.Module):
    "Predicts class `k` everywhere"
    def __init__(self, k=1, n=3): super().__init__(); self.k, self.n = k, n; self.w = torch.nn.Parameter(torch.zeros(1))
    def forward(self, x):
        out = torch.full((x.shape[0], self.n, *x.shape[2:]), -10.)
        out[:, self.k] = 10.
        return out


def test_evaluate_structure_on_untrained_unet(demo):
    torch.manual_seed(0)
    net = UNet(1, 3, C=2, n_down=2, n_fix=1)
    cfg = _cfg()
    df = evaluate_patch_sizes(net, cfg, demo.image[:2], demo.label[:2], sizes=[8, 16, (8, 16, 12)],
                              pre_inference_tfms=TFMS, class_names=DEMO_CLASSES, name='tiny')
    assert list(df.columns) == ['model', 'size', 'patch_size', 'case', 'dice_lesion_right', 'dice_lesion_left',
                                'mean_dice', 'time_s']
    assert len(df) == 6 and (df.model == 'tiny').all()
    assert df['size'].tolist() == [8, 8, 16, 16, '8x16x12', '8x16x12']
    assert df.patch_size.tolist() == [(8, 8, 8)] * 2 + [(16, 16, 16)] * 2 + [(8, 16, 12)] * 2
    assert df.case.tolist() == ['case_000', 'case_001'] * 3
    d = df[['dice_lesion_right', 'dice_lesion_left', 'mean_dice']].to_numpy()
    assert np.isfinite(d).all() and ((d >= 0) & (d <= 1)).all()
    assert (df.time_s > 0).all()
    # the values are those of patch_inference + an independent Dice on the preprocessed frame
    pred = patch_inference(net, cfg.replace(patch_size=16), [demo.image[1]], pre_inference_tfms=TFMS, progress=False)[0]
    gt = MedMask.create(demo.label[1], target_spacing=cfg.target_spacing)
    ref = multiclass_metrics(pred, gt, labels=[1, 2])
    row = df[(df['size'] == 16) & (df.case == 'case_001')].iloc[0]
    assert row.dice_lesion_right == pytest.approx(ref[1]['DSC'], abs=1e-6)
    assert row.dice_lesion_left == pytest.approx(ref[2]['DSC'], abs=1e-6)
    assert row.mean_dice == pytest.approx((ref[1]['DSC'] + ref[2]['DSC']) / 2, abs=1e-6)


def test_evaluate_dice_values_with_a_constant_model(demo):
    "Predicting class 1 everywhere: Dice 1 = 2|T1| / (N + |T1|), Dice 2 = 0, whatever the size"
    cfg = _cfg()
    df = evaluate_patch_sizes(Constant(1), cfg, demo.image[:1], demo.label[:1], sizes=[8, 16], pre_inference_tfms=TFMS)
    gt = torch.as_tensor(MedMask.create(demo.label[0], target_spacing=cfg.target_spacing))
    t1 = int((gt == 1).sum())
    assert df.model.tolist() == ['Constant'] * 2 and list(df.columns[4:6]) == ['dice_1', 'dice_2']
    assert df.dice_1.tolist() == pytest.approx([2 * t1 / (gt.numel() + t1)] * 2, rel=1e-5)
    assert df.dice_2.tolist() == [0.0, 0.0]


def test_conditional_model_gets_the_evaluated_size(demo):
    torch.manual_seed(0)
    hyper = HyperUNet(1, 3, C=2, n_down=2, n_fix=1, size_encoding='log2', reference_size=16)
    calls = []
    hyper.register_forward_pre_hook(lambda m, args, kw: calls.append((tuple(args[0].shape[2:]), kw.get('patch_size'))),
                                    with_kwargs=True)
    df = evaluate_patch_sizes(hyper, _cfg(), demo.image[:1], demo.label[:1], sizes=[8, 12, 16], pre_inference_tfms=TFMS)
    assert df['size'].tolist() == [8, 12, 16]
    assert {ps for _, ps in calls} == {(8, 8, 8), (12, 12, 12), (16, 16, 16)}
    assert all(shape == ps for shape, ps in calls)
    # sizes default to the config's training range
    calls.clear()
    df = evaluate_patch_sizes(hyper, augmented_config(_cfg(), 8, 16, 8), demo.image[:1], demo.label[:1], pre_inference_tfms=TFMS)
    assert df['size'].tolist() == [8, 16] and {ps for _, ps in calls} == {(8, 8, 8), (16, 16, 16)}


def test_evaluate_errors(demo):
    net, cfg = UNet(1, 3, C=2, n_down=2, n_fix=1), _cfg()
    with pytest.raises(ValueError, match='multiples of 4'):
        evaluate_patch_sizes(net, cfg, demo.image[:1], demo.label[:1], sizes=[8, 10])
    with pytest.raises(ValueError, match='2 image'):
        evaluate_patch_sizes(net, cfg, demo.image[:2], demo.label[:1], sizes=[8])
    with pytest.raises(ValueError, match='sizes'):
        evaluate_patch_sizes(net, cfg, demo.image[:1], demo.label[:1], sizes=[(8, 8)])
    with pytest.raises(ValueError, match='same case'):  # gt of another case: other shape
        evaluate_patch_sizes(net, cfg, demo.image[:1], demo.label[1:2], sizes=[8], pre_inference_tfms=TFMS)
    with pytest.raises(TypeError, match='Learner'): evaluate_patch_sizes('model', cfg, demo.image[:1], demo.label[:1])


# --- summaries -------------------------------------------------------------------------------------------------
def _fake():
    rows = [dict(model=m, size=s, patch_size=(s,) * 3, case=c, mean_dice=v)
            for m, base in (('FP', 0.2), ('AP', 0.6)) for s in (24, 8, 16) for c, v in (('a', base), ('b', base + s / 100))]
    return pd.DataFrame(rows)


def test_patch_size_table_and_plot():
    df = _fake()
    t = patch_size_table(df)
    assert list(t.index) == ['FP', 'AP'] and list(t.columns) == [8, 16, 24]
    assert t.loc['AP', 16] == pytest.approx(0.6 + 0.08) and t.loc['FP', 8] == pytest.approx(0.2 + 0.04)
    fig = plot_patch_sizes(df, title='x')
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert [l.get_label() for l in ax.lines] == ['FP', 'AP']
    assert list(ax.lines[1].get_xdata()) == [8, 16, 24]
    assert list(ax.lines[1].get_ydata()) == pytest.approx([0.64, 0.68, 0.72])
    aniso = pd.DataFrame([dict(model='m', size='8x16x16', patch_size=(8, 16, 16), case='a', mean_dice=0.5),
                          dict(model='m', size=8, patch_size=(8, 8, 8), case='a', mean_dice=0.4)])
    assert [t.get_text() for t in plot_patch_sizes(aniso).axes[0].get_xticklabels()] == ['8', '8x16x16']
    with pytest.raises(ValueError, match='mean_dice'): plot_patch_sizes(df.drop(columns='mean_dice'))
    with pytest.raises(ValueError, match='empty'): patch_size_table(df.iloc[:0])
