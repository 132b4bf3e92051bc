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
