"save_model / load_model: pickle-free, exact weights, config and preprocessing round trip, refusals."
import json, numpy as np, pytest, torch, torchio as tio
from monai.networks.nets import UNet
from patchfm.config import PatchConfig
from patchfm.learner import save_model, load_model, model_spec, build_model
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
