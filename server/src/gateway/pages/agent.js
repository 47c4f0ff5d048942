// The agent page (served as /assets/agent.js).
'use strict';
const { $, api, setStatus, clearStatusIf, fmtTime } = window.ConfabChat;
const LOGIN_KEY = 'confab.agent';

let lastQueueJson = null, queueBusy = false, queueErr = false;

const session = window.ConfabChat.create({
  storageKey: 'confab.agentChat',
  homeId: 'queue-view',
  leaveId: 'end', leaveBody: { end_chat: true },
  doneId: 'back',
  onReset: () => { lastQueueJson = null; refreshQueue(true); },
});

// ---------- queue ----------
function saveLogin() {
  sessionStorage.setItem(LOGIN_KEY, JSON.stringify({ credential: $('credential').value, nickname: $('agent-nickname').value }));
}
function renderQueue(chats, emptyText) {
  const q = $('queue');
  q.textContent = '';
  if (!chats || !chats.length) {
    const li = document.createElement('li');
    li.className = 'empty'; li.textContent = emptyText || 'No chats waiting.';
    q.appendChild(li); return;
  }
  chats.forEach((c) => {
    const li = document.createElement('li');
    li.dataset.chatId = c.chat_id;
    const info = document.createElement('div');
    const subj = document.createElement('div');
    subj.className = 'subject'; subj.textContent = c.subject || '(no subject)';
    const meta = document.createElement('div'); meta.className = 'meta';
    meta.textContent = (c.nickname ? c.nickname + ' · ' : '') + 'waiting since ' + fmtTime(c.created_at) + ' · ' + c.chat_id;
    info.appendChild(subj); info.appendChild(meta);
    const b = document.createElement('button');
    b.type = 'button'; b.className = 'join'; b.dataset.chatId = c.chat_id; b.textContent = 'Join';
    li.appendChild(info); li.appendChild(b);
    q.appendChild(li);
  });
}
async function refreshQueue(force) {
  if (session.current() || queueBusy) return;
  const cred = $('credential').value;
  if (!cred) { lastQueueJson = null; renderQueue(null, 'Enter the agent credential to see waiting chats.'); return; }
  queueBusy = true;
  try {
    // Oldest first by default; newest first so that a flood of old chats
    // (or of new ones, the other way round) hides no customer.
    const order = $('queue-order').value === 'newest' ? 'newest' : 'oldest';
    const d = await api('GET', '/api/v1/queue?order=' + order, undefined, cred);
    if (session.current()) return;
    const chats = (d && d.chats) || [];
    const j = JSON.stringify(chats);
    if (force || j !== lastQueueJson) { lastQueueJson = j; renderQueue(chats); }
    if (queueErr) { queueErr = false; clearStatusIf('error'); }
  } catch (e) { queueErr = true; lastQueueJson = null; setStatus(e.message, 'error'); } finally { queueBusy = false; }
}
async function join(chatId, btn) {
  const cred = $('credential').value;
  const nickname = $('agent-nickname').value.trim() || 'agent';
  if (!cred) { setStatus('enter the agent credential first', 'error'); return; }
  if (btn) btn.disabled = true;
  setStatus('joining…');
  try {
    const d = await api('POST', '/api/v1/chats/' + encodeURIComponent(chatId) + '/join', { nickname }, cred);
    const chat = { chat_id: chatId, participant_id: d.participant_id, token: d.token, token_expires_at: d.token_expires_at, instance_id: d.instance_id };
    session.remember(chat);
    setStatus('');
    session.openChat(chat);
  } catch (e) {
    setStatus(e.message, 'error');
    if (btn) btn.disabled = false;
    refreshQueue(true);
  }
}

$('queue').addEventListener('click', (e) => {
  const b = e.target.closest('button.join');
  if (b && !b.disabled) join(b.dataset.chatId, b);
});
$('refresh').addEventListener('click', () => refreshQueue(true));
$('queue-order').addEventListener('change', () => refreshQueue(true));
$('credential').addEventListener('input', () => { saveLogin(); lastQueueJson = null; });
$('credential').addEventListener('change', () => refreshQueue(true));
$('agent-nickname').addEventListener('input', saveLogin);
$('back').addEventListener('click', () => { session.forget(); setStatus(''); session.reset(); });

(function init() {
  try {
    const login = JSON.parse(sessionStorage.getItem(LOGIN_KEY) || 'null');
    if (login) { $('credential').value = login.credential || ''; $('agent-nickname').value = login.nickname || ''; }
  } catch (e) { /* ignore */ }
  const saved = session.restore();
  if (saved) session.openChat(saved);
  else refreshQueue(true);
  setInterval(() => refreshQueue(false), 2000);
})();
