"Contract of patchfm.models: U-Net layout, HyperUNet weight generation, baking, the patch-size protocol, errors."
import json, math
import pytest, torch
from torch import nn
from patchfm.models import *

SMALL = dict(in_channels=1, out_channels=3, C=4, n_down=2, n_fix=1)
n_params = lambda m: sum(p.numel() for p in m.parameters())


@pytest.fixture(scope='module')
def hyper():
    torch.manual_seed(0)
    return HyperUNet(**SMALL).eval()


@pytest.fixture(scope='module')
def default_hyper():
    "The one full-size HyperUNet of this file (~680 MB of float32)"
    torch.manual_seed(0)
    return HyperUNet()


# ---------------------------------------------------------------- parameter counts and layout
def test_unet_default_param_count():
    test = UNet()
    assert (test.in_channels, test.out_channels, test.C, test.n_down, test.n_fix) == (1, 6, 16, 3, 3)
    assert n_params(test) == 3_328_854


def test_hyperunet_param_count_analytic_on_meta():
    with torch.device('meta'): m = HyperUNet()
    assert n_params(m) == 169_776_854
    # conditioner 3->50->50->50 plus one Linear(50, numel) head per U-Net tensor
    assert n_params(m) == (3 * 50 + 50) + 2 * (50 * 50 + 50) + 51 * n_params(UNet())


def test_default_hyperunet_real_instance(default_hyper):
    m = default_hyper
    assert n_params(m) == 169_776_854
    unet_sd = UNet().state_dict()
    w = m.generate_weights((96, 160, 128))
    assert set(w) == set(unet_sd)
    assert all(w[k].shape == unet_sd[k].shape for k in w)
    # init: weights N(0, std=0.025), biases N(0, std=0.005) -- standard deviations, not variances
    heads_w = torch.cat([h.weight.flatten() for h in m.heads.values()])
    heads_b = torch.cat([h.bias.flatten() for h in m.heads.values()])
    assert abs(heads_w.std().item() - 0.025) < 1e-3 and abs(heads_w.mean().item()) < 1e-3
    assert abs(heads_b.std().item() - 0.005) < 2e-4
    assert abs(m.conditioner[0][0].weight.std().item() - 0.025) < 0.01


def test_default_hyperunet_extreme_sizes_bounded(default_hyper):
    with torch.no_grad():
        for size in [(1e4, 1e4, 1e4), (1, 1, 1), (1e4, 8, 1)]:
            w = default_hyper.generate_weights(size)
            for k, v in w.items():
                assert torch.isfinite(v).all(), (size, k)
                assert v.abs().max() <= 5.0, (size, k)


def test_unet_layout_channels():
    m = UNet(**SMALL)
    sd = m.state_dict()
    assert sd['encoder.0.0.conv.weight'].shape == (4, 1, 3, 3, 3)
    assert sd['encoder.1.0.conv.weight'].shape == (8, 4, 3, 3, 3)          # strided downsampling
    assert m.encoder[1][0].conv.stride == (2, 2, 2)
    assert sd['ups.0.conv.weight'].shape == (8, 4, 4, 4, 4)                # transposed: (in, out, k, k, k)
    assert sd['decoder.0.0.conv.weight'].shape == (4, 8, 3, 3, 3)           # after the skip concatenation
    assert sd['head.weight'].shape == (3, 4, 3, 3, 3)
    assert isinstance(m.encoder[0][0].norm, nn.InstanceNorm3d) and m.encoder[0][0].norm.affine
    assert len(m.encoder) == 3 and all(len(s) == 2 for s in m.encoder)     # n_fix + 1 blocks per level


# ---------------------------------------------------------------- shapes
@pytest.mark.parametrize('cls', [UNet, HyperUNet])
@pytest.mark.parametrize('kw,shape', [(dict(n_down=2), (16, 24, 8)), (dict(n_down=2), (8, 4, 12)),
                                      (dict(n_down=3), (8, 16, 24))])
def test_output_shapes_anisotropic(cls, kw, shape):
    torch.manual_seed(0)
    m = cls(in_channels=2, out_channels=5, C=2, n_fix=1, **kw)
    assert m(torch.randn(2, 2, *shape)).shape == (2, 5, *shape)


@pytest.mark.parametrize('cls', [UNet, HyperUNet])
def test_2d(cls):
    m = cls(in_channels=1, out_channels=2, C=2, n_down=2, n_fix=1, spatial_dims=2)
    assert m(torch.randn(3, 1, 16, 12)).shape == (3, 2, 16, 12)
    with pytest.raises(ValueError, match='4D input'): m(torch.randn(1, 1, 16, 12, 8))


# ---------------------------------------------------------------- generated weights
@pytest.mark.parametrize('enc', ['raw', 'normalized', 'log2'])
def test_generated_weights_bounded_and_finite(enc):
    m = HyperUNet(**SMALL, size_encoding=enc, init_std=0.3)  # large init: saturates, must still be bounded
    with torch.no_grad():
        for size in [(1e4,) * 3, (1,) * 3, (1e4, 1, 64)]:
            for v in m.generate_weights(size).values():
                assert torch.isfinite(v).all() and v.abs().max() <= 5.0


@pytest.mark.parametrize('enc', ['raw', 'normalized', 'log2'])
def test_different_sizes_give_different_weights(enc):
    torch.manual_seed(0)
    m = HyperUNet(**SMALL, size_encoding=enc)
    with torch.no_grad():
        a, b = m.generate_weights((32, 32, 32)), m.generate_weights((64, 32, 16))
        again = m.generate_weights((32, 32, 32))
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert all((a[k] - b[k]).abs().max() > 1e-7 for k in a)


def test_size_encodings():
    m = HyperUNet(**SMALL, size_encoding='normalized', reference_size=(64, 32, 16))
    assert torch.allclose(m.encode_patch_size((64, 64, 8)), torch.tensor([[1., 2., .5]]))
    m = HyperUNet(**SMALL, size_encoding='log2', reference_size=64)
    assert torch.allclose(m.encode_patch_size((64, 128, 32)), torch.tensor([[0., 1., -1.]]))
    m = HyperUNet(**SMALL)
    assert torch.equal(m.encode_patch_size(torch.Size([96, 160, 128])), torch.tensor([[96., 160., 128.]]))


def test_weight_bound_option():
    m = HyperUNet(**SMALL, weight_bound=0.5, init_std=0.5)
    with torch.no_grad(): w = m.generate_weights((1e4,) * 3)
    assert max(v.abs().max().item() for v in w.values()) <= 0.5
    assert max(v.abs().max().item() for v in w.values()) > 0.4   # it does saturate towards the bound


# ---------------------------------------------------------------- baking
def test_baked_unet_equals_hypernetwork(hyper):
    torch.manual_seed(1)
    x = torch.randn(2, 1, 16, 16, 16)
    baked = hyper.get_unet((16, 16, 16))
    assert type(baked) is UNet and not baked.training
    assert n_params(baked) == n_params(UNet(**SMALL))
    with torch.no_grad():
        diff = (baked(x) - hyper(x)).abs().max().item()
        other = hyper.get_unet((32, 32, 32))
        diff_other = (other(x) - hyper(x)).abs().max().item()
    assert diff <= 1e-5
    assert diff_other > 1e-4                     # baking for another size gives another network
    # baked weights are a detached copy: trainable, and independent of the hypernetwork
    assert all(p.requires_grad and p.grad_fn is None for p in baked.parameters())
    before = hyper.generate_weights((16, 16, 16))['head.bias'].detach().clone()
    with torch.no_grad(): baked.head.bias.add_(1.0)
    assert torch.equal(hyper.generate_weights((16, 16, 16))['head.bias'].detach(), before)


def test_baked_unet_follows_dtype_and_mode():
    m = HyperUNet(**SMALL).double().train()
    baked = m.get_unet((16, 16, 16))
    assert baked.training and all(p.dtype == torch.float64 for p in baked.parameters())
    x = torch.randn(1, 1, 16, 16, 16, dtype=torch.float64)
    with torch.no_grad(): assert (baked(x) - m(x)).abs().max() < 1e-10


# ---------------------------------------------------------------- training
def test_gradient_reaches_every_head_and_step_changes_them():
    torch.manual_seed(0)
    m = HyperUNet(**SMALL)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    x, y = torch.randn(2, 1, 16, 16, 8), torch.randint(0, 3, (2, 16, 16, 8))
    nn.functional.cross_entropy(m(x), y).backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    opt.step()
    changed = [n for n, p in m.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    assert all(any(n.startswith(f'heads.{k}.') for n in changed) for k in m.heads)


def test_batch_equals_single_samples(hyper):
    torch.manual_seed(2)
    x = torch.randn(2, 1, 16, 8, 24)
    with torch.no_grad():
        both = hyper(x)
        singles = torch.cat([hyper(x[:1]), hyper(x[1:])])
    assert torch.allclose(both, singles, atol=1e-5)


def test_state_dict_round_trip_and_init_kwargs(hyper):
    kw = hyper.init_kwargs
    json.dumps(kw)
    clone = HyperUNet(**kw)
    clone.load_state_dict(hyper.state_dict())
    assert not any('template' in k for k in hyper.state_dict())
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad(): assert torch.equal(clone.eval()(x), hyper(x))
    u = UNet(**SMALL)
    assert UNet(**u.init_kwargs).init_kwargs == u.init_kwargs


# ---------------------------------------------------------------- protocol
def test_patch_size_protocol(hyper):
    torch.manual_seed(3)
    x = torch.randn(2, 1, 16, 24, 8)
    assert HyperUNet.conditions_on_patch_size and not UNet.conditions_on_patch_size
    with torch.no_grad():
        default = hyper(x)
        explicit = hyper(x, patch_size=(16, 24, 8))
        as_batch = hyper(x, patch_size=torch.tensor([[16, 24, 8], [16, 24, 8]]))
        other = hyper(x, patch_size=(32, 48, 16))
        via_helper = model_forward(hyper, x)
        via_helper_other = model_forward(hyper, x, patch_size=(32, 48, 16))
    assert torch.equal(default, explicit) and torch.equal(default, as_batch) and torch.equal(default, via_helper)
    assert torch.equal(other, via_helper_other) and not torch.allclose(default, other)
    unet = UNet(**SMALL)
    assert model_forward(unet, x, patch_size=(99, 99, 99)).shape == (2, 3, 16, 24, 8)  # plain model ignores it


def test_is_size_conditional_sees_through_wrappers(hyper):
    assert is_size_conditional(hyper) and not is_size_conditional(UNet(**SMALL))
    assert is_size_conditional(nn.DataParallel(hyper))
    assert is_size_conditional(torch.compile(hyper))
    assert not is_size_conditional(nn.Linear(2, 2))


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize('cls', [UNet, HyperUNet])
def test_bad_inputs_raise_clear_errors(cls):
    m = cls(**SMALL)
    with pytest.raises(ValueError, match=r'multiple of 4.*\(16, 18, 8\)'): m(torch.randn(1, 1, 16, 18, 8))
    with pytest.raises(ValueError, match='in_channels=1.*2 channels'): m(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match=r'5D input \(B, C, D, H, W\)'): m(torch.randn(1, 16, 16, 16))
    with pytest.raises(ValueError, match='multiple of 4'): m(torch.randn(1, 1, 0, 16, 16))
    with pytest.raises(TypeError, match='torch.Tensor'): m([[1.0]])


@pytest.mark.parametrize('bad,err,msg', [
    ((16, 16), ValueError, '3 sizes'),
    ((16, -1, 16), ValueError, 'finite and > 0'),
    ((16, float('nan'), 16), ValueError, 'finite and > 0'),
    ('161616', TypeError, 'sequence'),
    (16, TypeError, 'sequence'),
    (('a', 1, 2), TypeError, 'numbers'),
    (torch.tensor([[16, 16, 16], [8, 16, 16]]), ValueError, 'share one patch size'),
])
def test_bad_patch_size(hyper, bad, err, msg):
    with pytest.raises(err, match=msg): hyper(torch.randn(1, 1, 16, 16, 16), patch_size=bad)


@pytest.mark.parametrize('kw,msg', [
    (dict(n_fix=0), 'n_fix'), (dict(n_down=-1), 'n_down'), (dict(C=0), '`C`'), (dict(spatial_dims=4), 'spatial_dims'),
    (dict(in_channels=1.5), 'in_channels'), (dict(out_channels=True), 'out_channels'),
])
@pytest.mark.parametrize('cls', [UNet, HyperUNet])
def test_bad_constructor_args(cls, kw, msg):
    with pytest.raises(ValueError, match=msg): cls(**{**SMALL, **kw})


@pytest.mark.parametrize('kw,msg', [
    (dict(size_encoding='log'), 'size_encoding'), (dict(hidden=()), 'hidden'), (dict(hidden=(50, 0)), 'hidden'),
    (dict(reference_size=(64, 64)), 'reference_size'), (dict(reference_size=-1), 'reference_size'),
    (dict(weight_bound=0), 'weight_bound'),
])
def test_bad_hyper_args(kw, msg):
    with pytest.raises(ValueError, match=msg): HyperUNet(**SMALL, **kw)


# ---------------------------------------------------------------- divisor
def test_unet_divisor():
    assert unet_divisor(3) == 8 and unet_divisor(0) == 1
    assert unet_divisor(UNet(**SMALL)) == 4
    with torch.device('meta'): assert unet_divisor(HyperUNet(n_down=3)) == 8
    assert unet_divisor(nn.DataParallel(UNet(**SMALL))) == 4
    from monai.networks.nets import UNet as MonaiUNet, DynUNet
    assert unet_divisor(MonaiUNet(3, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2))) == 8
    dyn = DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, (2, 2, 1)], upsample_kernel_size=[2, (2, 2, 1)])
    assert unet_divisor(dyn) == 4
    for bad in (True, 2.0, '3'):
        with pytest.raises(TypeError, match='n_down'): unet_divisor(bad)
    with pytest.raises(ValueError, match='>= 0'): unet_divisor(-1)
    with pytest.raises(TypeError, match='neither'): unet_divisor(nn.Linear(2, 2))


def test_divisor_matches_what_the_network_accepts():
    m = UNet(**{**SMALL, 'n_down': 3})
    d = unet_divisor(m)
    m(torch.randn(1, 1, d, 2 * d, d))
    with pytest.raises(ValueError): m(torch.randn(1, 1, d, d + d // 2, d))


def test_single_as_pair_runs_one_item_batches_as_two():
    "A one-item CPU batch without gradients is computed on two copies (PyTorch's fast oneDNN path); the result is the item's"
    from patchfm.models import single_as_pair, model_forward
    seen = []
    class Rec(torch.nn.Module):
        def __init__(self): super().__init__(); self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)
        def forward(self, x): seen.append(x.shape[0]); return self.conv(x)
    net, x = Rec().eval(), torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        ref = net.conv(x)
        out = model_forward(net, x)
        assert seen == [2] and out.shape == (1, 2, 8, 8, 8) and torch.allclose(out, ref, atol=1e-5)
        seen.clear(); model_forward(net, torch.randn(3, 1, 8, 8, 8)); assert seen == [3]  # larger batches as they are
        d = single_as_pair(lambda b: {'a': b * 2, 'n': b.sum((1, 2, 3, 4))}, x)
        assert d['a'].shape == x.shape and torch.equal(d['a'], x * 2) and d['n'].shape == (1,)
        calls = []
        assert single_as_pair(lambda b: calls.append(b.shape[0]) or [b], x)[0].shape[0] == 1 and calls == [2, 1]  # other outputs: again
    seen.clear(); model_forward(net, x).sum().backward(); assert seen == [1]  # with gradients (training): untouched
