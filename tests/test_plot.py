"Tests for patchfm.plot: figure structure, chosen slices, aspect ratios, overlays and input handling."
import io
from types import SimpleNamespace

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from patchfm.core import MedImage, MedMask
from patchfm.plot import (PLANES, foreground_slice, foreground_center, draw_slice, draw_three_planes,
                          show_three_planes, plot_volume_grid, show_segmentation_comparison, plot_metric_curve,
                          label_cmap)

SHAPE = (24, 20, 10)


@pytest.fixture
def case():
    g = np.random.default_rng(0)
    img = torch.from_numpy(g.normal(size=SHAPE)).float()[None]
    gt = torch.zeros(1, *SHAPE, dtype=torch.uint8)
    gt[0, 4:10, 6:12, 2:5] = 1
    gt[0, 5:7, 7:9, 6] = 2  # few voxels: the most foreground stays at x=5, y=7, z=2
    pred = torch.zeros_like(gt)
    pred[0, 15:20, 3:6, 7:9] = 1
    return img, gt, pred


def overlay(ax):
    "Label values drawn by the mask overlay of `ax` (masked background removed), in display orientation."
    assert len(ax.images) == 2
    return ax.images[1].get_array()


def test_foreground_slice_and_center(case):
    _, gt, _ = case
    assert foreground_slice(gt, 2) == 2 and foreground_slice(gt, 0) == 5 and foreground_slice(gt, 1) == 7
    assert foreground_center(gt) == (5, 7, 2)
    assert foreground_center(gt[0].numpy()) == (5, 7, 2)  # (X,Y,Z) array
    assert foreground_center(torch.zeros(SHAPE)) == (12, 10, 5)  # empty: the middle
    with pytest.raises(ValueError, match='anatomical_plane'): foreground_slice(gt, 3)


def test_comparison_default_slice_axes_and_titles(case):
    img, gt, pred = case
    n_open = len(plt.get_fignums())
    fig = show_segmentation_comparison(img, gt, pred, metric_value=0.8123)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert len(plt.get_fignums()) == n_open  # not registered with pyplot
    assert fig.get_suptitle() == 'axial slice 2 of 10'
    assert fig.axes[0].get_title() == 'Ground truth'
    assert fig.axes[1].get_title() == 'Prediction (DSC = 0.812)'
    # the panels show that slice: overlays equal the label maps at z=2, transposed for display
    assert np.array_equal(overlay(fig.axes[0]).filled(0), gt[0, :, :, 2].numpy().T)
    assert np.array_equal(overlay(fig.axes[1]).filled(0), pred[0, :, :, 2].numpy().T)
    assert np.allclose(fig.axes[0].images[0].get_array(), img[0, :, :, 2].numpy().T)
    fig.savefig(io.BytesIO(), format='png')


@pytest.mark.parametrize('plane, expected', [(0, 5), (1, 7), (2, 2)])
def test_comparison_planes(case, plane, expected):
    img, gt, pred = case
    fig = show_segmentation_comparison(img, gt, pred, anatomical_plane=plane, metric_name='HD95')
    assert fig.get_suptitle() == f'{PLANES[plane]} slice {expected} of {SHAPE[plane]}'
    assert fig.axes[1].get_title() == 'Prediction'
    drawn = fig.axes[0].images[0].get_array()
    assert drawn.shape == tuple(s for d, s in enumerate(SHAPE) if d != plane)[::-1]


def test_comparison_explicit_slice_empty_gt_and_errors(case):
    img, gt, pred = case
    assert show_segmentation_comparison(img, gt, pred, slice_index=8).get_suptitle() == 'axial slice 8 of 10'
    fig = show_segmentation_comparison(img, torch.zeros_like(gt), pred)
    assert fig.get_suptitle() == 'axial slice 7 of 10'  # ground truth empty: most prediction foreground
    with pytest.raises(ValueError, match='out of range'): show_segmentation_comparison(img, gt, pred, slice_index=10)
    with pytest.raises(ValueError, match='anatomical_plane'): show_segmentation_comparison(img, gt, pred, anatomical_plane=-1)
    with pytest.raises(ValueError, match='prediction shape'): show_segmentation_comparison(img, gt, pred[..., :-1])
    with pytest.raises(ValueError, match=r'\(X,Y,Z\) or \(C,X,Y,Z\)'): show_segmentation_comparison(img[0, 0], gt, pred)
    with pytest.raises(ValueError, match='voxel_size'): show_segmentation_comparison(img, gt, pred, voxel_size=(1, 1))


@pytest.mark.parametrize('plane', [0, 1, 2])
def test_aspect_from_voxel_size(case, plane):
    img, gt, pred = case
    sp = (0.8, 0.6, 2.5)
    fig = show_segmentation_comparison(img, gt, pred, voxel_size=sp, anatomical_plane=plane)
    a, b = [s for d, s in enumerate(sp) if d != plane]
    assert fig.axes[0].get_aspect() == pytest.approx(b / a)
    assert fig.axes[1].get_aspect() == pytest.approx(b / a)


def test_med_image_spacing_used(case):
    img, gt, pred = case
    aff = np.diag([0.5, 0.5, 3.0, 1.0])
    mi, mm = MedImage(img, affine=aff), MedMask(gt, affine=aff)
    fig = show_segmentation_comparison(mi, mm, pred[0].numpy(), anatomical_plane=0)  # mixed input types
    assert fig.axes[0].get_aspect() == pytest.approx(3.0 / 0.5)
    fig = show_segmentation_comparison(mi, mm, pred, anatomical_plane=0, voxel_size=(1, 1, 1))  # explicit wins
    assert fig.axes[0].get_aspect() == pytest.approx(1.0)
    tio_like = SimpleNamespace(data=img, spacing=(1.0, 2.0, 4.0))
    assert show_three_planes(tio_like).axes[2].get_aspect() == pytest.approx(2.0)


def test_onehot_and_probability_masks(case):
    img, gt, pred = case
    onehot = torch.nn.functional.one_hot(gt[0].long(), 3).permute(3, 0, 1, 2)
    fig = show_segmentation_comparison(img, onehot, pred.float() * 0.9)
    assert np.array_equal(overlay(fig.axes[0]).filled(0), gt[0, :, :, 2].numpy().T)
    assert np.array_equal(overlay(fig.axes[1]).filled(0), pred[0, :, :, 2].numpy().T)  # 0.9 rounds to 1


def test_overlay_background_transparent_and_fixed_colours(case):
    img, gt, pred = case
    fig = show_segmentation_comparison(img, gt, gt * 2)
    ov_gt, ov_pr = overlay(fig.axes[0]), overlay(fig.axes[1])
    assert ov_gt.mask[~(gt[0, :, :, 2].numpy().T > 0)].all()  # background masked out
    im = fig.axes[0].images[1]
    assert im.norm.vmin == 0.5 and im.norm.vmax == 20.5  # label k always gets colour k-1
    cmap = label_cmap()
    assert cmap.N == 20 and len({tuple(c) for c in cmap.colors}) == 20


def test_three_planes(case):
    img, gt, _ = case
    fig = show_three_planes(img, gt, voxel_size=(1, 1, 2), title='case 1')
    assert len(fig.axes) == 3
    assert [a.get_title() for a in fig.axes] == ['sagittal x=5', 'coronal y=7', 'axial z=2']
    assert fig.get_suptitle() == 'case 1'
    assert all(len(a.images) == 2 for a in fig.axes)
    fig = show_three_planes(img, center=(1, 2, 3))
    assert [a.get_title() for a in fig.axes] == ['sagittal x=1', 'coronal y=2', 'axial z=3']
    assert all(len(a.images) == 1 for a in fig.axes)  # no mask, no overlay
    assert [a.get_title() for a in show_three_planes(img).axes] == ['sagittal x=12', 'coronal y=10', 'axial z=5']


def test_draw_three_planes_on_given_axes(case):
    img, gt, _ = case
    fig = Figure()
    axs = fig.subplots(2, 3)
    out = draw_three_planes(axs[1], img, gt, titles=False)
    assert out == list(axs[1])
    assert all(len(a.images) == 2 for a in axs[1]) and all(len(a.images) == 0 for a in axs[0])
    assert all(a.get_title() == '' for a in axs[1])
    with pytest.raises(ValueError, match='needs 3 axes'): draw_three_planes(axs[0][:2], img)
    with pytest.raises(ValueError, match='mask shape'): draw_three_planes(axs[0], img, gt[..., :-1])
    with pytest.raises(ValueError, match='channel 1 out of range'): draw_three_planes(axs[0], img, channel=1)


def test_multichannel_image_channel_choice(case):
    img, gt, _ = case
    two = torch.cat([img, img * 0 + 7])
    fig = show_three_planes(two, gt, channel=1)
    assert np.allclose(fig.axes[2].images[0].get_array(), 7)


def test_plot_volume_grid(case):
    img, gt, _ = case
    batch_i, batch_m = torch.stack([img] * 5), torch.stack([gt] * 5)
    fig = plot_volume_grid(batch_i, batch_m)
    assert len(fig.axes) == 4 * 3  # max_n=4 rows
    assert len(plot_volume_grid(batch_i[:2], max_n=4).axes) == 6
    assert len(plot_volume_grid([img[0].numpy()]).axes) == 3
    with pytest.raises(ValueError, match='3 images but 2 masks'): plot_volume_grid(batch_i[:3], batch_m[:2])
    with pytest.raises(ValueError, match='at least one'): plot_volume_grid([])


def test_draw_slice_errors(case):
    img, _, _ = case
    ax = Figure().subplots()
    with pytest.raises(ValueError, match='out of range'): draw_slice(ax, img[0].numpy(), None, 1, 20, (1, 1, 1))


def test_plot_metric_curve():
    rec = SimpleNamespace(metric_names=['epoch', 'train_loss', 'valid_loss', 'accumulated_dice', 'foo', 'time'],
                          values=[[0.9, 0.8, 0.40, 1.0], [0.6, 0.55, 0.62, 2.0]])
    fig = plot_metric_curve(rec)
    lines = fig.axes[0].lines
    assert [l.get_label() for l in lines] == ['accumulated_dice', 'foo']
    assert lines[0].get_ydata().tolist() == [0.40, 0.62] and lines[0].get_xdata().tolist() == [0, 1]
    learner_like = SimpleNamespace(recorder=rec)
    assert [l.get_label() for l in plot_metric_curve(learner_like, names=['valid_loss']).axes[0].lines] == ['valid_loss']
    with pytest.raises(ValueError, match=r"\['dice'\] not recorded"): plot_metric_curve(rec, names=['dice'])
    with pytest.raises(ValueError, match='no epochs'): plot_metric_curve(SimpleNamespace(metric_names=rec.metric_names, values=[]))


def test_torchio_images_accepted(case):
    import torchio as tio
    img, gt, pred = case
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    fig = show_segmentation_comparison(tio.ScalarImage(tensor=img, affine=aff), tio.LabelMap(tensor=gt, affine=aff),
                                       tio.LabelMap(tensor=pred, affine=aff), anatomical_plane=1)
    assert fig.axes[0].get_aspect() == pytest.approx(3.0)
    assert fig.get_suptitle() == 'coronal slice 7 of 20'
