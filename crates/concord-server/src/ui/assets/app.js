// Concord dashboard. Fills the server-rendered pages from the hub's own /v1 API
// and keeps them live from its event stream. The session cookie authenticates
// every call; every call that changes something carries the session's CSRF token
// in X-Concord-CSRF. Text is always inserted as text (textContent), never as HTML.
'use strict';

(() => {
  const meta = (name) => {
    const el = document.querySelector(`meta[name="${name}"]`);
    return el ? el.content : '';
  };
  const CSRF = meta('concord-csrf');
  const ADMIN = meta('concord-role') === 'admin';
  // Countdowns follow the hub's clock, not this machine's.
  const SKEW = (Number(meta('concord-now')) || Date.now()) - Date.now();
  const now = () => Date.now() + SKEW;
  const PAGE = document.body.dataset.page;
  const PAGE_ID = document.body.dataset.id || '';

  // ---------- DOM helpers ----------

  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k === 'dataset') Object.assign(el.dataset, v);
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    for (const kid of kids.flat(Infinity)) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return el;
  }

  const SVG = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    return el;
  }

  const $ = (id) => document.getElementById(id);

  // Replaces a container's children, keeping keyboard focus on the control that
  // had it (same data-key) so a live refresh never throws the user out.
  function fill(container, ...kids) {
    if (!container) return;
    const active = document.activeElement;
    const key = active && container.contains(active) ? active.dataset.key : null;
    container.replaceChildren(...kids.flat(Infinity).filter((k) => k !== null && k !== undefined && k !== false));
    if (key) {
      const again = container.querySelector(`[data-key="${CSS.escape(key)}"]`);
      if (again) again.focus();
    }
  }

  function badge(text, cls, title) {
    return h('span', { class: `badge ${cls || ''}`, title }, text);
  }

  function table(headers, rows, empty) {
    if (!rows.length) return h('p', { class: 'muted' }, empty);
    return h('div', { class: 'table-wrap' },
      h('table', {},
        h('thead', {}, h('tr', {}, headers.map((c) => h('th', { class: c.num ? 'num' : null, scope: 'col' }, c.label || c)))),
        h('tbody', {}, rows)));
  }

  // ---------- time ----------

  const ms = (t) => (t ? Date.parse(t) : NaN);
  function dur(d) {
    const a = Math.abs(d);
    if (a < 10e3) return `${(a / 1e3).toFixed(1)} s`;
    if (a < 120e3) return `${Math.round(a / 1e3)} s`;
    if (a < 7200e3) return `${Math.round(a / 60e3)} min`;
    if (a < 172800e3) return `${Math.round(a / 3600e3)} h`;
    return `${Math.round(a / 86400e3)} d`;
  }
  const ago = (t) => `${dur(now() - ms(t))} ago`;
  function clock(t) {
    const d = new Date(ms(t));
    return isNaN(d) ? '' : d.toLocaleTimeString([], { hour12: false });
  }
  function when(t) {
    return h('time', { datetime: t, title: t }, ago(t));
  }

  // ---------- API ----------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: 'application/json' };
    if (method !== 'GET') headers['X-Concord-CSRF'] = CSRF;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const resp = await fetch(path, {
      method,
      headers,
      credentials: 'same-origin',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (resp.status === 401) {
      window.location.assign('/ui/login');
      throw new ApiError(401, 'unauthorized', 'the session ended; log in again');
    }
    if (!resp.ok) {
      const e = data && data.error ? data.error : {};
      throw new ApiError(resp.status, e.code || 'error', e.message || `HTTP ${resp.status}`);
    }
    return data;
  }

  const enc = encodeURIComponent;

  // ---------- toast and confirmation ----------

  let toastTimer = null;
  function toast(text, bad) {
    const el = $('toast');
    if (!el) return;
    el.textContent = text;
    el.className = bad ? 'toast bad' : 'toast';
    el.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { el.hidden = true; }, bad ? 9000 : 4000);
  }

  // Resolves true only when the user pressed Confirm (Escape and Cancel say no).
  function confirmStep(title, text, verb) {
    const dlg = $('confirm');
    $('confirm-title').textContent = title;
    $('confirm-text').textContent = text;
    $('confirm-ok').textContent = verb || 'Confirm';
    return new Promise((resolve) => {
      dlg.addEventListener('close', () => resolve(dlg.returnValue === 'ok'), { once: true });
      dlg.returnValue = 'cancel';
      dlg.showModal();
      $('confirm-cancel').focus();
    });
  }

  // An admin action: confirm, call, report, refresh. The hub decides who may:
  // a reader's call comes back 403 and says so.
  async function act(spec) {
    if (!(await confirmStep(spec.title, spec.text, spec.verb))) return false;
    try {
      await api(spec.method, spec.path, spec.body);
      toast(spec.done);
      refreshSoon(0);
      return true;
    } catch (e) {
      toast(`${e.status === 403 ? 'Refused' : 'Failed'}: ${e.message}`, true);
      return false;
    }
  }

  function actionButton(label, key, spec, danger) {
    if (!ADMIN) return null;
    return h('button', {
      type: 'button',
      class: danger ? 'danger' : null,
      dataset: { key },
      onclick: () => act(spec),
    }, label);
  }

  // Exposed for the browser tests and the console: the same path the buttons take.
  window.concord = { act, api };

  // ---------- live: the event stream ----------

  const live = { cursor: null, handlers: [] };
  const onEvent = (fn) => live.handlers.push(fn);

  function setLive(state) {
    const el = $('live');
    if (!el) return;
    el.className = `live ${state}`;
    el.textContent = state === 'on' ? 'live' : state === 'off' ? 'reconnecting…' : 'connecting…';
  }

  function dispatchBlock(block) {
    let event = 'message';
    const data = [];
    for (const line of block.split('\n')) {
      if (!line || line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') event = value;
      else if (field === 'data') data.push(value);
    }
    if (event === 'cursor_expired') {
      // Fell behind retention: start again from now and redraw from the API.
      live.cursor = null;
      refreshSoon(0);
      return;
    }
    if (!data.length) return;
    let ev;
    try { ev = JSON.parse(data.join('\n')); } catch (_) { return; }
    if (typeof ev.seq !== 'number') return;
    live.cursor = ev.seq;
    for (const fn of live.handlers) {
      try { fn(ev); } catch (e) { console.error(e); }
    }
  }

  // EventSource cannot see every topic (the hub names each SSE event after its
  // topic), so the stream is read with fetch and parsed here.
  async function stream() {
    let backoff = 500;
    for (;;) {
      try {
        if (live.cursor === null) live.cursor = (await api('GET', '/v1/status')).last_event_seq;
        const resp = await fetch(`/v1/events/stream?from=${live.cursor}`, {
          credentials: 'same-origin',
          headers: { Accept: 'text/event-stream' },
        });
        if (resp.status === 401) { window.location.assign('/ui/login'); return; }
        if (!resp.ok || !resp.body) throw new Error(`stream: HTTP ${resp.status}`);
        setLive('on');
        backoff = 500;
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value.replace(/\r\n?/g, '\n');
          let cut;
          while ((cut = buf.indexOf('\n\n')) >= 0) {
            dispatchBlock(buf.slice(0, cut));
            buf = buf.slice(cut + 2);
          }
        }
      } catch (_) {
        // fall through to reconnect
      }
      setLive('off');
      await new Promise((r) => setTimeout(r, backoff));
      backoff = Math.min(backoff * 2, 10000);
      refreshSoon(0);
    }
  }

  // ---------- page refresh ----------

  let loader = null;
  let refreshTimer = null;
  let loading = false;
  let again = false;

  async function refresh() {
    if (!loader) return;
    if (loading) { again = true; return; }
    loading = true;
    try {
      await loader();
    } catch (e) {
      if (e.status !== 401) toast(`Could not load: ${e.message}`, true);
    } finally {
      loading = false;
      if (again) { again = false; refreshSoon(100); }
    }
  }

  // Bursts of events (a batch of tasks) cause one reload, not hundreds.
  function refreshSoon(delay) {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refresh, delay === undefined ? 250 : delay);
  }

  const topicIs = (ev, ...prefixes) => prefixes.some((p) => ev.topic === p || ev.topic.startsWith(`${p}.`));

  // Countdowns tick in the browser between reloads: every element with
  // data-deadline (ms since epoch) shows the time left, then "overdue".
  function tick() {
    for (const el of document.querySelectorAll('[data-deadline]')) {
      const left = Number(el.dataset.deadline) - now();
      const label = el.dataset.label || '';
      if (left >= 0) {
        el.textContent = `${label}${dur(left)}`;
        el.classList.remove('state-overdue');
      } else {
        el.textContent = `${el.dataset.overdue || 'overdue'} ${dur(-left)}`;
        el.classList.add('state-overdue');
      }
    }
    for (const el of document.querySelectorAll('time[datetime]')) {
      if (!el.dataset.fixed) el.textContent = ago(el.getAttribute('datetime'));
    }
  }

  // ---------- Fleet ----------

  const RECENT_ENDED_MS = 15 * 60e3;

  // What an instance is now: the entity's record says who the primary is (an old
  // primary's own record may still say "primary" after a transfer).
  function instanceKind(i, entity) {
    if (i.state === 'live' && entity && entity.primary === i.id) return 'primary';
    if (i.role === 'fork') return 'fork';
    if (i.state !== 'live' && i.role === 'primary') return 'former primary';
    return 'secondary';
  }

  const isGhost = (i, kind) => kind !== 'primary' && !(i.label || '').trim();

  function liveness(i) {
    if (i.state !== 'live') {
      return h('span', { class: `state-${i.state}`, dataset: { state: i.state } },
        `${i.state} `, h('time', { datetime: i.last_seen_at }, ago(i.last_seen_at)));
    }
    // The hub expires an instance one TTL after its last heartbeat.
    const deadline = ms(i.last_seen_at) + i.ttl_ms;
    return h('span', { class: 'state-live', dataset: { state: 'live' } },
      h('span', { dataset: { deadline, label: 'live · ', overdue: 'heartbeat overdue' } }, 'live'));
  }

  function instanceRow(i, entity) {
    const kind = instanceKind(i, entity);
    const ghost = i.state === 'live' && isGhost(i, kind);
    const label = (i.label || '').trim();
    const name = label || i.id;
    const badges = [badge(kind, kind === 'former primary' ? '' : kind)];
    if (ghost) badges.push(badge('ghost', 'ghost', 'no label: nobody said what this instance is for'));
    if (i.persistent) badges.push(badge('persistent', 'persistent', 'a persistent secondary: meant to stay'));
    const details = [];
    if (i.role === 'fork') {
      details.push(h('span', {}, 'fork of ', h('code', {}, i.forked_from || '?'), ' · age ',
        h('time', { datetime: i.registered_at }, ago(i.registered_at))));
    }
    if (i.host) details.push(h('span', {}, i.host));
    if (i.meta && typeof i.meta.state_detail === 'string') details.push(h('span', {}, i.meta.state_detail));
    details.push(h('code', {}, i.id));
    const actions = [];
    if (i.state === 'live' && kind !== 'primary' && i.role !== 'fork' && !ghost) {
      actions.push(actionButton('Make primary', `transfer-${i.id}`, {
        title: 'Transfer the primary role?',
        text: `${entity.name}: the primary role moves from ${entity.primary || 'nobody'} to ${name} (${i.id}). The epoch goes up; the old primary's fence stops working.`,
        verb: 'Transfer primary',
        method: 'POST',
        path: `/v1/entities/${enc(entity.name)}/primary/transfer`,
        body: { to: i.id },
        done: `${name} is now primary of ${entity.name}`,
      }));
    }
    if (i.state === 'live') {
      actions.push(actionButton('Close', `close-${i.id}`, {
        title: 'Close this instance?',
        text: `${name} (${i.id}) of ${entity.name} ends now: its session token stops working and its leases and claims are released.`,
        verb: 'Close instance',
        method: 'DELETE',
        path: `/v1/instances/${enc(i.id)}`,
        done: `${name} closed`,
      }, true));
    }
    return h('li', {
      class: `inst ${kind.replace(' ', '-')} is-${i.state}${ghost ? ' ghost' : ''}`,
      dataset: { instance: i.id, kind, state: i.state },
    },
    h('span', { class: 'badges' }, badges),
    h('a', { class: label ? 'name' : 'name unlabelled', href: `/ui/instances/${enc(i.id)}`, title: i.id }, label || 'unlabelled'),
    liveness(i),
    h('span', { class: 'detail' }, details, actions.some(Boolean) ? h('span', { class: 'actions' }, actions) : null));
  }

  const KIND_ORDER = { primary: 0, secondary: 1, fork: 2, 'former primary': 3 };

  async function loadFleet() {
    const [ents, liveList, expired, closed, ghosts] = await Promise.all([
      api('GET', '/v1/entities'),
      api('GET', '/v1/instances?state=live'),
      api('GET', '/v1/instances?state=expired'),
      api('GET', '/v1/instances?state=closed'),
      api('GET', '/v1/ghosts'),
    ]);
    const cutoff = now() - RECENT_ENDED_MS;
    const recentEnded = [...expired.instances, ...closed.instances].filter((i) => ms(i.last_seen_at) >= cutoff);
    const groups = new Map(ents.entities.map((e) => [e.name, { e, insts: [] }]));
    for (const i of [...liveList.instances, ...recentEnded]) {
      if (!groups.has(i.entity)) groups.set(i.entity, { e: { name: i.entity, epoch: 0, primary: null, live_instances: 0 }, insts: [] });
      groups.get(i.entity).insts.push(i);
    }
    let ghostCount = 0;
    const cards = [...groups.values()].sort((a, b) => a.e.name.localeCompare(b.e.name)).map(({ e, insts }) => {
      insts.sort((a, b) => (a.state === 'live' ? 0 : 1) - (b.state === 'live' ? 0 : 1)
        || KIND_ORDER[instanceKind(a, e)] - KIND_ORDER[instanceKind(b, e)]
        || ms(b.last_seen_at) - ms(a.last_seen_at));
      const ghostsHere = insts.filter((i) => i.state === 'live' && isGhost(i, instanceKind(i, e))).length;
      ghostCount += ghostsHere;
      const primary = insts.find((i) => i.id === e.primary);
      return h('article', { class: `card entity${ghostsHere ? ' has-ghost' : ''}`, dataset: { entity: e.name } },
        h('header', {},
          h('h3', {}, e.name),
          h('span', { class: 'muted' }, `${e.live_instances} live`),
          ghostsHere ? badge(`${ghostsHere} ghost${ghostsHere > 1 ? 's' : ''}`, 'ghost') : null,
          h('span', { class: 'epoch muted', title: 'the fence: every primary grant raises it' }, `epoch ${e.epoch}`)),
        e.primary
          ? null
          : h('p', { class: 'state-overdue' }, 'no primary'),
        primary || !e.primary ? null : h('p', { class: 'muted' }, 'primary ', h('code', {}, e.primary)),
        h('ul', { class: 'insts' }, insts.map((i) => instanceRow(i, e))));
    });
    fill($('entities'), cards.length ? cards : h('p', { class: 'muted' }, 'No entities yet: register an instance to see it here.'));
    const total = liveList.instances.length;
    $('fleet-summary').textContent = `${groups.size} entities · ${total} live instances · ${ghostCount} ghosts`;
    const g = $('ghosts');
    if (ghosts.ghosts.length) {
      g.hidden = false;
      fill(g, h('h2', {}, `Ghost reports (${ghosts.ghosts.length})`),
        h('ul', {}, ghosts.ghosts.slice(0, 20).map((x) => h('li', {},
          h('b', {}, x.reason), ' · ', x.entity || '?', ' · ', h('code', {}, x.instance || '?'),
          x.host ? ` on ${x.host}` : '', ' · ', h('time', { datetime: x.seen_at }, ago(x.seen_at))))));
    } else {
      g.hidden = true;
    }
    tick();
  }

  function fleetPage() {
    loader = loadFleet;
    onEvent((ev) => {
      if (ev.topic === 'sys.instance.expired' || ev.topic === 'sys.instance.closed') {
        // Show the end at once; the reload that follows fills in the rest.
        const id = ev.data && ev.data.instance;
        const row = id && document.querySelector(`li.inst[data-instance="${CSS.escape(id)}"] .state-live`);
        if (row) {
          const state = ev.topic.endsWith('expired') ? 'expired' : 'closed';
          row.replaceWith(h('span', { class: `state-${state}`, dataset: { state } }, state));
        }
      }
      if (topicIs(ev, 'sys.instance', 'sys.primary', 'sys.ghost')) refreshSoon();
    });
  }

  // ---------- Instance ----------

  function kv(pairs) {
    return h('dl', { class: 'kv' }, pairs.filter(([, v]) => v !== null && v !== undefined && v !== '')
      .map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
  }

  const json = (v) => h('pre', { class: 'json' }, JSON.stringify(v, null, 2));

  function eventItem(ev, fresh) {
    return h('li', { class: fresh ? 'fresh' : null, dataset: { seq: ev.seq, topic: ev.topic } },
      h('span', { class: 'muted' }, `#${ev.seq}`),
      h('span', { class: 'muted', title: ev.time }, clock(ev.time)),
      h('span', { class: 'topic' }, ev.topic),
      h('span', { class: 'data', title: JSON.stringify(ev.data) },
        ev.source && ev.source.instance ? `${ev.source.instance} ` : '', JSON.stringify(ev.data)));
  }

  const concerns = (ev, id) => (ev.source && ev.source.instance === id) || (ev.data && (ev.data.instance === id || ev.data.to === id || ev.data.from === id));

  async function recentEvents(filter, max) {
    const status = await api('GET', '/v1/status');
    const from = Math.max(0, status.last_event_seq - 2000);
    const found = [];
    let cursor = from;
    for (let page = 0; page < 3; page++) {
      const res = await api('GET', `/v1/events?from=${cursor}&limit=1000`);
      for (const ev of res.events) if (filter(ev)) found.push(ev);
      if (!res.events.length || res.next <= cursor) break;
      cursor = res.next;
    }
    return found.slice(-max).reverse();
  }

  async function loadInstance() {
    const id = PAGE_ID;
    let inst;
    try {
      inst = (await api('GET', `/v1/instances/${enc(id)}`)).instance;
    } catch (e) {
      if (e.status === 404) { fill($('instance'), h('p', { class: 'error' }, `No instance ${id}.`)); return; }
      throw e;
    }
    const entity = (await api('GET', `/v1/entities/${enc(inst.entity)}`).catch(() => null)) || { name: inst.entity, primary: null };
    const primary = entity.primary ? entity.primary.id : null;
    const kind = instanceKind(inst, { primary });
    fill($('crumb-entity'), h('span', {}, inst.entity));
    $('inst-title').textContent = (inst.label || '').trim() || inst.id;
    fill($('inst-sub'), badge(kind, kind), ' ', inst.state === 'live' && isGhost(inst, kind) ? badge('ghost', 'ghost') : null,
      ' ', inst.persistent ? badge('persistent', 'persistent') : null, ' ', h('code', {}, inst.id));
    const m = inst.meta && typeof inst.meta === 'object' ? inst.meta : {};
    const proc = m.process && typeof m.process === 'object' ? m.process : null;
    const actions = inst.state === 'live'
      ? h('p', {}, actionButton('Close instance', 'close', {
        title: 'Close this instance?',
        text: `${inst.id} of ${inst.entity} ends now: its session token stops working and its leases and claims are released.`,
        verb: 'Close instance',
        method: 'DELETE',
        path: `/v1/instances/${enc(inst.id)}`,
        done: `${inst.id} closed`,
      }, true))
      : null;
    fill($('instance'),
      h('section', { class: 'panel' }, h('h2', {}, 'Presence'), kv([
        ['state', liveness(inst)],
        ['role', kind],
        ['entity', inst.entity],
        ['epoch', String(entity.epoch ?? '')],
        ['last heartbeat', when(inst.last_seen_at)],
        ['TTL', dur(inst.ttl_ms)],
        ['durable lease until', inst.lease_until],
        ['registered', when(inst.registered_at)],
        ['forked from', inst.forked_from],
        ['fork point', inst.fork_point === null || inst.fork_point === undefined ? null : String(inst.fork_point)],
      ]), actions),
      h('section', { class: 'panel' }, h('h2', {}, 'Process'), kv([
        ['detail', typeof m.state_detail === 'string' ? m.state_detail : null],
        ['process', proc ? String(proc.state ?? '') : null],
        ['pid', proc && proc.pid !== undefined ? String(proc.pid) : null],
        ['restarts', proc && proc.restarts !== undefined ? String(proc.restarts) : null],
        ['port', proc && proc.port !== undefined ? String(proc.port) : null],
        ['home', proc && proc.home !== undefined ? String(proc.home) : null],
        ['last exit', proc && proc.last_exit !== undefined && proc.last_exit !== null ? JSON.stringify(proc.last_exit) : null],
        ['endpoint', inst.endpoint],
        ['host', inst.host],
        ['version', inst.version],
        ['capabilities', inst.capabilities.length ? inst.capabilities.map((c) => badge(c)) : 'none'],
      ]), Object.keys(m).length ? [h('h2', {}, 'Meta'), json(m)] : null));
    const events = await recentEvents((ev) => concerns(ev, id), 50);
    fill($('inst-events'), events.length ? events.map((ev) => eventItem(ev)) : h('li', { class: 'muted' }, 'No recent events.'));
    tick();
  }

  function instancePage() {
    loader = loadInstance;
    onEvent((ev) => {
      if (!concerns(ev, PAGE_ID)) {
        if (topicIs(ev, 'sys.primary')) refreshSoon();
        return;
      }
      refreshSoon();
    });
  }

  // ---------- Queues ----------

  const SPARK_BUCKETS = 30;
  const SPARK_BUCKET_MS = 60e3;
  const throughput = new Map(); // queue -> Map(bucket index -> count)

  function countCompleted(ev) {
    const t = ms(ev.time);
    const bucket = Math.floor(t / SPARK_BUCKET_MS);
    for (const task of (ev.data && ev.data.tasks) || []) {
      if (!throughput.has(task.queue)) throughput.set(task.queue, new Map());
      const q = throughput.get(task.queue);
      q.set(bucket, (q.get(bucket) || 0) + 1);
    }
  }

  async function loadThroughput() {
    throughput.clear();
    const status = await api('GET', '/v1/status');
    let cursor = Math.max(0, status.last_event_seq - 20000);
    const since = now() - SPARK_BUCKETS * SPARK_BUCKET_MS;
    for (let page = 0; page < 20; page++) {
      const res = await api('GET', `/v1/events?topics=sys.task.completed&from=${cursor}&limit=1000`);
      for (const ev of res.events) if (ms(ev.time) >= since) countCompleted(ev);
      if (res.events.length < 1000 || res.next <= cursor) break;
      cursor = res.next;
    }
  }

  function sparkline(queue) {
    const q = throughput.get(queue) || new Map();
    const last = Math.floor(now() / SPARK_BUCKET_MS);
    const counts = [];
    for (let b = last - SPARK_BUCKETS + 1; b <= last; b++) counts.push(q.get(b) || 0);
    const total = counts.reduce((a, b) => a + b, 0);
    const max = Math.max(1, ...counts);
    const W = 150;
    const H = 26;
    const step = W / (SPARK_BUCKETS - 1);
    const pts = counts.map((c, i) => [i * step, H - 2 - (c / max) * (H - 4)]);
    const line = pts.map(([x, y], i) => `${i ? 'L' : 'M'}${x.toFixed(1)},${y.toFixed(1)}`).join('');
    const el = svg('svg', { class: 'spark', width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `${total} completed in the last ${SPARK_BUCKETS} minutes, peak ${max === 1 && !total ? 0 : max} per minute` });
    el.append(svg('path', { class: 'area', d: `${line}L${W},${H}L0,${H}Z` }), svg('path', { class: 'line', d: line }));
    const title = svg('title', {});
    title.textContent = `${total} completed in the last ${SPARK_BUCKETS} min`;
    el.append(title);
    return h('span', { title: `${total} completed in ${SPARK_BUCKETS} min` }, el);
  }

  const num = (n) => h('td', { class: n ? 'num' : 'num zero' }, String(n));

  async function loadQueues() {
    const [queues, pending, scheduled, dead, schedules] = await Promise.all([
      api('GET', '/v1/queues'),
      api('GET', '/v1/tasks?state=pending&limit=50'),
      api('GET', '/v1/tasks?state=scheduled&limit=50'),
      api('GET', '/v1/tasks?state=dead&limit=100'),
      api('GET', '/v1/schedules'),
      throughput.size ? Promise.resolve() : loadThroughput(),
    ]);
    const cols = ['pending', 'scheduled', 'running', 'failed', 'dead', 'completed', 'cancelled'];
    fill($('queues'), table(
      [{ label: 'queue' }, ...cols.map((c) => ({ label: c, num: true })), { label: 'oldest pending', num: true }, { label: 'completed / min, last 30 min' }],
      queues.queues.map((q) => h('tr', { dataset: { queue: q.name } },
        h('th', { scope: 'row' }, q.name),
        cols.map((c) => num(q[c])),
        h('td', { class: 'num' }, q.oldest_pending_age_ms === null || q.oldest_pending_age_ms === undefined
          ? '–' : h('span', { class: q.oldest_pending_age_ms > 60e3 ? 'state-overdue' : null }, dur(q.oldest_pending_age_ms))),
        h('td', {}, sparkline(q.name)))),
      'No queues yet.'));
    const waiting = [...pending.tasks, ...scheduled.tasks];
    $('queue-summary').textContent = `${queues.queues.length} queues · ${queues.queues.reduce((a, q) => a + q.pending, 0)} pending · ${queues.queues.reduce((a, q) => a + q.dead, 0)} dead`;
    fill($('pending'), table(['task', 'queue', 'state', 'age', ''], waiting.map((t) => h('tr', { dataset: { task: t.id } },
      h('td', {}, h('code', {}, t.id)), h('td', {}, t.queue), h('td', {}, t.state), h('td', {}, when(t.created_at)),
      h('td', {}, actionButton('Cancel', `cancel-${t.id}`, {
        title: 'Cancel this task?',
        text: `${t.id} in ${t.queue} will not run; tasks that depend on it are cancelled too.`,
        verb: 'Cancel task',
        method: 'POST',
        path: `/v1/tasks/${enc(t.id)}/cancel`,
        done: `${t.id} cancelled`,
      }, true)))), 'Nothing waiting.'));
    fill($('dead'), table(['task', 'queue', 'attempts', 'error', 'ended'], dead.tasks.slice().reverse().map((t) => h('tr', { dataset: { task: t.id } },
      h('td', {}, h('code', {}, t.id)), h('td', {}, t.queue), h('td', { class: 'num' }, `${t.attempt}/${t.max_attempts}`),
      h('td', { class: 'err' }, t.error || ''), h('td', {}, t.completed_at ? when(t.completed_at) : ''))), 'No dead tasks.'));
    fill($('schedules'), table(['name', 'queue', 'every', 'next due', 'last enqueued'], schedules.schedules.map((s) => h('tr', {},
      h('th', { scope: 'row' }, s.name), h('td', {}, s.queue), h('td', {}, s.cron ? h('code', {}, s.cron) : dur(s.every_ms || 0)),
      h('td', {}, h('span', { dataset: { deadline: ms(s.next_due), label: 'in ', overdue: 'due' } }, s.next_due)),
      h('td', {}, s.last_enqueued_at ? when(s.last_enqueued_at) : 'never'))), 'No schedules.'));
    tick();
  }

  function queuesPage() {
    loader = loadQueues;
    onEvent((ev) => {
      if (ev.topic === 'sys.task.completed') countCompleted(ev);
      if (topicIs(ev, 'sys.task', 'sys.schedule')) refreshSoon(500);
    });
    // The sparkline's window slides even when nothing happens.
    setInterval(() => refreshSoon(0), 60e3);
  }

  // ---------- Memory ----------

  function provenance(p) {
    const who = p.instance ? p.instance : `token ${p.token}`;
    return [
      h('span', {}, 'by ', h('b', {}, who)),
      p.entity ? h('span', {}, 'entity ', h('b', {}, p.entity)) : null,
      p.role ? h('span', {}, 'as ', h('b', {}, p.role)) : null,
      p.host ? h('span', {}, 'on ', h('b', {}, p.host)) : null,
      h('span', {}, 'via ', h('b', {}, p.via)),
      p.fence !== null && p.fence !== undefined ? h('span', {}, 'fence ', h('b', {}, String(p.fence))) : null,
      p.promoted_from ? h('span', {}, 'promoted from ', h('code', {}, p.promoted_from)) : null,
    ];
  }

  let trustLists = [];

  // Who trusts the writer: every entity whose trust list names its entity or instance.
  function trustedBy(p) {
    return trustLists.filter((t) => t.trusts.some((ref) => (p.entity && ref === `entity:${p.entity}`)
      || (p.instance && ref === `instance:${p.instance}`))).map((t) => t.entity);
  }

  function memoryCard(m, extra) {
    const trusted = trustedBy(m.provenance);
    const closed = Boolean(m.invalid_at);
    return h('article', { class: `hit${closed ? ' closed' : ''}`, dataset: { memory: m.id } },
      h('div', { class: 'meta' },
        badge(m.kind), badge(m.space), badge(`visibility: ${m.visibility}`, m.visibility === 'public' ? 'warn' : ''),
        trusted.length ? badge(`trusted by ${trusted.join(', ')}`, 'ok') : badge('trusted by no entity'),
        closed ? badge(m.superseded_by ? 'superseded' : 'forgotten', 'warn') : null,
        m.purged ? badge('purged', 'bad') : null,
        extra),
      h('p', { class: 'text' }, m.purged ? '(purged)' : m.text),
      h('div', { class: 'meta provenance' }, provenance(m.provenance),
        h('span', {}, `v${m.version}`), h('span', {}, 'written ', h('time', { datetime: m.created_at }, ago(m.created_at))),
        m.tags.length ? h('span', {}, 'tags ', m.tags.join(', ')) : null,
        h('code', {}, m.id),
        h('button', { type: 'button', class: 'link', dataset: { key: `hist-${m.id}` }, onclick: () => showHistory(m.id) }, 'history'),
        m.purged ? null : actionButton('Purge', `purge-${m.id}`, {
          title: 'Purge this memory?',
          text: `Every version of ${m.id} is erased for good (tombstones stay). This cannot be undone.`,
          verb: 'Purge memory',
          method: 'DELETE',
          path: `/v1/memories/${enc(m.id)}?purge=true`,
          done: `${m.id} purged`,
        }, true)));
  }

  async function loadTrust() {
    const ents = await api('GET', '/v1/entities');
    trustLists = await Promise.all(ents.entities.map((e) => api('GET', `/v1/trust/${enc(e.name)}`).catch(() => ({ entity: e.name, trusts: [] }))));
    fill($('trust'), table(['entity', 'trusts'], trustLists.map((t) => h('tr', {},
      h('th', { scope: 'row' }, t.entity), h('td', {}, t.trusts.length ? t.trusts.map((r) => [badge(r), ' ']) : h('span', { class: 'muted' }, 'nobody else')))), 'No entities.'));
  }

  let lastSearch = null;

  async function runSearch() {
    if (!lastSearch) return;
    const res = await api('POST', '/v1/memories/search', lastSearch);
    fill($('results'),
      h('p', { class: 'muted' }, `${res.results.length} result${res.results.length === 1 ? '' : 's'} · ${res.mode}${res.note ? ` · ${res.note}` : ''}`),
      res.results.map((hit) => memoryCard(hit.memory, h('span', { title: JSON.stringify(hit.explain) }, `score ${hit.score.toFixed(3)}`))));
  }

  async function showHistory(id) {
    $('mem-id').value = id;
    try {
      const res = await api('GET', `/v1/memories/${enc(id)}?history=true`);
      const versions = (res.history || [res.memory]).slice().reverse();
      fill($('history'), versions.map((m) => memoryCard(m)));
    } catch (e) {
      fill($('history'), h('p', { class: 'error' }, e.message));
    }
    $('history').scrollIntoView({ block: 'nearest' });
  }

  async function loadMemory() {
    await loadTrust();
    await runSearch();
  }

  function memoryPage() {
    loader = loadMemory;
    $('recall').addEventListener('submit', async (e) => {
      e.preventDefault();
      const space = $('space').value.trim();
      lastSearch = {
        query: $('q').value,
        spaces: space ? [space] : [],
        include_closed: $('closed').checked,
        limit: 20,
      };
      try { await runSearch(); } catch (err) { fill($('results'), h('p', { class: 'error' }, err.message)); }
    });
    $('history-form').addEventListener('submit', (e) => {
      e.preventDefault();
      showHistory($('mem-id').value.trim());
    });
    $('diff-form').addEventListener('submit', async (e) => {
      e.preventDefault();
      const id = $('fork-id').value.trim();
      try {
        const d = await api('GET', `/v1/forks/${enc(id)}/diff`);
        fill($('diff'),
          h('p', { class: 'muted' }, `${d.fork} of ${d.entity}, forked at memory-log position ${d.fork_point}`),
          h('h2', {}, `Only on the fork (${d.branch.length})`), d.branch.map((m) => memoryCard(m)),
          h('h2', {}, `Canonical since the fork (${d.canonical_since.length})`), d.canonical_since.map((m) => memoryCard(m)));
      } catch (err) {
        fill($('diff'), h('p', { class: 'error' }, err.message));
      }
    });
    onEvent((ev) => {
      if (topicIs(ev, 'sys.trust')) loadTrust().catch(() => {});
      if (topicIs(ev, 'sys.memory') && lastSearch) refreshSoon(500);
    });
  }

  // ---------- Events ----------

  // The hub's topic patterns: words split by '.', '*' is one word, '>' the rest.
  function matches(pattern, topic) {
    const p = pattern.split('.');
    const t = topic.split('.');
    for (let i = 0; i < p.length; i++) {
      if (p[i] === '>') return t.length > i;
      if (i >= t.length) return false;
      if (p[i] !== '*' && p[i] !== t[i]) return false;
    }
    return p.length === t.length;
  }

  let patterns = [];
  let paused = false;
  const TAIL_MAX = 300;

  function parsePatterns(text) {
    const list = text.split(',').map((s) => s.trim()).filter(Boolean);
    for (const p of list) {
      const words = p.split('.');
      if (words.some((w, i) => !w || (w === '>' && i !== words.length - 1) || (/[*>]/.test(w) && w.length > 1))) {
        throw new Error(`topics: ${JSON.stringify(p)} is not a pattern (words split by ".", "*" one word, ">" the rest, last)`);
      }
    }
    return list;
  }

  const wanted = (ev) => !patterns.length || patterns.some((p) => matches(p, ev.topic));

  async function loadEvents() {
    const status = await api('GET', '/v1/status');
    const q = patterns.length ? `&topics=${enc(patterns.join(','))}` : '';
    const res = await api('GET', `/v1/events?from=${Math.max(0, status.last_event_seq - 1000)}&limit=1000${q}`);
    fill($('tail'), res.events.slice(-100).reverse().map((ev) => eventItem(ev)));
  }

  function eventsPage() {
    loader = loadEvents;
    const params = new URLSearchParams(window.location.search);
    if (params.get('topics')) {
      $('topics').value = params.get('topics');
      try { patterns = parsePatterns(params.get('topics')); } catch (_) { patterns = []; }
    }
    $('filter').addEventListener('submit', (e) => {
      e.preventDefault();
      const err = $('filter-error');
      try {
        patterns = parsePatterns($('topics').value);
        err.hidden = true;
        const url = new URL(window.location.href);
        if (patterns.length) url.searchParams.set('topics', patterns.join(','));
        else url.searchParams.delete('topics');
        window.history.replaceState(null, '', url);
        refreshSoon(0);
      } catch (ex) {
        err.textContent = ex.message;
        err.hidden = false;
      }
    });
    $('pause').addEventListener('click', (e) => {
      paused = !paused;
      e.currentTarget.setAttribute('aria-pressed', String(paused));
      e.currentTarget.textContent = paused ? 'Resume' : 'Pause';
      if (!paused) refreshSoon(0);
    });
    onEvent((ev) => {
      if (paused || !wanted(ev)) return;
      const tail = $('tail');
      tail.prepend(eventItem(ev, true));
      while (tail.children.length > TAIL_MAX) tail.lastElementChild.remove();
    });
  }

  // ---------- Breakers and leases ----------

  async function loadBreakers() {
    const [breakers, leases] = await Promise.all([api('GET', '/v1/breakers'), api('GET', '/v1/leases')]);
    const order = { open: 0, half_open: 1, closed: 2 };
    const list = breakers.breakers.slice().sort((a, b) => order[a.state] - order[b.state] || a.subject.localeCompare(b.subject));
    fill($('breakers'), table(['subject', 'state', { label: 'error rate', num: true }, { label: 'samples', num: true }, { label: 'p50', num: true }, { label: 'p95', num: true }, 'opened', 'retry', 'last observed'],
      list.map((b) => h('tr', { dataset: { subject: b.subject, state: b.state } },
        h('th', { scope: 'row' }, h('code', {}, b.subject)),
        h('td', {}, badge(b.state.replace('_', '-'), b.state === 'open' ? 'bad' : b.state === 'half_open' ? 'warn' : 'ok')),
        h('td', { class: 'num' }, `${(b.error_rate * 100).toFixed(1)} %`),
        num(b.samples),
        h('td', { class: 'num' }, b.p50_ms === null || b.p50_ms === undefined ? '–' : `${b.p50_ms} ms`),
        h('td', { class: 'num' }, b.p95_ms === null || b.p95_ms === undefined ? '–' : `${b.p95_ms} ms`),
        h('td', {}, b.opened_at ? when(b.opened_at) : ''),
        h('td', {}, b.retry_at ? h('span', { dataset: { deadline: ms(b.retry_at), label: 'in ', overdue: 'probe due' } }, b.retry_at) : ''),
        h('td', {}, b.last_observed_at ? when(b.last_observed_at) : ''))),
      'No breakers: nothing has reported an observation yet.'));
    fill($('leases'), table(['resource', 'mode', 'holder', 'entity', { label: 'fence', num: true }, 'acquired', 'expires', 'reason', ''],
      leases.leases.map((l) => h('tr', { dataset: { lease: l.id } },
        h('th', { scope: 'row' }, h('code', {}, l.resource)),
        h('td', {}, l.mode),
        h('td', {}, h('a', { href: `/ui/instances/${enc(l.holder)}` }, h('code', {}, l.holder))),
        h('td', {}, l.entity || ''),
        h('td', { class: 'num' }, String(l.fence)),
        h('td', {}, when(l.acquired_at)),
        h('td', {}, h('span', { dataset: { deadline: ms(l.expires_at), label: 'in ', overdue: 'expired' } }, l.expires_at)),
        h('td', {}, l.reason || ''),
        h('td', {}, actionButton('Force release', `release-${l.id}`, {
          title: 'Force-release this lease?',
          text: `${l.resource} is taken from ${l.holder} now; its fence ${l.fence} stops being current. The holder is not told beforehand.`,
          verb: 'Force release',
          method: 'DELETE',
          path: `/v1/leases/${enc(l.id)}?force=true`,
          done: `${l.resource} released`,
        }, true)))),
      'No live leases.'));
    tick();
  }

  function breakersPage() {
    loader = loadBreakers;
    onEvent((ev) => {
      if (topicIs(ev, 'sys.breaker', 'sys.lease')) refreshSoon();
    });
    // Statistics (error rate, samples) change without events.
    setInterval(() => refreshSoon(0), 10e3);
  }

  // ---------- Tokens ----------

  async function loadTokens() {
    let res;
    try {
      res = await api('GET', '/v1/tokens');
    } catch (e) {
      if (e.status === 403) { fill($('tokens'), h('p', { class: 'muted' }, 'Only an admin sees tokens.')); return; }
      throw e;
    }
    fill($('tokens'), table(['id', 'kind', 'name', 'entity', 'instance', 'created', ''],
      res.tokens.map((t) => h('tr', { dataset: { token: t.id } },
        h('td', {}, h('code', {}, t.id)), h('td', {}, t.kind), h('td', {}, t.name || ''), h('td', {}, t.entity || ''),
        h('td', {}, t.instance ? h('a', { href: `/ui/instances/${enc(t.instance)}` }, h('code', {}, t.instance)) : ''),
        h('td', {}, when(t.created_at)),
        h('td', {}, actionButton('Revoke', `revoke-${t.id}`, {
          title: 'Revoke this token?',
          text: `${t.kind} token ${t.name || t.id} stops working on every hub at once${t.kind === 'admin' || t.kind === 'reader' ? ', and dashboard sessions opened with it end' : ''}.`,
          verb: 'Revoke token',
          method: 'DELETE',
          path: `/v1/tokens/${enc(t.id)}`,
          done: `${t.id} revoked`,
        }, true)))),
      'No tokens.'));
  }

  function tokensPage() {
    loader = loadTokens;
    onEvent((ev) => { if (topicIs(ev, 'sys.token')) refreshSoon(); });
  }

  // ---------- start ----------

  const PAGES = {
    fleet: fleetPage,
    instance: instancePage,
    queues: queuesPage,
    memory: memoryPage,
    events: eventsPage,
    breakers: breakersPage,
    tokens: tokensPage,
  };

  if (PAGES[PAGE]) {
    PAGES[PAGE]();
    refresh();
    stream();
    setInterval(tick, 250);
  }
})();
