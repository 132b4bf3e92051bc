"`accelerate launch` (Hugging Face accelerate) starts `patchfm train` data-parallel, as torchrun does: 2 CPU processes, gloo."
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest

pytest.importorskip('accelerate')
ACCELERATE = Path(sys.executable).parent / 'accelerate'
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore', 'HF_HUB_OFFLINE': '1',
       'HF_HOME': '/nonexistent-patchfm-test'}  # no accelerate config file of the user's is read


def test_accelerate_launch_trains_on_two_processes(tmp_path):
    from patchfm.demo import make_demo_dataset
    df = make_demo_dataset(tmp_path / 'data', n_cases=5, seed=3)
    df['is_valid'] = ['no'] * 4 + ['yes']
    df.to_csv(tmp_path / 'cases.csv', index=False)
    # on a machine without GPUs `--multi_gpu` still runs torch's elastic launcher (one process each); `--cpu` would start one
    cmd = [str(ACCELERATE if ACCELERATE.exists() else shutil.which('accelerate')), 'launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0',
           '-m', 'patchfm.cli', 'train', '--csv', str(tmp_path / 'cases.csv'), '--out', str(tmp_path / 'run'), '--epochs', '1',
           '--valid-col', 'is_valid', '--patch-size', '16', '16', '16', '--spacing', '4', '--samples-per-volume', '2',
           '--bs', '2', '--sw-every', '0', '--quiet']
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    info = json.loads((tmp_path / 'run' / 'train_info.json').read_text())
    assert info['world_size'] == 2 and info['backend'] == 'gloo'
    a, b = info['rank_epoch_subjects'][0][0], info['rank_epoch_subjects'][1][0]
    assert len(a) == len(b) == 2 and not set(a) & set(b)  # disjoint shards of the 4 training subjects
    assert info['rank_weights_sha1'][0] == info['rank_weights_sha1'][1]  # gradients were averaged: equal weights
    assert (tmp_path / 'run' / 'model' / 'model.safetensors').exists() and out.stdout.count('outputs in') == 1
