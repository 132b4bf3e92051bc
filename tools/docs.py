"""Build patchfm's offline docs site, and store real outputs in the tutorials.

    python tools/docs.py --out DIR                 # every notebook (with its stored outputs) -> DIR/*.html
    python tools/docs.py --execute NB [NB ...]     # run notebooks in place (PATCHFM_CI=1) and keep their outputs

The site is plain HTML that works from file:// (no server, no network, no JavaScript needed to read it): nbconvert's
`HTMLExporter` (basic template) renders each notebook's cells and stored outputs, a small Jinja page template adds the
sidebar, and each API module gets a `show_doc`-style reference (signature, docstring, docments parameter table for
every name in the module's `__all__`) made by introspecting the installed package. `DIR/index.html` is the README's
page (nbs/index.ipynb). Notebooks are never executed at build time.
"""
import argparse, html, importlib, inspect, json, os, re, shutil, sys
from pathlib import Path
from urllib.parse import urlsplit

root = Path(__file__).resolve().parent.parent
NBS = root / 'nbs'
REPO_URL = 'https://github.com/patchfm/patchfm/blob/main/'
MD_PAGES = {'DESIGN.md': 'design.html', 'CONTRIBUTING.md': 'contributing.html'}


# ---------------------------------------------------------------- executing notebooks (tutorial outputs)
def _skipped(src: str) -> bool:
    "Cells nbdev's test runner skips: `#| eval: false` and the `notest`/`slow` flags."
    for line in src.splitlines():
        m = re.match(r'#\|\s*(.*)', line.strip())
        if not m: continue
        d = m.group(1).replace(' ', '').lower()
        if d in ('eval:false', 'notest', 'slow'): return True
    return False


def execute(nb_path: Path, timeout: int = 1200) -> None:
    "Run `nb_path` in place in a fresh kernel with the small CI settings (PATCHFM_CI=1) and store its outputs."
    import nbformat
    from nbclient import NotebookClient
    nb_path = Path(nb_path).resolve()
    nb = nbformat.read(nb_path, as_version=4)
    tag = 'skip-execution'  # nbclient's own marker; added for the run only
    skip = [c for c in nb.cells if c.cell_type == 'code' and _skipped(c.source)]
    for c in skip: c.metadata.setdefault('tags', []).append(tag)
    for c in nb.cells:
        if c.cell_type == 'code': c.outputs, c.execution_count = [], None
    os.environ['PATCHFM_CI'] = '1'
    os.environ.pop('MPLBACKEND', None)  # the kernel's inline backend stores the figures as image/png
    # --matplotlib=inline: a Figure returned by a cell (patchfm's plots build Figures without pyplot) is stored as a PNG
    try: NotebookClient(nb, timeout=timeout, kernel_name='python3', skip_cells_with_tag=tag, extra_arguments=['--matplotlib=inline'],
                        resources={'metadata': {'path': str(nb_path.parent)}}).execute()
    finally:
        for c in skip:
            c.metadata['tags'].remove(tag)
            if not c.metadata['tags']: del c.metadata['tags']
    for c in nb.cells:
        c.metadata.pop('execution', None)  # timestamps: noise in diffs
        if c.cell_type == 'code':  # warnings raised inside third-party packages say nothing about the tutorial
            c.outputs = [o for o in c.outputs if not (o.output_type == 'stream' and o.name == 'stderr'
                                                      and 'site-packages/' in o.text and 'Error' not in o.text)]
    # absolute paths of this machine say nothing to a reader
    text = nbformat.writes(nb).replace(str(root) + '/', '').replace(str(root), '.')
    nb_path.write_text(text if text.endswith('\n') else text + '\n')


# ---------------------------------------------------------------- notebooks -> pages
def notebooks():
    "(source path, page file name, section) for every notebook: home, tutorials, API notebooks in order."
    out = [(NBS / 'index.ipynb', 'index.html', 'Home')]
    out += [(p, f'tutorial_{p.stem}.html', 'Tutorials') for p in sorted((NBS / 'tutorials').glob('*.ipynb'))]
    out += [(p, f'{p.stem}.html', 'API') for p in sorted(NBS.glob('[0-9]*.ipynb'))]
    return out


def _title(nb, fallback: str) -> tuple[str, str]:
    "The notebook's `# Title` and its `> summary` line."
    for c in nb.cells:
        if c.cell_type != 'markdown': continue
        m = re.search(r'^#\s+(.+)$', c.source, re.M)
        if m:
            s = re.search(r'^>\s*(.+)$', c.source, re.M)
            return m.group(1).strip(), (s.group(1).strip() if s else '')
    return fallback, ''


def _directives(src: str) -> dict:
    d = {}
    for line in src.splitlines():
        m = re.match(r'#\|\s*([\w-]+)\s*:?\s*(.*)', line.strip())
        if m: d[m.group(1).lower()] = m.group(2).strip()
    return d


def _prepare(nb):
    "Drop hidden cells and directive lines; mark exported cells (folded by the template); returns the module name or None."
    module, cells = None, []
    for c in nb.cells:
        if c.cell_type == 'raw': continue
        if c.cell_type == 'code':
            d = _directives(c.source)
            if 'default_exp' in d: module = d['default_exp']; continue
            if 'hide' in d or d.get('include', '').lower() == 'false': continue
            if d.get('echo', '').lower() == 'false' or 'exporti' in d: c.source = ''
            c.source = '\n'.join(l for l in c.source.splitlines() if not re.match(r'\s*#\|', l)).strip('\n')
            if ('export' in d or 'exports' in d) and c.source:
                c.metadata['patchfm_folded'] = True
            if not c.source and not c.get('outputs'): continue
        cells.append(c)
    nb.cells = cells
    return module


def _link(href: str, src_dir: Path, pages: dict) -> str:
    "Rewrite a link written for the repo (notebook, .md, any file) into one that works in the site."
    u = urlsplit(href)
    if u.scheme or u.netloc or not u.path: return href
    target = (src_dir / u.path).resolve()
    if not target.exists() and (root / u.path).exists(): target = (root / u.path).resolve()  # README links: from the root
    frag = f'#{u.fragment}' if u.fragment else ''
    if target in pages: return pages[target] + frag
    try: rel = target.relative_to(root)
    except ValueError: return href
    if target.is_file() and target.suffix.lower() in ('.png', '.jpg', '.jpeg', '.gif', '.svg'):  # a picture: ship it
        dest = _ASSETS[0] / 'assets' / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, dest)
        return 'assets/' + rel.as_posix()
    return REPO_URL + rel.as_posix() + frag  # any other file of the repo: its page on the forge


_ASSETS = [Path('.')]  # the site folder, set by build()


def _fix_links(body: str, src_dir: Path, pages: dict) -> str:
    return re.sub(r'(href|src)="([^"]*)"',
                  lambda m: f'{m.group(1)}="{html.escape(_link(html.unescape(m.group(2)), src_dir, pages))}"'
                  if not m.group(2).startswith(('data:', '#')) else m.group(0), body)


def _fix_fragments(pages: list[Path]) -> None:
    "Point `page.html#anchor` links written GitHub-style (lower case) at the anchor nbconvert made for that heading."
    ids = {p.name: set(re.findall(r' id="([^"]+)"', p.read_text())) for p in pages}
    key = lambda a: re.sub(r'[^a-z0-9-]', '', a.lower())
    lower = {n: {key(i): i for i in s} for n, s in ids.items()}
    for p in pages:
        def fix(m):
            page, frag = m.group(2) or p.name, m.group(3)
            if page not in ids or frag in ids[page]: return m.group(0)
            real = lower[page].get(key(frag))
            return f'{m.group(1)}"{m.group(2) or ""}#{real}"' if real else m.group(0)
        text = p.read_text()
        new = re.sub(r'(href=)"([^"#:]*\.html)?#([^"]+)"', fix, text)
        if new != text: p.write_text(new)


# ---------------------------------------------------------------- show_doc-style API reference
def _fmt_anno(a) -> str:
    if a is inspect.Parameter.empty or a is None: return ''
    return a if isinstance(a, str) else inspect.formatannotation(a)


def _fmt_default(d) -> str:
    if d is inspect.Parameter.empty: return ''
    r = repr(d)
    return r if len(r) <= 60 else r[:57] + '...'


def _sig(obj) -> str:
    for kw in ({'eval_str': True}, {}):  # string annotations (from __future__) evaluated where they can be
        try: return str(inspect.signature(obj, **kw))
        except Exception: pass
    return ''


def _params_table(obj) -> str:
    from fastcore.docments import docments
    try: docs = docments(obj, full=True)
    except Exception: return ''
    rows = [(n, v) for n, v in docs.items() if n != 'return' and n not in ('self', 'cls')]
    if not rows: return ''
    ret = docs.get('return')
    out = ['<table class="params"><thead><tr><th></th><th>Type</th><th>Default</th><th>Details</th></tr></thead><tbody>']
    for n, v in rows:
        out.append(f'<tr><td><code>{html.escape(n)}</code></td><td>{html.escape(_fmt_anno(v.get("anno")))}</td>'
                   f'<td>{html.escape(_fmt_default(v.get("default")))}</td><td>{html.escape(v.get("docment") or "")}</td></tr>')
    if ret and (ret.get('docment') or _fmt_anno(ret.get('anno'))):
        out.append(f'<tr class="ret"><td><b>Returns</b></td><td>{html.escape(_fmt_anno(ret.get("anno")))}</td><td></td>'
                   f'<td>{html.escape(ret.get("docment") or "")}</td></tr>')
    out.append('</tbody></table>')
    return ''.join(out)


def _doc_html(doc: str | None) -> str:
    import mistune
    return mistune.html(doc) if doc else ''


def show_doc(name: str, obj, level: int = 3, owner: str = '') -> str:
    "HTML for one name: heading, signature, docstring, parameter table."
    anchor = f'{owner}.{name}' if owner else name
    if inspect.isclass(obj):
        kind, sig_obj = 'class', obj
    elif callable(obj):
        kind, sig_obj = ('def' if not owner else 'method'), obj
    else:
        r = repr(obj)
        return (f'<div class="doc" id="{anchor}"><h{level}><code>{html.escape(name)}</code></h{level}>'
                f'<pre class="sig">{html.escape(name)} = {html.escape(r if len(r) < 200 else r[:197] + "...")}</pre></div>')
    src_mod = getattr(obj, '__module__', '') or ''
    out = [f'<div class="doc" id="{anchor}"><h{level}><code>{html.escape(name)}</code></h{level}>',
           f'<pre class="sig"><span class="kw">{kind}</span> {html.escape(name)}{html.escape(_sig(sig_obj))}</pre>']
    if src_mod and not src_mod.startswith('patchfm') and not owner:
        out.append(f'<p class="from">from <code>{html.escape(src_mod)}</code></p>')
    out.append(_doc_html(inspect.getdoc(obj)))
    out.append(_params_table(obj.__init__ if inspect.isclass(obj) and '__init__' in vars(obj) else obj))
    if inspect.isclass(obj) and src_mod.startswith('patchfm'):
        for mname, m in vars(obj).items():
            if mname.startswith('_'): continue
            f = m.__func__ if isinstance(m, (classmethod, staticmethod)) else m
            if isinstance(m, property):
                out.append(f'<div class="doc method" id="{anchor}.{mname}"><h{level+1}><code>{html.escape(name)}.{html.escape(mname)}</code> '
                           f'<small>property</small></h{level+1}>{_doc_html(inspect.getdoc(m))}</div>')
            elif inspect.isfunction(f):
                out.append(show_doc(mname, f, level + 1, owner=name).replace(f'<h{level+1}><code>{html.escape(mname)}',
                                                                             f'<h{level+1}><code>{html.escape(name)}.{html.escape(mname)}', 1))
    out.append('</div>')
    return '\n'.join(out)


def _defined(src: str) -> list[str]:
    "Top-level names a cell defines (functions, classes, assignments), in order."
    import ast
    try: tree = ast.parse(src)
    except SyntaxError: return []
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): out.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                out += [n.id for n in ast.walk(t) if isinstance(n, ast.Name)]
    return out


def add_show_docs(nb, module: str, module_pages: dict) -> tuple[list[str], str]:
    """Put the `show_doc` block of each name `patchfm.<module>` defines (its `__all__`) right after the exported cell
    that defines it, as nbdev does. Returns those names and the HTML for the end of the page: the blocks of names no
    cell defines, then the names the module re-exports (linked to their own page, or listed by library)."""
    import nbformat
    modname = f'patchfm.{module}'
    mod = importlib.import_module(modname)
    exported = [n for n in getattr(mod, '__all__', []) if hasattr(mod, n)]
    cell_names = {n for c in nb.cells if c.metadata.get('patchfm_folded') for n in _defined(c.source)}
    def home(n):
        m = getattr(getattr(mod, n), '__module__', None)
        return m if isinstance(m, str) else None
    names = [n for n in exported if home(n) == modname or (n in cell_names and not (home(n) or '').startswith('patchfm.'))]
    placed = set()
    for c in nb.cells:
        if not c.metadata.get('patchfm_folded'): continue
        here = [n for n in _defined(c.source) if n in names and n not in placed]
        if not here: continue
        placed.update(here)
        c.outputs = list(c.get('outputs', [])) + [nbformat.v4.new_output(
            'display_data', data={'text/html': '\n'.join(show_doc(n, getattr(mod, n)) for n in here)})]
    rest = [show_doc(n, getattr(mod, n)) for n in names if n not in placed]
    others = [n for n in exported if n not in names]
    ours = [n for n in others if (home(n) or '').startswith('patchfm.') and home(n)[8:] in module_pages]
    if ours:
        rest.append('<h3 id="reexported">Re-exported from other patchfm modules</h3><p class="names">' + ' '.join(
            f'<a href="{module_pages[home(n)[8:]]}#{html.escape(n)}"><code>{html.escape(n)}</code></a>' for n in ours) + '</p>')
    libs = {}
    for n in others:
        if n not in ours: libs.setdefault((home(n) or 'other').split('.')[0], []).append(n)
    if libs:
        rest.append('<h3 id="from-libraries">Re-exported from other libraries</h3>' + ''.join(
            f'<details><summary><code>{html.escape(lib)}</code>: {len(ns)} names</summary><p class="names">'
            + ' '.join(f'<code>{html.escape(n)}</code>' for n in ns) + '</p></details>' for lib, ns in sorted(libs.items())))
    return names, '\n'.join(rest)


# ---------------------------------------------------------------- the page shell
PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} – patchfm</title>
{% if summary %}<meta name="description" content="{{ summary|e }}">{% endif %}
<link rel="stylesheet" href="style.css">
</head>
<body>
<nav id="sidebar">
<a class="brand" href="index.html">patchfm</a>
<input id="search" type="search" placeholder="Search names and pages" aria-label="Search">
<ul id="search-results"></ul>
{% for section, items in nav %}
<h4>{{ section }}</h4>
<ul>
{% for href, label in items %}<li><a href="{{ href }}"{% if href == current %} class="current"{% endif %}>{{ label }}</a></li>
{% endfor %}</ul>
{% endfor %}
</nav>
<main>
{% if module %}<p class="module">module <code>patchfm.{{ module }}</code> · <a href="#api-reference">API reference</a> · source <a href="{{ source }}">{{ source_name }}</a></p>{% endif %}
{{ body }}
{% if module %}<section id="api-reference"><h2>API reference</h2>
{% if names %}<p>The public names <code>patchfm.{{ module }}</code> defines (from its <code>__all__</code>), each documented where the notebook defines it:</p>
<p class="names">{% for n in names %}<a href="#{{ n }}"><code>{{ n }}</code></a> {% endfor %}</p>{% endif %}
{{ api }}</section>{% endif %}
</main>
<script src="search.js"></script>
</body>
</html>
"""

STYLE = """
body { margin: 0; font: 16px/1.55 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; }
#sidebar { position: fixed; top: 0; left: 0; bottom: 0; width: 250px; overflow-y: auto; padding: 1rem;
  background: #f6f8fa; border-right: 1px solid #d0d7de; box-sizing: border-box; font-size: 14px; }
#sidebar .brand { font-size: 1.4rem; font-weight: 700; text-decoration: none; color: #0b5394; }
#sidebar h4 { margin: 1rem 0 .3rem; text-transform: uppercase; font-size: 12px; color: #57606a; }
#sidebar ul { list-style: none; margin: 0; padding: 0; }
#sidebar li a { display: block; padding: 2px 6px; border-radius: 4px; color: #1f2328; text-decoration: none; }
#sidebar li a:hover, #sidebar li a.current { background: #dbe9f7; }
#search { width: 100%; margin-top: .8rem; padding: 4px 6px; box-sizing: border-box; }
#search-results li a { font-size: 13px; }
main { margin-left: 250px; padding: 1rem 2.5rem 4rem; max-width: 1000px; }
a { color: #0969da; }
pre, code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13.5px; }
pre { background: #f6f8fa; padding: .6rem .8rem; overflow-x: auto; border-radius: 6px; }
p code, li code, td code { background: #eff1f3; padding: 0 3px; border-radius: 3px; }
.cell { margin: .6rem 0; }
.prompt { display: none; }
.output_area pre { background: #fff; border-left: 3px solid #d0d7de; border-radius: 0; max-height: 32em; }
.output_stderr pre { background: #fff8f0; border-color: #e3b341; }
.output_area img { max-width: 100%; }
.rendered_html table, table.params { border-collapse: collapse; font-size: 14px; margin: .5rem 0; }
.rendered_html th, .rendered_html td, table.params th, table.params td
  { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
table.params thead { background: #f6f8fa; }
details.export > summary { cursor: pointer; color: #57606a; font-size: 13px; }
.doc { border-top: 1px solid #d0d7de; margin-top: 1.5rem; padding-top: .3rem; }
.doc.method { margin-left: 1.2rem; border-top: 1px dashed #d0d7de; }
.doc pre.sig, .output_area .doc pre.sig { white-space: pre-wrap; background: #f6f8fa; border-left: 3px solid #8250df; }
.output_area .doc p, .output_area .doc table { font-size: 14.5px; }
a.anchor-link { visibility: hidden; text-decoration: none; margin-left: .3rem; font-size: .8em; }
h1:hover a.anchor-link, h2:hover a.anchor-link, h3:hover a.anchor-link, h4:hover a.anchor-link { visibility: visible; }
.doc .kw { color: #8250df; }
.doc .from { color: #57606a; font-size: 13px; }
p.module { color: #57606a; font-size: 14px; }
p.names { line-height: 2; }
"""

SEARCH_JS = """// client-side search over page titles, headings and API names (works from file://: the index is a script)
(function () {
  var box = document.getElementById('search'), out = document.getElementById('search-results');
  if (!box || !window.PATCHFM_INDEX) return;
  function run() {
    var q = box.value.trim().toLowerCase(); out.innerHTML = '';
    if (q.length < 2) return;
    window.PATCHFM_INDEX.filter(function (e) { return e.t.toLowerCase().indexOf(q) >= 0; }).slice(0, 25)
      .forEach(function (e) {
        var li = document.createElement('li'), a = document.createElement('a');
        a.href = e.u; a.textContent = e.t; li.appendChild(a); out.appendChild(li);
      });
  }
  box.addEventListener('input', run);
  var q = new URLSearchParams(window.location.search).get('q');  // page.html?q=word opens with that search
  if (q) { box.value = q; run(); }
})();
"""


# nbconvert's basic (classic) cell markup, without prompts; exported source folded into a closed <details>
CELL_TEMPLATE = """{%- extends 'classic/base.html.j2' -%}
{% block input_group -%}
{%- if cell.metadata.get('patchfm_folded') -%}
<details class="export"><summary>source (exported to the module)</summary>
{{ super() }}
</details>
{%- else -%}
{{ super() }}
{%- endif -%}
{% endblock input_group %}
{% block in_prompt %}{% endblock in_prompt %}
{% block empty_in_prompt %}{% endblock empty_in_prompt %}
{% block output_area_prompt %}{% endblock output_area_prompt %}
"""


def _exporter():
    import jinja2
    from nbconvert import HTMLExporter
    return HTMLExporter(template_name='basic', template_file='patchfm_cells.html.j2',
                        extra_loaders=[jinja2.DictLoader({'patchfm_cells.html.j2': CELL_TEMPLATE})])


def _render_md(path: Path) -> str:
    import mistune
    return mistune.html(path.read_text())


def build(out: Path) -> list[Path]:
    "Render every notebook (and DESIGN.md, CONTRIBUTING.md) into `out`; returns the pages written."
    import nbformat, jinja2, warnings
    warnings.filterwarnings('ignore')  # importing the modules to document them: their dependencies' warnings are noise here
    from pygments.formatters import HtmlFormatter
    sys.path.insert(0, str(root))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _ASSETS[0] = out
    srcs = notebooks()
    pages = {p.resolve(): fn for p, fn, _ in srcs}
    pages.update({(root / md).resolve(): fn for md, fn in MD_PAGES.items()})
    pages[(root / 'README.md').resolve()] = 'index.html'
    nbs = {p: nbformat.read(p, as_version=4) for p, _, _ in srcs}
    titles = {p: _title(nb, p.stem) for p, nb in nbs.items()}
    nav = {'Home': [('index.html', 'Home')], 'Tutorials': [], 'API': []}
    for p, fn, sec in srcs:
        if sec != 'Home': nav[sec].append((fn, titles[p][0] if sec == 'Tutorials' else f'{p.stem.split("_", 1)[0]} · {titles[p][0]}'))
    nav['Project'] = [(fn, md.removesuffix('.md').title()) for md, fn in MD_PAGES.items()]
    nav = list(nav.items())
    page = jinja2.Environment(autoescape=False).from_string(PAGE)
    ex, written, index = _exporter(), [], []
    module_pages = {}
    for p, fn, sec in srcs:
        if sec == 'API':
            m = next((_directives(c.source)['default_exp'] for c in nbs[p].cells
                      if c.cell_type == 'code' and 'default_exp' in _directives(c.source)), None)
            if m: module_pages[m] = fn
    for p, fn, sec in srcs:
        nb = nbs[p]
        module = _prepare(nb)
        names, api = add_show_docs(nb, module, module_pages) if module else ([], '')
        body, _ = ex.from_notebook_node(nb)
        body = _fix_links(body, p.parent, pages)
        title, summary = titles[p]
        rel_src = p.relative_to(root).as_posix()
        (out / fn).write_text(page.render(title=title, summary=summary, nav=nav, current=fn, body=body, module=module, api=api,
                                          names=names, source=REPO_URL + rel_src, source_name=rel_src))
        written.append(out / fn)
        index.append({'t': title, 'u': fn})
        index += [{'t': f'{n} ({module})', 'u': f'{fn}#{n}'} for n in names]
        index += [{'t': f'{h} — {title}', 'u': f'{fn}#{a}'} for a, h in re.findall(r'<h2 id="([^"]+)">(.*?)<a', body)]
    for md, fn in MD_PAGES.items():
        if not (root / md).exists(): continue
        body = _fix_links(_render_md(root / md), root, pages)
        title = md.removesuffix('.md').title()
        (out / fn).write_text(page.render(title=title, nav=nav, current=fn, body=body, module=None, api='', names=[]))
        written.append(out / fn)
        index.append({'t': title, 'u': fn})
    _fix_fragments(written)
    (out / 'style.css').write_text(STYLE + HtmlFormatter(style='default').get_style_defs('.highlight'))
    for it in index: it['t'] = re.sub(r'<[^>]+>', '', html.unescape(it['t']))
    (out / 'search.js').write_text('window.PATCHFM_INDEX = ' + json.dumps(index) + ';\n' + SEARCH_JS)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', type=Path, help='folder for the site (DIR/index.html is the README page)')
    ap.add_argument('--execute', nargs='+', type=Path, metavar='NB', help='notebooks to run in place, keeping outputs')
    a = ap.parse_args(argv)
    if not (a.out or a.execute): ap.error('give --out DIR or --execute NB ...')
    for nb in a.execute or []:
        print(f'executing {nb} (PATCHFM_CI=1)', flush=True)
        execute(nb)
    if a.out:
        pages = build(a.out)
        print(f'{len(pages)} pages in {a.out}; open {a.out / "index.html"}')


if __name__ == '__main__':
    main()
