"Tests for patchfm.grid: patch grid, windows, padding, fast labels and the patch aggregator."
import itertools, math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, HealthCheck, strategies as st

from patchfm.grid import (WINDOW_MODES, PatchAggregator, channel_argmax, crop_padding, extract_patches,
                          overlap_voxels, pad_to_patch, patch_grid, patch_starts, patch_window, probs_to_labels)

MODES = ('hann', 'gaussian', 'average', 'crop')
OVERLAPS = (0, 0.25, 0.5, 3, (2, 0.5, 0))  # fraction, voxels, and mixed per axis
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def quantised(*shape, seed=0):
    "Random values k/256: sums and divisions by small counts are exact in float32."
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float() / 256


def aggregate(vol, patch_size, overlap, mode, batch_size=5, order=None, **kw):
    "Run an identity 'model' (patch = crop of `vol`) through a PatchAggregator."
    agg = PatchAggregator(vol.shape[1:], vol.shape[0], patch_size, overlap, mode=mode, **kw)
    starts = agg.starts if order is None else agg.starts[order]
    for i in range(0, len(starts), batch_size):
        s = starts[i:i + batch_size]
        agg.add(extract_patches(vol, s, patch_size), s)
    return agg


def assert_identity(out, vol, mode):
    if mode == 'crop': assert torch.equal(out, vol)
    else: torch.testing.assert_close(out, vol, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- overlap_voxels
@pytest.mark.parametrize('patch,overlap,expected', [
    ((96, 96, 64), 0.5, (48, 48, 32)),
    ((16, 24, 8), 0.25, (4, 6, 2)),
    ((37, 37, 37), 0.5, (19, 19, 19)),      # fractions round up: at least the requested overlap
    ((10, 10, 10), 0.1, (1, 1, 1)),         # 0.1 * 10 is 1.0000000000000002 in floating point: still 1
    ((16, 24, 8), 0, (0, 0, 0)),
    ((16, 24, 8), 0.0, (0, 0, 0)),
    ((16, 24, 8), 7, (7, 7, 7)),
    ((16, 24, 8), (4, 0.5, 0), (4, 12, 0)),
    ((64, 64, 1), 0.5, (32, 32, 0)),        # a size-1 axis never overlaps
    ((10, 10, 10), 0.99, (9, 9, 9)),        # capped at patch - 1
    (32, 0.25, (8, 8, 8)),                  # an int patch size is cubic
    ((16, 16, 16), np.float32(0.5), (8, 8, 8)),
    ((16, 16, 16), np.int64(3), (3, 3, 3)),
])
def test_overlap_voxels(patch, overlap, expected):
    assert overlap_voxels(patch, overlap) == expected


def test_overlap_matches_monai_step():
    # step = patch - overlap = floor(patch * (1 - fraction)), MONAI's sliding-window interval
    for p in range(1, 70):
        for f in (0.1, 0.25, 1 / 3, 0.5, 0.6, 0.75):
            o = overlap_voxels((p, p, p), f)[0]
            assert o >= min(f * p - 1e-9, p - 1) and p - o == max(1, int(p * (1 - f) + 1e-9))


@pytest.mark.parametrize('overlap,match', [
    (16, r'patch_overlap on axis 0.*\[0, 15\]'), (-1, 'patch_overlap'), ((0, 0, 8), 'axis 2.*\\[0, 7\\]'),
    (1.0, r'\[0, 1\)'), (-0.1, r'\[0, 1\)'), (2.0, 'patch_overlap'), (float('nan'), 'patch_overlap'),
    (True, 'patch_overlap'), ('0.5', 'patch_overlap'), (None, 'patch_overlap'), ((0.5, 0.5), 'patch_overlap'),
    ((1, 2, 3, 4), 'patch_overlap'),
])
def test_overlap_voxels_errors(overlap, match):
    with pytest.raises(ValueError, match=match): overlap_voxels((16, 24, 8), overlap)


@pytest.mark.parametrize('patch', [(16, 0, 8), (16, -2, 8), (16.0, 8, 8), (16, 8), (True, 8, 8), 'abc', None])
def test_patch_size_errors(patch):
    with pytest.raises(ValueError, match='patch_size'): overlap_voxels(patch, 0.5)
    with pytest.raises(ValueError, match='patch_size'): patch_grid((32, 32, 32), patch, 0.5)


# ------------------------------------------------------------------------------------------------------- grid
def test_patch_starts_examples():
    assert patch_starts((37, 29, 21), (16, 24, 8), 0.25) == [[0, 12, 21], [0, 5], [0, 6, 12, 13]]
    assert patch_starts((64, 64, 64), 32, 0) == [[0, 32]] * 3            # exact tiling, nothing snapped
    assert patch_starts((70, 64, 64), 32, 0) == [[0, 32, 38], [0, 32], [0, 32]]
    assert patch_starts((96, 96, 96), 96, 0.5) == [[0]] * 3
    assert patch_starts((10, 40, 7), (16, 16, 8), 0.5) == [[0], [0, 8, 16, 24], [0]]  # smaller: start 0
    assert patch_starts((5, 5, 5), 1, 0) == [list(range(5))] * 3


def test_patch_grid_layout():
    g = patch_grid((37, 29, 21), (16, 24, 8), 0.25)
    assert g.dtype == torch.long and g.shape == (3 * 2 * 4, 3)
    axes = patch_starts((37, 29, 21), (16, 24, 8), 0.25)
    assert g.tolist() == [list(p) for p in itertools.product(*axes)]   # X slowest, Z fastest
    assert patch_grid((8, 8, 8), 8, 0.5).tolist() == [[0, 0, 0]]


@pytest.mark.parametrize('shape', [(32, 32), (0, 32, 32), (32, 32, 32, 32), 32, (32.0, 32, 32), None])
def test_image_shape_errors(shape):
    with pytest.raises(ValueError, match='image_shape'): patch_starts(shape, 16, 0.5)


def check_grid(shape, patch, overlap):
    ps = (patch,) * 3 if isinstance(patch, int) else tuple(patch)
    ov = overlap_voxels(ps, overlap)
    axes = patch_starts(shape, ps, overlap)
    for size, p, o, s in zip(shape, ps, ov, axes):
        assert s == sorted(set(s)) and s[0] == 0
        if size <= p:
            assert s == [0]; continue
        assert s[-1] == size - p                               # last window snapped to the border
        assert all(0 <= v <= size - p for v in s)              # no window leaves the volume
        gaps = np.diff(s)
        assert (gaps >= 1).all() and (gaps <= p - o).all()     # neighbours overlap at least as requested
        assert (p - gaps >= o).all()
        cover = np.zeros(size, int)
        for v in s: cover[v:v + p] += 1
        assert (cover >= 1).all()                              # every voxel covered
        if o == 0 and size % p == 0: assert (cover == 1).all()  # overlap 0: a tiling
    g = patch_grid(shape, ps, overlap)
    assert len(g) == math.prod(len(s) for s in axes) == len({tuple(r) for r in g.tolist()})


@pytest.mark.parametrize('shape', [(37, 29, 21), (64, 64, 64), (16, 24, 8), (17, 25, 9), (100, 7, 33)])
@pytest.mark.parametrize('overlap', OVERLAPS)
def test_grid_properties(shape, overlap):
    check_grid(shape, (16, 24, 8), overlap)


@FAST
@given(shape=st.tuples(*[st.integers(1, 40)] * 3), patch=st.tuples(*[st.integers(1, 12)] * 3),
       overlap=st.one_of(st.floats(0, 0.95), st.integers(0, 11)))
def test_grid_properties_hypothesis(shape, patch, overlap):
    if isinstance(overlap, int) and overlap >= min(patch): overlap = min(patch) - 1
    check_grid(shape, patch, overlap)


# -------------------------------------------------------------------------------------------------- padding
def test_pad_to_patch_end_and_crop_back():
    x = torch.rand(2, 10, 30, 5)
    y, pad = pad_to_patch(x, (16, 24, 8), value=-1.)
    assert y.shape == (2, 16, 30, 8) and pad == ((0, 6), (0, 0), (0, 3))
    assert torch.equal(y[:, :10, :, :5], x)                    # indices unchanged
    assert (y[:, 10:] == -1).all() and (y[..., 5:] == -1).all()
    assert torch.equal(crop_padding(y, pad), x)
    assert torch.equal(crop_padding(y[0] > 0.5, pad), x[0] > 0.5)  # also (X, Y, Z) label maps


@pytest.mark.parametrize('mode', ['constant', 'reflect', 'replicate', 'circular'])
def test_pad_to_patch_both(mode):
    x = torch.rand(3, 9, 30, 6)
    y, pad = pad_to_patch(x, (16, 24, 9), mode=mode, side='both')
    assert pad == ((3, 4), (0, 0), (1, 2)) and y.shape == (3, 16, 30, 9)
    assert torch.equal(crop_padding(y, pad), x)
    if mode == 'replicate': assert torch.equal(y[:, 0, :, 1:7], x[:, 0])
    if mode == 'reflect': assert torch.equal(y[:, 2, :, 1:7], x[:, 1])
    if mode == 'constant': assert (y[:, :3] == 0).all()


def test_pad_to_patch_noop_and_3d():
    x = torch.rand(1, 16, 24, 8)
    y, pad = pad_to_patch(x, (16, 24, 8))
    assert y is x and pad == ((0, 0),) * 3
    lab = torch.randint(0, 3, (4, 30, 8))
    y, pad = pad_to_patch(lab, (16, 24, 8), mode='replicate')
    assert y.shape == (16, 30, 8) and y.dtype == lab.dtype and torch.equal(crop_padding(y, pad), lab)


def test_pad_errors():
    x = torch.rand(1, 4, 4, 4)
    with pytest.raises(ValueError, match='mode'): pad_to_patch(x, 8, mode='wrap')
    with pytest.raises(ValueError, match='side'): pad_to_patch(x, 8, side='start')
    with pytest.raises(ValueError, match="reflect"): pad_to_patch(x, 16, mode='reflect')
    with pytest.raises(ValueError, match="circular"): pad_to_patch(x, 9, mode='circular')
    assert pad_to_patch(x, 8, mode='circular')[0].shape == (1, 8, 8, 8)
    with pytest.raises(ValueError, match='x must'): pad_to_patch(torch.rand(4, 4), 8)
    with pytest.raises(ValueError, match='patch_size'): pad_to_patch(x, (8, 8))
    with pytest.raises(ValueError, match='pad'): crop_padding(x, ((0, 1), (0, 1)))
    with pytest.raises(ValueError, match='pad'): crop_padding(x, ((0, -1), (0, 0), (0, 0)))
    with pytest.raises(ValueError, match='does not fit'): crop_padding(x, ((0, 5), (0, 0), (0, 0)))


@FAST
@given(shape=st.tuples(*[st.integers(1, 12)] * 3), patch=st.tuples(*[st.integers(1, 12)] * 3),
       side=st.sampled_from(['end', 'both']), mode=st.sampled_from(['constant', 'replicate']))
def test_pad_roundtrip_hypothesis(shape, patch, side, mode):
    x = torch.rand(2, *shape)
    y, pad = pad_to_patch(x, patch, mode=mode, side=side)
    assert tuple(y.shape[1:]) == tuple(max(s, p) for s, p in zip(shape, patch))
    assert torch.equal(crop_padding(y, pad), x)


# --------------------------------------------------------------------------------------------------- windows
@pytest.mark.parametrize('mode', ['hann', 'gaussian'])
@pytest.mark.parametrize('patch', [(16, 24, 8), (17, 9, 5), (1, 2, 3), (96, 96, 64)])
def test_smooth_windows(mode, patch):
    w = patch_window(patch, mode)
    assert w.shape == patch and w.dtype == torch.float32
    assert (w > 0).all() and w.max() == 1 and w.min() < 1
    for d in range(3): assert torch.equal(w, w.flip(d))       # symmetric on every axis
    assert w[tuple(p // 2 for p in patch)] == 1               # peak in the centre
    assert w[0, 0, 0] == w.min()                               # lowest in the corners


def test_hann_values():
    # Hann window of length n + 2 without its zero endpoints, scaled to max 1, separable
    hann = lambda n: torch.tensor([math.sin(math.pi * k / (n + 1)) ** 2 for k in range(1, n + 1)],
                                  dtype=torch.float64)
    h5, h4 = hann(5), hann(4) / hann(4).max()
    assert h5.max() == 1
    w = patch_window((5, 1, 4), 'hann', dtype=torch.float64)
    torch.testing.assert_close(w, h5[:, None, None] * h4[None, None, :], rtol=1e-12, atol=0)
    assert torch.equal(patch_window((1, 1, 1), 'hann'), torch.ones(1, 1, 1))


def test_gaussian_matches_nnunet_sigma():
    n = 17
    w = patch_window((n, 1, 1), 'gaussian', dtype=torch.float64)[:, 0, 0]
    sigma = n / 8
    for k in range(9): assert w[8 + k].item() == pytest.approx(math.exp(-k ** 2 / (2 * sigma ** 2)), rel=1e-12)
    wide = patch_window((n, 1, 1), 'gaussian', sigma_scale=0.5)[:, 0, 0]
    assert wide[0] > w[0]                                     # larger sigma: flatter window
    narrow = patch_window((64, 64, 64), 'gaussian', sigma_scale=0.01)
    assert (narrow > 0).all() and narrow.max() == 1          # the floor keeps it strictly positive


def test_average_and_crop_windows():
    assert torch.equal(patch_window((4, 5, 6), 'average'), torch.ones(4, 5, 6))
    assert torch.equal(patch_window((4, 5, 6), 'constant'), torch.ones(4, 5, 6))
    w = patch_window((8, 9, 6), 'crop', overlap=(4, 3, 0))
    assert w[:, 4, 3].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    assert w[4, :, 3].tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 0]   # odd overlap: o // 2 before, the rest after
    assert w[4, 4, :].tolist() == [1] * 6
    assert torch.equal(patch_window((8, 8, 8), 'crop', overlap=0), torch.ones(8, 8, 8))


def test_window_device_dtype_and_errors():
    w = patch_window((4, 4, 4), 'hann', device='cpu', dtype=torch.float64)
    assert w.dtype == torch.float64 and w.device.type == 'cpu'
    with pytest.raises(ValueError, match='aggregation_mode'): patch_window((4, 4, 4), 'cosine')
    with pytest.raises(ValueError, match='overlap'): patch_window((4, 4, 4), 'crop')
    with pytest.raises(ValueError, match='dtype'): patch_window((4, 4, 4), 'hann', dtype=torch.int32)
    with pytest.raises(ValueError, match='sigma_scale'): patch_window((4, 4, 4), 'gaussian', sigma_scale=0)
    with pytest.raises(ValueError, match='patch_overlap'): patch_window((4, 4, 4), 'crop', overlap=4)
    assert WINDOW_MODES == MODES


# ----------------------------------------------------------------------------------------- identity property
@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('overlap', OVERLAPS)
@pytest.mark.parametrize('shape', [(37, 29, 21), (16, 24, 8), (48, 48, 16)])
def test_identity(mode, overlap, shape):
    vol = torch.rand(2, *shape, generator=torch.Generator().manual_seed(1))
    agg = aggregate(vol, (16, 24, 8), overlap, mode)
    assert agg.complete and agg.n_added == agg.n_patches
    out = agg.result()
    assert out.shape == vol.shape and out.dtype == torch.float32
    assert_identity(out, vol, mode)


@pytest.mark.parametrize('overlap', OVERLAPS)
def test_identity_average_exact(overlap):
    vol = quantised(2, 37, 29, 21)
    assert torch.equal(aggregate(vol, (16, 24, 8), overlap, 'average').result(), vol)


@pytest.mark.parametrize('mode', MODES)
def test_identity_of_a_tiling_is_exact_for_average_and_crop(mode):
    vol = torch.rand(1, 32, 48, 16)                            # overlap 0 and a multiple of the patch: a tiling
    out = aggregate(vol, (16, 24, 8), 0, mode).result()
    if mode in ('average', 'crop'): assert torch.equal(out, vol)
    else: torch.testing.assert_close(out, vol, rtol=0, atol=1e-6)


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('side', ['end', 'both'])
def test_identity_image_smaller_than_patch(mode, side):
    vol = torch.rand(3, 37, 10, 5)                          # Y and Z smaller than the patch
    padded, pad = pad_to_patch(vol, (16, 24, 8), mode='replicate', side=side)
    agg = aggregate(padded, (16, 24, 8), 0.5, mode)
    assert_identity(crop_padding(agg.result(), pad), vol, mode)


@pytest.mark.parametrize('mode', MODES)
def test_patch_order_and_batch_size_do_not_matter(mode):
    vol = torch.rand(2, 37, 29, 21)
    ref = aggregate(vol, (16, 24, 8), 0.5, mode, batch_size=1).result()
    n = len(patch_grid((37, 29, 21), (16, 24, 8), 0.5))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    out = aggregate(vol, (16, 24, 8), 0.5, mode, batch_size=7, order=perm).result()
    assert_identity(out, ref, mode)


@FAST
@given(shape=st.tuples(*[st.integers(1, 14)] * 3), patch=st.tuples(*[st.integers(1, 9)] * 3),
       overlap=st.one_of(st.sampled_from([0, 0.25, 0.5, 0.75]), st.integers(0, 8)), mode=st.sampled_from(MODES),
       channels=st.integers(1, 3))
def test_identity_hypothesis(shape, patch, overlap, mode, channels):
    if isinstance(overlap, int): overlap = min(overlap, min(patch) - 1)
    vol = torch.rand(channels, *shape)
    padded, pad = pad_to_patch(vol, patch)
    out = crop_padding(aggregate(padded, patch, overlap, mode, batch_size=4).result(), pad)
    assert_identity(out, vol, mode)


# ------------------------------------------------------------------------------ weighting against a reference
def reference_blend(preds, starts, shape, patch, mode, overlap):
    "Weighted mean of the patch predictions, accumulated voxel by voxel in float64 with numpy."
    w = patch_window(patch, mode, overlap=overlap, dtype=torch.float64).numpy()
    num, den = np.zeros((preds.shape[1], *shape)), np.zeros(shape)
    for p, (x, y, z) in zip(preds.double().numpy(), starts.tolist()):
        sl = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
        num[(slice(None), *sl)] += p * w
        den[sl] += w
    return num / den


def reference_owner(size, starts, patch):
    "For each voxel of an axis, the index of the start whose patch centre is nearest (ties: the later patch)."
    owners = []
    for i in range(size):
        cands = [(abs(i + 0.5 - (s + patch / 2)), -k) for k, s in enumerate(starts) if s <= i < s + patch]
        owners.append(-min(cands)[1])
    return owners


@pytest.mark.parametrize('mode', ['hann', 'gaussian', 'average'])
@pytest.mark.parametrize('overlap', [0.25, 0.5, (5, 0, 3)])
def test_weighted_mean_matches_reference(mode, overlap):
    shape, patch = (37, 29, 21), (16, 24, 8)
    agg = PatchAggregator(shape, 2, patch, overlap, mode=mode)
    preds = torch.rand(agg.n_patches, 2, *patch, generator=torch.Generator().manual_seed(5))  # patches disagree
    agg.add(preds, agg.starts)
    np.testing.assert_allclose(agg.result().numpy(), reference_blend(preds, agg.starts, shape, patch, mode, overlap),
                               rtol=0, atol=2e-6)


@pytest.mark.parametrize('overlap', [0.25, 0.5, 0.75, 3, (7, 0, 5)])
def test_crop_takes_the_owner_patch(overlap):
    shape, patch = (37, 29, 21), (16, 24, 8)
    agg = PatchAggregator(shape, 1, patch, overlap, mode='crop')
    preds = torch.arange(agg.n_patches, dtype=torch.float32)[:, None, None, None, None].expand(-1, 1, *patch)
    agg.add(preds, agg.starts)
    owners = [reference_owner(s, st_, p) for s, st_, p in zip(shape, agg.axis_starts, patch)]
    n = [len(s) for s in agg.axis_starts]
    expected = torch.tensor([[[(ox * n[1] + oy) * n[2] + oz for oz in owners[2]] for oy in owners[1]]
                             for ox in owners[0]], dtype=torch.float32)
    assert torch.equal(agg.result()[0], expected)
    assert torch.equal(agg.weight_map(), torch.ones(shape))


def test_weight_map_matches_summed_windows():
    shape, patch = (37, 29, 21), (16, 24, 8)
    agg = PatchAggregator(shape, 3, patch, 0.5, mode='hann')
    den = np.zeros(shape)
    w = patch_window(patch, 'hann', dtype=torch.float64).numpy()
    for x, y, z in agg.starts.tolist(): den[x:x + 16, y:y + 24, z:z + 8] += w
    wm = agg.weight_map()
    assert wm.shape == shape                                   # one channel, not C
    np.testing.assert_allclose(wm.numpy(), den, rtol=1e-6)


def test_no_second_full_size_multichannel_buffer():
    agg = PatchAggregator((40, 40, 40), 8, (16, 16, 16), 0.5, mode='hann')
    big = [k for k, v in vars(agg).items() if isinstance(v, torch.Tensor) and v.numel() > 40 ** 3]
    assert big == ['_acc']                                     # weights are never stored per channel
    assert all(v.numel() <= 40 ** 2 for k, v in vars(agg).items()
               if isinstance(v, torch.Tensor) and k not in ('_acc', '_window'))


# ------------------------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize('C', [2, 3, 5, 14])
def test_channel_argmax_matches_torch_with_ties(C):
    x = torch.randint(0, 3, (C, 9, 10, 11)).float()            # many exact ties
    assert torch.equal(channel_argmax(x, dtype=torch.long), x.argmax(0))
    assert channel_argmax(x).dtype == torch.uint8
    y = torch.randn(C, 9, 10, 11)
    y[1, 0] = -math.inf
    assert torch.equal(channel_argmax(y).long(), y.argmax(0))


def test_channel_argmax_shapes_and_dtypes():
    assert torch.equal(channel_argmax(torch.rand(1, 4, 4)), torch.zeros(4, 4, dtype=torch.uint8))
    x = torch.rand(300, 5)
    out = channel_argmax(x)
    assert out.dtype == torch.int64 and torch.equal(out, x.argmax(0))
    x = torch.rand(4, 3, 5, 6).permute(0, 3, 1, 2)            # non-contiguous input
    assert torch.equal(channel_argmax(x).long(), x.argmax(0))
    with pytest.raises(ValueError, match='x must'): channel_argmax(torch.tensor(1.))
    with pytest.raises(ValueError, match='x must'): channel_argmax(np.zeros((2, 3)))


def test_probs_to_labels_threshold():
    p = torch.tensor([[0.2, 0.5, 0.50001, 0.9]])
    assert probs_to_labels(p).tolist() == [0, 0, 1, 1]         # strictly above the threshold
    assert probs_to_labels(p, threshold=0.1).tolist() == [1, 1, 1, 1]
    assert probs_to_labels(p, dtype=torch.long).dtype == torch.long
    with pytest.raises(ValueError, match='threshold'): probs_to_labels(p, threshold='high')
    x = torch.rand(3, 4, 5)
    assert torch.equal(probs_to_labels(x).long(), x.argmax(0))


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('C', [2, 4])
def test_aggregator_labels_equal_argmax_of_result(mode, C):
    vol = torch.randint(0, 3, (C, 37, 29, 21), generator=torch.Generator().manual_seed(C)).float() / 2  # ties
    agg = aggregate(vol, (16, 24, 8), 0.5, mode)
    lab = agg.labels()
    assert lab.shape == (37, 29, 21) and lab.dtype == torch.uint8
    assert torch.equal(lab.long(), agg.result().argmax(0))
    assert torch.equal(lab.long(), vol.argmax(0))


def test_aggregator_labels_single_channel():
    vol = torch.rand(1, 37, 29, 21)
    agg = aggregate(vol, (16, 24, 8), 0.25, 'hann')
    lab = agg.labels(threshold=0.3)
    assert lab.shape == (37, 29, 21)
    far = (vol[0] - 0.3).abs() > 1e-5                          # away from rounding at the threshold
    assert torch.equal(lab[far], (vol[0] > 0.3)[far].to(torch.uint8))


# ------------------------------------------------------------------------------------------ aggregator state
def test_result_inplace_false_keeps_aggregator_open():
    vol = torch.rand(2, 37, 29, 21)
    agg = PatchAggregator(vol.shape[1:], 2, (16, 24, 8), 0.5)
    half = agg.starts[:10]
    agg.add(extract_patches(vol, half, agg.patch_size), half)
    with pytest.raises(RuntimeError, match='allow_missing'): agg.result()
    partial = agg.result(inplace=False, allow_missing=True)
    covered = torch.zeros(37, 29, 21, dtype=torch.bool)
    for x, y, z in half.tolist(): covered[x:x + 16, y:y + 24, z:z + 8] = True
    torch.testing.assert_close(partial[:, covered], vol[:, covered], rtol=0, atol=1e-6)
    assert (partial[:, ~covered] == 0).all() and (~covered).any()
    rest = agg.starts[10:]
    agg.add(extract_patches(vol, rest, agg.patch_size), rest)   # still open
    out = agg.result()
    torch.testing.assert_close(out, vol, rtol=0, atol=1e-6)
    assert agg.result() is out                                  # normalised once
    with pytest.raises(RuntimeError, match='result'): agg.add(extract_patches(vol, rest[:1], agg.patch_size), rest[:1])


def test_allow_missing_crop():
    vol = torch.rand(1, 32, 24, 8)
    agg = PatchAggregator(vol.shape[1:], 1, (16, 24, 8), 0.5, mode='crop')   # x starts 0, 8, 16
    agg.add(extract_patches(vol, agg.starts[:1], agg.patch_size), agg.starts[:1])
    out = agg.result(allow_missing=True)
    assert torch.equal(out[:, :12], vol[:, :12]) and (out[:, 12:] == 0).all()


def test_add_validation_leaves_state_unchanged():
    vol = torch.rand(2, 37, 29, 21)
    agg = PatchAggregator(vol.shape[1:], 2, (16, 24, 8), 0.5)
    good = agg.starts[:3]
    batch = extract_patches(vol, good, agg.patch_size)
    bad = good.clone(); bad[2] = torch.tensor([1, 0, 0])
    with pytest.raises(ValueError, match=r'starts \(1, 0, 0\).*not a position'): agg.add(batch, bad)
    assert agg.n_added == 0 and (agg._acc == 0).all()
    with pytest.raises(ValueError, match='starts must be shaped'): agg.add(batch, good[:2])
    with pytest.raises(ValueError, match='integer'): agg.add(batch, good.float())
    with pytest.raises(ValueError, match='batch must be shaped'): agg.add(batch[:, :1], good)
    with pytest.raises(ValueError, match='batch must be shaped'): agg.add(batch[..., :4], good)
    with pytest.raises(ValueError, match='batch must be shaped'): agg.add(batch[0], good[0])
    with pytest.raises(ValueError, match='batch must be a tensor'): agg.add(batch.numpy(), good)
    dup = torch.stack([good[0], good[1], good[0]])
    with pytest.raises(ValueError, match='already added'): agg.add(batch, dup)
    assert agg.n_added == 0
    agg.add(batch, good.numpy())                                # numpy / list starts are fine
    with pytest.raises(ValueError, match=r'starts \(0, 0, 0\).*already added'): agg.add(batch[:1], good[:1].tolist())
    assert agg.n_added == 3 and not agg.complete
    assert 'added=3/' in repr(agg)


@pytest.mark.parametrize('kwargs,match', [
    (dict(image_shape=(10, 29, 21)), 'pad_to_patch'),
    (dict(image_shape=(37, 29)), 'image_shape'),
    (dict(n_channels=0), 'n_channels'),
    (dict(n_channels=2.0), 'n_channels'),
    (dict(mode='median'), 'aggregation_mode'),
    (dict(overlap=1.5), 'patch_overlap'),
    (dict(overlap=16), 'patch_overlap'),
    (dict(patch_size=(16, 24)), 'patch_size'),
    (dict(dtype=torch.int64), 'dtype'),
    (dict(mode='gaussian', sigma_scale=-1), 'sigma_scale'),
])
def test_aggregator_constructor_errors(kwargs, match):
    args = dict(image_shape=(37, 29, 21), n_channels=2, patch_size=(16, 24, 8), overlap=0.5) | kwargs
    with pytest.raises(ValueError, match=match): PatchAggregator(**args)


def test_dtypes_and_input_types():
    vol = torch.rand(2, 20, 20, 20, dtype=torch.float64)
    agg = PatchAggregator((20, 20, 20), 2, 12, 0.5, mode='gaussian', dtype=torch.float64)
    agg.add(extract_patches(vol, agg.starts, 12).half(), agg.starts)   # e.g. AMP output: converted on add
    out = agg.result()
    assert out.dtype == torch.float64 and out.device.type == 'cpu'
    torch.testing.assert_close(out, vol, rtol=0, atol=1e-3)            # half-precision inputs
    from fastai.torch_core import TensorBase
    agg = PatchAggregator((20, 20, 20), 2, 12, 0.5, mode='constant')
    vol = vol.float()
    agg.add(TensorBase(extract_patches(vol, agg.starts, 12)), agg.starts)  # tensor subclasses accepted
    out = agg.result()
    assert type(out) is torch.Tensor and agg.mode == 'average'
    torch.testing.assert_close(out, vol, rtol=0, atol=1e-6)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.int32])
def test_accumulator_dtype_must_be_float32_or_64(dtype):
    with pytest.raises(ValueError, match='dtype.*float32'): PatchAggregator((30, 30, 30), 1, 12, 0.5, dtype=dtype)


def test_half_window_stays_positive():
    w = patch_window((64, 64, 64), 'gaussian', dtype=torch.float16)   # corner products underflow in half
    assert w.dtype == torch.float16 and (w > 0).all() and w.max() == 1


def test_extract_patches():
    x = torch.arange(2 * 6 * 5 * 4).reshape(2, 6, 5, 4)
    p = extract_patches(x, [[1, 0, 2], [2, 3, 0]], (3, 2, 2))
    assert p.shape == (2, 2, 3, 2, 2)
    assert torch.equal(p[0], x[:, 1:4, 0:2, 2:4]) and torch.equal(p[1], x[:, 2:5, 3:5, 0:2])
    with pytest.raises(ValueError, match='does not fit'): extract_patches(x, [[4, 0, 0]], (3, 2, 2))
    with pytest.raises(ValueError, match='x must'): extract_patches(x[0], [[0, 0, 0]], (3, 2, 2))
