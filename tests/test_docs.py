"Docs: tutorials carry the outputs of a real run; `tools/docs.py --out DIR` builds a site whose links resolve, in a real browser too."
from pathlib import Path
from urllib.parse import unquote, urlsplit
import json, re, shutil, subprocess, sys
import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / 'nbs' / 'tutorials'
OTHERS = set()  # every tutorial ships with outputs (the top-k one with those of its full run)


def _outputs(nb_path):
    nb = json.loads(nb_path.read_text())
    return [o for c in nb['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', [])]


def _tutorials():
    return sorted(p for p in TUTORIALS.glob('*.ipynb') if p.name not in OTHERS or _outputs(p))


@pytest.mark.parametrize('nb', _tutorials(), ids=lambda p: p.name)
def test_tutorial_has_stored_outputs(nb):
    outs = _outputs(nb)
    assert outs, f'{nb.name} has no stored outputs: run `python tools/docs.py --execute {nb.relative_to(ROOT)}`'
    assert not [o for o in outs if o['output_type'] == 'error'], f'{nb.name} stores an error output'
    assert any('image/png' in o.get('data', {}) for o in outs), f'{nb.name} stores no figure (image/png)'
    assert any(o['output_type'] in ('execute_result', 'display_data') and
               ('text/html' in o.get('data', {}) or 'text/plain' in o.get('data', {})) for o in outs), \
        f'{nb.name} stores no result (table or value)'
    assert str(ROOT) not in json.dumps(outs), f"{nb.name}'s outputs contain this machine's path {ROOT}"


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp('site')
    r = subprocess.run([sys.executable, str(ROOT / 'tools' / 'docs.py'), '--out', str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _links(page):
    return re.findall(r'(?:href|src)="([^"]*)"', page.read_text())


def test_site_pages(site):
    pages = sorted(site.glob('*.html'))
    names = {p.name for p in pages}
    assert 'index.html' in names and len(pages) >= 10, names
    nbs = sorted((ROOT / 'nbs').glob('[0-9]*.ipynb')) + sorted(TUTORIALS.glob('*.ipynb'))
    assert {f'{p.stem}.html' for p in nbs if p.parent.name == 'nbs'} <= names
    assert {f'tutorial_{p.stem}.html' for p in nbs if p.parent == TUTORIALS} <= names
    index = (site / 'index.html').read_text()
    assert '<title>' in index and 'patchfm' in index and 'tools/docs.py' in index  # the README page names the command
    grid = (site / '03_grid.html').read_text()
    assert 'id="patch_starts"' in grid and 'class="params"' in grid  # show_doc: anchor and docments table
    assert 'data:image/png;base64' in (site / 'tutorial_patch_segmentation.html').read_text()  # stored figures


def test_site_links_resolve(site):
    bad = []
    for page in site.glob('*.html'):
        for href in _links(page):
            u = urlsplit(href)
            if u.scheme or u.netloc or href.startswith('data:'): continue
            target = (page.parent / unquote(u.path)).resolve() if u.path else page
            if not target.is_file(): bad.append(f'{page.name}: {href} (no file)')
            elif u.fragment and target.suffix == '.html' and f'id="{u.fragment}"' not in target.read_text():
                bad.append(f'{page.name}: {href} (no anchor)')
    assert not bad, '\n'.join(bad[:30])


CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')


def _dom(url, tmp_path):
    args = [CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
            '--disable-component-update', '--disable-sync', '--no-first-run', f'--user-data-dir={tmp_path / "profile"}',
            '--dump-dom', url]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.mark.skipif(not CHROMIUM, reason='chromium is not installed (apt-get install -y chromium; .ci/run installs it)')
def test_site_in_headless_chromium(site, tmp_path):
    dom = _dom((site / 'index.html').as_uri() + '?q=patch_starts', tmp_path)
    assert re.search(r'<title>[^<]*patchfm[^<]*</title>', dom)
    nav = re.search(r'<nav id="sidebar">(.*?)</nav>', dom, re.S).group(1)
    hrefs = re.findall(r'href="([^"]+)"', nav)
    assert 'tutorial_patch_segmentation.html' in hrefs and '03_grid.html' in hrefs and len(hrefs) >= 10
    # the search script ran in the browser and found the API name (its index loads from file://)
    assert 'href="03_grid.html#patch_starts"' in re.search(r'<ul id="search-results">(.*?)</ul>', dom, re.S).group(1)
    # a page reached through the sidebar loads too, with its figure
    dom = _dom((site / 'tutorial_patch_segmentation.html').as_uri(), tmp_path)
    assert 'Patch-based segmentation' in re.search(r'<title>(.*?)</title>', dom).group(1)
    assert 'data:image/png;base64' in dom
