// The customer chat page (served as /assets/chat.js).
'use strict';
const { $, api, setStatus } = window.ConfabChat;

const session = window.ConfabChat.create({
  storageKey: 'confab.chat',
  homeId: 'start-form',
  leaveId: 'leave', leaveBody: {},
  doneId: 'new',
  onReset: () => { $('start').disabled = false; },
});

$('start-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const nickname = $('nickname').value.trim();
  const subject = $('subject').value.trim();
  if (!nickname) { setStatus('please enter your name', 'error'); return; }
  const body = { nickname };
  if (subject) body.subject = subject;
  $('start').disabled = true;
  setStatus('starting chat…');
  try {
    const d = await api('POST', '/api/v1/chats', body);
    const chat = { chat_id: d.chat_id, participant_id: d.participant_id, token: d.token, token_expires_at: d.token_expires_at, instance_id: d.instance_id };
    session.remember(chat);
    setStatus('');
    session.openChat(chat);
  } catch (err) {
    setStatus(err.message, 'error');
  } finally {
    $('start').disabled = false;
  }
});
$('new').addEventListener('click', () => { session.forget(); session.reset(); setStatus(''); $('nickname').focus(); });

(function init() {
  const saved = session.restore();
  if (saved) session.openChat(saved);
  else { session.updateControls(); $('nickname').focus(); }
})();
