"Several processes: subject shards per rank, data-parallel `patchfm train` under torchrun (gloo, 2 ranks), sharded inference."
import json, os, socket, subprocess, sys, textwrap
from pathlib import Path
import numpy as np, nibabel as nib, pandas as pd, pytest, torch
from patchfm.config import PatchConfig
from patchfm.data import PatchDataLoader
from patchfm.subjects import PatchSubjects
from patchfm.stream import epoch_keys as _epoch_keys, shard_size
from patchfm.inference import patch_inference, file_part, default_part
from patchfm.cli import main

TORCHRUN = Path(sys.executable).parent / 'torchrun'
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


@pytest.mark.parametrize('n,world', [(4, 2), (5, 2), (7, 3), (1, 2), (6, 1)])
def test_epoch_keys_shard_the_subjects(n, world):
    for epoch in range(3):
        shards = [_epoch_keys(n, 11, epoch, True, True, r, world) for r in range(world)]
        subj = [[i for i, _ in s] for s in shards]
        assert all(len(s) == shard_size(n, world) for s in subj)  # same number of batches on every rank
        assert sorted({i for s in subj for i in s}) == list(range(n))  # together: the training set
        flat = [i for s in subj for i in s]
        assert len(flat) - len(set(flat)) == shard_size(n, world) * world - n  # repeats only to pad the last shard
        again = [_epoch_keys(n, 11, epoch, True, True, r, world) for r in range(world)]
        assert again == shards  # deterministic from seed, epoch and rank
    # world_size 1 is the single-process sequence; a new epoch reshuffles the shards
    assert _epoch_keys(n, 11, 0, True, True) == _epoch_keys(n, 11, 0, True, True, 0, 1)
    if n >= 4 and world > 1:
        assert [_epoch_keys(n, 11, e, True, True, 0, world) for e in range(4)] != [_epoch_keys(n, 11, 0, True, True, 0, world)] * 4


def test_loader_rank_arguments(tmp_path):
    subs = PatchSubjects([f'{tmp_path}/i{k}.nii.gz' for k in range(5)], [f'{tmp_path}/m{k}.nii.gz' for k in range(5)])
    cfg = PatchConfig(patch_size=8, samples_per_volume=2)
    dls = [PatchDataLoader(subs, cfg, bs=2, rank=r, world_size=2) for r in range(2)]
    assert [len(d) for d in dls] == [3, 3] and dls[0].new().rank == 0 and dls[1].new().world_size == 2
    assert sorted({i for d in dls for i, _ in d.keys(0)}) == list(range(5))
    valid = PatchDataLoader(subs, cfg, bs=2, train=False, shuffle=False, rank=1, world_size=2)
    assert (valid.rank, valid.world_size) == (0, 1) and len(valid.keys(0)) == 5  # validation is not sharded
    with pytest.raises(ValueError, match='rank must be in'): PatchDataLoader(subs, cfg, rank=2, world_size=2)
    with pytest.raises(ValueError, match='world_size must be an integer >= 1'): PatchDataLoader(subs, cfg, rank=0, world_size=0)


def _cases(tmp_path, n=5, seed=3) -> Path:
    from patchfm.demo import make_demo_dataset
    df = make_demo_dataset(tmp_path / 'data', n_cases=n, seed=seed)
    df['image'] = [str(Path(p).relative_to(tmp_path)) for p in df.image]  # relative to the CSV's folder
    df['label'] = [str(Path(p).relative_to(tmp_path)) for p in df.label]
    df['is_valid'] = ['no'] * (n - 1) + ['yes']
    df.to_csv(tmp_path / 'cases.csv', index=False)
    return tmp_path / 'cases.csv'


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "One data-parallel `patchfm train` on 2 CPU processes (gloo), launched by torchrun"
    tmp = tmp_path_factory.mktemp('ddp')
    csv = _cases(tmp)
    cmd = [str(TORCHRUN), '--standalone', '--nproc_per_node', '2', '-m', 'patchfm.cli', 'train', '--csv', str(csv),
           '--out', str(tmp / 'run'), '--epochs', '2', '--valid-col', 'is_valid', '--patch-size', '16', '16', '16',
           '--spacing', '4', '--samples-per-volume', '2', '--bs', '2', '--sw-every', '0', '--quiet']
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp)
    return tmp, out


def test_torchrun_train_writes_the_run(run):
    tmp, out = run
    assert out.returncode == 0, out.stderr[-4000:]
    r = tmp / 'run'
    assert (r / 'model' / 'model.safetensors').exists() and (r / 'patch_config.json').exists()
    info = json.loads((r / 'train_info.json').read_text())
    assert info['world_size'] == 2 and info['backend'] == 'gloo' and len(info['train_subjects']) == 4
    assert [Path(p).name for p in info['valid_subjects']] == ['case_004.nii.gz']  # from --valid-col
    for epoch in range(2):  # each epoch: disjoint shards that together are the training set
        a, b = (info['rank_epoch_subjects'][k][epoch] for k in range(2))
        assert len(a) == len(b) == 2 and not set(a) & set(b) and sorted(a + b) == sorted(info['train_subjects'])
    assert sorted(set(info['rank_subjects'][0]) | set(info['rank_subjects'][1])) == sorted(info['train_subjects'])
    assert info['rank_weights_sha1'][0] == info['rank_weights_sha1'][1]  # DDP kept the ranks in sync
    a, b = info['rank_final_metrics']  # train loss averaged over the ranks, validation on the same weights: one set of numbers
    assert len(a) == len(b) >= 2 and a == b and a[0] is not None
    assert info['batches_per_epoch_per_rank'] == [2, 2]
    assert out.stdout.count('outputs in') == 1  # only rank 0 prints the summary


def test_saved_model_loads_and_predicts(run, tmp_path):
    from patchfm.serialisation import load_model
    from patchfm.distributed import weights_digest
    tmp, out = run
    assert out.returncode == 0, out.stderr[-4000:]
    saved = load_model(tmp / 'run' / 'model', device='cpu')
    assert weights_digest(saved.model) == json.loads((tmp / 'run' / 'train_info.json').read_text())['rank_weights_sha1'][0]
    img = tmp / 'data' / 'images' / 'case_004.nii.gz'
    res = patch_inference(saved.model, saved.config, [img], pre_inference_tfms=saved.pre_patch_tfms, save_dir=tmp_path,
                          progress=False, num_parts=1)
    lab = nib.load(res.paths[0])
    assert lab.shape == nib.load(img).shape and set(np.unique(np.asarray(lab.dataobj))) <= {0, 1, 2}


def test_torchrun_predict_shards_the_files(run, tmp_path):
    "Under torchrun, `patchfm predict` predicts rank r's part; every input is written once, as by one process"
    tmp, out = run
    assert out.returncode == 0, out.stderr[-4000:]
    imgs = sorted(str(p) for p in (tmp / 'data' / 'images').glob('*.nii.gz'))
    model = str(tmp / 'run' / 'model')
    got = subprocess.run([str(TORCHRUN), '--standalone', '--nproc_per_node', '2', '-m', 'patchfm.cli', 'predict',
                          '--model', model, '--input', *imgs, '--output', str(tmp_path / 'parts'), '--quiet'],
                         capture_output=True, text=True, timeout=300, env=ENV)
    assert got.returncode == 0, got.stderr[-4000:]
    printed = [l for l in got.stdout.splitlines() if l.endswith('_pred.nii.gz')]
    assert len(printed) == len(set(printed)) == len(imgs)  # each input predicted by exactly one rank
    assert main(['predict', '--model', model, '--input', *imgs, '--output', str(tmp_path / 'one'), '--quiet']) == 0
    for p in sorted((tmp_path / 'one').iterdir()):
        a, b = nib.load(p), nib.load(tmp_path / 'parts' / p.name)
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.allclose(a.affine, b.affine)
    assert sorted(p.name for p in (tmp_path / 'parts').iterdir()) == sorted(p.name for p in (tmp_path / 'one').iterdir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def test_python_api_two_ranks(tmp_path):
    "The three lines of patchfm.distributed in a script started without torchrun (the launcher's variables set by hand)"
    csv = _cases(tmp_path, n=5, seed=4)
    script = tmp_path / 'train.py'
    script.write_text(textwrap.dedent('''
        import json, sys, torch, pandas as pd, torchio as tio
        torch.set_num_threads(1)
        from patchfm.config import PatchConfig
        from patchfm.data import MedPatchDataLoaders
        from patchfm.learner import patch_learner
        from patchfm.distributed import init_distributed, distribute, is_main, all_gather_json, weights_digest, cleanup_distributed
        rank, world = init_distributed()
        cfg = PatchConfig(patch_size=16, samples_per_volume=2, queue_length=2, target_spacing=(4., 4., 4.),
                          sampler_type='label', label_probabilities={0: 0.5, 1: 0.25, 2: 0.25})
        df = pd.read_csv(sys.argv[1]); df['image'] = sys.argv[2] + '/' + df.image; df['label'] = sys.argv[2] + '/' + df.label
        dls = MedPatchDataLoaders.from_df(df, 'image', 'label', valid_pct=0.2, patch_config=cfg, bs=2, seed=1, num_workers=0,
                                          pre_patch_tfms=[tio.ZNormalization()])
        learn = distribute(patch_learner(dls))
        start = weights_digest(learn.model)
        with learn.no_bar(): learn.fit(1, 1e-2)
        first = list(dls.train.subjects_read)
        with learn.no_bar(): learn.fit(1, 1e-2)
        digest = weights_digest(learn.model)
        from fastai.callback.core import Callback
        from torch.nn.parallel import DistributedDataParallel as DDP
        class Boom(Callback):
            def after_batch(self): raise RuntimeError('boom')
        try:
            with learn.no_bar(): learn.fit(1, 1e-2, cbs=Boom())
        except RuntimeError: pass
        left = isinstance(learn.model, DDP)  # a PatchLearner sent after_fit_exception: unwrapped at once
        learn.model = DDP(learn.model)  # what a plain fastai Learner's failed fit leaves (no event at all)
        with learn.no_bar(): learn.fit(1, 1e-2)  # the next fit unwraps it and trains
        info = all_gather_json(dict(rank=rank, world=world, start=start, read=first, digest=digest, left=left,
                                    again=weights_digest(learn.model), plain=not isinstance(learn.model, DDP),
                                    n=len(dls.train.subjects_dataset), main=is_main()))
        if rank == 0: print(json.dumps(info))
        cleanup_distributed()
    '''))
    env = {**ENV, 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(_free_port())}
    procs = [subprocess.Popen([sys.executable, str(script), str(csv), str(tmp_path)], env={**env, 'RANK': str(r), 'LOCAL_RANK': str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    info = json.loads(outs[0][0].strip().splitlines()[-1])
    assert [i['main'] for i in info] == [True, False] and info[0]['world'] == 2
    assert info[0]['start'] != info[0]['digest'] and info[0]['digest'] == info[1]['digest']  # trained, and in sync
    assert all(not i['left'] and i['plain'] for i in info) and info[0]['again'] == info[1]['again'] != info[0]['digest']  # fit after a failed one
    a, b = info[0]['read'], info[1]['read']  # one epoch, a FIFO-sized buffer: exactly each rank's shard
    assert len(a) == len(b) == 2 and not set(a) & set(b) and sorted(a + b) == list(range(info[0]['n']))


def _volumes(tmp_path, n=3):
    from patchfm.core import write_nifti
    rng = np.random.default_rng(0)
    paths = []
    for k in range(n):
        aff = np.diag([1.3, 1.1, 2.0, 1.0]); aff[0, 0] *= -1 if k % 2 else 1
        paths.append(write_nifti(rng.normal(size=(20 + k, 18, 9)).astype(np.float32), aff, tmp_path / f'v{k}.nii.gz'))
    return paths


def test_patch_inference_parts_match_one_process(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1)).eval()
    cfg = PatchConfig(patch_size=8, target_spacing=(1.5, 1.5, 1.5), patch_overlap=0.5)
    files = _volumes(tmp_path, 5)
    whole = patch_inference(model, cfg, files, save_dir=tmp_path / 'whole', progress=False)
    parts = [patch_inference(model, cfg, files, save_dir=tmp_path / 'parts', progress=False, num_parts=2, part_id=k) for k in range(2)]
    assert file_part(5, 2, 0) == [0, 2, 4] and file_part(5, 2, 1) == [1, 3]
    for k, r in enumerate(parts):
        assert len(r) == len(files) and r.part == (2, k)
        assert [x is not None for x in r] == [o is not None for o in r.outputs] == [i % 2 == k for i in range(5)]
    written = [p for r in parts for p in r.paths]
    assert len(written) == len(set(written)) == 5
    for i, f in enumerate(files):
        r = parts[i % 2]
        assert torch.equal(torch.as_tensor(r[i]), torch.as_tensor(whole[i]))
        a, b = nib.load(whole.outputs[i]), nib.load(r.outputs[i])
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


def test_patch_inference_part_arguments(tmp_path, monkeypatch):
    model, cfg, files = torch.nn.Conv3d(1, 2, 1), PatchConfig(patch_size=8), _volumes(tmp_path, 2)
    for kw, msg in [(dict(num_parts=2), 'needs part_id'), (dict(part_id=0), 'needs num_parts'),
                    (dict(num_parts=2, part_id=2), r'part_id must be in \[0, num_parts=2\)'), (dict(num_parts=0, part_id=0), 'num_parts must be')]:
        with pytest.raises(ValueError, match=msg): patch_inference(model, cfg, files, progress=False, **kw)
    monkeypatch.setenv('WORLD_SIZE', '2'); monkeypatch.setenv('RANK', '1')  # what torchrun exports
    assert default_part() == (2, 1)
    res = patch_inference(model, cfg, files, progress=False)
    assert res[0] is None and res[1] is not None and res.part == (2, 1)
    monkeypatch.setenv('WORLD_SIZE', '1')
    assert default_part() == (1, 0)
