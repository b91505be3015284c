// Two JsSIP web phones in one page, driven by its URL, reporting every step to the page's server
// (POST /report).
//
// ?ws=ws://127.0.0.1:P&domain=farm.test&caller=alice:PW&callee=bob:PW&talk_ms=2000&hold_ms=1500
//
// Both user agents register over the WebSocket. The caller sends the callee a MESSAGE, then calls;
// the callee answers and both RTCPeerConnections exchange audio (Chromium's fake microphone) for
// talk_ms. The page then waits for the test (GET /wait/screenshot: it takes its screenshot of the
// call), the caller holds for hold_ms and resumes for talk_ms, and hangs up. Last, the caller calls
// again and the callee rejects it (486 Busy Here), and once more, ringing until the caller gives
// up (CANCEL). Reports: {step: "loaded" | "media" | "registered" |
// "message" | "confirmed" | "stats" | "talking" | "hold" | "ended" | "busy" | "no answer" | "done"} or
// {step: "failed", where, cause}. The page shows each phone's state, the call's duration, the
// packets and the audio level it receives, for the screenshot.
'use strict';

const params = new URLSearchParams(location.search);
const wsUrl = params.get('ws');
const domain = params.get('domain');
const talkMs = Number(params.get('talk_ms') || 2000);
const holdMs = Number(params.get('hold_ms') || 1500);
const holdSettleMs = Number(params.get('hold_settle_ms') || 5000);
const STEP_TIMEOUT_MS = 10000;
const LOG_LINES = 9;

const logLines = [];

function log(text) {
  logLines.push(`${new Date().toISOString().slice(11, 23)} ${text}`);
  document.getElementById('log').textContent = logLines.slice(-LOG_LINES).join('\n');
}

// One line of the page's log for a report a human reads in the screenshot.
function describe(body) {
  const audio = (side) => `${side.packetsReceived} packets, energy ${(side.totalAudioEnergy || 0).toFixed(2)}`;
  switch (body.step) {
    case 'loaded': return 'page loaded';
    case 'media': return 'fake microphone granted';
    case 'registered': return 'both registered over WebSocket (REGISTER, 401, REGISTER, 200)';
    case 'message': return `MESSAGE delivered (${body.status}): "${body.received.body}"`;
    case 'confirmed': return 'INVITE answered, call confirmed on both sides';
    case 'stats': return `audio received: caller ${audio(body.caller)}; callee ${audio(body.callee)}`;
    case 'talking': return 'talking (the test takes this screenshot)';
    default: return JSON.stringify(body).slice(0, 110);
  }
}

function report(body) {
  if (body.step !== 'debug') log(describe(body));
  return fetch('/report', {
    method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body),
  });
}

// First report: the page and both scripts loaded (the test allows Chromium's start-up more time
// than a step). Errors anywhere from here on are reported as failures.
window.addEventListener('error', (e) => report({step: 'failed', where: 'window', cause: String(e.message)}));
report({step: 'loaded'});

// JsSIP's debug output (the SIP messages) goes to the test's log through /report too.
JsSIP.debug.enable('JsSIP:Transport JsSIP:RTCSession JsSIP:Registrator JsSIP:DigestAuthentication');
JsSIP.debug.log = (...args) => { report({step: 'debug', text: args.map(String).join(' ').slice(0, 4000)}); };

function withTimeout(promise, what) {
  return Promise.race([
    promise,
    new Promise((_, reject) => setTimeout(() => reject(new Error(`timeout: ${what}`)), STEP_TIMEOUT_MS)),
  ]);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// -- what the page shows: one panel per phone --------------------------------------------------

const panels = {};

function panel(role, ua) {
  const el = document.getElementById(role);
  el.innerHTML = `<h2>sip:${ua.user}@${domain} <span class="role">${role}</span></h2>
    <table>
      <tr><td>registration</td><td class="reg">starting</td></tr>
      <tr><td>call</td><td class="state">idle</td></tr>
      <tr><td>duration</td><td class="duration">-</td></tr>
      <tr><td>codec</td><td class="codec">-</td></tr>
      <tr><td>RTP received / sent</td><td class="packets">-</td></tr>
      <tr><td>ICE pair</td><td class="pair">-</td></tr>
      <tr><td>audio level heard</td><td><span class="level">-</span><div class="meter"><div></div></div></td></tr>
    </table>`;
  const field = (name) => el.querySelector(`.${name}`);
  panels[role] = {field, meter: el.querySelector('.meter div'), session: null, since: 0};
  ua.on('registered', () => { field('reg').textContent = 'registered (WebSocket)'; });
  ua.on('registrationFailed', (e) => { field('reg').textContent = `failed: ${e.cause}`; });
}

function showState(role, text, cls) {
  const state = panels[role].field('state');
  state.textContent = text;
  state.className = `state ${cls || ''}`;
}

function attach(role, session) {
  const p = panels[role];
  p.session = session;
  session.on('progress', () => showState(role, 'ringing'));
  session.on('confirmed', () => { p.since = Date.now(); showState(role, 'in call', 'confirmed'); });
  session.on('hold', (e) => showState(role, `on hold (${e.originator})`, 'held'));
  session.on('unhold', () => showState(role, 'in call', 'confirmed'));
  session.on('ended', (e) => { p.session = null; showState(role, `ended: ${e.cause}`, 'ended'); });
  session.on('failed', (e) => { p.session = null; showState(role, `failed: ${e.cause}`, 'failed'); });
}

async function refreshPanels() {
  for (const p of Object.values(panels)) {
    if (!p.session || !p.session.connection || !p.since) continue;
    const s = await audioStats(p.session);
    const seconds = Math.floor((Date.now() - p.since) / 1000);
    p.field('duration').textContent = `${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, '0')}`;
    p.field('codec').textContent = [...new Set(s.codecs || [])].join(', ') || '-';
    p.field('packets').textContent = `${s.packetsReceived || 0} / ${s.packetsSent || 0}`;
    p.field('pair').textContent = s.pair || '-';
    const level = s.audioLevel || 0;
    p.field('level').textContent = level.toFixed(3);
    p.meter.style.width = `${Math.round(level * 100)}%`;
  }
}

// -- the phones ---------------------------------------------------------------------------------

function makeUA(account) {
  const [user, password] = account.split(':');
  const ua = new JsSIP.UA({
    sockets: [new JsSIP.WebSocketInterface(wsUrl)],
    uri: `sip:${user}@${domain}`,
    password,
    register: true,
    session_timers: false,
    connection_recovery_min_interval: 2,
  });
  ua.user = user;
  ua.registeredPromise = new Promise((resolve, reject) => {
    ua.on('registered', resolve);
    ua.on('registrationFailed', (e) => reject(new Error(`${user} registration failed: ${e.cause}`)));
  });
  return ua;
}

const CALL_OPTIONS = {
  mediaConstraints: {audio: true, video: false},
  pcConfig: {iceServers: []},
};

function play(session) {
  const audio = document.createElement('audio');
  audio.autoplay = true;
  audio.srcObject = new MediaStream(session.connection.getReceivers().map((r) => r.track));
  document.body.appendChild(audio);
  return audio.play();
}

// The audio figures of one RTCPeerConnection: inbound-rtp (what it received) and outbound-rtp.
async function audioStats(session) {
  const stats = await session.connection.getStats();
  const out = {};
  stats.forEach((s) => {
    if (s.type === 'codec') out.codecs = (out.codecs || []).concat(s.mimeType);
    if (s.kind !== 'audio') return;
    if (s.type === 'inbound-rtp') {
      Object.assign(out, {
        bytesReceived: s.bytesReceived, packetsReceived: s.packetsReceived,
        totalAudioEnergy: s.totalAudioEnergy, audioLevel: s.audioLevel,
      });
    } else if (s.type === 'outbound-rtp') {
      Object.assign(out, {bytesSent: s.bytesSent, packetsSent: s.packetsSent});
    } else if (s.type === 'media-source') {
      out.sourceAudioEnergy = s.totalAudioEnergy;
    }
  });
  out.pair = nominatedPair(stats);
  return out;
}

const bothStats = async (a, b) => ({caller: await audioStats(a), callee: await audioStats(b)});

// Both sides' stats once neither hears anything (audio level 0 twice in a row, 100 ms apart),
// or as they are after holdSettleMs.
async function settled(a, b) {
  const started = performance.now();
  let quiet = 0;
  for (;;) {
    const stats = await bothStats(a, b);
    const settleMs = performance.now() - started;
    quiet = !stats.caller.audioLevel && !stats.callee.audioLevel ? quiet + 1 : 0;
    if (quiet >= 2 || settleMs >= holdSettleMs) return {...stats, settleMs};
    await sleep(100);
  }
}

function once(emitter, event, what) {
  return withTimeout(new Promise((resolve) => emitter.once(event, resolve)), what);
}

async function main() {
  document.getElementById('farm').textContent = `farm.test through the balancer at ${wsUrl}`;
  // A granted microphone (fake device, fake permission prompt) lets candidates carry real
  // addresses instead of mDNS names, which nothing resolves in a loopback-only namespace.
  const mic = await withTimeout(navigator.mediaDevices.getUserMedia({audio: true}), 'getUserMedia');
  mic.getTracks().forEach((t) => t.stop());
  await report({step: 'media'});

  const caller = makeUA(params.get('caller'));
  const callee = makeUA(params.get('callee'));
  panel('caller', caller);
  panel('callee', callee);
  setInterval(refreshPanels, 200);
  // the callee answers the first call, rejects the next as busy, and lets the last one ring
  let calleeDoes = 'answer';
  const calleeSessions = [];
  const nextCalleeSession = () => new Promise((resolve) => calleeSessions.push(resolve));
  callee.on('newRTCSession', (e) => {
    if (e.originator !== 'remote') return;
    if (calleeDoes === 'answer') {
      attach('callee', e.session);
      e.session.answer(CALL_OPTIONS);
    } else if (calleeDoes === 'reject') {
      e.session.terminate({status_code: 486, reason_phrase: 'Busy Here'});
    }
    const resolve = calleeSessions.shift();
    if (resolve) resolve(e.session);
  });
  caller.start();
  callee.start();
  await withTimeout(Promise.all([caller.registeredPromise, callee.registeredPromise]), 'registration');
  await report({step: 'registered'});

  // MESSAGE, caller to callee
  const text = `hello ${callee.user}, this is ${caller.user}`;
  const received = withTimeout(new Promise((resolve) => {
    callee.on('newMessage', (e) => {
      if (e.originator === 'remote') resolve({from: e.request.from.uri.toString(), body: e.request.body});
    });
  }), 'MESSAGE at the callee');
  const sent = withTimeout(new Promise((resolve, reject) => {
    caller.sendMessage(`sip:${callee.user}@${domain}`, text, {
      eventHandlers: {
        succeeded: (e) => resolve(e.response.status_code),
        failed: (e) => reject(new Error(`MESSAGE failed: ${e.cause}`)),
      },
    });
  }), 'MESSAGE answer');
  const [message, status] = await Promise.all([received, sent]);
  await report({step: 'message', sent: text, received: message, status});

  // the call
  const calleeSession = nextCalleeSession();
  const session = caller.call(`sip:${callee.user}@${domain}`, CALL_OPTIONS);
  attach('caller', session);
  const confirmed = (s) => new Promise((resolve, reject) => {
    s.on('confirmed', resolve);
    s.on('failed', (e) => reject(new Error(`call failed (${e.originator}): ${e.cause}`)));
  });
  const answered = await withTimeout(calleeSession, 'INVITE at the callee');
  await withTimeout(Promise.all([confirmed(session), confirmed(answered)]), 'call confirmed');
  await report({step: 'confirmed'});
  // Chromium decodes received audio only for a sink that plays it: without one, inbound-rtp
  // counts packets but its audio energy stays 0.
  await Promise.all([session, answered].map(play));

  await sleep(talkMs);
  await refreshPanels();
  await report({step: 'stats', ...await bothStats(session, answered)});
  await report({step: 'talking'});
  await withTimeout(fetch('/wait/screenshot'), 'the test\'s screenshot');

  // hold (re-INVITE a=sendonly; JsSIP mutes both ends' tracks while held) and resume
  const calleeHeld = once(answered, 'hold', 'hold at the callee');
  await withTimeout(new Promise((resolve) => session.hold({}, resolve)), 'hold re-INVITE');
  await calleeHeld;
  // What each phone had buffered before the hold still plays out (Chromium's jitter buffer,
  // deeper when the machine is busy): "held" starts once both hear silence, as a user would
  // judge it, so only what arrives during the hold is counted against it.
  const held = await settled(session, answered);
  await sleep(holdMs);
  const stillHeld = await bothStats(session, answered);
  const calleeResumed = once(answered, 'unhold', 'unhold at the callee');
  await withTimeout(new Promise((resolve) => session.unhold({}, resolve)), 'unhold re-INVITE');
  await calleeResumed;
  const resumed = await bothStats(session, answered);
  await sleep(talkMs);
  const talking = await bothStats(session, answered);
  await report({step: 'hold', held, stillHeld, resumed, talking});

  const ended = (s) => new Promise((resolve) => s.on('ended', (e) => resolve(`${e.originator}: ${e.cause}`)));
  const calleeEnded = ended(answered);
  const callerEnded = ended(session);
  session.terminate();
  const causes = await withTimeout(Promise.all([callerEnded, calleeEnded]), 'BYE');
  await report({step: 'ended', caller: causes[0], callee: causes[1]});

  // busy: the callee rejects the next call
  calleeDoes = 'reject';
  const rejected = nextCalleeSession();
  const busy = caller.call(`sip:${callee.user}@${domain}`, CALL_OPTIONS);
  const failure = withTimeout(new Promise((resolve) => busy.on('failed', (e) => resolve({
    originator: e.originator, cause: e.cause, status: e.message && e.message.status_code,
  }))), 'busy call failed');
  await withTimeout(rejected, 'second INVITE at the callee');
  await report({step: 'busy', ...await failure});

  // no answer: the callee's phone rings until the caller gives up (CANCEL)
  calleeDoes = 'ring';
  const ringing = nextCalleeSession();
  const unanswered = caller.call(`sip:${callee.user}@${domain}`, CALL_OPTIONS);
  const failed = (s) => withTimeout(new Promise((resolve) => s.on('failed', (e) => resolve(`${e.originator}: ${e.cause}`))), 'CANCEL');
  const callerGaveUp = failed(unanswered);
  const rang = await withTimeout(ringing, 'third INVITE at the callee');
  const calleeCancelled = failed(rang);
  await withTimeout(new Promise((resolve) => unanswered.on('progress', resolve)), 'ringing at the caller');
  await sleep(1000);
  unanswered.terminate();
  await report({step: 'no answer', caller: await callerGaveUp, callee: await calleeCancelled});

  for (const ua of [caller, callee]) {
    ua.stop();
  }
  await report({step: 'done'});
}

main().catch((err) => report({step: 'failed', where: 'main', cause: String(err && err.message || err)}));
