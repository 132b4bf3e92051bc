"Top-k patch inference (patchfm.topk): Gumbel top-k, aggregation, strategies, learner and file output."
import math, warnings
import numpy as np
import pytest
import torch

from patchfm.config import PatchConfig
from patchfm.core import read_header
from patchfm.grid import patch_grid, extract_patches
from patchfm.inference import predict_volume
from patchfm.topk import (gumbel_topk, TopKSegmenter, TopKLoss, default_global_net, default_local_net, predict_topk,
                          topk_inference, topk_learner, volume_dataloaders, zoom_indices, PatchBlender, STRATEGIES,
                          suppressed_topk, global_errors, objectness_loss)

warnings.filterwarnings('ignore', message='.*torch.jit.script.*')
torch.set_num_threads(2)


def tiny_model(n_classes=2, patch=16, down=2, refine=False, **kw):
    torch.manual_seed(0)
    return TopKSegmenter(default_global_net(1, n_classes, channels=(8, 16)),
                         default_local_net(1, n_classes, (patch,) * 3, (8, 16)), n_classes, (patch,) * 3,
                         down_size_rate=down, refine=refine, **kw)


# ---------------------------------------------------------------- Gumbel top-k
def test_first_pick_frequencies_match_softmax():
    p = torch.tensor([.5, .25, .125, .125])
    g = torch.Generator().manual_seed(1)
    idx, _, _ = gumbel_topk(p.log().expand(4000, 4).contiguous(), 1, generator=g)
    freq = torch.bincount(idx[:, 0], minlength=4).double() / 4000
    assert torch.allclose(freq, p.double(), atol=0.025), freq
    # the temperature changes the relaxation, never the hard sample
    idx2, _, _ = gumbel_topk(p.log().expand(4000, 4).contiguous(), 1, tau=5., generator=torch.Generator().manual_seed(1))
    assert torch.equal(idx, idx2)


def test_indices_distinct_and_one_hot_even_with_ties():
    logits = torch.full((5, 20), math.log(torch.finfo(torch.float32).tiny))  # all "background": ties after masking
    logits[:, 3] = 2.
    idx, w, soft = gumbel_topk(logits, 20)
    assert all(len(set(r.tolist())) == 20 for r in idx)
    assert torch.allclose(w.sum(-1), torch.ones(5, 20)) and torch.allclose(soft.sum(-1), torch.ones(5, 20), atol=1e-5)
    hard = w.detach().round()
    assert torch.equal(hard.argmax(-1), idx) and torch.equal(hard.sum(-2), torch.ones(5, 20))
    assert not torch.isnan(w).any()


def test_without_noise_is_plain_topk():
    logits = torch.randn(3, 30)
    idx, _, _ = gumbel_topk(logits, 7, noise=False)
    assert torch.equal(idx, logits.topk(7, -1).indices)


def test_gradients_reach_every_logit():
    torch.manual_seed(0)
    logits = torch.randn(2, 16, requires_grad=True)
    _, w, _ = gumbel_topk(logits, 4)
    (w * torch.randn_like(w)).sum().backward()
    assert logits.grad is not None and (logits.grad != 0).all() and torch.isfinite(logits.grad).all()


def test_k_larger_than_candidates_raises_clearly():
    with pytest.raises(ValueError, match='larger than the 4 candidate'): gumbel_topk(torch.zeros(4), 5)
    with pytest.raises(ValueError, match='k must be an integer >= 1'): gumbel_topk(torch.zeros(4), 0)
    with pytest.raises(ValueError, match='tau'): gumbel_topk(torch.zeros(4), 1, tau=0)
    with pytest.raises(ValueError, match='logits'): gumbel_topk(torch.zeros(2, 2, 2), 1)


# ---------------------------------------------------------------- aggregation
def test_all_candidates_identity_refinement_equals_sliding_window():
    m = tiny_model().eval()
    x = torch.randn(1, 32, 32, 32)
    lg, n = predict_topk(m, x, 'all', activation=False)
    ref = predict_volume(m.local_net, x, (16,) * 3, 0.5, 'gaussian', activation=None)
    assert n == len(patch_grid((32, 32, 32), 16, 0.5)) == 27
    assert torch.allclose(lg, ref, atol=1e-4)
    lg2, n2 = predict_topk(m, x, 3, 'sliding', activation=False)  # 'sliding' ignores k
    assert n2 == 27 and torch.allclose(lg2, lg)


def test_uncovered_voxels_equal_upsampled_global():
    m = tiny_model().eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        m.k = 1
        o = m(x)
        glog = o['global_logits']
        gup = torch.nn.functional.interpolate(glog, size=(32, 32, 32), mode='trilinear', align_corners=False)
    (a, b, c), = o['patch_starts'][0].tolist()
    covered = torch.zeros(32, 32, 32, dtype=torch.bool); covered[a:a + 16, b:b + 16, c:c + 16] = True
    assert torch.equal(o['logits'][0][:, ~covered], gup[0][:, ~covered])
    assert not torch.equal(o['logits'][0][:, covered], gup[0][:, covered])


def test_k_above_candidates_is_clamped_at_inference():
    m = tiny_model().eval()
    x = torch.randn(1, 20, 24, 16)  # padded to (20, 24, 16): 2*2*1 = 4 candidates
    for strategy in ('topk', 'random'):
        p, n = predict_topk(m, x, 50, strategy)
        assert n == 4 and torch.isfinite(p).all() and p.shape == (2, 20, 24, 16)
        assert torch.allclose(p.sum(0), torch.ones(20, 24, 16))
    with pytest.raises(ValueError, match='k must be'): predict_topk(m, x, 0)
    with pytest.raises(ValueError, match='strategy'): predict_topk(m, x, 3, 'grid')


def test_blender_matches_manual_average():
    fill = torch.randn(2, 10, 10, 10)
    win = torch.rand(4, 4, 4) + 0.1
    p = torch.randn(2, 2, 4, 4, 4)
    out = PatchBlender(fill, win).add(p, [[0, 0, 0], [2, 0, 0]]).result()
    v = (p[0, :, 3, 1, 1] * win[3, 1, 1] + p[1, :, 1, 1, 1] * win[1, 1, 1]) / (win[3, 1, 1] + win[1, 1, 1])
    assert torch.allclose(out[:, 3, 1, 1], v, atol=1e-6)
    assert torch.equal(out[:, 9, 9, 9], fill[:, 9, 9, 9])


# ---------------------------------------------------------------- strategies
def test_zoom_covers_every_structure():
    lab = torch.zeros(40, 40, 40, dtype=torch.long)
    lab[3:8, 30:37, 5:9] = 1; lab[20:34, 2:5, 20:22] = 2
    idx = zoom_indices(lab, (40, 40, 40), (16, 16, 16), 0.5)
    starts = patch_grid((40, 40, 40), 16, 0.5)
    cover = torch.zeros_like(lab, dtype=torch.bool)
    for a, b, c in starts[idx].tolist(): cover[a:a + 16, b:b + 16, c:c + 16] = True
    assert cover[lab > 0].all() and len(idx) < len(starts)
    assert len(zoom_indices(torch.zeros(40, 40, 40, dtype=torch.long), (40,) * 3, (16,) * 3, 0.5)) == 0


def test_strategies_share_networks_and_count_patches():
    m = tiny_model().eval()
    x = torch.randn(1, 32, 48, 32)
    N = len(patch_grid((32, 48, 32), 16, 0.5))
    counts = {s: predict_topk(m, x, 3, s, seed=0)[1] for s in STRATEGIES}
    assert counts['topk'] == counts['random'] == 3 and counts['sliding'] == N and 0 <= counts['zoom'] <= N


def test_random_prefers_foreground_cells():
    m = tiny_model()
    fg = torch.zeros(1, 30, dtype=torch.bool); fg[0, [4, 9, 17]] = True
    idx = m._random_fg(fg, 3)
    assert sorted(idx[0].tolist()) == [4, 9, 17]


def test_topk_strategy_spreads_its_patches():
    "Evaluation top-k discounts candidates covered by earlier picks (soft suppression); spread=False is plain top-k"
    m = tiny_model().eval()
    starts = patch_grid((48, 48, 48), 16, 0.5)
    scores = (-starts.float().norm(dim=1) / 16)[None]  # one peak at the corner: plain top-k picks its neighbours
    fg = torch.ones_like(scores, dtype=torch.bool)
    plain = scores[0].topk(4).indices
    spread = m.select(scores, fg, None, (48, 48, 48), k=4)[0]
    assert len(set(spread.tolist())) == 4 and spread[0] == plain[0]
    def shared(idx):
        st = starts[idx]
        sh = (16 - (st[:, None] - st[None]).abs()).clamp_min(0).prod(-1).float() / 16 ** 3
        return sh[~torch.eye(len(idx), dtype=torch.bool)].sum()
    assert shared(spread) < shared(plain)  # the picks overlap less
    m.spread = False
    assert m.select(scores, fg, None, (48, 48, 48), k=4)[0].tolist() == plain.tolist()
    # k above the candidates: every one once, best first
    allp = suppressed_topk(scores[0], starts, (16, 16, 16), 1000)
    assert sorted(allp.tolist()) == list(range(len(starts))) and allp[0] == scores[0].argmax()


def test_objectness_loss_targets_global_errors():
    y = torch.zeros(2, 1, 32, 32, 32, dtype=torch.long); y[0, 0, 20:28, 20:28, 20:28] = 1
    glog = torch.zeros(2, 2, 16, 16, 16); glog[:, 0] = 1.  # background everywhere: wrong only on volume 0's cube
    starts = patch_grid((32, 32, 32), 16, 0.5)
    err = global_errors(glog, y, starts, (16, 16, 16))
    assert err.shape == (2, len(starts)) and err[1].sum() == 0
    assert err[0].max() == 512 and int((err[0] > 0).sum()) == sum(1 for s in starts.tolist() if all(a + 16 > 20 and a < 28 for a in s))
    # volume 1 has no error: its target is uniform over the selectable cells (zero loss for flat scores)
    assert objectness_loss(torch.zeros(1, len(starts)), err[1:]) < 1e-6
    # TopKLoss adds exactly this term to the original loss
    m = tiny_model(n_classes=2, down=2).train()
    torch.manual_seed(3); o = m(torch.randn(2, 1, 32, 32, 32))
    tp = y
    extra = TopKLoss()(o, y) - TopKLoss(objectness_weight=0.)(o, y)
    expect = objectness_loss(o['scores'], global_errors(o['global_logits'], tp, o['candidate_starts'], o['patch_size']))
    assert torch.allclose(extra, expect, atol=1e-5) and expect > 0


# ---------------------------------------------------------------- training
def test_training_step_reaches_scorer_and_both_nets():
    m = tiny_model(n_classes=3, refine=True, k_train=2, k_random=1).train()
    x, y = torch.randn(2, 1, 32, 28, 36), torch.randint(0, 3, (2, 1, 32, 28, 36))
    o = m(x)
    assert o['logits'].shape == (2, 3, 32, 28, 36) and o['n_patches'] == [3, 3]
    assert all(len(set(map(tuple, s.tolist()))) == 3 for s in o['patch_starts'])
    loss = TopKLoss()(o, y)
    assert torch.isfinite(loss)
    loss.backward()
    for name, mod in (('scorer', m.scorer), ('global', m.global_net), ('local', m.local_net), ('refiner', m.refiner)):
        g = [p.grad for p in mod.parameters() if p.grad is not None]
        assert g and any(t.abs().sum() > 0 for t in g), name


def test_bad_global_net_channels_and_args():
    m = TopKSegmenter(default_global_net(1, 2, score_channels=0, channels=(8, 16)), default_local_net(1, 2, channels=(8, 16)),
                      2, 16, down_size_rate=2, score_channels=32)
    with pytest.raises(ValueError, match='n_classes \\+ score_channels'): m(torch.randn(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match='strategy'): tiny_model(strategy='nope')
    with pytest.raises(ValueError, match='k_train'): tiny_model(k_train=0)
    for bad in (1, 'yes', None):
        with pytest.raises(ValueError, match='spread'): tiny_model(spread=bad)
    with pytest.raises(TypeError, match='TopKSegmenter'): predict_topk(torch.nn.Conv3d(1, 1, 1), torch.zeros(1, 8, 8, 8))


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    from patchfm.demo import make_demo_dataset
    return make_demo_dataset(tmp_path_factory.mktemp('demo'), n_cases=3, seed=4, lesion_radius=(6.0, 9.0))


def test_learner_fits_and_files_keep_geometry(demo, tmp_path):
    from torchio.transforms import ZNormalization
    cfg = PatchConfig(patch_size=(8, 8, 8), target_spacing=(3., 3., 3.), patch_overlap=0.5)
    dls = volume_dataloaders(demo.image, demo.label, cfg, [ZNormalization()], valid_idx=[2])
    assert dls.n_classes == 3 and dls.n_channels == 1
    learn = topk_learner(dls, down_size_rate=2, k_train=2, k_random=1, k=3,
                         global_net=default_global_net(1, 3, channels=(8, 16)),
                         local_net=default_local_net(1, 3, channels=(8, 16)))
    from patchfm.learner import PatchLearner
    assert isinstance(learn, PatchLearner)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 3e-3)
    assert all(np.isfinite(v) for v in learn.recorder.values[-1][:2]) and learn.fit_count == 1
    for strategy in ('topk', 'zoom'):
        res = topk_inference(learn, cfg, list(demo.image), k=3, strategy=strategy, save_dir=tmp_path / strategy)
        assert not res.failed and len(res.paths) == 3 and len(res.timings) == 3
        for src, out in zip(demo.image, res.paths):
            a, b = read_header(src), read_header(out)
            assert tuple(a.shape) == tuple(b.shape) and np.allclose(a.affine, b.affine, atol=1e-4), (src, out)
    assert res[0].shape[0] == 1 and int(res[0].max()) <= 2
    # existing outputs are kept unless overwrite
    again = topk_inference(learn, cfg, list(demo.image), save_dir=tmp_path / 'topk')
    assert again.n_patches == [0, 0, 0] and len(again.paths) == 3
    with pytest.raises(TypeError, match='PatchConfig'): topk_inference(learn, {}, list(demo.image))


def test_topk_dice_metric_counts_per_class():
    from types import SimpleNamespace
    from patchfm.topk import TopKDice
    met = TopKDice(3)
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 1, 1, 2]]), 3).permute(0, 2, 1)[..., None, None].float()
    met.accumulate(SimpleNamespace(pred={'logits': logits}, yb=(torch.tensor([[[0, 1, 2, 2]]])[..., None, None],)))
    assert met.value == pytest.approx(2 / 3)
    met.reset()
    assert math.isnan(met.value)
