"""Inference benchmark: patchfm's file-to-file `patch_inference` against the pure network forward, MONAI and TorchIO.

Run from the repo root:  python benchmarks/inference.py [--quick] [--repeats N] [--parts real,batch,zero] [--files N]

Every measurement runs in its own subprocess (clean peak RSS, same 2 threads) and is printed as a ratio:
1. real network (MONAI UNet 16-256, 192x192x160, patch 96^3, overlap 0.5, batch 4): end-to-end file -> NIfTI time
   over the pure forward of the same 27 patches (target <= 1.10), for patchfm and for MONAI sliding_window_inference
   with nibabel I/O. patchfm runs on CPU inside `cpu_heap_cache` (glibc keeps the freed activations), which makes
   the network itself faster; the forward is also timed inside it, so patchfm's own overhead shows apart;
1b. (--parts batch) the same network on a job of --files files: the next file is read while the model runs;
2. zero-cost model (14 output channels, 256x256x200): whole file-to-file call, patchfm vs MONAI (gaussian) and
   TorchIO GridSampler + GridAggregator('hann') with the same I/O (target: >= 1.5x faster than MONAI);
3. peak memory over the pure forward's: the whole process's (includes the libraries each pipeline imports: TorchIO
   and SimpleITK for patchfm, nibabel for the others) and the call's own (peak above the resident size just before
   the call, imports and model set up; Linux /proc/self/clear_refs resets the mark).
"""
import argparse, json, os, resource, subprocess, sys, tempfile, time
from pathlib import Path

THREADS = 2


def _setup():
    import torch
    torch.set_num_threads(THREADS)
    return torch


def _unet(out_channels=2):
    from monai.networks.nets import UNet
    return UNet(spatial_dims=3, in_channels=1, out_channels=out_channels, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2, norm='instance').eval()


class ZeroCost:
    "A network that costs nothing (an identity-like 1x1x1 map to 14 channels): the CPU stand-in for a fast GPU"
    @staticmethod
    def make(n=14):
        import torch
        class Z(torch.nn.Module):
            def __init__(self):
                super().__init__(); self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, n).view(1, n, 1, 1, 1))
            def forward(self, x): return x * self.w
        return Z().eval()


_CALL = {}  # the child's measured call: its own peak memory (MiB above the resident size just before it)


def _rss_mib(field='VmRSS') -> float:
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith(field + ':'))


def _timed(fn) -> float:
    "Seconds of `fn()`; its peak memory above the resident size before it (imports and setup excluded) goes to _CALL"
    try:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')  # reset the peak-RSS mark (Linux)
    except OSError: pass
    before = _rss_mib()
    t0 = time.perf_counter()
    fn()
    secs = time.perf_counter() - t0
    _CALL['mib'] = _rss_mib('VmHWM') - before
    return secs


def make_volume(path, shape, seed=0):
    import numpy as np, nibabel as nib
    rng = np.random.default_rng(seed)
    arr = rng.normal(0, 1, shape).astype(np.float32)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(arr, aff), str(path))


def run_forward(args):
    "Plain PyTorch: the model on the same patches, batches of 4, no I/O, no blending"
    torch = _setup()
    from patchfm.grid import patch_grid, extract_patches
    model = _unet() if args.model == 'unet' else ZeroCost.make()
    xs = [torch.randn(1, *args.shape) for _ in args.file.split(',')]  # one volume per file of the job
    starts = patch_grid(args.shape, (96,) * 3, 0.5)
    def job():
        with torch.no_grad():
            for x in xs:
                for i in range(0, len(starts), 4): model(extract_patches(x, starts[i:i + 4], (96,) * 3))
    return _timed(job)


def run_forward_cached(args):
    "The same forward inside patchfm's `cpu_heap_cache` (glibc keeps freed activations): patchfm's own overhead"
    from patchfm.runtime import cpu_heap_cache
    with cpu_heap_cache(): return run_forward(args)


def run_patchfm(args):
    torch = _setup()
    from patchfm.config import PatchConfig
    from patchfm.inference import patch_inference
    model = _unet() if args.model == 'unet' else ZeroCost.make()
    cfg = PatchConfig(patch_size=(96, 96, 96), patch_overlap=0.5, aggregation_mode='hann' if args.model == 'zero' else 'gaussian')
    out = Path(args.out)
    def job():
        res = patch_inference(model, cfg, args.file.split(','), save_dir=out, progress=False, return_predictions=False,
                              overwrite=True, activation=None if args.model == 'zero' else 'auto')
        assert not res.failed, res.failed
    return _timed(job)


def _nib_read(path):
    import nibabel as nib, numpy as np, torch
    img = nib.load(path)
    return torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None, None], img.affine


def _nib_write(labels, affine, path):
    import nibabel as nib, numpy as np
    nib.save(nib.Nifti1Image(labels.numpy().astype(np.uint8), affine), str(path))


def _nibabel_job(args, name, predict) -> float:
    "Seconds to read each file with nibabel, `predict(x (1,1,X,Y,Z), affine)` -> (C,X,Y,Z), argmax and write uint8"
    import torch, nibabel  # noqa: imported before the clock starts, like patchfm's
    def job():
        for k, f in enumerate(args.file.split(',')):
            x, aff = _nib_read(f)
            with torch.no_grad(): lab = torch.argmax(predict(x, aff), 0)
            _nib_write(lab, aff, Path(args.out) / f'{name}_pred_{k}.nii.gz')
            del x, lab
    return _timed(job)


def run_monai(args):
    _setup()
    from monai.inferers import sliding_window_inference
    model = _unet() if args.model == 'unet' else ZeroCost.make()
    return _nibabel_job(args, 'monai', lambda x, aff: sliding_window_inference(x, (96,) * 3, 4, model, overlap=0.5, mode='gaussian')[0])


def run_torchio(args):
    torch = _setup()
    import torchio as tio
    model = _unet() if args.model == 'unet' else ZeroCost.make()
    def predict(x, aff):
        sampler = tio.inference.GridSampler(tio.Subject(image=tio.ScalarImage(tensor=x[0], affine=aff)), (96,) * 3, (48,) * 3)
        agg = tio.inference.GridAggregator(sampler, overlap_mode='hann')
        for b in torch.utils.data.DataLoader(sampler, batch_size=4): agg.add_batch(model(b['image'][tio.DATA]), b[tio.LOCATION])
        return agg.get_output_tensor()
    return _nibabel_job(args, 'torchio', predict)


def run_fastmonai(args):
    torch = _setup()
    from fastMONAI.vision_patch import patch_inference as fm_patch_inference, PatchConfig as FMConfig
    model = _unet() if args.model == 'unet' else ZeroCost.make()
    cfg = FMConfig(patch_size=[96, 96, 96], patch_overlap=0.5, aggregation_mode='hann', apply_reorder=True)
    return _timed(lambda: fm_patch_inference(model, cfg, args.file.split(','), sw_batch_size=4, progress=False,
                                             save_dir=str(Path(args.out) / 'fm')))


RUNNERS = dict(forward=run_forward, forward_cached=run_forward_cached, patchfm=run_patchfm, monai=run_monai, torchio=run_torchio, fastmonai=run_fastmonai)


def child(args):
    secs = RUNNERS[args.run](args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
    print(json.dumps(dict(seconds=secs, peak_mib=peak, call_mib=_CALL.get('mib', float('nan')))))


def measure(run, model, shape, file, out, repeats):
    best = None
    for _ in range(repeats):
        cmd = [sys.executable, __file__, '--run', run, '--model', model, '--shape', ','.join(map(str, shape)),
               '--file', str(file), '--out', str(out)]
        env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode:
            return dict(error=(p.stderr.strip().splitlines() or ['?'])[-1])
        r = json.loads(p.stdout.strip().splitlines()[-1])
        best = r if best is None or r['seconds'] < best['seconds'] else best
    return best


def interleaved(runs, model, shape, file, out, repeats) -> dict:
    "Best of `repeats` for each run, the runs taking turns: a slow spell of a shared machine hits every run alike"
    rows = {}
    for _ in range(repeats):
        for run in runs:
            r = measure(run, model, shape, file, out, 1)
            if run not in rows or 'error' in r or ('error' not in rows[run] and r['seconds'] < rows[run]['seconds']): rows[run] = r
    return rows


def _memory(r, fwd) -> str:
    "Peak memory against the forward's: the whole process (imports included) and the call's own (above its start)"
    return (f"process peak {r['peak_mib']:.0f} MiB = {r['peak_mib'] / fwd['peak_mib']:.2f} x forward's; the call's own "
            f"{r['call_mib']:.0f} MiB = {r['call_mib'] / fwd['call_mib']:.2f} x forward's")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--run'); ap.add_argument('--model', default='unet'); ap.add_argument('--shape')
    ap.add_argument('--file'); ap.add_argument('--out')
    ap.add_argument('--quick', action='store_true', help='smaller volumes (for a smoke run)')
    ap.add_argument('--repeats', type=int, default=3, help='best of N runs per measurement, the runs interleaved')
    ap.add_argument('--parts', default='real,zero', help="parts to run: 'real' (network, one file), 'batch' (network, a job of --files files), 'zero' (zero-cost model)")
    ap.add_argument('--files', type=int, default=4, help="files in the 'batch' part")
    args = ap.parse_args()
    if args.run:
        args.shape = tuple(int(v) for v in args.shape.split(','))
        return child(args)
    try:
        import fastMONAI  # noqa
        has_fm = True
    except ImportError: has_fm = False
    tmp = Path(tempfile.mkdtemp())
    real_shape = (128, 128, 112) if args.quick else (192, 192, 160)
    zero_shape = (160, 160, 128) if args.quick else (256, 256, 200)
    make_volume(tmp / 'real.nii.gz', real_shape); make_volume(tmp / 'zero.nii.gz', zero_shape, 1)
    print(f"python benchmarks/inference.py{' --quick' if args.quick else ''}  ({THREADS} threads, best of {args.repeats})")
    parts = set(args.parts.split(','))
    if 'real' in parts:
        print(f"\n1. MONAI UNet 16-256 on {real_shape}, patch 96^3, overlap 0.5, batch 4 (file -> NIfTI)")
        rows = interleaved(['forward', 'forward_cached', 'patchfm', 'monai'] + (['fastmonai'] if has_fm else []), 'unet',
                           real_shape, tmp / 'real.nii.gz', tmp, args.repeats)
        fwd, fwc = rows.pop('forward'), rows.pop('forward_cached')
        print(f"   pure network forward: {fwd['seconds']:.2f} s (process peak {fwd['peak_mib']:.0f} MiB, the loop's own "
              f"{fwd['call_mib']:.0f} MiB); inside cpu_heap_cache: {fwc['seconds']:.2f} s ({fwc['peak_mib']:.0f} MiB, {fwc['call_mib']:.0f} MiB)")
        for run, r in rows.items():
            if 'error' in r: print(f"   {run:8s}: failed ({r['error']})"); continue
            print(f"   {run:8s}: {r['seconds']:.2f} s = {r['seconds'] / fwd['seconds']:.3f} x forward (target <= 1.10); "
                  f"{_memory(r, fwd)}")
        if 'error' not in rows['patchfm']:
            r = rows['patchfm']
            print(f"   patchfm over the heap-cached forward (its own overhead): {r['seconds'] / fwc['seconds']:.3f} x; "
                  f"peak {r['peak_mib'] / fwc['peak_mib']:.2f} x")
        if not has_fm: print("   fastMONAI: not installed, skipped")
    if 'batch' in parts:  # a job of several files: the next file is read while the model runs on the current one
        n = args.files
        files = [tmp / f'batch_{k}.nii.gz' for k in range(n)]
        for k, f in enumerate(files): make_volume(f, real_shape, 10 + k)
        print(f"\n1b. the same network on a job of {n} files of {real_shape} (file -> NIfTI, each)")
        rows = interleaved(['forward', 'patchfm', 'monai'] + (['fastmonai'] if has_fm else []), 'unet', real_shape,
                           ','.join(map(str, files)), tmp, args.repeats)
        fwd = rows.pop('forward')
        print(f"   pure network forward of the {n} volumes: {fwd['seconds']:.2f} s")
        for run, r in rows.items():
            if 'error' in r: print(f"   {run:8s}: failed ({r['error']})"); continue
            print(f"   {run:8s}: {r['seconds']:.2f} s = {r['seconds'] / fwd['seconds']:.3f} x forward")
    if 'zero' in parts:
        print(f"\n2. zero-cost model, 14 channels, {zero_shape}, patch 96^3, overlap 0.5 (file -> NIfTI)")
        z = interleaved(['forward', 'patchfm', 'monai', 'torchio'] + (['fastmonai'] if has_fm else []), 'zero', zero_shape,
                        tmp / 'zero.nii.gz', tmp, args.repeats)
        zf = z.pop('forward')
        for run, r in z.items():
            if 'error' in r: print(f"   {run:8s}: failed ({r['error']})"); continue
            print(f"   {run:8s}: {r['seconds']:.2f} s; {_memory(r, zf)}")
        pf = z['patchfm']
        if 'error' not in pf:
            for run in ('monai', 'torchio', 'fastmonai'):
                if run in z and 'error' not in z[run]:
                    print(f"   patchfm is {z[run]['seconds'] / pf['seconds']:.2f}x faster than {run}")


if __name__ == '__main__':
    main()
