"The patchfm command: analysis-only demo, analyze, predict errors (the full demo runs in nbs/15_cli.ipynb)."
import json, subprocess, sys
import pytest
from patchfm.cli import main
from patchfm.config import PatchConfig


def test_demo_analysis_only(tmp_path, capsys):
    assert main(['demo', '--output', str(tmp_path), '--n-cases', '4', '--n-test', '1', '--epochs', '0', '--quiet']) == 0
    cfg = PatchConfig.load(tmp_path / 'patch_config.json')
    assert cfg.target_spacing == (2.0, 2.0, 2.0) and cfg.patch_size == (48, 48, 48)
    assert cfg.sampler_type == 'label' and set(cfg.label_probabilities) == {0, 1, 2}
    assert (tmp_path / 'data' / 'cases.csv').exists()
    assert 'analysis only' in capsys.readouterr().out


def test_analyze_paths_and_csv(tmp_path, capsys):
    from patchfm.demo import make_demo_dataset
    df = make_demo_dataset(tmp_path / 'd', n_cases=3, seed=5)
    assert main(['analyze', *df.label.tolist(), '--output', str(tmp_path / 'a'), '--quiet']) == 0
    assert (tmp_path / 'a' / 'patch_config.json').exists()
    df.to_csv(tmp_path / 'c.csv', index=False)
    assert main(['analyze', str(tmp_path / 'c.csv'), '--output', str(tmp_path / 'b'), '--quiet']) == 0
    assert main(['analyze', str(tmp_path / 'c.csv'), '--label-col', 'nolabel', '--quiet']) == 2
    assert "no column 'nolabel'" in capsys.readouterr().err


def test_demo_csv_errors(tmp_path, capsys):
    (tmp_path / 'x.csv').write_text('img,lab\na.nii.gz,b.nii.gz\n')
    assert main(['demo', '--csv', str(tmp_path / 'x.csv'), '--output', str(tmp_path / 'o')]) == 2
    assert "no column 'image'" in capsys.readouterr().err


def test_predict_missing_model(tmp_path, capsys):
    assert main(['predict', '--model', str(tmp_path / 'none'), '--input', 'x.nii.gz', '--output', str(tmp_path / 'o')]) == 2
    assert 'model.safetensors' in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match='model.safetensors'):  # --debug: the exception itself
        main(['--debug', 'predict', '--model', str(tmp_path / 'none'), '--input', 'x.nii.gz', '--output', str(tmp_path / 'o')])


def test_console_script_help():
    out = subprocess.run([sys.executable, '-m', 'patchfm.cli', '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and 'demo' in out.stdout and 'predict' in out.stdout


def test_train_errors(tmp_path, capsys):
    "patchfm train: one-line errors for bad arguments, CSVs, validation columns and configs"
    (tmp_path / 'c.csv').write_text('image,label,v\na.nii.gz,b.nii.gz,maybe\nc.nii.gz,d.nii.gz,no\n')
    run = lambda *a: main(['train', '--csv', str(tmp_path / 'c.csv'), '--out', str(tmp_path / 'o'), *a])
    cases = [(('--epochs', '0'), '--epochs must be >= 1'), (('--lr', '0'), '--lr must be > 0'),
             (('--valid-pct', '1'), '--valid-pct must be in [0, 1)'), (('--flip-axes', '3'), '--flip-axes must be among 0 1 2'),
             (('--config', str(tmp_path / 'none.json')), 'no such PatchConfig file'),
             (('--valid-col', 'w'), "no column 'w'"), (('--valid-col', 'v'), "column 'v' on line 2: expected true/false")]
    for args, msg in cases:
        assert run(*args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith('patchfm: error:') and msg in err and err.count('\n') == 1, (args, err)
    (tmp_path / 'all.csv').write_text('image,label,v\na.nii.gz,b.nii.gz,yes\n')
    assert main(['train', '--csv', str(tmp_path / 'all.csv'), '--out', str(tmp_path / 'o'), '--valid-col', 'v']) == 2
    assert 'every row as validation' in capsys.readouterr().err
    assert main(['train', '--csv', str(tmp_path / 'nothere.csv'), '--out', str(tmp_path / 'o')]) == 2
    assert 'no such CSV file' in capsys.readouterr().err
    assert run() == 2  # the images do not exist: the analysis names the file
    assert 'b.nii.gz' in capsys.readouterr().err


def test_train_with_config_and_predict_parts(tmp_path, capsys):
    "A one-epoch run from a given --config; the model predicts through `patchfm predict` in two parts"
    from patchfm.demo import make_demo_dataset
    from patchfm.serialisation import load_model
    df = make_demo_dataset(tmp_path / 'd', n_cases=4, seed=2)
    df.to_csv(tmp_path / 'c.csv', index=False)
    cfg = PatchConfig(patch_size=16, samples_per_volume=2, queue_length=4, queue_num_workers=0, target_spacing=(4.0,) * 3,
                      sampler_type='label', label_probabilities={0: 0.4, 1: 0.3, 2: 0.3})
    cfg.save(tmp_path / 'cfg.json')
    assert main(['train', '--csv', str(tmp_path / 'c.csv'), '--out', str(tmp_path / 'run'), '--config', str(tmp_path / 'cfg.json'),
                 '--epochs', '1', '--quiet', '--sw-every', '0', '--samples-per-volume', '3']) == 0
    assert PatchConfig.load(tmp_path / 'run' / 'patch_config.json') == cfg.replace(samples_per_volume=3)
    info = json.loads((tmp_path / 'run' / 'train_info.json').read_text())
    assert info['world_size'] == 1 and len(info['train_subjects']) == 3 and len(info['valid_subjects']) == 1
    assert set(info['rank_subjects'][0]) <= set(info['train_subjects']) and info['final_metrics']
    assert load_model(tmp_path / 'run' / 'model', device='cpu').config == cfg.replace(samples_per_volume=3)
    capsys.readouterr()
    imgs = df.image.tolist()[:3]
    for k in range(2):
        assert main(['predict', '--model', str(tmp_path / 'run' / 'model'), '--input', *imgs, '--output', str(tmp_path / 'p'),
                     '--num-parts', '2', '--part-id', str(k), '--quiet']) == 0
    assert len(capsys.readouterr().out.split()) == 3 and len(list((tmp_path / 'p').iterdir())) == 3
    assert main(['predict', '--model', str(tmp_path / 'run' / 'model'), '--input', *imgs, '--output', str(tmp_path / 'p'),
                 '--num-parts', '2', '--quiet']) == 2
    assert '--num-parts and --part-id go together' in capsys.readouterr().err
    assert main(['predict', '--model', str(tmp_path / 'run' / 'model'), '--input', *imgs, '--output', str(tmp_path / 'p'),
                 '--num-parts', '2', '--part-id', '2', '--quiet']) == 2
    assert 'part_id must be in [0, num_parts=2)' in capsys.readouterr().err
