"save_model / load_model: pickle-free, exact weights, config and preprocessing round trip, refusals."
import json, numpy as np, pytest, torch, torchio as tio
from monai.networks.nets import UNet
from patchfm.config import PatchConfig
from patchfm.serialisation import save_model, load_model, model_spec, build_model
from patchfm.models import HyperUNet, UNet as PaperUNet


def _unet():
    return UNet(spatial_dims=3, in_channels=2, out_channels=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm='instance')


def test_monai_unet_round_trip(tmp_path):
    net = _unet().eval()
    cfg = PatchConfig(patch_size=(16, 16, 16), target_spacing=(1, 1, 2))
    save_model(net, tmp_path / 'm', config=cfg, pre_patch_tfms=[tio.ZNormalization(), tio.Clamp(-3, 3)], extra={'classes': ['bg', 'a', 'b']})
    desc = json.loads((tmp_path / 'm' / 'model.json').read_text())
    assert desc['model_class'] == 'monai.networks.nets.unet.UNet' and desc['model_kwargs']['spatial_dims'] == 3
    assert desc['extra']['classes'] == ['bg', 'a', 'b']
    s = load_model(tmp_path / 'm', device='cpu')
    assert s.config == cfg and [type(t) for t in s.pre_patch_tfms] == [tio.ZNormalization, tio.Clamp]
    x = torch.randn(2, 2, 16, 16, 16)
    assert torch.equal(net(x), s.model(x))
    assert not s.model.training


def test_patchfm_models_round_trip(tmp_path):
    net = HyperUNet(in_channels=1, out_channels=2, C=4, n_down=2, n_fix=1).eval()
    save_model(net, tmp_path / 'h', config=PatchConfig(patch_size=(16, 16, 16)))
    s = load_model(tmp_path / 'h', device='cpu')
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.equal(net(x), s.model(x))


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match='allowed packages'):
        build_model({'model_class': 'os.system', 'model_kwargs': {}})
    with pytest.raises(ValueError, match='PatchConfig'):
        save_model(_unet(), tmp_path / 'x')
    with pytest.raises(FileNotFoundError, match='model.safetensors'):
        load_model(tmp_path / 'nothing')
    net = _unet()
    save_model(net, tmp_path / 'm', config=PatchConfig(patch_size=(16, 16, 16)))
    d = json.loads((tmp_path / 'm' / 'model.json').read_text())
    d['model_kwargs']['out_channels'] = 5
    (tmp_path / 'm' / 'model.json').write_text(json.dumps(d))
    with pytest.raises(Exception, match='out|size|fit'):
        load_model(tmp_path / 'm', device='cpu')


def test_spec_needs_kwargs_for_unknown_models():
    class Odd(torch.nn.Module):
        def __init__(self, secret): super().__init__(); self.lin = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match='secret'):
        model_spec(Odd(3))
    assert model_spec(Odd(3), {'secret': 3})['model_kwargs'] == {'secret': 3}


# --- training path: patch_learner, SlidingWindowDice, lr_find, SaveModelCallback, show_results ---------------
import numpy as np, matplotlib
matplotlib.use('Agg')


@pytest.fixture(scope='module')
def demo_dls(tmp_path_factory):
    from patchfm.demo import make_demo_dataset
    from patchfm.data import MedPatchDataLoaders
    d = tmp_path_factory.mktemp('demo')
    df = make_demo_dataset(d, n_cases=4, seed=3, lesion_radius=(6.0, 9.0))
    cfg = PatchConfig(patch_size=(32, 32, 32), target_spacing=(3.0, 3.0, 3.0), sampler_type='label',
                      label_probabilities={0: 0.2, 1: 0.4, 2: 0.4}, samples_per_volume=2, queue_length=8,
                      queue_num_workers=0)
    return MedPatchDataLoaders.from_df(df, 'image', 'label', valid_pct=0.5, patch_config=cfg,
                                      pre_patch_tfms=[tio.ZNormalization()], bs=2, seed=0, num_workers=0)


def test_patch_learner_fit_and_sliding_window_dice(demo_dls, tmp_path):
    from fastai.callback.tracker import SaveModelCallback
    from patchfm.learner import patch_learner, SlidingWindowDice
    from patchfm.learner import PatchLearner
    learn = patch_learner(demo_dls, sw_every=1, path=tmp_path)
    assert isinstance(learn, PatchLearner)
    assert isinstance(learn.metrics[1], SlidingWindowDice) and learn.model.out_channels == 3
    learn.fit(2, 1e-3, cbs=[SaveModelCallback(monitor='accumulated_dice', comp=np.greater, fname='best', with_opt=False)])
    names = learn.recorder.metric_names
    assert 'accumulated_dice' in names and 'sw_dice' in names
    vals = learn.recorder.values[-1]
    sw = vals[names.index('sw_dice') - 1]
    assert 0 <= sw <= 1  # a real Dice over whole validation volumes
    assert (tmp_path / 'models' / 'best.pth').exists()
    # the metric equals a direct full-volume computation with the same engine
    from patchfm.preprocess import preprocess_subject
    from patchfm.inference import predict_volume, default_activation
    from patchfm.grid import probs_to_labels
    cfg = demo_dls.patch_config
    tp, fp, fn = np.zeros(3), np.zeros(3), np.zeros(3)
    for img, msk in zip(demo_dls.valid.subjects_dataset.images, demo_dls.valid.subjects_dataset.masks):
        s = preprocess_subject(img, cfg, demo_dls.pre_patch_tfms, mask=msk, pad=False)
        p = probs_to_labels(predict_volume(learn.model, s['image'], cfg.patch_size, cfg.overlap_voxels,
                                           cfg.aggregation_mode, 4, default_activation(learn)))
        t = s['mask'][0]
        for c in (1, 2):
            a, b = p == c, t == c
            tp[c] += (a & b).sum().item(); fp[c] += (a & ~b).sum().item(); fn[c] += (~a & b).sum().item()
    d = 2 * tp[1:] / (2 * tp[1:] + fp[1:] + fn[1:])
    m = learn.metrics[1]
    m._learn, m._cache = learn, {}
    learn.epoch, learn.n_epoch = 0, 1
    assert m.value == pytest.approx(float(np.nanmean(d)), abs=1e-6)


def test_lr_find_and_show_results(demo_dls, tmp_path):
    from patchfm.learner import patch_learner
    learn = patch_learner(demo_dls, n_classes=3, path=tmp_path)
    res = learn.lr_find(num_it=6, show_plot=False)
    assert res.valley > 0
    learn.show_results(max_n=2)


def test_patch_learner_needs_n_classes(tmp_path):
    from patchfm.learner import patch_learner
    class D: patch_config = PatchConfig(patch_size=(16, 16, 16))
    with pytest.raises(ValueError, match='n_classes'):
        patch_learner(D())


# --- PatchLearner: fit calls, fit count and the after_fit_exception event ---------------------------------------
from fastai.callback.core import Callback, CancelFitException
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from torch.utils.data import TensorDataset
from patchfm.learner import PatchLearner


def tiny_learner(*cbs, **kwargs):
    "A PatchLearner on 4 random 8^3 volumes: a 1x1x1 convolution learning y = 2x (a fit takes milliseconds)"
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8, 8)
    ds = TensorDataset(x, 2 * x)
    dls = DataLoaders(DataLoader(ds, bs=2), DataLoader(ds, bs=2))
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 1), torch.nn.Conv3d(1, 1, 1))
    return PatchLearner(dls, net, loss_func=torch.nn.MSELoss(), cbs=list(cbs),
                        splitter=lambda m: [list(m[0].parameters()), list(m[1].parameters())], **kwargs)


class Spy(Callback):
    "Records what a callback can read from a PatchLearner"
    def __init__(self): self.fits, self.errors = [], []
    def before_fit(self): self.fits.append((self.learn.fit_count, self.learn.fit_calls))
    def after_fit_exception(self): self.errors.append((self.learn.fit_exception, self.learn.fit_count))


def raise_at(event, exc, epoch=0):
    "A callback raising `exc` at `event` of epoch `epoch` (after the Recorder)"
    def f(self):
        if self.epoch == epoch: raise exc
    return type('Raiser', (Callback,), {event: f, 'order': 90})()


def test_patch_learner_records_fit_one_cycle_and_fine_tune():
    spy = Spy()
    learn = tiny_learner(spy)
    assert learn.fit_calls == () and learn.fit_count == 0
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-2)
    (count, calls), = spy.fits
    assert count == 1 and [n for n, _ in calls] == ['fit_one_cycle', 'fit']
    assert calls[0][1] == dict(n_epoch=1, lr_max=1e-2, div=25., div_final=1e5, pct_start=0.25, wd=None, moms=None,
                               reset_opt=False, start_epoch=0)
    assert calls[1][1] == dict(n_epoch=1, lr=None, wd=None, reset_opt=False, start_epoch=0)  # fit_one_cycle calls fit without lr
    assert learn.fit_calls == () and learn.fit_count == 1
    spy.fits.clear()
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, base_lr=1e-3, freeze_epochs=1, wd=0.1)
    assert [c for c, _ in spy.fits] == [2, 3]  # fine_tune makes two fits
    for (_, calls), pct in zip(spy.fits, (0.99, 0.3)):
        assert [n for n, _ in calls] == ['fine_tune', 'fit_one_cycle', 'fit']
        ft, oc = calls[0][1], calls[1][1]
        assert (ft['epochs'], ft['base_lr'], ft['freeze_epochs'], ft['wd']) == (1, 1e-3, 1, 0.1) and 'cbs' not in ft
        assert oc['pct_start'] == pct and oc['wd'] == 0.1
    spy.fits.clear()
    with learn.no_bar(), learn.no_logging(): learn.fit_flat_cos(1, 1e-3); learn.fit_sgdr(1, 1, 1e-3); learn.fit(1, 1e-3, wd=0.)
    assert [[n for n, _ in calls] for _, calls in spy.fits] == [['fit_flat_cos', 'fit'], ['fit_sgdr', 'fit'], ['fit']]
    assert spy.fits[-1][1][0][1]['lr'] == 1e-3 and learn.fit_count == 6 and not spy.errors


def test_patch_learner_validate_is_not_a_fit():
    spy = Spy()
    learn = tiny_learner(spy)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3); learn.validate(); learn.get_preds()
    assert [(c, [n for n, _ in calls]) for c, calls in spy.fits] == [(1, ['fit']), (1, []), (1, [])]


@pytest.mark.parametrize('exc', [RuntimeError('loss exploded'), KeyboardInterrupt()])
def test_exception_event_sent_once_by_the_outermost_fit_and_reraised_unchanged(exc):
    spy = Spy()

    class NestedFit(Callback):
        "Starts a fit (that raises) from inside the fit"
        def after_epoch(self):
            if self.learn.fit_count == 1: self.learn.fit(1, cbs=raise_at('after_batch', exc))
    learn = tiny_learner(spy)
    with pytest.raises(type(exc)) as info, learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 1e-3, cbs=NestedFit())
    assert info.value is exc  # the very exception, re-raised
    assert len(spy.errors) == 1 and spy.errors[0][0] is exc and spy.errors[0][1] == 1
    assert [c for c, _ in spy.fits] == [1, 1]  # the nested fit does not count as a new fit
    assert learn.fit_calls == () and learn.fit_exception is None and not any(isinstance(cb, NestedFit) for cb in learn.cbs)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)  # the learner fits on
    assert learn.fit_count == 2 and len(spy.errors) == 1


def test_fit_cbs_hear_the_exception_and_a_failing_handler_is_a_warning():
    heard = []
    class Listener(Callback):
        def after_fit_exception(self): heard.append(type(self.learn.fit_exception).__name__)
    class Broken(Callback):
        def after_fit_exception(self): raise ValueError('handler bug')
    learn = tiny_learner()
    with pytest.warns(UserWarning, match='Broken.after_fit_exception failed'), pytest.raises(RuntimeError, match='boom'):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=[Broken(), Listener(), raise_at('after_loss', RuntimeError('boom'))])
    assert heard == ['RuntimeError']  # a callback passed to fit() is still attached when the event is sent


def test_cancel_fit_is_no_exception_event():
    spy = Spy()
    learn = tiny_learner(spy)
    with learn.no_bar(), learn.no_logging(): learn.fit(3, 1e-3, cbs=raise_at('after_epoch', CancelFitException(), epoch=0))
    assert len(learn.recorder.values) == 1 and not spy.errors and learn.fit_count == 1


def test_plain_learner_unchanged():
    "PatchLearner adds no event to a plain fastai Learner"
    assert not hasattr(Learner, 'fit_calls') and Learner.fit is not PatchLearner.fit
    assert Learner.fit_one_cycle is not PatchLearner.fit_one_cycle and PatchLearner.fit_one_cycle.__name__ == 'fit_one_cycle'
