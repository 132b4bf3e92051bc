"""Patch loader benchmark: patches/s delivered to a training loop, batch waits, and process-tree memory.

Compares `patchfm.data.MedPatchDataLoaders` with a plain TorchIO `Queue` feeding a torch `DataLoader` (and
fastMONAI's `MedPatchDataLoaders` when it is installed), and patchfm with its optional `cache_dir` (first epoch
builds the cache), on demo-phantom volumes of about 160x160x128, patch
96^3, samples_per_volume 8, queue_length 64, bs 4, a label sampler (background 0.2, foreground 0.8) and
2 workers. Every measurement runs in its own Python process so that one does not inherit another's memory.

Waits for a batch, the same definitions for every loader: the run's very first batch is a cold start (workers
start, the queue fills) and is shown on its own; "after batch 1" covers every other batch of the run, and
"epochs 2+" the epochs after the first (the steady state, epoch boundaries included). Memory: peak PSS of the
process tree while each loader delivers the same number of patches for every subject count (the patchfm cache
is built beforehand, so that its runs all read it).

    .venv/bin/python benchmarks/loader.py            # full sizes (a few minutes on 2 cores)
    .venv/bin/python benchmarks/loader.py --quick    # 64x64x48 volumes, patch 32 (seconds)

This is a script, not a test: it prints figures and ratios and asserts nothing.
"""
from __future__ import annotations
import argparse, json, math, os, statistics, subprocess, sys, tempfile, threading, time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROBS = {0: 0.2, 1: 0.4, 2: 0.4}  # the demo phantom has two foreground classes: 0.8 foreground in total

def sizes(quick: bool) -> dict:
    if quick: return dict(shape=(64, 64, 48), spacing=2.5, jitter=4, patch=32, spv=8, qlen=64, bs=4)
    return dict(shape=(160, 160, 128), spacing=1.0, jitter=8, patch=96, spv=8, qlen=64, bs=4)

# ---------------------------------------------------------------- data
def make_data(root: Path, n: int, quick: bool) -> list:
    "n demo phantoms of about `shape` voxels (orientations RAS/LPS) as .nii.gz; reused when present"
    from patchfm.demo import make_demo_volume
    from patchfm.core import write_nifti
    s = sizes(quick)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img, seg = root / f'case_{i:03d}_img.nii.gz', root / f'case_{i:03d}_seg.nii.gz'
        if not (img.exists() and seg.exists()):
            rng = np.random.default_rng(i)
            shape = tuple(int(d + rng.integers(-s['jitter'], s['jitter'] + 1)) for d in s['shape'])
            im, lb, aff = make_demo_volume(shape, (s['spacing'],) * 3, ('RAS', 'LPS')[i % 2], seed=i)
            write_nifti(lb, aff, seg); write_nifti(im, aff, img)
        rows.append((str(img), str(seg)))
    return rows

# ---------------------------------------------------------------- loaders (run in a child process)
def patchfm_batches(rows, s, workers, seed=0, cache_dir=None):
    "A function returning an iterator over one epoch of (x, y) batches"
    import pandas as pd, torchio as tio
    from patchfm.config import PatchConfig
    from patchfm.data import MedPatchDataLoaders
    df = pd.DataFrame(dict(image=[r[0] for r in rows], label=[r[1] for r in rows]))
    cfg = PatchConfig(patch_size=s['patch'], samples_per_volume=s['spv'], queue_length=s['qlen'], sampler_type='label',
                      label_probabilities=PROBS, queue_num_workers=workers)
    dls = MedPatchDataLoaders.from_df(df, 'image', 'label', valid_pct=0.0, patch_config=cfg,
                                      pre_patch_tfms=[tio.ZNormalization()], bs=s['bs'], seed=seed, device='cpu',
                                      cache_dir=cache_dir)
    return lambda: iter(dls.train), len(dls.train)

def patchfm_cache_batches(rows, s, workers, seed=0, cache_dir=None):
    "patchfm with `cache_dir` (default: a fresh folder, so that the first epoch builds the cache and later epochs read it)"
    import atexit, shutil
    if cache_dir is None:
        cache_dir = tempfile.mkdtemp(prefix='patchfm_bench_cache_')
        atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    return patchfm_batches(rows, s, workers, seed, cache_dir=cache_dir)

def torchio_batches(rows, s, workers, seed=0):
    import torch, torchio as tio
    torch.manual_seed(seed)
    subjects = [tio.Subject(image=tio.ScalarImage(i), mask=tio.LabelMap(m)) for i, m in rows]
    ds = tio.SubjectsDataset(subjects, transform=tio.Compose([tio.ToCanonical(), tio.ZNormalization()]))
    queue = tio.Queue(ds, max_length=s['qlen'], samples_per_volume=s['spv'],
                      sampler=tio.LabelSampler(s['patch'], 'mask', PROBS), num_workers=workers)
    loader = torch.utils.data.DataLoader(queue, batch_size=s['bs'], num_workers=0)
    def it():
        for b in loader: yield b['image'][tio.DATA], b['mask'][tio.DATA].long()
    return it, len(loader)

def fastmonai_batches(rows, s, workers, seed=0):
    import pandas as pd
    from fastMONAI.vision_all import MedPatchDataLoaders as FMLoaders, PatchConfig as FMConfig, ZNormalization
    # fastMONAI refuses valid_pct=0 ("Subjects list is empty"): one extra subject goes to validation
    rows = rows + rows[:1]
    df = pd.DataFrame(dict(image=[r[0] for r in rows], label=[r[1] for r in rows], is_valid=[False] * (len(rows) - 1) + [True]))
    cfg = FMConfig(patch_size=[s['patch']] * 3, samples_per_volume=s['spv'], queue_length=s['qlen'], sampler_type='label',
                   label_probabilities=PROBS, queue_num_workers=workers)
    dls = FMLoaders.from_df(df, img_col='image', mask_col='label', valid_col='is_valid', patch_config=cfg,
                            pre_patch_tfms=[ZNormalization()], bs=s['bs'], seed=seed, device='cpu')
    return lambda: iter(dls.train), len(dls.train)

LOADERS = {'patchfm': patchfm_batches, 'patchfm-cache': patchfm_cache_batches, 'torchio': torchio_batches,
           'fastmonai': fastmonai_batches}

def _available(lib: str) -> bool:
    if lib != 'fastmonai': return True
    import importlib.util
    return importlib.util.find_spec('fastMONAI') is not None

def tree_memory(pid: int) -> tuple:
    "PSS (MiB) of a process and of its children (RSS where PSS is unavailable)"
    import psutil
    main = kids = 0
    try:
        p = psutil.Process(pid)
        for q in [p] + p.children(recursive=True):
            try:
                mi = q.memory_full_info()
                v = getattr(mi, 'pss', mi.rss)
                if q.pid == pid: main += v
                else: kids += v
            except (psutil.NoSuchProcess, psutil.AccessDenied): pass
    except psutil.NoSuchProcess: pass
    return main / 2**20, kids / 2**20

def child(args):
    "One measurement; prints a JSON line"
    s = sizes(args.quick)
    rows = json.loads(Path(args.rows).read_text())[:args.n]
    kw = dict(cache_dir=args.cache_dir) if args.lib == 'patchfm-cache' and args.cache_dir else {}
    make, n_batches = LOADERS[args.lib](rows, s, args.workers, **kw)
    peak, stop = [0.0, 0.0, 0.0], threading.Event()  # tree, main process, workers
    def watch():
        while not stop.is_set():
            m, k = tree_memory(os.getpid())
            peak[:] = max(peak[0], m + k), max(peak[1], m), max(peak[2], k)
            stop.wait(0.1)
    if args.memory: threading.Thread(target=watch, daemon=True).start()
    waits, epochs, per_epoch = [], [], []
    t_all = time.perf_counter()
    for e in range(args.epochs):
        t0 = time.perf_counter(); it = make(); n = 0
        while True:
            t = time.perf_counter()
            b = next(it, None)
            if b is None: break
            waits.append(time.perf_counter() - t); n += b[0].shape[0]
            if args.step: time.sleep(args.step)  # the simulated training step (a GPU forward/backward)
        del it
        epochs.append(time.perf_counter() - t0); per_epoch.append(len(waits))
    total = time.perf_counter() - t_all
    stop.set()
    steady = waits[1:] or waits  # the run's first batch is a cold start for every loader: reported on its own
    later = waits[per_epoch[0]:] or steady  # epochs 2+: the steady state, epoch boundaries included
    print(json.dumps(dict(lib=args.lib, n=args.n, patches=n * args.epochs, seconds=total, patches_per_s=n * args.epochs / total,
                          epoch_s=epochs, first_wait=waits[0], median_wait=statistics.median(steady), max_wait=max(steady),
                          p95_wait=float(np.percentile(steady, 95)), max_wait_batch=1 + int(np.argmax(steady)),
                          median_wait_e2=statistics.median(later), max_wait_e2=max(later),
                          idle_s=sum(waits), peak_mib=peak[0], peak_main_mib=peak[1], peak_workers_mib=peak[2],
                          batches=len(waits), waits=[round(w, 5) for w in waits])))

def run_child(lib, n, rows_file, quick, step, epochs, workers, memory=False, cache_dir=None) -> dict | None:
    cmd = [sys.executable, __file__, '--child', lib, '--n', str(n), '--rows', rows_file, '--step', str(step),
           '--epochs', str(epochs), '--workers', str(workers)] + (['--quick'] if quick else []) + (['--memory'] if memory else [])
    if cache_dir: cmd += ['--cache-dir', str(cache_dir)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"  {lib} n={n}: failed\n{r.stderr[-2000:]}"); return None
    return json.loads(r.stdout.strip().splitlines()[-1])

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true', help='small volumes and patches')
    ap.add_argument('--steps', default='0,0.1', help='simulated training step(s) per batch, seconds (comma-separated)')
    ap.add_argument('--epochs', type=int, default=3)
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--repeat', type=int, default=2, help='throughput runs per loader (the best is shown)')
    ap.add_argument('--subjects', type=int, default=16, help='subjects for the throughput runs')
    ap.add_argument('--memory-subjects', default='8,16,32', help='subject counts of the memory runs (the same work each)')
    ap.add_argument('--data', default=None, help='folder for the generated volumes (default: a temp folder)')
    ap.add_argument('--libs', default='patchfm,patchfm-cache,torchio,fastmonai')
    ap.add_argument('--child', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--n', type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument('--rows', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--step', type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument('--memory', action='store_true', help=argparse.SUPPRESS)
    ap.add_argument('--cache-dir', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child: args.lib = args.child; return child(args)

    s = sizes(args.quick)
    mem_n = [int(v) for v in args.memory_subjects.split(',')]
    n_max = max([args.subjects] + mem_n)
    data = Path(args.data or Path(tempfile.gettempdir()) / f"patchfm_bench_{'quick' if args.quick else 'full'}")
    t = time.perf_counter()
    rows = make_data(data, n_max, args.quick)
    rows_file = str(data / 'rows.json'); Path(rows_file).write_text(json.dumps(rows))
    print(f"data: {n_max} volumes of about {s['shape']} in {data} ({time.perf_counter() - t:.0f} s)")
    print(f"patch {s['patch']}^3, samples_per_volume {s['spv']}, queue_length {s['qlen']}, bs {s['bs']}, "
          f"label sampler {PROBS}, {args.workers} workers, {args.epochs} epochs of {args.subjects} subjects\n")
    libs = [l for l in args.libs.split(',') if _available(l) or print(f"{l}: not installed, skipped")]

    res = {}
    for step in [float(v) for v in args.steps.split(',') if v]:
        print(f"simulated training step {step * 1000:.0f} ms per batch")
        print(f"  {'':13s} {'':>9s} {'':>18s} {'':>7s} | {'after batch 1':^30s} | {'epochs 2+':^24s} |")
        print(f"  {'loader':13s} {'patches/s':>9s} {'epoch s':>18s} {'batch 1':>7s} | {'median':>7s} {'p95':>6s} {'max':>6s} "
              f"{'max/med':>7s} | {'median':>7s} {'max':>6s} {'max/med':>7s} | {'loop idle':>9s}")
        for lib in libs:
            runs = [run_child(lib, args.subjects, rows_file, args.quick, step, args.epochs, args.workers) for _ in range(args.repeat)]
            runs = [r for r in runs if r is not None]
            if not runs: continue
            r = max(runs, key=lambda r: r['patches_per_s'])  # best of the repeats: other load on the machine only slows
            res[(lib, step)] = r
            ms = lambda v: f"{v * 1000:5.0f}ms" if v >= 0.0095 else f"{v * 1000:5.1f}ms"
            print(f"  {lib:13s} {r['patches_per_s']:9.1f} {' / '.join(f'{e:.1f}' for e in r['epoch_s']):>18s} {r['first_wait']:6.2f}s | "
                  f"{ms(r['median_wait'])} {ms(r['p95_wait'])} {r['max_wait']:5.2f}s {r['max_wait'] / max(r['median_wait'], 1e-9):7.1f} | "
                  f"{ms(r['median_wait_e2'])} {r['max_wait_e2']:5.2f}s {r['max_wait_e2'] / max(r['median_wait_e2'], 1e-9):7.1f} | {r['idle_s']:8.1f}s")
        for mine in ('patchfm', 'patchfm-cache'):
            for other in ('torchio', 'fastmonai'):
                if (mine, step) in res and (other, step) in res:
                    a, b = res[(mine, step)], res[(other, step)]
                    print(f"  {mine} / {other}: patches/s x{a['patches_per_s'] / b['patches_per_s']:.2f}, "
                          f"loop idle x{a['idle_s'] / max(b['idle_s'], 1e-9):.2f}, first batch x{a['first_wait'] / max(b['first_wait'], 1e-9):.2f}, "
                          f"max wait after batch 1 x{a['max_wait'] / max(b['max_wait'], 1e-9):.2f}")
        print()

    # the same work for every subject count: as many patches as one epoch of the largest count (a run of one
    # epoch of 8 subjects would never reach the steady state of a full queue plus prefetched subjects)
    n_work = max(mem_n)
    print(f"peak PSS of the process tree over {n_work * s['spv']} patches ({n_work} subject visits) per run (MiB)")
    mem, cache = {}, None
    if 'patchfm-cache' in libs:  # build the cache first: every patchfm-cache run below then reads it
        import atexit, shutil
        cache = tempfile.mkdtemp(prefix='patchfm_bench_cache_'); atexit.register(shutil.rmtree, cache, ignore_errors=True)
        run_child('patchfm-cache', max(mem_n), rows_file, args.quick, 0.0, 1, args.workers, cache_dir=cache)
    for lib in libs:
        for n in mem_n:
            r = run_child(lib, n, rows_file, args.quick, 0.0, math.ceil(n_work / n), args.workers, memory=True,
                          cache_dir=cache if lib == 'patchfm-cache' else None)
            if r is not None:
                mem[(lib, n)] = r['peak_mib']
                print(f"  {lib:13s} {n:3d} subjects: tree {r['peak_mib']:.0f}, main process {r['peak_main_mib']:.0f}, "
                      f"workers {r['peak_workers_mib']:.0f}")
        line = ', '.join(f"{n}: {mem[(lib, n)]:.0f}" for n in mem_n if (lib, n) in mem)
        done = [n for n in mem_n if (lib, n) in mem]
        if len(done) >= 2:
            a, b = done[0], done[-1]
            line += f"  ->  {b} vs {a} subjects x{mem[(lib, b)] / mem[(lib, a)]:.2f} ({(mem[(lib, b)] - mem[(lib, a)]) / (b - a):+.1f} MiB per subject)"
        if len(done) >= 3:
            a, b = done[-2], done[-1]
            line += f", {b} vs {a}: {(mem[(lib, b)] - mem[(lib, a)]) / (b - a):+.1f} MiB per subject"
        print(f"  {lib:13s} {line}")
    n = mem_n[-1]
    for mine in ('patchfm', 'patchfm-cache'):
        for other in ('torchio', 'fastmonai'):
            if (mine, n) in mem and (other, n) in mem:
                print(f"  {mine} / {other} at {n} subjects: x{mem[(mine, n)] / mem[(other, n)]:.2f}")

if __name__ == '__main__': main()
