"""Top-k patch inference benchmark (NMSW, arXiv 2501.10814): learned top-k patches vs random foreground patches vs
sliding window, all with the same global and local networks.

Run from the repo root:  python benchmarks/topk.py [--quick] [--json-out FILE] [--realdata DIR]

1. make the demo phantoms (patchfm.demo), preprocess them with the training pipeline (2 mm voxels, z-normalised);
2. train a `topk_learner` (global UNet at 1/3 resolution + local UNet on 24^3 patches, K_train=4, K_random=1)
   with `fit_one_cycle` on whole volumes;
3. on held-out volumes, per K in {1, 3, 5, 10, 30, all}: mean foreground Dice and wall time of
   - topk: the K best candidates by learned objectness,
   - random: K random candidates the global prediction calls foreground (mean over seeds),
   and once: sliding window (every candidate, the same nets and refinement), zoom-in (patches covering each
   structure the global net finds) and the plain sliding-window engine (`patchfm.inference.predict_volume` on the
   local net alone, timing only);
4. print the ratios (sliding-window time / top-k time, Dice differences) in one table.

Times are in-memory `predict_topk` calls (preprocessed volume -> probabilities, no file I/O), summed over the
held-out volumes, each timed on its second call (the first sets up the CPU kernels of its shapes); 2 threads. Dice is measured on the preprocessed grid against the
preprocessed labels. `--realdata DIR` repeats it on real scans (the folder of ../shared/realdata/fetch.sh) cut as
benchmarks/accuracy.py cuts them: ct_kidneys (CT, both kidneys as one label: train on one kidney's side of the body,
test on the other's; a small structure in a large volume, the case top-k is for) and cta_heart (CTA, the heart: train on
one side, test on the other); 3 mm voxels, the training side and its mirror image as the two training volumes
(`--real-epochs`, lr `--real-lr`), results under the JSON key "realdata" by task.
"""
import argparse, json, os, sys, tempfile, time, warnings

import numpy as np
from pathlib import Path

THREADS = 2
K_FULL = [1, 3, 5, 10, 30, 'all']
K_QUICK = [1, 3, 5, 10, 'all']


def _dice(pred, targ, n_classes):
    "Mean foreground Dice of two label maps (classes absent from both are skipped)."
    ds = []
    for c in range(1, n_classes):
        p, t = pred == c, targ == c
        den = int(p.sum() + t.sum())
        if den: ds.append(2 * int((p & t).sum()) / den)
    return sum(ds) / len(ds) if ds else float('nan')


def _evaluate(learn, cases, n_classes, k, strategy, seeds=(None,)):
    "Mean Dice, summed seconds and mean number of patches of one strategy over the held-out cases."
    import torch
    from patchfm.topk import predict_topk
    from patchfm.grid import probs_to_labels
    dice, secs, npat = [], 0., []
    for j, seed in enumerate(seeds):
        for x, y in cases:
            # the first call of a shape sets up the CPU conv kernels: time the second one (first seed), or the only one
            if j == 0: predict_topk(learn, x, k, strategy, batch_size=4, seed=seed)
            t0 = time.perf_counter()
            p, n = predict_topk(learn, x, k, strategy, batch_size=4, seed=seed)
            lab = probs_to_labels(p)  # what topk_inference does (a channel loop: torch's argmax(0) is slow on CPU)
            secs += time.perf_counter() - t0
            dice.append(_dice(lab, y[0], n_classes)); npat.append(n)
    return sum(dice) / len(dice), secs / len(seeds), sum(npat) / len(npat)


def run(images, labels, test_idx, config, pre_tfms, epochs, lr, ks, n_random_seeds, label='', global_channels=None):
    import torch
    from patchfm.topk import topk_learner, volume_dataloaders, predict_topk, TopKSegmenter, default_global_net
    from patchfm.inference import predict_volume
    from patchfm.grid import patch_grid
    torch.manual_seed(0)
    t0 = time.perf_counter()
    dls = volume_dataloaders(images, labels, config, pre_tfms, valid_idx=test_idx, seed=0)
    prep = time.perf_counter() - t0
    n_classes = dls.n_classes
    gnet = None if global_channels is None else default_global_net(getattr(dls, 'n_channels', None) or 1, n_classes, channels=global_channels)
    learn = topk_learner(dls, down_size_rate=3, k_train=4, k_random=1, k=5, global_net=gnet)
    t0 = time.perf_counter()
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    train_s = time.perf_counter() - t0
    val = learn.recorder.values[-1]
    cases = dls.valid_ds.items
    model: TopKSegmenter = learn.model
    n_cand = [len(patch_grid(model.padded_shape(tuple(x.shape[1:])), model.patch_size, model.overlap)) for x, _ in cases]
    sw_dice, sw_s, _ = _evaluate(learn, cases, n_classes, 'all', 'sliding')
    res = dict(k=[k for k in ks], n_candidates=n_cand, n_classes=n_classes, train_seconds=train_s, preprocess_seconds=prep,
               epochs=epochs, final_train_loss=float(val[0]), final_valid_loss=float(val[1]), final_valid_dice_k5=float(val[2]),
               sliding_window_dice=sw_dice, sliding_window_seconds=sw_s,
               topk_dice=[], topk_seconds=[], random_dice=[], random_seconds=[], topk_patches=[])
    seeds = tuple(range(n_random_seeds))
    for k in ks:
        if k == 'all':
            res['topk_dice'].append(sw_dice); res['topk_seconds'].append(sw_s); res['topk_patches'].append(sum(n_cand) / len(n_cand))
            res['random_dice'].append(sw_dice); res['random_seconds'].append(sw_s)
            continue
        d, s, n = _evaluate(learn, cases, n_classes, k, 'topk')
        res['topk_dice'].append(d); res['topk_seconds'].append(s); res['topk_patches'].append(n)
        d, s, _ = _evaluate(learn, cases, n_classes, k, 'random', seeds)
        res['random_dice'].append(d); res['random_seconds'].append(s)
    d, s, n = _evaluate(learn, cases, n_classes, 'all', 'zoom')
    res.update(zoom_dice=d, zoom_seconds=s, zoom_patches=n)
    # the patchfm sliding-window engine on the local net alone (no global branch, no refinement): timing reference
    secs = 0.
    with torch.no_grad():
        for x, _ in cases:
            predict_volume(model.local_net, x, model.patch_size, model.overlap, 'gaussian', 4)  # warm-up
            t0 = time.perf_counter()
            predict_volume(model.local_net, x, model.patch_size, model.overlap, 'gaussian', 4)
            secs += time.perf_counter() - t0
    res['plain_sliding_window_seconds'] = secs
    _print(res, label)
    return res


def _print(r, label):
    print(f"\n== {label}: {len(r['n_candidates'])} held-out volumes, candidates per volume {r['n_candidates']}, "
          f"trained {r['epochs']} epochs in {r['train_seconds']:.0f} s (valid Dice at K=5 {r['final_valid_dice_k5']:.3f})")
    print(f"sliding window (same nets): Dice {r['sliding_window_dice']:.4f}, {r['sliding_window_seconds']:.2f} s; "
          f"plain engine on the local net: {r['plain_sliding_window_seconds']:.2f} s")
    print(f"zoom-in per structure: Dice {r['zoom_dice']:.4f}, {r['zoom_seconds']:.2f} s, {r['zoom_patches']:.1f} patches/volume")
    print(f"{'K':>5} {'patches':>8} {'topk Dice':>10} {'random Dice':>12} {'topk-random':>12} {'topk-SW':>9} "
          f"{'topk s':>8} {'SW s / topk s':>14}")
    for i, k in enumerate(r['k']):
        td, rd, ts = r['topk_dice'][i], r['random_dice'][i], r['topk_seconds'][i]
        print(f"{str(k):>5} {r['topk_patches'][i]:>8.1f} {td:>10.4f} {rd:>12.4f} {td - rd:>+12.4f} "
              f"{td - r['sliding_window_dice']:>+9.4f} {ts:>8.2f} {r['sliding_window_seconds'] / ts:>14.2f}")


def demo_data(root, n_cases):
    from patchfm.demo import make_demo_dataset
    df = make_demo_dataset(root, n_cases=n_cases, seed=11, lesion_radius=(6.0, 9.0))
    return list(df.image), list(df.label)


REAL_TASKS = ('ct_kidneys', 'cta_heart')  # benchmarks/accuracy.py's cuts: a small and a medium structure


def _mirrored(image, label, axis, out_dir):
    "The training side flipped along the voxel axis of the left-right cut (the affine kept): a copy the other side resembles."
    import nibabel as nib
    out = []
    for f, name in ((image, 'train_flip_image.nii.gz'), (label, 'train_flip_label.nii.gz')):
        im = nib.load(f)
        a = np.flip(np.asarray(im.dataobj), axis).copy()
        new = nib.Nifti1Image(a, im.affine); new.set_qform(im.affine, 1); new.set_sform(im.affine, 1)
        nib.save(new, str(Path(out_dir) / name)); out.append(str(Path(out_dir) / name))
    return out


def real_tasks(root, tmp, tasks=REAL_TASKS):
    """benchmarks/accuracy.py's task cuts of the fetch.sh scans, per task ([train, train mirrored, test] images, labels).
    The whole-volume learner has no geometric augmentation, and one volume overfits within a hundred steps: the
    mirrored copy of the training side stands in for accuracy.py's random flips."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import nibabel as nib
    from accuracy import make_task, _axis_of
    out = {}
    for t in tasks:
        f = make_task(Path(root), t, Path(tmp) / t)
        ax = _axis_of(nib.load(f['train_image']).affine, 'R')
        fi, fl = _mirrored(f['train_image'], f['train_label'], ax, Path(tmp) / t)
        out[t] = ([f['train_image'], fi, f['test_image']], [f['train_label'], fl, f['test_label']])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true', help='fewer cases and epochs, K in {1,3,5,10,all} (a few minutes)')
    ap.add_argument('--json-out', help='write the results as JSON here')
    ap.add_argument('--realdata', help='folder of ../shared/realdata/fetch.sh (cases.csv): also benchmark those cases')
    ap.add_argument('--epochs', type=int, help='training epochs (default 25 quick, 150 full)')
    ap.add_argument('--cases', type=int, help='demo cases (default 10 quick, 16 full; the last 3 held out quick, 4 full)')
    ap.add_argument('--real-epochs', type=int, default=60, help='training epochs of each real task (two volumes: two steps each)')
    ap.add_argument('--lr', type=float, default=1e-2)
    ap.add_argument('--real-lr', type=float, default=3e-3, help='learning rate of the real tasks (benchmarks/accuracy.py\'s)')
    ap.add_argument('--global-channels', type=int, nargs='+', help='channels of the global UNet (default: default_global_net\'s)')
    args = ap.parse_args()
    warnings.filterwarnings('ignore')
    import torch
    torch.set_num_threads(THREADS)
    from torchio.transforms import ZNormalization
    from patchfm.config import PatchConfig
    ks = K_QUICK if args.quick else K_FULL
    n_cases = args.cases or (10 if args.quick else 16)
    n_test = 3 if args.quick else 4
    epochs = args.epochs or (25 if args.quick else 150)
    cfg = PatchConfig(patch_size=(24, 24, 24), target_spacing=(2., 2., 2.), patch_overlap=0.5)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = demo_data(Path(tmp) / 'demo', n_cases)
        out = run(images, labels, list(range(n_cases - n_test, n_cases)), cfg, [ZNormalization()], epochs, args.lr, ks,
                  n_random_seeds=3, label='demo phantoms', global_channels=args.global_channels)
        out.update(dataset='demo', n_cases=n_cases, patch_size=list(cfg.patch_size), target_spacing=list(cfg.target_spacing),
                   down_size_rate=3, threads=THREADS, quick=args.quick)
        if args.realdata:
            rcfg = PatchConfig(patch_size=(24, 24, 24), target_spacing=(3., 3., 3.), patch_overlap=0.5)
            out['realdata'] = {}
            for task, (images, labels) in real_tasks(args.realdata, tmp).items():
                rd = run(images, labels, [2], rcfg, [ZNormalization()], args.real_epochs, args.real_lr, ks, n_random_seeds=3,
                         label=f'real task {task} (benchmarks/accuracy.py cut: train on one side, test on the other)',
                         global_channels=args.global_channels)
                rd.update(dataset=str(args.realdata), task=task, n_cases=3, target_spacing=list(rcfg.target_spacing))
                out['realdata'][task] = rd
    out['total_seconds'] = time.perf_counter() - t_start
    print(f"\ntotal {out['total_seconds']:.0f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json_out}")


if __name__ == '__main__':
    main()
