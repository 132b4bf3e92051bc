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
    learn = patch_learner(demo_dls, sw_every=1, path=tmp_path)
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
