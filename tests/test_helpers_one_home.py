"Issue 15: one home each for samplers, per-axis values, plain tensors and atomic text writes"
import numpy as np, pytest, torch
from fastai.torch_core import TensorBase
from patchfm.config import SAMPLER_TYPES
from patchfm.core import atomic_write_text, is_temp_file, plain_tensor, triple
from patchfm.sampling import (SAMPLERS, LabelSampler, UniformSampler, WeightedSampler, draw_centres, make_sampler)


def test_make_sampler_is_the_one_place_a_sampler_name_is_resolved():
    assert set(SAMPLERS) == set(SAMPLER_TYPES)  # every name PatchConfig accepts has its sampler
    assert type(make_sampler('uniform')) is UniformSampler and type(make_sampler('weighted')) is WeightedSampler
    s = make_sampler('label', {0: 0.5, 1: 0.5})
    assert isinstance(s, LabelSampler) and s.label_probabilities == {0: 0.5, 1: 0.5}
    with pytest.raises(ValueError, match='unknown sampler'): make_sampler('grid')
    m = torch.zeros(1, 12, 12, 12, dtype=torch.uint8); m[0, 2:5, 2:5, 2:5] = 1
    for name, kw in (('uniform', {}), ('label', dict(mask=m)), ('weighted', dict(weight=m.float()))):
        a = make_sampler(name, {0: 0.5, 1: 0.5} if name == 'label' else None)(20, np.random.default_rng(1), (12, 12, 12), (6, 6, 6), **kw)
        b = draw_centres(20, np.random.default_rng(1), (12, 12, 12), (6, 6, 6), name, kw.get('mask'),
                         {0: 0.5, 1: 0.5} if name == 'label' else None, kw.get('weight'))
        assert np.array_equal(a, b), name
    with pytest.raises(ValueError, match='smaller than the patch'): UniformSampler()(1, np.random.default_rng(0), (4, 4, 4), (6, 6, 6))


def test_triple():
    assert triple(3, 'p') == (3, 3, 3) and triple(np.array([1, 2, 3]), 'p', int, 1) == (1, 2, 3)
    assert triple((1.5, 2, 3), 's', float, 0, strict=True) == (1.5, 2.0, 3.0)
    for bad, kw, match in [((1, 2), {}, 'p must be one or 3'), ('abc', {}, 'p must be'), (4, dict(broadcast=False), 'sequence'),
                           ((1, 2.5, 3), dict(kind=int), '3 integers'), ((1, True, 3), dict(kind=int), '3 integers'),
                           ((1, 0, 3), dict(kind=int, minimum=1), '>= 1'), ((1, 0, 3), dict(kind=float, minimum=0, strict=True), '> 0')]:
        with pytest.raises(ValueError, match=match): triple(bad, 'p', **kw)


def test_plain_tensor():
    t = torch.ones(3, requires_grad=True).as_subclass(TensorBase)
    p = plain_tensor(t)
    assert type(p) is torch.Tensor and not p.requires_grad
    q = plain_tensor(t, detach=False)
    assert type(q) is torch.Tensor and q.requires_grad
    assert type(plain_tensor(np.zeros(2))) is torch.Tensor
    with pytest.raises(TypeError, match='torch.Tensor or numpy'): plain_tensor([1, 2])


def test_atomic_write_text(tmp_path):
    f = atomic_write_text(tmp_path / 'a' / 'b.txt', 'héllo')
    assert f.read_text(encoding='utf-8') == 'héllo' and not any(is_temp_file(p) for p in f.parent.iterdir())
