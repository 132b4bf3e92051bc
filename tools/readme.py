"Write README.md from nbs/index.ipynb (markdown cells as they are, code cells as python blocks)."
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent


def render(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text())
    parts = []
    for cell in nb['cells']:
        src = ''.join(cell['source']).rstrip()
        if not src or src.startswith('#| hide'): continue
        if cell['cell_type'] == 'markdown': parts.append(src)
        elif cell['cell_type'] == 'code':
            lines = [l for l in src.splitlines() if not l.startswith('#|')]
            if lines: parts.append('```python\n' + '\n'.join(lines) + '\n```')
    return '<!-- generated from nbs/index.ipynb by tools/readme.py: edit the notebook, not this file -->\n\n' + '\n\n'.join(parts) + '\n'


if __name__ == '__main__':
    text = render(root / 'nbs' / 'index.ipynb')
    out = root / 'README.md'
    if '--check' in sys.argv:
        if out.read_text() != text: sys.exit('README.md is out of date: run `python tools/readme.py`')
    else: out.write_text(text)
