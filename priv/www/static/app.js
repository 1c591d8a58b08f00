// dspex debug console. Every value that comes from users (session ids,
// variable names, values, metadata) is put into the page as text
// (textContent), never as markup; the only markup inserted is the graph SVG,
// parsed as XML and stripped of scripts and event handlers.
'use strict';
(function () {
  const state = { token: sessionStorage.getItem('dspex_token') || '', config: null, streams: [] };
  const main = document.getElementById('main');

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'on') for (const [ev, f] of Object.entries(v)) e.addEventListener(ev, f);
      else if (k === 'dataset') Object.assign(e.dataset, v);
      else e.setAttribute(k, v === true ? '' : String(v));
    }
    for (const k of kids.flat()) {
      if (k === undefined || k === null) continue;
      e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    }
    return e;
  }
  // a float that happens to be whole keeps its decimal point (2.0, not 2)
  const showTyped = (type, v) => (type === 'float' && typeof v === 'number' && Number.isInteger(v)) ? v.toFixed(1) : show(v);
  const show = (v) => (v === null || v === undefined) ? '—' : (typeof v === 'string' ? v : JSON.stringify(v));
  const time = (us) => us ? new Date(us / 1000).toISOString().replace('T', ' ').replace('Z', '') : '—';
  const fmt = (n, d) => (n === null || n === undefined) ? '—' : (typeof n === 'number' ? n.toFixed(d === undefined ? 1 : d) : String(n));

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (state.token) h['Authorization'] = 'Bearer ' + state.token;
    return h;
  }
  async function api(path, opts) {
    const o = Object.assign({}, opts || {});
    o.headers = headers(o.headers);
    const r = await fetch(path, o);
    const type = r.headers.get('content-type') || '';
    const body = type.startsWith('application/json') ? await r.json() : await r.text();
    if (!r.ok) { const err = new Error('HTTP ' + r.status); err.status = r.status; err.body = body; throw err; }
    return body;
  }

  // Server-Sent Events over fetch (EventSource cannot send the bearer token).
  function stream(path, handlers) {
    const ctl = new AbortController();
    state.streams.push(ctl);
    (async function run() {
      while (!ctl.signal.aborted) {
        try {
          const r = await fetch(path, { headers: headers({ Accept: 'text/event-stream' }), signal: ctl.signal });
          if (!r.ok || !r.body) return;
          const reader = r.body.getReader();
          const dec = new TextDecoder();
          let buf = '';
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buf += dec.decode(value, { stream: true });
            let i;
            while ((i = buf.indexOf('\n\n')) >= 0) {
              const chunk = buf.slice(0, i); buf = buf.slice(i + 2);
              let ev = 'message', data = '';
              for (const line of chunk.split('\n')) {
                if (line.startsWith('event: ')) ev = line.slice(7);
                else if (line.startsWith('data: ')) data += line.slice(6);
              }
              if (data && handlers[ev]) handlers[ev](JSON.parse(data));
            }
          }
        } catch (e) {
          if (ctl.signal.aborted) return;
        }
        await new Promise((res) => setTimeout(res, 1000));
      }
    })();
    return ctl;
  }

  function table(cols, rows) {
    return el('table', {}, el('thead', {}, el('tr', {}, cols.map((c) => el('th', {}, c)))),
      el('tbody', {}, rows));
  }
  function card(label, value, id) {
    return el('div', { class: 'card' }, el('div', {}, label), el('div', { class: 'v', id: id }, value));
  }
  function absent(part) {
    return el('div', { class: 'absent', id: 'absent' },
      el('h2', {}, 'Absent'),
      el('p', {}, `This node has no ${part.module} (issue #${part.issue}: ${part.what}). ` +
        'The page appears when that part is part of the build; nothing is shown in its place.'));
  }
  function fail(e) {
    main.replaceChildren(el('p', { class: 'error', id: 'error' },
      e.status === 401 ? 'A bearer token is required (enter it above).' : ('Error: ' + (e.body && e.body.error ? show(e.body.error) : e.message))));
  }

  // ---- overview ------------------------------------------------------------
  function chart(title, series, width) {
    if (!window.uPlot) return el('p', { class: 'error' }, 'uPlot is not installed (make console-vendor)');
    const box = el('div', { class: 'chart' });
    const opts = { title: title, width: width || 520, height: 220, series: [{}].concat(series.map((s) => ({ label: s.label, stroke: s.color, spanGaps: true }))) };
    box._plot = new window.uPlot(opts, [[]].concat(series.map(() => [])), box);
    return box;
  }
  async function overview() {
    const o = await api('/api/overview');
    const ops = chart('store operations / s', [{ label: 'ops/s', color: '#1e88e5' }, { label: 'errors/s', color: '#e53935' }]);
    const lat = chart('store latency (µs)', [{ label: 'p50', color: '#43a047' }, { label: 'p95', color: '#fb8c00' }, { label: 'p99', color: '#8e24aa' }]);
    const cards = el('div', { class: 'cards' });
    const clusterBox = el('div', { id: 'cluster' });
    const breakers = el('div', { id: 'breakers' });
    main.replaceChildren(el('h1', {}, 'Overview'), cards, el('div', {}, ops, lat), el('h2', {}, 'Cluster'), clusterBox,
      el('h2', {}, 'Circuit breakers'), breakers);
    const update = (o) => {
      const d = o.dashboard || {};
      const m = d.last_minute || {}, h = d.last_hour || {};
      const last = (a) => a && a.length ? a[a.length - 1] : null;
      cards.replaceChildren(card('node', o.node, 'node-name'), card('sessions', o.sessions, 'sessions-count'),
        card('ops/s (last s)', last(o.series.ops), 'ops'), card('p99 µs (last s)', fmt(last(o.series.p99)), 'p99'),
        card('error rate (1 min)', m.error_rate === null || m.error_rate === undefined ? '—' : fmt(100 * m.error_rate, 2) + ' %', 'error-rate'),
        card('operations (1 h)', h.operations, 'ops-hour'), card('dropped samples', d.dropped_samples, 'dropped'));
      const t = o.series.t;
      if (ops._plot) ops._plot.setData([t, o.series.ops, o.series.errors]);
      if (lat._plot) lat._plot.setData([t, o.series.p50.map((x) => x === 'undefined' ? null : x), o.series.p95.map((x) => x === 'undefined' ? null : x), o.series.p99.map((x) => x === 'undefined' ? null : x)]);
      if (o.cluster === 'not_clustered') clusterBox.replaceChildren(el('p', {}, 'Not clustered (one node).'));
      else clusterBox.replaceChildren(table(['key', 'value'], Object.entries(o.cluster).map(([k, v]) => el('tr', {}, el('td', {}, k), el('td', {}, show(v))))));
      breakers.replaceChildren(o.breakers.length === 0 ? el('p', {}, 'No breakers installed.') :
        table(['name', 'state', 'details'], o.breakers.map((b) => el('tr', {}, el('td', {}, show(b.name)), el('td', {}, b.status.state), el('td', {}, show(b.status))))));
    };
    update(o);
    stream('/api/events?overview=1', { overview: update });
  }

  // ---- sessions --------------------------------------------------------------
  async function sessions() {
    const params = new URLSearchParams(location.search);
    let q = params.get('q') || '', offset = parseInt(params.get('offset') || '0', 10) || 0;
    const limit = 50;
    const input = el('input', { id: 'search', type: 'search', placeholder: 'search session ids', value: q });
    const body = el('div', { id: 'sessions' });
    const info = el('span', { id: 'sessions-info' });
    const prev = el('button', { id: 'prev' }, '‹ previous'), next = el('button', { id: 'next' }, 'next ›');
    main.replaceChildren(el('h1', {}, 'Sessions'), el('div', {}, input, ' ', prev, ' ', next, ' ', info), body);
    async function load() {
      const r = await api(`/api/sessions?q=${encodeURIComponent(q)}&offset=${offset}&limit=${limit}`);
      history.replaceState(null, '', `/sessions?q=${encodeURIComponent(q)}&offset=${offset}`);
      info.textContent = r.total === 0 ? 'no sessions' : `${offset + 1}–${offset + r.items.length} of ${r.total}`;
      prev.disabled = offset === 0; next.disabled = offset + limit >= r.total;
      body.replaceChildren(table(['session', 'variables', 'TTL (s)', 'created', 'last access'],
        r.items.map((s) => el('tr', {}, el('td', {}, el('a', { href: '/session?id=' + encodeURIComponent(s.id) }, s.id)),
          el('td', {}, s.variable_count), el('td', {}, show(s.ttl)), el('td', {}, time(s.created_at)), el('td', {}, time(s.last_accessed_at))))));
    }
    let timer = null;
    input.addEventListener('input', () => { clearTimeout(timer); timer = setTimeout(() => { q = input.value; offset = 0; load().catch(fail); }, 200); });
    prev.addEventListener('click', () => { offset = Math.max(0, offset - limit); load().catch(fail); });
    next.addEventListener('click', () => { offset += limit; load().catch(fail); });
    await load();
  }

  // ---- event log -------------------------------------------------------------
  // The types of the events the bridge itself writes (dspex_events); an
  // application's own types are shown too, but only these are in the filter.
  const EVENT_TYPES = ['session_created', 'session_deleted', 'variable_registered', 'variable_updated',
    'variable_deleted', 'variable_rolled_back', 'batch_committed', 'dependency_added', 'dependency_removed',
    'derived_recomputed', 'lock_acquired', 'lock_released', 'lock_preempted', 'lock_expired', 'acl_rule_set',
    'access_denied', 'optimization_progress'];
  const LOG_OFF = 'The event log is off on this node (event_log = false): there is no event timeline and no time travel.';
  function summary(ev, typeOf) {
    const d = ev.data;
    const type = d && typeof d === 'object' ? (d.type || (typeOf && typeOf((ev.metadata || {}).variable))) : null;
    const t = (d && typeof d === 'object' && 'value' in d) ? showTyped(type, d.value) : show(d);
    return t.length > 160 ? t.slice(0, 160) + '…' : t;
  }
  // A page of the event log, newest first, with a type filter and paging by
  // global position. `session' null: every session's events. `pick(seq)' is
  // called when a row of a session's timeline is clicked.
  function timeline(session, pick, typeOf) {
    const box = el('div', { id: 'timeline' }, el('p', {}, 'Reading the event log…'));
    const select = el('select', { id: 'timeline-type' }, el('option', { value: '' }, 'all types'),
      EVENT_TYPES.map((t) => el('option', { value: t }, t)));
    const newer = el('button', { id: 'timeline-newer' }, '‹ newer'), older = el('button', { id: 'timeline-older' }, 'older ›');
    const info = el('span', { id: 'timeline-info' });
    const body = el('div', { id: 'timeline-events' });
    const cursors = [];   // the `before' of each page shown so far (0: the newest)
    let before = 0;
    async function load() {
      const q = new URLSearchParams({ limit: '25' });
      if (session !== null) q.set('id', session);
      if (before) q.set('before', String(before));
      if (select.value) q.set('type', select.value);
      const r = await api('/api/timeline?' + q.toString());
      if (!r.enabled) { box.replaceChildren(el('p', { id: 'timeline-off', class: 'absent' }, LOG_OFF)); return r; }
      newer.disabled = cursors.length === 0;
      older.disabled = !r.more;
      older.dataset.before = r.events.length ? String(r.events[r.events.length - 1].position) : '';
      info.textContent = r.events.length === 0 ? 'no events' :
        `positions ${r.events[0].position}–${r.events[r.events.length - 1].position}`;
      const cols = (session === null ? ['position', 'session'] : ['sequence']).concat(['time', 'type', 'variable', 'changed by', 'principal', 'data']);
      body.replaceChildren(table(cols, r.events.map((ev) => {
        const m = ev.metadata || {};
        const tr = el('tr', { dataset: { sequence: ev.sequence, position: ev.position, type: ev.type } },
          session === null ? [el('td', {}, ev.position), el('td', {}, el('a', { href: '/session?id=' + encodeURIComponent(ev.session) }, ev.session))] :
            el('td', {}, ev.sequence),
          el('td', {}, time(ev.timestamp)), el('td', { class: 'type' }, show(ev.type)), el('td', {}, show(m.variable)),
          el('td', {}, show(m.changed_by)), el('td', {}, show(m.principal)), el('td', { class: 'data' }, summary(ev, typeOf)));
        if (pick) { tr.classList.add('pickable'); tr.title = 'show the variables as they were after this event'; tr.addEventListener('click', () => pick(ev.sequence)); }
        return tr;
      })));
      return r;
    }
    const reload = () => load().catch((e) => box.replaceChildren(el('p', { class: 'error' }, 'Event log: ' + (e.body && e.body.error ? show(e.body.error) : e.message))));
    select.addEventListener('change', () => { cursors.length = 0; before = 0; reload(); });
    older.addEventListener('click', () => { if (!older.dataset.before) return; cursors.push(before); before = parseInt(older.dataset.before, 10); reload(); });
    newer.addEventListener('click', () => { before = cursors.pop() || 0; reload(); });
    box.replaceChildren(el('div', {}, select, ' ', newer, ' ', older, ' ', info), body);
    const ready = load().catch((e) => { box.replaceChildren(el('p', { class: 'error' }, 'Event log: ' + (e.body && e.body.error ? show(e.body.error) : e.message))); return null; });
    // after a live change: the newest page is read again (an older page stays)
    const refresh = () => (before === 0 ? load().catch(() => null) : Promise.resolve(null));
    return { box: box, ready: ready, refresh: refresh };
  }

  // Time travel: a slider over the session's event sequence; at N the
  // variables as they were after event N (dspex_events:state_at/2), beside
  // their current values (`current(name)': the live table's text), the
  // differences marked.
  function timeTravel(id, last, current, types) {
    const slider = el('input', { id: 'tt-slider', type: 'range', min: 1, max: last, step: 1, value: last });
    const label = el('span', { id: 'tt-seq' }, String(last));
    const body = el('div', { id: 'tt-vars' });
    let asked = 0;
    async function at(n) {
      const mine = ++asked;
      label.textContent = `${n} of ${last}`;
      slider.dataset.loaded = '';
      const r = await api(`/api/state_at?id=${encodeURIComponent(id)}&seq=${n}`);
      if (mine !== asked) return;   // a later position was asked meanwhile
      const past = new Map(r.variables.map((v) => [v.name, v]));
      const names = Array.from(new Set(r.variables.map((v) => v.name).concat(Array.from(types.keys())))).sort();
      body.replaceChildren(table(['name', `value after event ${n}`, 'version then', 'changed by then', 'current value', 'current version'],
        names.map((name) => {
          const p = past.get(name);
          const then = p ? showTyped(p.type, p.value) : '(not registered)';
          const cur = current(name);
          const now = cur ? cur.value : '(deleted)';
          const differs = !p || !cur || then !== now;
          return el('tr', { dataset: { name: name }, class: differs ? 'differs' : null },
            el('td', {}, name), el('td', { class: 'then' }, then), el('td', { class: 'version-then' }, p ? p.version : '—'),
            el('td', {}, p ? show(p.changed_by) : '—'), el('td', { class: 'now' }, now), el('td', {}, cur ? cur.version : '—'));
        })));
      slider.dataset.loaded = String(n);
    }
    const go = () => at(parseInt(slider.value, 10)).catch((e) => body.replaceChildren(el('p', { class: 'error' }, 'No state: ' + (e.body && e.body.error ? show(e.body.error) : e.message))));
    slider.addEventListener('input', go);
    const box = el('div', { id: 'timetravel' }, el('div', {}, 'event ', slider, ' ', label), body);
    go();
    // new events: the slider reaches them; left at the newest, it follows
    // (the values of then and now are read again), else it stays where it is
    function extend(n) {
      if (!(n > last)) return;
      const atEnd = parseInt(slider.value, 10) === last;
      last = n;
      slider.max = String(n);
      if (atEnd) { slider.value = String(n); go(); } else label.textContent = `${slider.value} of ${last}`;
    }
    return { box: box, set: (n) => { slider.value = String(n); go(); }, extend: extend };
  }

  // ---- session ---------------------------------------------------------------
  function diff(older, newer) {
    const a = show(older), b = show(newer);
    let p = 0; while (p < a.length && p < b.length && a[p] === b[p]) p++;
    let s = 0; while (s < a.length - p && s < b.length - p && a[a.length - 1 - s] === b[b.length - 1 - s]) s++;
    return el('span', { class: 'diff' }, a.slice(0, p), el('span', { class: 'diff-del' }, a.slice(p, a.length - s)),
      el('span', { class: 'diff-add' }, b.slice(p, b.length - s)), a.slice(a.length - s));
  }
  function unescapeDot(t) { return t.replace(/\\(["\\])/g, '$1'); }

  // "variables A–B of N" with links to the previous and next pages
  function pager(s, id) {
    const shown = s.variables.length;
    const link = (off, text) => el('a', { href: '/session?id=' + encodeURIComponent(id) + '&offset=' + off }, text);
    return el('p', { id: 'variables-page' },
      shown === 0 ? `no variables of ${s.total}` : `variables ${s.offset + 1}–${s.offset + shown} of ${s.total}`,
      s.offset > 0 ? [' ', link(Math.max(0, s.offset - s.limit), '« previous')] : [],
      s.offset + shown < s.total ? [' ', link(s.offset + shown, 'next »')] : []);
  }

  async function session() {
    const params = new URLSearchParams(location.search);
    const id = params.get('id') || '';
    // the variables come a page at a time (500; the answer stays small for a big session)
    const offset = Math.max(0, parseInt(params.get('offset'), 10) || 0);
    const s = await api('/api/session?id=' + encodeURIComponent(id) + '&offset=' + offset);
    const d = s.diagnostics;
    const rows = new Map();
    const changedBy = new Map();
    const derived = new Set(s.variables.filter((v) => v.derived).map((v) => v.name));
    const historyBox = el('div', { id: 'history' }, el('p', {}, 'Click a variable (in the table or the graph) for its history.'));
    const graph = el('div', { id: 'graph' }, el('p', {}, 'Drawing the graph…'));
    const status = el('p', { id: 'rollback-status' });
    const tbody = el('tbody', { id: 'variables' });
    for (const v of s.variables) {
      const tr = el('tr', { dataset: { name: v.name, type: v.type } },
        el('td', { class: v.derived ? 'derived' : null }, el('a', { href: '#', class: 'var-link', on: { click: (e) => { e.preventDefault(); openVar(v.name); } } }, v.name)),
        el('td', {}, v.type), el('td', { class: 'value' }, showTyped(v.type, v.value)), el('td', { class: 'version' }, v.version),
        el('td', { class: 'updated' }, time(v.updated_at)), el('td', { class: 'changed-by' }, show((d.changed_by || {})[v.name])),
        el('td', {}, v.lock ? show(v.lock.optimizer) : '—'), el('td', { class: 'error' }, v.error ? show(v.error) : ''));
      rows.set(v.name, tr); tbody.append(tr);
    }
    const travelBox = el('div', { id: 'timetravel-part' }, el('p', {}, 'Reading the event log…'));
    let travel = null;
    const types = new Map(s.variables.map((v) => [v.name, v.type]));
    const tl = timeline(id, (seq) => { if (travel) travel.set(seq); }, (name) => types.get(name));
    const currentOf = (name) => {
      const tr = rows.get(name);
      return tr ? { value: tr.querySelector('.value').textContent, version: tr.querySelector('.version').textContent } : null;
    };
    let refreshTimer = null;
    const tlReady = tl.ready.then((r) => {
      if (!r) { travelBox.replaceChildren(el('p', { class: 'error' }, 'No time travel without the event log.')); return; }
      if (!r.enabled) { travelBox.replaceChildren(el('p', { id: 'timetravel-off', class: 'absent' }, LOG_OFF)); return; }
      if (!r.last_sequence) { travelBox.replaceChildren(el('p', {}, 'No events recorded for this session.')); return; }
      travel = timeTravel(id, r.last_sequence, currentOf, types);
      travelBox.replaceChildren(travel.box);
    });
    const summaryTable = table(['', ''], [['variables', d.variables], ['value bytes', d.bytes], ['history entries', d.history_entries],
      ['watchers', d.watchers], ['TTL left (ms)', show(d.ttl_left_ms)], ['cluster', show(d.cluster)], ['metadata', show(d.metadata)]]
      .map(([k, v]) => el('tr', {}, el('th', {}, k), el('td', {}, String(v)))));
    const watched = Object.entries(d.watched);
    const watchers = watched.length === 0 ? el('p', { id: 'watchers' }, 'No watchers.') :
      el('div', { id: 'watchers' }, table(['variable', 'watches'], watched.map((w) => el('tr', {}, el('td', {}, w[0]), el('td', {}, w[1])))));
    main.replaceChildren(el('h1', {}, 'Session ', el('span', { id: 'session-id' }, id)), summaryTable,
      el('h2', {}, 'Variables'), pager(s, id),
      el('table', {}, el('thead', {}, el('tr', {}, ['name', 'type', 'value', 'version', 'updated', 'changed by', 'lock holder', 'error'].map((c) => el('th', {}, c)))), tbody),
      el('h2', {}, 'History'), status, historyBox, el('h2', {}, 'Dependency graph'), graph, el('h2', {}, 'Watchers'), watchers,
      el('h2', {}, 'Time travel'), travelBox, el('h2', {}, 'Event timeline (newest first; click an event to travel to it)'), tl.box);

    async function openVar(name) {
      rows.forEach((tr, n) => tr.classList.toggle('selected', n === name));
      graph.querySelectorAll('g.node').forEach((g) => g.classList.toggle('selected', g.dataset.name === name));
      const h = await api(`/api/history?id=${encodeURIComponent(id)}&var=${encodeURIComponent(name)}`);
      const cur = rows.get(name);
      const current = cur ? cur.querySelector('.value').textContent : null;
      const write = state.config && state.config.write;
      const entries = h.history;
      const type = cur ? cur.dataset.type : null;
      historyBox.replaceChildren(el('h3', {}, 'History of ', el('span', { id: 'history-name' }, name)),
        entries.length === 0 ? el('p', {}, 'No earlier versions.') :
          table(['version', 'value', 'change to the next version', 'updated', 'changed by', ''],
            entries.map((e, i) => el('tr', { dataset: { version: e.version } }, el('td', {}, e.version), el('td', {}, showTyped(type, e.value)),
              el('td', {}, diff(e.value, i === 0 ? current : entries[i - 1].value)), el('td', {}, time(e.updated_at)),
              el('td', {}, show(e.changed_by)),
              el('td', {}, el('button', { class: 'rollback', disabled: !write, title: write ? 'write this value as a new version' : 'the console is read-only',
                on: { click: () => rollback(name, e.version) } }, 'roll back'))))));
    }
    async function rollback(name, version) {
      try {
        const body = new URLSearchParams({ id: id, var: name, version: String(version) });
        const r = await api('/api/rollback', { method: 'POST', body: body, headers: { 'X-DSPex-CSRF': state.config.csrf } });
        status.textContent = `Rolled back ${name} to the value of version ${version}: now version ${r.version}.`;
        status.className = 'ok';
      } catch (e) {
        status.textContent = 'Rollback refused: ' + (e.body && e.body.error ? show(e.body.error) : e.message);
        status.className = 'error';
      }
    }
    api('/api/graph.svg?id=' + encodeURIComponent(id)).then((text) => {
      const doc = new DOMParser().parseFromString(text, 'image/svg+xml');
      const svg = doc.documentElement;
      if (svg.nodeName !== 'svg') throw new Error('not an SVG');
      svg.querySelectorAll('script, foreignObject').forEach((n) => n.remove());
      svg.querySelectorAll('*').forEach((n) => { for (const a of Array.from(n.attributes)) if (/^on/i.test(a.name) || /href/i.test(a.name)) n.removeAttribute(a.name); });
      const node = document.importNode(svg, true);
      node.querySelectorAll('g.node').forEach((g) => {
        const t = g.querySelector('title');
        const name = t ? unescapeDot(t.textContent) : '';
        g.dataset.name = name;
        if (derived.has(name)) g.classList.add('derived');
        g.addEventListener('click', () => openVar(name));
      });
      graph.replaceChildren(node);
    }).catch((e) => graph.replaceChildren(el('p', { class: 'error' }, 'No graph: ' + (e.body && e.body.error ? show(e.body.error) : e.message))));

    stream('/api/events?id=' + encodeURIComponent(id), {
      variable: (ev) => {
        const tr = rows.get(ev.name);
        if (!tr) return;
        tr.querySelector('.value').textContent = showTyped(tr.dataset.type, ev.value);
        tr.querySelector('.version').textContent = ev.version;
        tr.querySelector('.updated').textContent = time(ev.updated_at);
        tr.querySelector('.changed-by').textContent = show(ev.changed_by);
        changedBy.set(ev.name, ev.changed_by);
        tr.classList.remove('flash'); void tr.offsetWidth; tr.classList.add('flash');
        if (tr.classList.contains('selected')) openVar(ev.name).catch(() => {});
        // the timeline and the slider follow, at most every 300 ms
        if (!refreshTimer) refreshTimer = setTimeout(() => {
          refreshTimer = null;
          tl.refresh().then((r) => { if (r && r.enabled && travel) travel.extend(r.last_sequence); });
        }, 300);
      },
      session: () => { route().catch(fail); },
    });
    await tlReady;
  }

  // ---- optimizations -----------------------------------------------------------
  // Best score and iterations of every held lock, sampled each second by the
  // event stream and plotted from the moment the page opened.
  async function optimizations() {
    const o = await api('/api/optimizations');
    const locksBox = el('div', { id: 'locks' });
    const plots = el('div', { id: 'progress' });
    const ended = el('div', { id: 'ended' });
    const series = new Map();   // "session\u0000variable" -> {t: [], best: [], iter: [], box}
    const runsBox = el('div', { id: 'runs' });
    const runs = new Map();   // run -> {box, info, trialsBox, plot}
    main.replaceChildren(el('h1', {}, 'Optimizations'), el('h2', {}, 'Optimizer runs (dspex_opt): trials and convergence'), runsBox,
      el('h2', {}, 'Optimizer locks'), locksBox,
      el('h2', {}, 'Progress (best score and iterations since this page opened)'), plots,
      el('h2', {}, 'Optimizations ended in the last hour (1 = finished by itself, 0 = preempted / expired / died)'), ended,
      ...o.absent.map(absent));
    const score = (b) => (b && typeof b === 'object' && typeof b.score === 'number') ? b.score : null;
    const update = (o) => {
      locksBox.replaceChildren(o.locks.length === 0 ? el('p', {}, 'No optimizer holds a lock.') :
        table(['session', 'variable', 'optimizer', 'holder', 'priority', 'iterations', 'best', 'waiters', 'token'],
          o.locks.map((l) => el('tr', { dataset: { variable: l.variable } }, el('td', {}, el('a', { href: '/session?id=' + encodeURIComponent(l.session) }, l.session)),
            el('td', {}, l.variable), el('td', {}, show(l.optimizer)), el('td', {}, show(l.pid)), el('td', {}, l.priority),
            el('td', { class: 'iterations' }, l.iterations), el('td', { class: 'best' }, show(l.best)), el('td', {}, show(l.waiters)), el('td', {}, l.token)))));
      for (const l of o.locks) {
        const key = l.session + '\u0000' + l.variable;
        let s = series.get(key);
        if (!s) {
          s = { t: [], best: [], iter: [], box: chart(`${l.session} / ${l.variable}`, [{ label: 'best score', color: '#1e88e5' }, { label: 'iterations', color: '#757575' }], 420) };
          s.box.dataset.variable = l.variable;
          series.set(key, s);
          plots.append(s.box);
        }
        if (s.t.length && s.t[s.t.length - 1] === o.time) continue;
        s.t.push(o.time); s.best.push(score(l.best)); s.iter.push(l.iterations);
        s.box.dataset.points = String(s.t.length);
        if (s.box._plot) s.box._plot.setData([s.t, s.best, s.iter]);
      }
      updateRuns(o.runs || []);
      ended.replaceChildren(table(['minute', 'ended', 'success rate'], o.success.filter((p) => p.count > 0).map((p) =>
        el('tr', {}, el('td', {}, new Date(p.t * 1000).toISOString()), el('td', {}, p.count), el('td', {}, fmt(p.mean, 2))))));
    };
    function updateRuns(list) {
      const seen = new Set(list.map((r) => r.run));
      for (const [k, r] of runs) if (!seen.has(k)) { r.box.remove(); runs.delete(k); }
      if (list.length === 0 && !runsBox.querySelector('#no-runs')) runsBox.replaceChildren(el('p', { id: 'no-runs' }, 'No optimizer run on this node.'));
      if (list.length > 0) { const none = runsBox.querySelector('#no-runs'); if (none) none.remove(); }
      for (const run of list) {
        let r = runs.get(run.run);
        if (!r) {
          r = { info: el('div', { class: 'run-info' }), trialsBox: el('div', { class: 'trials' }), plot: convergence() };
          r.box = el('section', { class: 'run', dataset: { run: run.run } }, el('h3', {}, 'Run ', run.run), r.info, r.plot, r.trialsBox);
          runs.set(run.run, r);
          runsBox.append(r.box);
        }
        const i = run.info;
        const key = `${i.asked}/${i.told}/${i.pending}`;
        if (r.key === key) continue;   // nothing new since the last second
        r.key = key;
        const b = run.best;
        r.info.replaceChildren(table(['', ''], [['session', el('a', { href: '/session?id=' + encodeURIComponent(i.session) }, i.session)],
          ['variables', i.variables.join(', ')], ['algorithm', show(i.algorithm)], ['direction', i.direction],
          ['budget', i.budget], ['asked', i.asked], ['told', i.told], ['pending', i.pending], ['seed', i.seed],
          ['best', b ? `trial ${b.trial}: ${fmt(b.score, 6)} at ${show(b.params)}` : '—']]
          .map(([k, v]) => el('tr', { dataset: { field: k } }, el('th', {}, k), el('td', {}, v)))));
        // best so far after each trial, in trial order (failed and pending trials keep it)
        const better = i.direction === 'maximize' ? ((a, c) => a > c) : ((a, c) => a < c);
        let best = null;
        const rows = run.trials.map((t) => {
          if (t.state === 'complete' && (best === null || better(t.score, best))) best = t.score;
          return { t: t, best: best };
        });
        const xs = rows.map((x) => x.t.id), ys = rows.map((x) => x.t.state === 'complete' ? x.t.score : null), bs = rows.map((x) => x.best);
        r.plot.dataset.points = String(xs.length);
        r.plot.dataset.best = best === null ? '' : String(best);
        if (r.plot._plot) r.plot._plot.setData([xs, ys, bs]);
        r.trialsBox.replaceChildren(table(['trial', 'state', 'score', 'best so far', 'parameters', 'reason'],
          rows.map(({ t, best }) => el('tr', { dataset: { trial: t.id, state: t.state } }, el('td', {}, t.id), el('td', {}, t.state),
            el('td', { class: 'score' }, t.state === 'complete' ? fmt(t.score, 6) : '—'), el('td', { class: 'best-so-far' }, best === null ? '—' : fmt(best, 6)),
            el('td', {}, show(t.params)), el('td', {}, t.reason === undefined ? '' : show(t.reason))))));
      }
    }
    function convergence() {
      if (!window.uPlot) return el('p', { class: 'error' }, 'uPlot is not installed (make console-vendor)');
      const box = el('div', { class: 'chart convergence' });
      box._plot = new window.uPlot({ title: 'convergence: best so far vs trial', width: 520, height: 220, scales: { x: { time: false } },
        series: [{ label: 'trial' }, { label: 'score', stroke: '#90a4ae', paths: () => null, points: { show: true, size: 5 } },
          { label: 'best so far', stroke: '#1e88e5', width: 2, spanGaps: true }] }, [[], [], []], box);
      return box;
    }
    update(o);
    stream('/api/events?optimizations=1', { optimizations: update });
  }

  // ---- access --------------------------------------------------------------------
  async function access() {
    const id = new URLSearchParams(location.search).get('id') || '';
    const a = await api('/api/access' + (id ? '?id=' + encodeURIComponent(id) : ''));
    const input = el('input', { id: 'rules-session', placeholder: 'session id for its rules', value: id });
    const form = el('form', { on: { submit: (e) => { e.preventDefault(); location.href = '/access?id=' + encodeURIComponent(input.value); } } }, input, el('button', {}, 'show rules'));
    main.replaceChildren(el('h1', {}, 'Access'),
      el('div', { class: 'cards' }, card('denied (1 h)', a.last_hour.denied, 'denied-count'), card('rate limited (1 h)', a.last_hour.rate_limited, 'rate-limited-count')),
      el('h2', {}, 'Rules per variable'), form,
      id ? (Object.keys(a.rules).length === 0 ? el('p', { id: 'rules' }, 'No rules: only the session itself has access.') :
        el('div', { id: 'rules' }, table(['variable', 'rules'], Object.entries(a.rules).map(([n, r]) => el('tr', {}, el('td', {}, n), el('td', {}, show(r))))))) : null,
      el('h2', {}, 'Denied attempts (newest first)'),
      a.denied.length === 0 ? el('p', { id: 'denied' }, 'None.') :
        el('div', { id: 'denied' }, table(['at', 'session', 'variable', 'principal', 'permission'],
          a.denied.map((e) => el('tr', {}, el('td', {}, time(e.at)), el('td', {}, show(e.session)), el('td', {}, show(e.variable)), el('td', {}, show(e.principal)), el('td', {}, show(e.permission)))))),
      el('h2', {}, 'Rate limits'),
      id ? el('p', { id: 'rate-limit' }, a.rate_limit === null ? 'No such session.' :
        (a.rate_limit.rate > 0 ? `Session ${id}: ${fmt(a.rate_limit.rate, 3)} operations/s, bursts of ${fmt(a.rate_limit.burst, 0)}, ${fmt(a.rate_limit.tokens, 2)} tokens left now.` :
          `Session ${id}: no rate limit.`)) : null,
      a.rate_limits.length === 0 ? el('p', { id: 'rate-limits' }, 'No session has a rate limit.') :
        el('div', { id: 'rate-limits' }, table(['session', 'operations / s', 'burst', 'tokens now'],
          a.rate_limits.map((l) => el('tr', { dataset: { session: l.session } }, el('td', {}, el('a', { href: '/access?id=' + encodeURIComponent(l.session) }, l.session)),
            el('td', { class: 'rate' }, fmt(l.rate, 3)), el('td', { class: 'burst' }, fmt(l.burst, 0)), el('td', {}, fmt(l.tokens, 2)))))));
  }

  // ---- models ---------------------------------------------------------------------
  // Decisions and verdicts come as JSON forms of Erlang terms: "continue",
  // ["winner", Id], ["stopped", "manual"].
  const term = (t) => Array.isArray(t) ? t.map(show).join(': ') : show(t);
  const ci = (c) => Array.isArray(c) && c.length === 2 ? `[${fmt(c[0], 4)}, ${fmt(c[1], 4)}]` : show(c);
  function experiment(t) {
    const arms = (t.arm_summary || []).map(([id, a]) => Object.assign({ model: id }, a));
    // the traffic split: weights of an A/B test; baseline / new model percent of a rollout
    let split;
    if (t.kind === 'rollout') split = new Map([[t.models[0], 100 - t.percent], [t.models[1], t.percent]]);
    else {
      const w = t.weights || [], sum = w.reduce((a, b) => a + b, 0) || 1;
      split = new Map((t.models || []).map((m, i) => [m, 100 * (w[i] || 0) / sum]));
    }
    const head = el('table', {}, el('tbody', {},
      [['kind', t.kind], ['name', t.name], ['status', t.status], ['decision', term(t.decision)]]
        .concat(t.kind === 'ab' ? [['metric', show(t.spec && t.spec.metric)], ['alpha', show(t.spec && t.spec.alpha)],
          ['minimum detectable effect', show(t.spec && t.spec.mde)], ['min samples per arm', show(t.spec && t.spec.min_samples)],
          ['p-value (smallest of the comparisons)', fmt(t.p_value, 4)],
          ['sample ratio mismatch p', t.srm ? fmt(t.srm.p, 4) : '—']] :
          [['step', `${t.step} of ${(t.steps || []).length}`], ['steps (% on the new model)', (t.steps || []).join(' → ')],
            ['on the new model', t.percent + ' %']])
        .map(([k, v]) => el('tr', { dataset: { field: k } }, el('th', {}, k), el('td', {}, v)))));
    const armTable = el('div', { class: 'arms' }, table(['model', 'traffic', 'samples', 'successes', 'success rate', 'latency p50 ms', 'latency p95 ms'],
      arms.map((a) => el('tr', { dataset: { model: a.model } }, el('td', {}, a.model), el('td', { class: 'traffic' }, fmt(split.get(a.model), 1) + ' %'),
        el('td', { class: 'n' }, a.n), el('td', {}, a.successes), el('td', {}, fmt(a.success_rate, 4)),
        el('td', {}, fmt(a.latency_p50_ms, 2)), el('td', {}, fmt(a.latency_p95_ms, 2))))));
    const parts = [el('h3', {}, t.id), head, el('h4', {}, 'Arms and traffic split'), armTable];
    if (t.kind === 'ab') {
      parts.push(el('h4', {}, 'Sequential test (always-valid) per treatment'),
        el('div', { class: 'comparisons' }, table(['treatment', 'control mean', 'treatment mean', 'effect', 'confidence interval', 'p-value'],
          Object.entries(t.comparisons || {}).map(([m, c]) => el('tr', { dataset: { model: m } }, el('td', {}, m),
            el('td', {}, fmt(c.control_mean, 4)), el('td', {}, fmt(c.treatment_mean, 4)), el('td', { class: 'effect' }, fmt(c.effect, 4)),
            el('td', { class: 'ci' }, ci(c.ci)), el('td', { class: 'p' }, fmt(c.p_value, 4)))))));
    } else {
      parts.push(el('h4', {}, 'Gates'),
        el('div', { class: 'gates' }, table(['metric', 'max degradation', 'degradation', 'confidence interval', 'samples (baseline / new)', 'verdict'],
          (t.gates || []).map((g) => el('tr', { dataset: { metric: g.metric } }, el('td', {}, show(g.metric)), el('td', {}, fmt(g.max_degradation, 4)),
            el('td', {}, fmt(g.degradation, 4)), el('td', {}, ci(g.ci)), el('td', {}, `${g.n_baseline} / ${g.n_new}`),
            el('td', { class: 'verdict verdict-' + term(g.verdict) }, term(g.verdict)))))));
    }
    return el('section', { class: 'experiment ' + t.status, dataset: { id: t.id, kind: t.kind, status: t.status } }, parts);
  }
  async function models() {
    const m = await api('/api/models');
    if (m.absent) { const part = state.config.absent.find((p) => p.module === 'dspex_models'); main.replaceChildren(el('h1', {}, 'Models'), absent(part)); return; }
    const reg = el('div', { id: 'models' }), aliases = el('div', { id: 'aliases' });
    const running = el('div', { id: 'running' }), finished = el('div', { id: 'finished' });
    main.replaceChildren(el('h1', {}, 'Models'), el('h2', {}, 'Registered models'), reg, el('h2', {}, 'Aliases'), aliases,
      el('h2', {}, 'Running experiments and rollouts'), running, el('h2', {}, 'Finished experiments and rollouts'), finished);
    const update = (m) => {
      reg.replaceChildren(m.models.length === 0 ? el('p', {}, 'No models registered.') :
        table(['model', 'name', 'version', 'status', 'registered', 'artifact', 'params', 'metadata'],
          m.models.map((x) => el('tr', { dataset: { model: x.id } }, el('td', {}, x.id), el('td', {}, x.name), el('td', {}, x.version),
            el('td', {}, x.status), el('td', {}, time(x.registered_at)), el('td', {}, show(x.artifact)), el('td', {}, show(x.params)),
            el('td', { class: 'metadata' }, show(x.metadata))))));
      aliases.replaceChildren(m.aliases.length === 0 ? el('p', {}, 'No aliases.') :
        table(['name', 'alias', 'model'], m.aliases.map((a) => el('tr', { dataset: { alias: a.name + ':' + a.alias } },
          el('td', {}, a.name), el('td', {}, a.alias), el('td', { class: 'target' }, a.model)))));
      const live = m.tests.filter((t) => t.status !== 'finished'), done = m.tests.filter((t) => t.status === 'finished');
      running.replaceChildren(...(live.length ? live.map(experiment) : [el('p', {}, 'None.')]));
      finished.replaceChildren(...(done.length ? done.map(experiment) : [el('p', {}, 'None.')]));
    };
    update(m);
    stream('/api/events?models=1', { models: (m) => { if (!m.absent) update(m); } });
  }

  // ---- events ---------------------------------------------------------------------
  async function events() {
    const part = state.config.absent.find((p) => p.module === 'dspex_events');
    if (part) { main.replaceChildren(el('h1', {}, 'Events'), absent(part)); return; }
    const tl = timeline(null, null);
    main.replaceChildren(el('h1', {}, 'Events (every session, newest first)'), tl.box);
    await tl.ready;
  }

  // ---- regions ---------------------------------------------------------------------
  // dspex_region:topology/0 and fenced/0 (/api/regions), refreshed every
  // second by the stream's `regions' event. Times are system time in ms.
  const msTime = (ms) => (typeof ms === 'number' && ms > 0) ? new Date(ms).toISOString().replace('T', ' ').replace('Z', '') : '—';
  const ago = (ms) => (typeof ms === 'number' && ms > 0) ? ` (${fmt(Math.max(0, Date.now() - ms) / 1000, 0)} s ago)` : '';
  const NO_REGION = 'Regions not configured: this node has no region (no `region` in the dspex_bridge application environment), so it is not part of a multi-region deployment.';
  async function regions() {
    const r = await api('/api/regions');
    const part = state.config.absent.find((p) => p.module === 'dspex_region');
    if (part) { main.replaceChildren(el('h1', {}, 'Regions'), absent(part)); return; }
    const me = el('div', { id: 'region' }), peers = el('div', { id: 'peers' });
    const off = el('p', { id: 'regions-off', class: 'absent' }, NO_REGION);
    const update = (r) => {
      if (!r.configured) { main.replaceChildren(el('h1', {}, 'Regions'), off); return; }
      if (!me.isConnected) main.replaceChildren(el('h1', {}, 'Regions'), el('h2', {}, 'This region'), me, el('h2', {}, 'Peer regions'), peers);
      const coords = (c) => Array.isArray(c) ? `${fmt(c[0], 4)}, ${fmt(c[1], 4)}` : show(c);
      me.replaceChildren(el('table', {}, el('tbody', {}, [
        ['region', r.region], ['coordinates', coords(r.coords)], ['gateway', `port ${show(r.gateway_port)} (${show(r.transport)})`],
        ['replication mode', show(r.replication)],
        ['fenced', r.fenced ? `yes: only ${(r.reachable || []).join(', ')} reachable, no majority: writes of its sessions that have backup regions are refused` : 'no'],
        ['sessions (primary here)', show(r.sessions)], ['backup sessions (of other regions)', show(r.backup_sessions)]]
        .map(([k, v]) => el('tr', { dataset: { field: k } }, el('th', {}, k), el('td', {}, v))))));
      peers.replaceChildren(r.peers.length === 0 ? el('p', {}, 'No peer regions.') :
        table(['region', 'link', 'since', 'last error', 'gateway', 'coordinates', 'RTT p50 ms', 'RTT p99 ms', 'RTT EWMA ms', 'samples',
          'last health check', 'replication lag (versions)', 'replication lag (ms)', 'sessions'],
        r.peers.map((p) => {
          const rtt = p.rtt || {}, rep = p.replication || {};
          return el('tr', { dataset: { peer: p.name, status: p.status } }, el('td', {}, p.name),
            el('td', { class: 'status status-' + p.status }, p.status), el('td', { class: 'since' }, msTime(p.since) + ago(p.since)),
            el('td', { class: 'last-error' }, p.last_error === null ? '' : show(p.last_error)), el('td', {}, show(p.gateway)), el('td', {}, coords(p.coords)),
            el('td', { class: 'p50' }, fmt(rtt.p50_ms, 2)), el('td', { class: 'p99' }, fmt(rtt.p99_ms, 2)), el('td', { class: 'ewma' }, fmt(rtt.ewma_ms, 2)),
            el('td', { class: 'samples' }, show(rtt.samples)), el('td', { class: 'checked' }, msTime(p.last_check_at)),
            el('td', { class: 'lag-versions' }, show(rep.lag_versions)), el('td', { class: 'lag-ms' }, show(rep.lag_ms)),
            el('td', { class: 'sessions' }, show(p.sessions)));
        })));
    };
    update(r);
    stream('/api/events?regions=1', { regions: update });
  }

  const routes = {
    '/': overview, '/sessions': sessions, '/session': session, '/optimizations': optimizations, '/access': access,
    '/events': events, '/models': models, '/regions': regions,
  };

  async function route() {
    state.streams.forEach((c) => c.abort()); state.streams = [];
    main.dataset.ready = 'false';
    document.querySelectorAll('header nav a').forEach((a) => a.classList.toggle('active', a.getAttribute('href') === location.pathname));
    try {
      state.config = await api('/api/config');
      document.getElementById('node').textContent = state.config.node + (state.config.write ? ' (writes enabled)' : ' (read-only)');
      await (routes[location.pathname] || (async () => main.replaceChildren(el('p', {}, 'Unknown page.'))))();
    } catch (e) { fail(e); }
    main.dataset.ready = 'true';
  }

  document.getElementById('token').value = state.token;
  document.getElementById('token-form').addEventListener('submit', (e) => {
    e.preventDefault();
    state.token = document.getElementById('token').value;
    sessionStorage.setItem('dspex_token', state.token);
    route();
  });
  route();
})();
