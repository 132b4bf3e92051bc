"""patchfm.tracking against real components: SQLite MLflow stores in tmp folders, real fastai fits of a tiny U-Net,
and a real `mlflow server` on 127.0.0.1 (no mocks)."""
import json, os, pickle, shutil, socket, subprocess, sys, textwrap, urllib.request
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
import torchio as tio
from fastai.callback.core import Callback
from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (adds Learner.fit_one_cycle / lr_find)
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from mlflow import MlflowClient

import patchfm
from patchfm.config import PatchConfig
from patchfm.core import write_nifti
from patchfm.inference import patch_inference
from patchfm.learner import PatchLearner
from patchfm.losses import default_loss
from patchfm.metrics import AccumulatedDice
from patchfm.models import UNet
from patchfm.tracking import (MLflowCallback, TrackingWarning, create_mlflow_callback, flatten_metric, learner_params,
                              load_model_from_run, split_frame)
from patchfm.mlflow_ui import MLflowUIManager, default_tracking_uri, free_port, resolve_tracking_uri, user_data_dir

CFG = PatchConfig(patch_size=(8, 8, 8), samples_per_volume=2, queue_length=8)


def make_learn(seed=0, patch_config=True, model=None, n_train=8, n_valid=4, learner=PatchLearner, **kwargs):
    "A tiny segmentation problem (foreground = bright voxels) on random tensors, plain fastai loaders; a PatchLearner by default"
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    def ds(n):
        x = torch.rand(n, 1, 8, 8, 8, generator=g)
        return list(zip(x, (x > 0.6).float()))
    dls = DataLoaders.from_dsets(ds(n_train), ds(n_valid), bs=4, device='cpu', num_workers=0)
    if patch_config: dls.patch_config, dls.pre_patch_tfms = CFG, [tio.ZNormalization()]
    model = model or UNet(in_channels=1, out_channels=2, C=4, n_down=1, n_fix=1)
    return learner(dls, model, loss_func=default_loss(2), metrics=[AccumulatedDice(n_classes=2, per_class=True)], **kwargs)


class Snapshots(Callback):
    "A copy of the weights after every epoch"
    order = 90
    def before_fit(self): self.states = []
    def after_epoch(self): self.states.append({k: v.detach().clone() for k, v in self.learn.model.state_dict().items()})


def raiser(event, exc=RuntimeError, epoch=1):
    "A callback raising `exc` at `event` of epoch `epoch`"
    def f(self):
        if self.epoch == epoch: raise exc('loss exploded')
    return type('Raiser', (Callback,), {event: f})()


def history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def gone(p: psutil.Process) -> bool:
    try: return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess: return True


@pytest.fixture(scope='module')
def tracked(tmp_path_factory):
    d = tmp_path_factory.mktemp('store')
    uri = f"sqlite:///{d}/mlflow.db"
    learn, snaps = make_learn(), Snapshots()
    cb = create_mlflow_callback(learn, experiment_name='test_exp', tracking_uri=uri, monitor='accumulated_dice',
                                extra_params={'fold': 3})
    with learn.no_bar(): learn.fit_one_cycle(2, 1e-2, cbs=[cb, snaps])
    client = MlflowClient(uri)
    return SimpleNamespace(dir=d, uri=uri, learn=learn, cb=cb, snaps=snaps, client=client, run_id=cb.run_id,
                           run=client.get_run(cb.run_id))


def test_run_params_read_from_learner(tracked):
    p = tracked.run.data.params
    assert tracked.run.info.status == 'FINISHED'
    assert json.loads(p['patch_patch_size']) == [8, 8, 8] and p['patch_sampler_type'] == 'uniform' and p['patch_queue_length'] == '8'
    assert p['model_class'] == 'patchfm.models.UNet' and p['model_C'] == '4' and p['model_out_channels'] == '2'
    assert int(p['model_n_parameters']) == sum(x.numel() for x in tracked.learn.model.parameters())
    assert p['loss_class'] == 'CustomLoss' and 'DiceCELoss' in p['loss'] and p['opt_func'] == 'Adam'
    # fit_one_cycle(2, 1e-2): peak 1e-2, starts at lr_max/div (div=25), one parameter group
    assert float(p['lr']) == pytest.approx(1e-2) and float(p['lr_start']) == pytest.approx(1e-2 / 25)
    assert float(p['lr_end']) < 1e-6 and p['lr_schedule'] == 'ParamScheduler'
    assert p['fit_method'] == 'fit_one_cycle > fit' and float(p['fit_pct_start']) == 0.25 and p['epochs'] == '2'
    assert p['batch_size'] == '4' and p['n_train_items'] == '8' and p['n_valid_items'] == '4' and p['n_train_batches'] == '2'
    assert json.loads(p['pre_patch_tfms']) == ['ZNormalization(masking_method=None)']
    assert json.loads(p['metrics']) == ['accumulated_dice'] and 'ParamScheduler' in json.loads(p['callbacks'])
    assert p['device'] == 'cpu' and p['version_torch'] == torch.__version__ and p['version_patchfm'] == patchfm.__version__
    assert p['fold'] == '3'
    assert tracked.run.data.tags['patchfm.version'] == patchfm.__version__


def test_every_epoch_logged_with_per_class_metrics(tracked):
    c, rid = tracked.client, tracked.run_id
    for k in ('train_loss', 'valid_loss', 'accumulated_dice', 'accumulated_dice_class_1', 'lr', 'epoch_time_s'):
        assert [m.step for m in sorted(c.get_metric_history(rid, k), key=lambda m: m.step)] == [0, 1], k
    rec = tracked.learn.recorder.values  # per epoch: train_loss, valid_loss, dice
    assert history(c, rid, 'train_loss') == pytest.approx([r[0] for r in rec])
    assert history(c, rid, 'valid_loss') == pytest.approx([r[1] for r in rec])
    dice = history(c, rid, 'accumulated_dice_class_1')  # AccumulatedDice leaves out the background: class 1
    assert dice == pytest.approx([float(r[2]) for r in rec]) and history(c, rid, 'accumulated_dice') == pytest.approx(dice)
    m = tracked.run.data.metrics
    assert m['best_accumulated_dice'] == pytest.approx(max(dice)) and m['best_epoch'] == int(np.argmax(dice))


def test_artifacts_next_to_the_database(tracked, tmp_path):
    c, rid = tracked.client, tracked.run_id
    names = {a.path for a in c.list_artifacts(rid)}
    assert names == {'patch_config.json', 'model_description.json', 'params.json', 'split.csv', 'loss_curve.png', 'best_model', 'final_model'}
    local = Path(c.download_artifacts(rid, '', str(tmp_path)))
    assert PatchConfig.load(local / 'patch_config.json') == CFG
    desc = json.loads((local / 'model_description.json').read_text())
    assert desc['model_class'] == 'patchfm.models.UNet' and desc['model_kwargs']['C'] == 4
    assert desc['pre_patch_tfms'][0]['name'] == 'ZNormalization' and 'ConvBlock' in desc['summary']
    assert json.loads((local / 'params.json').read_text())['fold'] == 3
    split = pd.read_csv(local / 'split.csv')
    assert split.subset.value_counts().to_dict() == {'train': 8, 'valid': 4}
    assert split[split.subset == 'valid']['index'].tolist() == [0, 1, 2, 3]
    assert (local / 'loss_curve.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    for f in ('best_model', 'final_model'):
        assert sorted(p.name for p in (local / f).iterdir()) == ['config.json', 'model.json', 'model.safetensors']
    art = Path(urlparse(tracked.run.info.artifact_uri).path)
    assert art.is_relative_to(tracked.dir / 'mlartifacts') and (art / 'best_model' / 'model.safetensors').is_file()


def test_load_model_from_run_restores_weights_and_config(tracked, tmp_path):
    rid, uri = tracked.run_id, tracked.uri
    final = load_model_from_run(rid, uri, which='final', device='cpu')
    for k, v in tracked.learn.model.state_dict().items(): assert torch.equal(final.model.state_dict()[k], v), k
    best = load_model_from_run(rid, uri, device='cpu')
    be = int(tracked.run.data.metrics['best_epoch'])
    for k, v in tracked.snaps.states[be].items(): assert torch.equal(best.model.state_dict()[k], v), k
    assert best.config == final.config == CFG and [type(t) for t in best.pre_patch_tfms] == [tio.ZNormalization]
    assert best.description['extra']['best_epoch'] == be
    vol = tmp_path / 'case.nii.gz'
    write_nifti(torch.rand(1, 12, 10, 9), np.diag([1.5, 1.5, 2., 1.]), vol)
    preds = patch_inference(best.model, best.config, [vol], pre_inference_tfms=best.pre_patch_tfms, progress=False)
    assert tuple(preds[0].shape) == (1, 12, 10, 9) and set(torch.unique(preds[0]).tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="'best' or 'final'"): load_model_from_run(rid, uri, which='last')
    with pytest.raises(ValueError, match='not found'): load_model_from_run('0' * 32, uri)


@pytest.mark.parametrize('event,exc,status', [('after_epoch', RuntimeError, 'FAILED'), ('after_loss', RuntimeError, 'FAILED'),
                                              ('before_validate', KeyboardInterrupt, 'KILLED')])
def test_raising_fit_ends_run_failed_and_reraises(tracked, event, exc, status):
    learn, c = make_learn(1), tracked.client
    cb = MLflowCallback(experiment_name='test_exp', tracking_uri=tracked.uri)
    with pytest.raises(exc, match='loss exploded'), learn.no_bar(): learn.fit(3, 1e-3, cbs=[cb, raiser(event, exc)])
    run = c.get_run(cb.run_id)
    assert run.info.status == status and 'loss exploded' in run.data.tags['patchfm.error'] and run.info.end_time
    assert len(history(c, cb.run_id, 'valid_loss')) == 1  # epoch 0 only
    names = {a.path for a in c.list_artifacts(cb.run_id)}
    assert 'best_model' in names and 'final_model' not in names and 'loss_curve.png' in names
    assert not {'_with_events', 'fit', '__call__'} & set(vars(learn))  # nothing of fastai's is patched on the learner
    failed = cb.run_id
    with pytest.raises(exc, match='loss exploded'), learn.no_bar(): learn.fit(3, 1e-3, cbs=[cb, raiser(event, exc)])
    assert cb.run_id != failed and c.get_run(cb.run_id).info.status == status  # a second failure is caught as well
    with learn.no_bar(): learn.fit(1, 1e-3, cbs=[cb])  # the learner and the callback work on
    assert len(set(cb.run_ids)) == 3 and c.get_run(cb.run_id).info.status == 'FINISHED'


class ValidateEachEpoch(Callback):
    "A callback that runs a nested `learn.validate()` inside the fit (validate sends after_epoch too: no recursion)"
    order, busy = 60, False
    def after_epoch(self):
        if self.busy: return
        self.busy = True
        try: self.learn.validate()
        finally: self.busy = False


@pytest.mark.parametrize('learner', [PatchLearner, Learner])
def test_one_run_per_fit_and_none_for_validate_getpreds_lrfind(tracked, tmp_path, learner):
    c = tracked.client
    learn = make_learn(2, learner=learner)
    learn.path = tmp_path  # lr_find saves a temporary model there
    cb = MLflowCallback(experiment_name=f'one_run_per_fit_{learner.__name__}', tracking_uri=tracked.uri)
    learn.add_cb(cb)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
        learn.validate(); learn.get_preds()
        learn.fit(2, 1e-3, cbs=[ValidateEachEpoch()])
        learn.lr_find(num_it=4, show_plot=False)
    learn.remove_cb(cb)
    clone = pickle.loads(pickle.dumps(cb))  # what learn.export() does with attached callbacks: the MLflow client is left out
    assert clone._client is None and clone.tracking_uri == cb.tracking_uri and cb._client is not None
    exp = c.get_experiment_by_name(f'one_run_per_fit_{learner.__name__}')
    runs = c.search_runs([exp.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(cb.run_ids) and len(runs) == 2
    assert all(r.info.status == 'FINISHED' for r in runs)
    assert [m.step for m in c.get_metric_history(cb.run_ids[1], 'valid_loss')] == [0, 1]  # nested validate logged nothing


def test_fine_tune_runs_name_the_fit_method(tracked):
    c = tracked.client
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.Conv3d(2, 2, 1))
    learn = make_learn(7, patch_config=False, model=net, splitter=lambda m: [list(m[0].parameters()), list(m[1].parameters())])
    cb = MLflowCallback(experiment_name='test_exp', tracking_uri=tracked.uri, log_model=False)
    with learn.no_bar(), learn.no_logging(): learn.fine_tune(1, 1e-3, freeze_epochs=1, cbs=[cb])
    assert len(cb.run_ids) == 2  # fine_tune makes two fits
    for rid, pct in zip(cb.run_ids, (0.99, 0.3)):
        run = c.get_run(rid)
        p = run.data.params
        assert run.info.status == 'FINISHED' and run.data.tags['patchfm.fit_method'] == p['fit_method'] == 'fine_tune > fit_one_cycle > fit'
        assert float(p['fit_pct_start']) == pct and float(p['fit_base_lr']) == 1e-3 and p['fit_freeze_epochs'] == '1'


def test_plain_learner_failed_run_is_ended_by_the_next_fit(tracked):
    "A plain fastai Learner says nothing when a fit raises: its run stays open until the next fit, which ends it FAILED"
    c = tracked.client
    learn = make_learn(8, learner=Learner)
    cb = MLflowCallback(experiment_name='plain_learner', tracking_uri=tracked.uri)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 1e-3, cbs=[cb])
        first = cb.run_id
        with pytest.raises(RuntimeError, match='loss exploded'): learn.fit(3, 1e-3, cbs=[cb, raiser('after_epoch')])
        failed = cb.run_id
        assert c.get_run(failed).info.status == 'RUNNING'  # nobody told the callback yet
        learn.validate()  # a validation in between is no new fit
        assert c.get_run(failed).info.status == 'RUNNING'
        learn.fit(1, 1e-3, cbs=[cb])
    runs = [c.get_run(r) for r in (first, failed, cb.run_id)]
    assert len(set(cb.run_ids)) == 3 and [r.info.status for r in runs] == ['FINISHED', 'FAILED', 'FINISHED']
    assert runs[1].data.tags['patchfm.error'] == 'the previous fit stopped without reaching after_fit'
    assert len(history(c, failed, 'valid_loss')) == 1 and 'best_model' in {a.path for a in c.list_artifacts(failed)}
    assert len(history(c, cb.run_id, 'valid_loss')) == 1
    assert 'fit_method' not in runs[0].data.params and 'patchfm.fit_method' not in runs[0].data.tags  # a plain Learner does not say
    assert float(runs[0].data.params['lr']) == pytest.approx(1e-3) and runs[0].data.params['lr_schedule'] == 'ParamScheduler'


def test_run_left_open_is_ended_at_exit(tracked):
    "A script whose plain-Learner fit crashes: the run is ended FAILED when Python exits"
    uri = tracked.uri  # a store whose tables exist already: the script starts faster
    script = textwrap.dedent(f"""
        import torch
        import fastai.callback.all  # noqa: F401  (no_bar)
        from fastai.callback.core import Callback
        from fastai.data.core import DataLoaders
        from fastai.learner import Learner
        from patchfm.tracking import MLflowCallback
        x = torch.rand(4, 1, 4, 4, 4)
        dls = DataLoaders.from_dsets(list(zip(x, 2 * x)), list(zip(x, 2 * x)), bs=2, device='cpu', num_workers=0)
        class Boom(Callback):
            order = 90  # after the epoch is logged
            def after_epoch(self):
                if self.epoch == 1: raise RuntimeError('loss exploded')
        learn = Learner(dls, torch.nn.Conv3d(1, 1, 1), loss_func=torch.nn.MSELoss())
        cb = MLflowCallback(experiment_name='at_exit', tracking_uri={uri!r})
        with learn.no_bar(), learn.no_logging(): learn.fit(3, 1e-3, cbs=[cb, Boom()])
        """)
    r = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert r.returncode == 1 and 'loss exploded' in r.stderr
    c = tracked.client
    (run,) = c.search_runs([c.get_experiment_by_name('at_exit').experiment_id])
    assert run.info.status == 'FAILED' and run.data.tags['patchfm.error'] == 'the process ended before the fit reached after_fit'
    assert len(history(c, run.info.run_id, 'valid_loss')) == 2
    assert {'best_model', 'loss_curve.png'} <= {a.path for a in c.list_artifacts(run.info.run_id)}


def test_unreachable_http_store_is_a_warning(monkeypatch):
    monkeypatch.setenv('MLFLOW_HTTP_REQUEST_MAX_RETRIES', '0')
    monkeypatch.setenv('MLFLOW_HTTP_REQUEST_TIMEOUT', '3')
    learn = make_learn(3)
    cb = MLflowCallback(tracking_uri=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.warns(TrackingWarning, match='connect to the store'), learn.no_bar(): learn.fit(2, 1e-3, cbs=[cb])
    assert len(learn.recorder.values) == 2 and cb.run_id is None and '_with_events' not in learn.__dict__


def test_unusable_sqlite_path_is_a_warning(tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    learn = make_learn(4)
    cb = MLflowCallback(tracking_uri=f"sqlite:///{blocker}/sub/mlflow.db")
    with pytest.warns(TrackingWarning, match='connect to the store'), learn.no_bar(): learn.fit(2, 1e-3, cbs=[cb])
    assert len(learn.recorder.values) == 2 and cb.run_id is None


def test_failures_during_the_run_are_warnings(tracked):
    "The run's artifact folder becomes unwritable mid-fit: artifacts fail with warnings, metrics and the status still land"
    c = tracked.client
    learn = make_learn(5)
    cb = MLflowCallback(experiment_name='test_exp', tracking_uri=tracked.uri)
    class BreakArtifacts(Callback):
        order = 60
        def after_epoch(self):
            if self.epoch == 0:
                art = Path(urlparse(c.get_run(cb.run_id).info.artifact_uri).path)
                shutil.rmtree(art); art.write_text('blocked')
    with pytest.warns(TrackingWarning, match='log the loss curve'), learn.no_bar(): learn.fit(2, 1e-3, cbs=[cb, BreakArtifacts()])
    assert len(learn.recorder.values) == 2
    assert c.get_run(cb.run_id).info.status == 'FINISHED' and len(history(c, cb.run_id, 'valid_loss')) == 2


def test_model_without_config_logs_weights_only_and_slices_give_per_group_lrs(tracked):
    c = tracked.client
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.Conv3d(2, 2, 1))
    learn = make_learn(6, patch_config=False, model=net, splitter=lambda m: [list(m[0].parameters()), list(m[1].parameters())])
    cb = MLflowCallback(experiment_name='test_exp', tracking_uri=tracked.uri, monitor='accumulated_dice', comp=np.greater)
    with pytest.warns(TrackingWarning, match='cannot be rebuilt'), learn.no_bar(): learn.fit_one_cycle(1, slice(1e-4, 1e-2), cbs=[cb])
    run = c.get_run(cb.run_id)
    p = run.data.params
    assert run.info.status == 'FINISHED' and not any(k.startswith('patch_') for k in p)
    assert p['model_class'] == 'torch.nn.modules.container.Sequential' and p['n_param_groups'] == '2'
    assert json.loads(p['lr']) == pytest.approx([1e-4, 1e-2]) and json.loads(p['lr_start']) == pytest.approx([4e-6, 4e-4])
    assert [a.path for a in c.list_artifacts(cb.run_id, 'final_model')] == ['final_model/model.safetensors']
    with pytest.raises(FileNotFoundError, match='cannot be rebuilt'): load_model_from_run(cb.run_id, tracked.uri, which='final')


def test_monitor_checked_at_creation(tmp_path):
    learn, uri = make_learn(), f"sqlite:///{tmp_path}/m.db"
    with pytest.raises(ValueError, match=r"monitor='dice'.*accumulated_dice"): create_mlflow_callback(learn, tracking_uri=uri, monitor='dice')
    assert create_mlflow_callback(learn, tracking_uri=uri, monitor='accumulated_dice_class_1').comp is np.greater
    assert create_mlflow_callback(learn, tracking_uri=uri).comp is np.less
    assert not (tmp_path / 'm.db').exists()  # nothing is opened before a fit


def test_flatten_metric():
    assert flatten_metric('valid_loss', torch.tensor(0.25)) == {'valid_loss': 0.25}
    r = flatten_metric('accumulated_dice', torch.tensor([0.5, 0.7]), first_class=1)
    assert r == pytest.approx({'accumulated_dice_class_1': 0.5, 'accumulated_dice_class_2': 0.7, 'accumulated_dice': 0.6})
    assert flatten_metric('x', None) == {} and flatten_metric('time', '00:01') == {}


def test_default_store_is_per_user_and_overridable(monkeypatch, tmp_path):
    monkeypatch.delenv('MLFLOW_TRACKING_URI', raising=False)
    monkeypatch.setenv('XDG_DATA_HOME', str(tmp_path))
    assert user_data_dir(sys_platform='linux') == tmp_path / 'patchfm'
    monkeypatch.setenv('XDG_DATA_HOME', 'relative/dir')  # not absolute: ignored, as the XDG spec says
    assert user_data_dir(sys_platform='linux') == Path.home() / '.local' / 'share' / 'patchfm'
    assert user_data_dir(sys_platform='darwin') == Path.home() / 'Library' / 'Application Support' / 'patchfm'
    monkeypatch.setenv('LOCALAPPDATA', str(tmp_path / 'local'))
    assert user_data_dir(sys_platform='win32') == tmp_path / 'local' / 'patchfm'
    if not str(user_data_dir()).startswith(str(tmp_path)): monkeypatch.setenv('XDG_DATA_HOME', str(tmp_path))
    uri = default_tracking_uri()
    assert uri == f"sqlite:///{(user_data_dir() / 'mlflow.db').resolve().as_posix()}" and MLflowCallback().tracking_uri == uri
    pkg = Path(patchfm.__file__).resolve().parent
    assert pkg not in Path(uri[len('sqlite:///'):]).parents
    monkeypatch.setenv('MLFLOW_TRACKING_URI', 'http://127.0.0.1:5999')
    assert default_tracking_uri() == resolve_tracking_uri(None) == MLflowCallback().tracking_uri == 'http://127.0.0.1:5999'
    assert MLflowCallback(tracking_uri=tmp_path / 'x.db').tracking_uri == f"sqlite:///{(tmp_path / 'x.db').resolve().as_posix()}"
    with pytest.raises(ValueError, match='installed package'): resolve_tracking_uri(pkg / 'mlflow.db')


def test_split_frame_lists_subject_paths(tmp_path):
    learn = make_learn(n_train=4, n_valid=2)
    def subjects(prefix, n):
        out = []
        for i in range(n):
            img, msk = tmp_path / f'{prefix}{i}_img.nii.gz', tmp_path / f'{prefix}{i}_msk.nii.gz'
            write_nifti(torch.rand(1, 4, 4, 4), np.eye(4), img); write_nifti(torch.zeros(1, 4, 4, 4, dtype=torch.uint8), np.eye(4), msk)
            out.append(tio.Subject(image=tio.ScalarImage(img), mask=tio.LabelMap(msk)))
        return tio.SubjectsDataset(out)
    learn.dls.train.subjects_dataset, learn.dls.valid.subjects_dataset = subjects('tr', 3), subjects('va', 2)
    df = split_frame(learn.dls)
    assert df.subset.tolist() == ['train'] * 3 + ['valid'] * 2
    assert df.image.tolist()[-1] == str(tmp_path / 'va1_img.nii.gz') and df['mask'].tolist()[0] == str(tmp_path / 'tr0_msk.nii.gz')
    p = learner_params(learn)
    assert (p['n_train_subjects'], p['n_valid_subjects'], p['n_train_items']) == (3, 2, 4)


def _request(url, body=None):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={'Content-Type': 'application/json'})
    with opener.open(req, timeout=30) as r: return json.loads(r.read())


def test_ui_serves_the_runs_on_loopback_and_stops(tracked):
    ui = MLflowUIManager(backend_store_uri=tracked.uri, timeout=150)
    with ui:
        url, st = ui.url, ui.status()
        assert url.startswith('http://127.0.0.1:') and st['running'] and ui.start_ui() == url  # idempotent
        root = psutil.Process(st['pid'])
        procs = [root] + root.children(recursive=True)
        listening = [c.laddr for p in procs for c in p.net_connections('tcp') if c.status == psutil.CONN_LISTEN]
        assert listening and all(a.ip == '127.0.0.1' and a.port == int(url.rsplit(':', 1)[1]) for a in listening)
        exps = _request(f"{url}/api/2.0/mlflow/experiments/search", {'max_results': 100})['experiments']
        exp_id = next(e['experiment_id'] for e in exps if e['name'] == 'test_exp')
        runs = _request(f"{url}/api/2.0/mlflow/runs/search", {'experiment_ids': [exp_id], 'max_results': 100})['runs']
        assert tracked.run_id in {r['info']['run_id'] for r in runs}
        files = _request(f"{url}/api/2.0/mlflow/artifacts/list?run_id={tracked.run_id}")['files']
        assert {'best_model', 'loss_curve.png', 'split.csv'} <= {f['path'] for f in files}
    assert not ui.is_running and ui.status()['running'] is False and ui.log_path is None
    assert all(gone(p) for p in procs)


def test_ui_errors(tmp_path):
    with pytest.raises(ValueError, match='already a tracking server'): MLflowUIManager(backend_store_uri='http://127.0.0.1:5000')
    uri = f"sqlite:///{tmp_path}/ui.db"
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f'port {port} .* in use'): MLflowUIManager(port=port, backend_store_uri=uri).start_ui()
    ui = MLflowUIManager(backend_store_uri=uri, timeout=0.3)
    with pytest.raises(TimeoutError, match=r'did not answer(.|\n)*last lines of'): ui.start_ui()
    assert not ui.is_running
    mine = [p for p in psutil.process_iter(['cmdline']) if uri in ' '.join(p.info['cmdline'] or [])]
    assert all(gone(p) for p in mine)
    ui.stop(); ui.stop()  # stopping a stopped manager is harmless
