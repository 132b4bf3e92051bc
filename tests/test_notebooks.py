"Every notebook in nbs/ runs as a test (cells flagged `#| slow` or `#| notest` are skipped)."
from pathlib import Path
import os, pytest

NBS = Path(__file__).resolve().parent.parent / 'nbs'
NOTEBOOKS = sorted(p for p in NBS.rglob('*.ipynb') if not any(part.startswith(('.', '_')) for part in p.relative_to(NBS).parts))


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[str(p.relative_to(NBS)) for p in NOTEBOOKS])
def test_notebook_runs(nb, tmp_path, monkeypatch):
    from nbdev.test import test_nb
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    monkeypatch.setenv('PATCHFM_CI', '1')
    monkeypatch.chdir(nb.parent)
    ok, secs = test_nb(nb, skip_flags=['notest', 'slow'], do_print=False)
    assert ok, f"{nb.name} failed (see the traceback above)"
