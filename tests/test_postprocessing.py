"Largest-component post-processing chosen on validation (`keep_largest_component='auto'`): the rule, the cache, the saved choice."
import json
from types import SimpleNamespace

import numpy as np, pytest, torch
from scipy import ndimage

from patchfm.config import PatchConfig
from patchfm.core import write_nifti, MedMask
from patchfm.inference import (PostprocessChoice, choose_keep_largest, choose_postprocessing, keep_largest_classes,
                               keep_largest_component, patch_inference, validation_cases)
from patchfm.models import weights_digest
from patchfm.serialisation import save_model, load_model


def _components(a, c): return ndimage.label(np.asarray(a) == c, structure=np.ones((3, 3, 3)))[1]


# ---------------------------------------------------------------- the rule
def test_keep_largest_component_per_class():
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[1:4, 1:4, 1:4] = 1; lab[8, 8, 8] = 1; lab[5:7, 1:3, 1:3] = 2; lab[1:3, 7:9, 7:9] = 2
    out = keep_largest_component(torch.as_tensor(lab), [1]).numpy()
    assert _components(out, 1) == 1 and out[8, 8, 8] == 0 and (out == 2).sum() == (lab == 2).sum()  # class 2 untouched
    both = keep_largest_component(torch.as_tensor(lab)).numpy()  # default: every label
    assert _components(both, 1) == 1 and _components(both, 2) == 1 and (both == 1).sum() == 27


def test_choose_keep_largest_rule():
    t = np.zeros((12, 12, 12), np.uint8); t[2:6, 2:6, 2:6] = 1; t[7:11, 7:11, 7:11] = 2; t[7:11, 1:3, 1:3] = 2
    p = t.copy(); p[0, 11, 11] = 1  # a stray class-1 voxel; class 2 is truly two pieces
    ch = choose_keep_largest([(p, t), (torch.as_tensor(p)[None], torch.as_tensor(t))])  # (1,X,Y,Z) tensors too
    assert ch.keep_largest == (1,) and ch.n_cases == 2
    assert ch.dice_after[1] == 1.0 and ch.dice_before[1] < 1.0 and ch.dice_after[2] < ch.dice_before[2]
    # no change on validation: only a class that is one piece in every label is cleaned
    assert choose_keep_largest([(t, t)]).keep_largest == (1,)
    half = t.copy(); half[7:11, 1:3, 1:3] = 0  # the model found one of class 2's pieces: cleaning changes nothing
    assert choose_keep_largest([(half, t)]).keep_largest == (1,)
    assert 3 not in choose_keep_largest([(t, t)], classes=[1, 2, 3]).dice_before  # a class nowhere is not decided
    with pytest.raises(ValueError, match='shape'): choose_keep_largest([(t, t[:-1])])


def test_keep_largest_classes_arguments():
    cfg = PatchConfig(patch_size=(8, 8, 8))
    assert cfg.keep_largest_component == 'auto'
    assert keep_largest_classes(None, cfg, True) is True and keep_largest_classes(None, cfg, False) is False
    assert keep_largest_classes(None, cfg, [2, 1]) == (2, 1)
    assert keep_largest_classes(torch.nn.Conv3d(1, 2, 1), cfg) == ()  # 'auto' with no validation data: nothing
    with pytest.raises(ValueError, match='keep_largest'): keep_largest_classes(None, cfg, 'sometimes')
    with pytest.raises(ValueError, match='keep_largest_component'): PatchConfig(keep_largest_component='yes')


# ---------------------------------------------------------------- on a learner's validation volumes
class Oracle(torch.nn.Module):
    "Class 1 where the intensity is about 100, class 2 about 200: it predicts the image, stray blobs included"
    def __init__(self): super().__init__(); self.w = torch.nn.Parameter(torch.zeros(1))
    def forward(self, x):
        v = x[:, :1]
        one, two = ((v - 100).abs() < 20).float(), ((v - 200).abs() < 20).float()
        return torch.cat([1 - one - two, one, two], 1) * 20 - 10 + 0 * self.w


def _case(d, name, stray=True):
    "Image: a class-1 ball (plus, with `stray`, a blob of the same intensity the label calls background) and two class-2 cubes"
    img = np.zeros((24, 24, 24), np.float32); lab = np.zeros((24, 24, 24), np.uint8)
    g = np.indices(img.shape)
    ball = ((g - 8) ** 2).sum(0) < 25
    img[ball], lab[ball] = 100, 1
    img[16:20, 2:6, 2:6] = lab[16:20, 2:6, 2:6] = 200; img[2:6, 16:20, 16:20] = 200; lab[2:6, 16:20, 16:20] = 2
    lab[16:20, 2:6, 2:6] = 2
    if stray: img[20:23, 20:23, 20:23] = 100  # a false positive far from the ball
    write_nifti(img, np.eye(4), d / f'{name}.nii.gz'); write_nifti(lab, np.eye(4), d / f'{name}_gt.nii.gz')
    return d / f'{name}.nii.gz', d / f'{name}_gt.nii.gz'


def _learner(cfg, cases):
    sd = SimpleNamespace(images=[(str(i),) for i, _ in cases], masks=[str(m) for _, m in cases])
    return SimpleNamespace(model=Oracle(), dls=SimpleNamespace(valid=SimpleNamespace(subjects_dataset=sd), patch_config=cfg,
                                                                pre_patch_tfms=[], patch_tfms=[]))


def test_auto_cleans_only_where_validation_says(tmp_path):
    cfg = PatchConfig(patch_size=(16, 16, 16), sampler_type='label', label_probabilities={0: .4, 1: .3, 2: .3})
    learn = _learner(cfg, [_case(tmp_path, 'valid')])
    assert validation_cases(learn) == [(str(tmp_path / 'valid.nii.gz'), str(tmp_path / 'valid_gt.nii.gz'))]
    test_img, test_gt = _case(tmp_path, 'test')
    res = patch_inference(learn, cfg, [test_img], save_dir=tmp_path / 'out', progress=False)
    assert res.keep_largest == (1,)  # the stray blob goes, class 2's second cube stays
    out = MedMask.create(res.paths[0], apply_reorder=False)[0].numpy()
    assert _components(out, 1) == 1 and _components(out, 2) == 2 and out[21, 21, 21] == 0
    assert np.array_equal(out, MedMask.create(test_gt, apply_reorder=False)[0].numpy())
    ch = learn.postprocessing
    assert isinstance(ch, PostprocessChoice) and ch.n_cases == 1 and ch.dice_after[1] == 1.0 > ch.dice_before[1]
    # cached until the weights change
    assert choose_postprocessing(learn) is ch
    with torch.no_grad(): learn.model.w += 1
    assert choose_postprocessing(learn) is not ch and learn.postprocessing.keep_largest == (1,)
    # explicit settings win; without the option nothing is removed
    plain = patch_inference(learn, cfg, [test_img], keep_largest=False, progress=False)
    assert plain.keep_largest is False and _components(plain[0].data[0].numpy(), 1) == 2


def test_auto_without_a_stray_blob_keeps_one_piece_classes_only(tmp_path):
    cfg = PatchConfig(patch_size=(16, 16, 16), sampler_type='label', label_probabilities={0: .4, 1: .3, 2: .3})
    learn = _learner(cfg, [_case(tmp_path, 'valid', stray=False)])
    ch = choose_postprocessing(learn)
    assert ch.keep_largest == (1,) and ch.dice_before[1] == ch.dice_after[1] == 1.0  # no change for class 1: one piece in the label
    assert ch.dice_after[2] < ch.dice_before[2] == 1.0  # class 2 would lose a cube


def test_failed_validation_warns_and_predicts(tmp_path):
    cfg = PatchConfig(patch_size=(16, 16, 16))
    learn = _learner(cfg, [(tmp_path / 'gone.nii.gz', tmp_path / 'gone_gt.nii.gz')])
    img, _ = _case(tmp_path, 'test')
    with pytest.warns(RuntimeWarning, match='post-processing'):
        res = patch_inference(learn, cfg, [img], save_dir=tmp_path / 'out', progress=False)
    assert res.keep_largest == () and not res.failed and len(res.paths) == 1


def test_saved_model_keeps_the_choice(tmp_path):
    cfg = PatchConfig(patch_size=(16, 16, 16), sampler_type='label', label_probabilities={0: .4, 1: .3, 2: .3})
    learn = _learner(cfg, [_case(tmp_path, 'valid')])
    learn.model = torch.nn.Conv3d(1, 3, 1)  # a real (savable) network standing in: its choice is whatever validation says
    learn.dls.patch_tfms = [__import__('torchio').RandomFlip(axes=(0,))]
    choice = choose_postprocessing(learn)
    save_model(learn, tmp_path / 'm')
    desc = json.loads((tmp_path / 'm' / 'model.json').read_text())
    assert desc['inference'] == {'tta': [[], [2]], 'keep_largest': list(choice.keep_largest)}
    s = load_model(tmp_path / 'm', device='cpu')
    assert s.inference_choices == desc['inference']
    assert keep_largest_classes(s, cfg) == choice.keep_largest  # no validation data needed any more
    desc['inference'] = {'keep_largest': ['one']}
    (tmp_path / 'm' / 'model.json').write_text(json.dumps(desc))
    with pytest.raises(ValueError, match=r'model\.json.*keep_largest'): load_model(tmp_path / 'm', device='cpu')
    desc['inference'] = {'tta': [[7]]}
    (tmp_path / 'm' / 'model.json').write_text(json.dumps(desc))
    with pytest.raises(ValueError, match=r'model\.json.*tta'): load_model(tmp_path / 'm', device='cpu')


def test_saved_model_cleans_at_prediction(tmp_path):
    "A SavedModel passed to patch_inference brings its transforms, flips and classes; the oracle's stray blob is removed"
    cfg = PatchConfig(patch_size=(16, 16, 16), sampler_type='label', label_probabilities={0: .4, 1: .3, 2: .3})
    s = SimpleNamespace(model=Oracle(), pre_patch_tfms=[], inference_choices={'tta': [[]], 'keep_largest': [1]})
    img, gt = _case(tmp_path, 'test')
    res = patch_inference(s, cfg, [img], save_dir=tmp_path / 'o', progress=False)
    assert res.keep_largest == (1,)
    assert np.array_equal(MedMask.create(res.paths[0], apply_reorder=False)[0].numpy(), MedMask.create(gt, apply_reorder=False)[0].numpy())


def test_weights_digest_changes_with_any_weight():
    m = torch.nn.Conv3d(1, 2, 3)
    a = weights_digest(m)
    assert a == weights_digest(m)
    with torch.no_grad(): m.bias[1] += 1e-6
    assert weights_digest(m) != a


def test_cli_predict_applies_the_saved_choice(tmp_path):
    "`patchfm predict` cleans the classes stored in model.json (and `--keep-largest false` does not); bare `--tta` = each axis"
    from patchfm.cli import build_parser, main
    cfg = PatchConfig(patch_size=(16, 16, 16), sampler_type='label', label_probabilities={0: .4, 1: .3, 2: .3})
    net = torch.nn.Conv3d(1, 3, 1)
    with torch.no_grad():  # logits ~ intensity bands: 100 -> class 1, 200 -> class 2 (a stray blob of 100 included)
        net.weight.zero_(); net.bias.zero_()
    save_model(net, tmp_path / 'm', config=cfg)
    desc = json.loads((tmp_path / 'm' / 'model.json').read_text())
    assert 'keep_largest' not in desc['inference']  # a bare module: no validation data, no choice stored
    desc['inference'] = {'tta': [[]], 'keep_largest': [1]}
    (tmp_path / 'm' / 'model.json').write_text(json.dumps(desc))
    calls = []
    import patchfm.inference as inf
    orig = inf.keep_largest_component
    inf.keep_largest_component = lambda lab, classes=None: calls.append(classes) or orig(lab, classes)
    try:
        img, _ = _case(tmp_path, 'test')
        assert main(['predict', '--model', str(tmp_path / 'm'), '--input', str(img), '--output', str(tmp_path / 'p'), '--quiet']) == 0
        assert calls == [(1,)] and (tmp_path / 'p' / 'test_pred.nii.gz').exists()
        assert main(['predict', '--model', str(tmp_path / 'm'), '--input', str(img), '--output', str(tmp_path / 'q'), '--quiet',
                     '--keep-largest', 'false']) == 0
        assert calls == [(1,)]  # not called again
    finally: inf.keep_largest_component = orig
    p = build_parser()
    base = ['predict', '--model', 'm', '--input', 'x', '--output', 'o']
    assert p.parse_args(base).tta == 'auto' and p.parse_args(base + ['--tta']).tta == 'each'
    assert p.parse_args(base + ['--tta', 'all']).tta == 'all'
