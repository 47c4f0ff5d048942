// Shared browser code for the customer page (chat.html) and the agent page (agent.html).
// Plain script, no modules: served at /assets/chat-common.js and loaded before each page's
// own inline script. Everything is exposed through the single global `window.ConfabChat`.
(function () {
'use strict';
const $ = (id) => document.getElementById(id);
const DELAYS = [300, 600, 1200, 2400, 4800];   // ~9.3 s of send retries
const MAX_BYTES = 64 * 1024;

// ---------- helpers ----------
function setStatus(msg, kind) { const s = $('status'); s.textContent = msg || ''; s.className = kind || ''; }
function clearStatusIf(kind) { if ($('status').className === kind) setStatus(''); }
function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }
function uuid() {
  const c = window.crypto;
  if (c && typeof c.randomUUID === 'function') return c.randomUUID();
  const b = new Uint8Array(16);
  if (c && c.getRandomValues) c.getRandomValues(b);
  else for (let i = 0; i < 16; i++) b[i] = Math.floor(Math.random() * 256);
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}
// Answers after which retrying cannot help: a bad or foreign token, an
// unknown chat, a closed chat (409).
function isFinal(e) { return [401, 403, 404, 409].includes(e.status); }
function pad(n) { return String(n).padStart(2, '0'); }
// What a `closed` event says, by its reason code (server/src/session.rs, mod reason;
// docs/public-api.md, "Events").
const CLOSED_TEXT = {
  'customer-left': 'Chat closed: the customer left',
  'agent-ended': 'Chat closed: ended by the agent',
  'save-error': 'Chat closed after save errors',
  'no-agent': 'Chat closed: no agent was available; please try again later',
};
function closedText(reason) {
  if (!reason) return 'Chat closed';
  return CLOSED_TEXT[reason] || 'Chat closed (' + String(reason).replace(/-/g, ' ') + ')';
}
function fmtTime(at) {
  const d = new Date(at);
  if (isNaN(d.getTime())) return '';
  return pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds());
}
async function api(method, path, body, token) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (token) headers['Authorization'] = 'Bearer ' + token;
  let r;
  try {
    r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    const err = new Error('network error — is the server reachable?'); err.status = 0; throw err;
  }
  let data = null;
  try { data = await r.json(); } catch (e) { /* empty or non-JSON body */ }
  if (!r.ok) {
    const msg = (data && data.error && data.error.message) || ('request failed (HTTP ' + r.status + ')');
    const err = new Error(msg); err.status = r.status; throw err;
  }
  return data;
}

// ---------- one chat view (#chat, #log, #send-form, #text, #send) ----------
// opts:
//   storageKey  sessionStorage key for the open chat {chat_id, participant_id, token, instance_id}
//   homeId      id of the view shown while no chat is open ('start-form' / 'queue-view')
//   leaveId     id of the leave/end button; leaveBody is POSTed to /leave when it is clicked
//   doneId      id of the button shown once the chat is closed ('new' / 'back')
//   onReset     optional; called at the end of reset(), after the home view is shown again
// Returns { openChat, reset, updateControls, current, remember, forget, restore }.
function create(opts) {
  const KEY = opts.storageKey;
  let S = null;            // the open chat: {chat_id, participant_id, token, instance_id}
  let lastSeq = 0, closed = false, ws = null, gen = 0, tries = 0, timer = null, renewal = null;
  const outbox = [];
  let pumping = false;

  function chatPath(suffix) { return '/api/v1/chats/' + encodeURIComponent(S.chat_id) + suffix; }
  function save() { if (S) sessionStorage.setItem(KEY, JSON.stringify(S)); }
  function remember(chat) { sessionStorage.setItem(KEY, JSON.stringify(chat)); }
  function forget() { sessionStorage.removeItem(KEY); }
  function restore() {
    let saved = null;
    try { saved = JSON.parse(sessionStorage.getItem(KEY) || 'null'); } catch (e) { saved = null; }
    return saved && saved.chat_id && saved.token ? saved : null;
  }

  // ---------- rendering ----------
  function addLine(ev, cls, build) {
    const log = $('log');
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    const li = document.createElement('li');
    li.className = 'ev ' + ev.kind + (cls ? ' ' + cls : '');
    li.dataset.seq = String(ev.seq);
    li.dataset.kind = ev.kind;
    if (ev.ephemeral) li.dataset.ephemeral = 'true';
    const t = document.createElement('span');
    t.className = 'time';
    t.textContent = fmtTime(ev.at);
    li.appendChild(t);
    build(li);
    log.appendChild(li);
    if (atBottom) log.scrollTop = log.scrollHeight;
  }
  function textLine(ev, cls, text) {
    addLine(ev, cls, (li) => { const s = document.createElement('span'); s.textContent = text; li.appendChild(s); });
  }
  function markSaved(seq) {
    document.querySelectorAll('#log li[data-kind="message"]:not(.saved)').forEach((li) => {
      if (Number(li.dataset.seq) <= seq) {
        li.classList.add('saved');
        const k = document.createElement('span');
        k.className = 'tick'; k.title = 'saved'; k.textContent = '✓';
        li.appendChild(k);
      }
    });
  }
  function handle(ev, live) {
    if (!ev || typeof ev !== 'object') return;
    if (ev.ephemeral) {
      if (ev.reason === 'save') markSaved(ev.seq);
      else if (ev.reason === 'ucs-save-fail') textLine(ev, 'warning', '⚠ message could not be saved');
      else textLine(ev, 'system', ev.text || ev.reason || 'notice');
      return;
    }
    if (typeof ev.seq !== 'number' || ev.seq <= lastSeq) return;
    lastSeq = ev.seq;
    const nick = ev.nickname || 'someone';
    switch (ev.kind) {
      case 'message':
        addLine(ev, ev.participant_id && S && ev.participant_id === S.participant_id ? 'own' : 'other', (li) => {
          const n = document.createElement('span'); n.className = 'nick'; n.textContent = nick + ': ';
          const m = document.createElement('span'); m.className = 'msg-text'; m.textContent = ev.text || '';
          li.appendChild(n); li.appendChild(m);
        });
        break;
      case 'joined':
        textLine(ev, 'system', nick + (ev.reason === 'reconnected' ? ' reconnected' : ' joined'));
        if (live && ev.reason === 'reconnected') resync().catch(() => {});
        break;
      case 'left':
        textLine(ev, 'system', ev.reason === 'disconnected' ? nick + ' was disconnected' : nick + ' left');
        break;
      case 'notice':
        if (ev.reason === 'ucs-save-fail') textLine(ev, 'warning', '⚠ message could not be saved');
        else textLine(ev, 'system', ev.text || ev.reason || 'notice');
        break;
      case 'closed':
        textLine(ev, 'system', closedText(ev.reason));
        markClosed();
        break;
      default:
        textLine(ev, 'system', ev.text || String(ev.kind));
    }
  }
  function setInstance(id) {
    if (!S || !id) return;
    S.instance_id = id; $('instance').textContent = id; save();
  }
  function updateControls() {
    const open = !!S && !closed;
    $('text').disabled = !open; $('send').disabled = !open; $(opts.leaveId).disabled = !open;
    $(opts.doneId).hidden = open;
  }
  function markClosed() {
    if (closed) return;
    closed = true;
    clearStatusIf('warn');
    updateControls();
  }

  // ---------- transcript + websocket ----------
  async function resync() {
    // The transcript comes in pages; read until the last one.
    for (let page = 0; S && page < 10000; page++) {
      const before = lastSeq;
      const d = await api('GET', chatPath('/transcript?after=' + lastSeq), undefined, S.token);
      if (d && d.instance_id) setInstance(d.instance_id);
      ((d && d.events) || []).forEach((ev) => handle(ev, false));
      if (d && (d.state === 'closed' || d.left_at)) markClosed();
      if (!(d && d.more) || lastSeq === before) break;
    }
  }
  function connect() {
    const my = ++gen;
    clearTimeout(timer);
    if (ws) { try { ws.close(1000); } catch (e) { /* ignore */ } ws = null; }
    if (!S || closed) return;
    const url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host +
      chatPath('/ws?after=' + lastSeq);
    let sock;
    // The token travels as a subprotocol, not in the URL (proxies log URLs).
    try { sock = new WebSocket(url, ['confab.token.' + S.token]); } catch (e) { scheduleReconnect(my); return; }
    ws = sock;
    sock.onopen = () => { if (my !== gen) return; tries = 0; clearStatusIf('warn'); };
    sock.onmessage = (m) => {
      if (my !== gen) return;
      let ev; try { ev = JSON.parse(m.data); } catch (e) { return; }
      handle(ev, true);
    };
    sock.onclose = (e) => {
      if (my !== gen) return;
      ws = null;
      if (e.code === 1000) { resync().catch(() => {}).then(markClosed); return; }
      // 4001: this participant left the chat; nothing after that is theirs.
      if (e.code === 4001) { markClosed(); setStatus('you left this chat', 'warn'); return; }
      if (!closed) scheduleReconnect(my);
    };
  }
  function scheduleReconnect(my) {
    setStatus('reconnecting…', 'warn');
    const delay = Math.min(8000, 500 * Math.pow(2, tries++));
    clearTimeout(timer);
    timer = setTimeout(async () => {
      if (my !== gen || !S || closed) return;
      try { await resync(); } catch (e) {
        if (isFinal(e)) { setStatus(e.message, 'error'); markClosed(); return; }
        scheduleReconnect(my); return;
      }
      if (!closed) connect();
    }, delay);
  }

  // ---------- sending ----------
  async function sendWithRetry(chat, text) {
    const body = { text, client_msg_id: uuid() };     // same body (same id) on every retry
    const path = '/api/v1/chats/' + encodeURIComponent(chat.chat_id) + '/messages';
    for (let i = 0; ; i++) {
      try { return await api('POST', path, body, chat.token); } catch (e) {
        if ((e.status && e.status < 500) || i >= DELAYS.length) throw e;
        await sleep(DELAYS[i]);
      }
    }
  }
  function queueSend() {
    const t = $('text');
    const text = t.value;
    if (!S || closed || !text.trim()) return;
    if (new TextEncoder().encode(text).length > MAX_BYTES) { setStatus('message too long (max 64 KiB)', 'error'); return; }
    t.value = '';
    outbox.push({ chat: S, text });
    pump();
  }
  async function pump() {
    if (pumping) return;
    pumping = true;
    while (outbox.length) {
      const item = outbox[0];
      try { await sendWithRetry(item.chat, item.text); clearStatusIf('error'); } catch (e) {
        setStatus(e.message, 'error');
        if (item.chat === S && !$('text').value) $('text').value = item.text;
      }
      outbox.shift();
    }
    pumping = false;
  }

  // ---------- lifecycle ----------
  // Tokens expire (gateway.token-ttl): renew at half the time left.
  function scheduleRenewal() {
    clearTimeout(renewal);
    if (!S || closed || !S.token_expires_at) return;
    const left = Date.parse(S.token_expires_at) - Date.now();
    if (!(left > 0)) return;
    // The chat, not `gen`: every reconnect of the stream bumps `gen`.
    const mine = S;
    renewal = setTimeout(async () => {
      if (S !== mine || closed) return;
      try {
        const d = await api('POST', chatPath('/token'), {}, S.token);
        S.token = d.token; S.token_expires_at = d.token_expires_at; save();
      } catch (e) { /* retried at half the time left */ }
      scheduleRenewal();
    }, Math.max(1000, left / 2));
  }

  function openChat(chat) {
    S = chat; lastSeq = 0; closed = false; tries = 0;
    scheduleRenewal();
    $('log').textContent = '';
    $('chat-id').textContent = S.chat_id;
    $('instance').textContent = S.instance_id || '?';
    $(opts.homeId).hidden = true; $('chat').hidden = false;
    updateControls();
    resync().then(() => { connect(); $('text').focus(); }, (e) => {
      if (isFinal(e)) {
        forget(); reset(); setStatus(e.message, 'error');
      } else { setStatus(e.message, 'error'); scheduleReconnect(gen); }
    });
  }
  function reset() {
    gen++; clearTimeout(timer); clearTimeout(renewal);
    if (ws) { try { ws.close(1000); } catch (e) { /* ignore */ } ws = null; }
    S = null; lastSeq = 0; closed = false;
    $('log').textContent = '';
    $('chat').hidden = true; $(opts.homeId).hidden = false;
    if (opts.onReset) opts.onReset();
  }

  $('send-form').addEventListener('submit', (e) => { e.preventDefault(); queueSend(); });
  $('text').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); queueSend(); }
  });
  $(opts.leaveId).addEventListener('click', async () => {
    if (!S || closed) return;
    $(opts.leaveId).disabled = true;
    try {
      const d = await api('POST', chatPath('/leave'), opts.leaveBody, S.token);
      if (d && d.state === 'closed') { await resync().catch(() => {}); markClosed(); }
      else updateControls();
    } catch (e) { setStatus(e.message, 'error'); updateControls(); }
  });

  return { openChat, reset, updateControls, current: () => S, remember, forget, restore };
}

window.ConfabChat = { $, api, setStatus, clearStatusIf, sleep, uuid, fmtTime, create };
})();
