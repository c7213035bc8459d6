"""The explain page's style and script (``fxforge/explain_page.py`` writes them inline)."""

PAGE_CSS = r"""
:root { --ink:#1d2430; --muted:#667085; --line:#d0d5dd; --bg:#f7f8fa; --card:#fff;
        --gemm:#2f6fdb; --fused:#1f9d6b; --attn:#8a4fd8; --aten:#98a2b3; --fallback:#d92d20; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color:var(--ink);
       background:var(--bg); }
header { position:sticky; top:0; z-index:2; display:flex; gap:16px; align-items:center;
         padding:10px 24px; background:#101828; color:#fff; }
header h1 { font-size:16px; margin:0; font-weight:600; }
#search { flex:0 1 420px; padding:6px 10px; border-radius:6px; border:0; font-size:14px; }
#matches { color:#d0d5dd; font-size:13px; }
main { max-width:1100px; margin:0 auto; padding:16px 24px 48px; }
.summary { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 16px; }
.summary code { background:#eef1f5; padding:1px 5px; border-radius:4px; }
.warn { color:var(--fallback); }
h2 { font-size:15px; margin:24px 0 8px; }
.phases { display:flex; flex-wrap:wrap; gap:6px; margin:0 0 12px; }
.phase { background:#eef1f5; border-radius:4px; padding:2px 8px; font-size:12px; color:var(--muted); }
.unit { position:relative; background:var(--card); border:1px solid var(--line);
        border-left:5px solid var(--aten); border-radius:6px; padding:8px 12px; margin:0 0 0 24px; }
.unit.gemm { border-left-color:var(--gemm); } .unit.fused { border-left-color:var(--fused); }
.unit.attn { border-left-color:var(--attn); } .unit.fallback { border-left-color:var(--fallback); }
.unit.io { border-left-color:#101828; background:#f2f4f7; }
.unit .title { display:flex; justify-content:space-between; gap:12px; }
.unit .op { font-weight:600; overflow-wrap:anywhere; }
.unit .id { color:var(--muted); font-size:12px; white-space:nowrap; }
.unit .path { color:var(--muted); font-size:12px; overflow-wrap:anywhere; }
.unit .reason { color:var(--fallback); font-size:12px; }
.bars { display:grid; grid-template-columns:64px 1fr 150px; gap:2px 8px; align-items:center;
        font-size:12px; margin-top:6px; color:var(--muted); }
.bar { height:8px; background:#eef1f5; border-radius:4px; overflow:hidden; }
.bar span { display:block; height:100%; background:var(--gemm); }
.bar.build span { background:#f79009; }
.attrs { margin-top:6px; font-size:12px; color:var(--muted); }
.attrs span { display:inline-block; background:#f2f4f7; border-radius:4px; padding:1px 6px; margin:2px 4px 0 0; }
.edge { margin:0 0 0 40px; padding:3px 0 3px 14px; border-left:2px solid var(--line);
        font-size:12px; color:var(--muted); min-height:14px; }
.edge .skip { color:var(--attn); }
details.block { margin:6px 0; border:1px dashed var(--gemm); border-radius:8px; background:#f5f8ff; }
details.block > summary { cursor:pointer; padding:8px 12px; font-weight:600; }
details.block > summary .count { background:var(--gemm); color:#fff; border-radius:10px; padding:1px 8px; margin-right:8px; }
details.block > div { padding:0 8px 8px; }
.unit.hit { outline:2px solid #f79009; }
.dim { opacity:0.25; }
details.text pre { white-space:pre-wrap; font-size:12px; background:var(--card); border:1px solid var(--line);
                   border-radius:8px; padding:12px; }
"""

PAGE_SCRIPT = r"""
(function () {
  const data = JSON.parse(document.getElementById('fxf-data').textContent);
  const page = document.getElementById('page');
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function ms(s) { return s >= 1 ? s.toFixed(2) + ' s' : (s * 1e3).toFixed(s < 1e-3 ? 3 : 2) + ' ms'; }
  function share(x, total) { return total > 0 ? 100 * x / total : 0; }
  function family(u) {
    if (u.kind !== 'kernel') return 'io';
    const p = u.path.toLowerCase(), op = u.op.toLowerCase();
    if (p.includes('fallback')) return 'fallback';
    if (p.includes('attention') || op.includes('attention')) return 'attn';
    if (p.includes('gemm') || p.includes('gemv') || op.includes('linear')) return 'gemm';
    if (p.includes('generated') || op.startsWith('fused')) return 'fused';
    return 'aten';
  }
  function bar(label, value, total, cls) {
    const frag = document.createDocumentFragment();
    frag.appendChild(el('span', '', label));
    const b = el('div', 'bar ' + cls), fill = el('span');
    fill.style.width = Math.min(100, share(value, total)).toFixed(1) + '%';
    b.appendChild(fill); frag.appendChild(b);
    frag.appendChild(el('span', '', share(value, total).toFixed(1) + '% · ' + ms(value)));
    return frag;
  }
  function unitBox(u, g, run, build, previous) {
    const wrap = document.createDocumentFragment();
    const edge = el('div', 'edge');
    const parts = u.inputs.map(function (i) {
      const via = i.via.length ? ' via ' + i.via.join(' → ') : '';
      if (i.from === previous) return '↓ ' + i.shape + via;
      const from = g.units[i.from];
      return '↳ from #' + i.from + ' ' + from.op.slice(0, 40) + ': ' + i.shape + via;
    });
    parts.forEach(function (t) {
      const line = el('div', t.startsWith('↳') ? 'skip' : '', t); edge.appendChild(line);
    });
    if (u.inputs.length) wrap.appendChild(edge);
    const box = el('div', 'unit ' + family(u));
    box.dataset.unit = u.id;
    const title = el('div', 'title');
    title.appendChild(el('span', 'op', u.op));
    title.appendChild(el('span', 'id', '#' + u.id + (u.kind === 'kernel' ? ' · ' + u.name : '')));
    box.appendChild(title);
    box.appendChild(el('div', 'path', u.path));
    if (u.reason) box.appendChild(el('div', family(u) === 'fallback' ? 'reason' : 'path', u.reason));
    if (u.kind === 'kernel') {
      const bars = el('div', 'bars');
      bars.appendChild(bar('run', run, g.run_total, 'run'));
      bars.appendChild(bar('build', build, g.build_total, 'build'));
      box.appendChild(bars);
    }
    const attrs = el('div', 'attrs');
    u.weights.forEach(function (w) { attrs.appendChild(el('span', '', w.name + ': ' + w.shape)); });
    if (u.out) attrs.appendChild(el('span', '', '→ ' + u.out));
    box.appendChild(attrs);
    wrap.appendChild(box);
    return wrap;
  }
  function graphSection(g) {
    const section = el('section', 'graph');
    section.appendChild(el('h2', '', 'Graph ' + g.index + ': ' + g.backend + ' backend, ' +
      g.kernels + ' kernels per call, ' + g.nodes_before + ' nodes captured → ' + g.nodes_after +
      ' after passes; one call ' + ms(g.run_total) + ', kernels built in ' + ms(g.build_total)));
    const phases = el('div', 'phases');
    g.profile.filter(function (r) { return r[0].length === 1; }).forEach(function (r) {
      phases.appendChild(el('span', 'phase', r[0][0] + ' ' + ms(r[1])));
    });
    section.appendChild(phases);
    const inBlock = {}, firstOf = {};
    g.blocks.forEach(function (b, k) {
      b.members.forEach(function (ids, m) { ids.forEach(function (id, j) { inBlock[id] = [k, m, j]; }); });
      firstOf[b.first[0]] = k;
    });
    let previous = null;
    g.units.forEach(function (u) {
      const where = inBlock[u.id];
      if (where && where[1] > 0) return;
      if (where && where[1] === 0 && where[2] === 0) {
        const b = g.blocks[where[0]];
        const details = el('details', 'block');
        details.open = location.hash === '#open';   // page.html#open: every block opened
        const summary = el('summary');
        summary.appendChild(el('span', 'count', '×' + b.count));
        let run = 0, build = 0;
        b.members.forEach(function (ids) { ids.forEach(function (id) { run += g.units[id].run; build += g.units[id].build; }); });
        summary.appendChild(document.createTextNode((b.label || 'repeated block') + ': ' + b.first.length +
          ' kernels, shown once · ' + share(run, g.run_total).toFixed(1) + '% of run time · ' +
          share(build, g.build_total).toFixed(1) + '% of build time'));
        details.appendChild(summary);
        const inner = el('div');
        let prev = previous;
        b.first.forEach(function (id, j) {
          let r = 0, c = 0;
          b.members.forEach(function (ids) { r += g.units[ids[j]].run; c += g.units[ids[j]].build; });
          inner.appendChild(unitBox(g.units[id], g, r, c, prev));
          prev = id;
        });
        details.appendChild(inner);
        section.appendChild(details);
        previous = b.members[b.members.length - 1][b.first.length - 1];
        return;
      }
      if (where) return;
      section.appendChild(unitBox(u, g, u.run, u.build, previous));
      previous = u.id;
    });
    return section;
  }
  const summary = el('section', 'summary');
  summary.appendChild(el('p', '', data.summary));
  const opts = Object.keys(data.options).map(function (k) { return k + '=' + JSON.stringify(data.options[k]); });
  const optLine = el('p'); optLine.appendChild(document.createTextNode('options: '));
  optLine.appendChild(el('code', '', opts.join(', ') || 'defaults')); summary.appendChild(optLine);
  data.warnings.forEach(function (w) { summary.appendChild(el('p', 'warn', w)); });
  page.appendChild(summary);
  data.graphs.forEach(function (g) { page.appendChild(graphSection(g)); });
  const text = el('details', 'text');
  text.appendChild(el('summary', '', 'the text report'));
  text.appendChild(el('pre', '', data.text));
  page.appendChild(text);
  const search = document.getElementById('search'), matches = document.getElementById('matches');
  search.addEventListener('input', function () {
    const q = search.value.trim().toLowerCase();
    let hits = 0;
    document.querySelectorAll('.unit').forEach(function (box) {
      const hit = q && box.textContent.toLowerCase().includes(q);
      box.classList.toggle('hit', !!hit);
      box.classList.toggle('dim', !!q && !hit);
      if (hit) { hits += 1; const d = box.closest('details'); if (d) d.open = true; }
    });
    matches.textContent = q ? hits + ' match' + (hits === 1 ? '' : 'es') : '';
  });
  document.body.dataset.ready = String(document.querySelectorAll('.unit').length);
})();
"""
