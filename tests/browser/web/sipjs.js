// Two SIP.js (0.21) web phones in one page, driven by its URL, reporting every step to the page's
// server (POST /report), as phone.js does for JsSIP.
//
// ?ws=ws://127.0.0.1:P&domain=farm.test&caller=alice:PW&callee=bob:PW&talk_ms=2000&hold_ms=1500
//
// Both user agents register over the WebSocket (SIP.js's Registerer). The caller sends the callee
// a MESSAGE (Messager), then calls (Inviter); the callee answers and both RTCPeerConnections
// exchange audio (Chromium's fake microphone) for talk_ms; the caller holds for hold_ms, resumes
// for talk_ms and hangs up (BYE). Then the
// caller calls again and the callee rejects it (486 Busy Here), and once more, ringing until the
// caller gives up (CANCEL). Reports: {step: "loaded" | "media" | "registered" | "message" |
// "confirmed" | "stats" | "hold" | "ended" | "busy" | "no answer" | "done"} or {step: "failed", where, cause};
// SIP.js's log (the SIP messages) as {step: "debug"}.
'use strict';

const params = new URLSearchParams(location.search);
const wsUrl = params.get('ws');
const domain = params.get('domain');
const talkMs = Number(params.get('talk_ms') || 2000);
const holdMs = Number(params.get('hold_ms') || 1500);
const STEP_TIMEOUT_MS = 10000;
const HOLD_SETTLE_MS = 500;

// The media direction of an SDP's first audio stream (RFC 4566 6: sendrecv when none is given).
function direction(sdp) {
  const lines = String(sdp || '').split(/\r?\n/);
  const media = lines.slice(Math.max(0, lines.findIndex((l) => l.startsWith('m=audio'))));
  const line = media.find((l) => /^a=(sendrecv|sendonly|recvonly|inactive)$/.test(l));
  return line ? line.slice(2) : 'sendrecv';
}

function log(text) {
  const el = document.getElementById('log');
  el.textContent = `${el.textContent}\n${new Date().toISOString().slice(11, 23)} ${text}`.split('\n').slice(-12).join('\n');
}

function report(body) {
  if (body.step !== 'debug') log(JSON.stringify(body).slice(0, 140));
  return fetch('/report', {
    method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body),
  });
}

window.addEventListener('error', (e) => report({step: 'failed', where: 'window', cause: String(e.message)}));
report({step: 'loaded'});

function withTimeout(promise, what) {
  return Promise.race([
    promise,
    new Promise((_, reject) => setTimeout(() => reject(new Error(`timeout: ${what}`)), STEP_TIMEOUT_MS)),
  ]);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const MEDIA = {constraints: {audio: true, video: false}};

// Resolves with the session's next state among `states` (SIP.SessionState names).
function reaches(session, states, what) {
  return withTimeout(new Promise((resolve) => {
    const listener = (state) => {
      if (states.includes(state)) {
        session.stateChange.removeListener(listener);
        resolve(state);
      }
    };
    session.stateChange.addListener(listener);
  }), what);
}

function makeUA(account, role, delegate) {
  const [user, password] = account.split(':');
  const ua = new SIP.UserAgent({
    uri: SIP.UserAgent.makeURI(`sip:${user}@${domain}`),
    transportOptions: {server: wsUrl},
    authorizationUsername: user,
    authorizationPassword: password,
    delegate,
    logBuiltinEnabled: false,
    logLevel: 'debug',
    logConnector: (level, category, label, content) => {
      if (category.endsWith('transport') || level === 'error' || level === 'warn') {
        report({step: 'debug', text: `${role} ${level} ${category}: ${String(content).slice(0, 4000)}`});
      }
    },
    sessionDescriptionHandlerFactoryOptions: {peerConnectionConfiguration: {iceServers: []}, iceGatheringTimeout: 500},
  });
  ua.user = user;
  return ua;
}

async function register(ua) {
  const registerer = new SIP.Registerer(ua);
  const registered = withTimeout(new Promise((resolve, reject) => {
    registerer.stateChange.addListener((state) => {
      if (state === SIP.RegistererState.Registered) resolve();
      if (state === SIP.RegistererState.Terminated) reject(new Error(`${ua.user}: registerer terminated`));
    });
  }), `${ua.user} registration`);
  await registerer.register({
    requestDelegate: {onReject: (r) => report({step: 'failed', where: 'register', cause: r.message.statusCode})},
  });
  await registered;
  return registerer;
}

function play(session) {
  const pc = session.sessionDescriptionHandler.peerConnection;
  const audio = document.createElement('audio');
  audio.autoplay = true;
  audio.srcObject = new MediaStream(pc.getReceivers().map((r) => r.track));
  document.body.appendChild(audio);
  return audio.play();
}

async function audioStats(session) {
  const stats = await session.sessionDescriptionHandler.peerConnection.getStats();
  const out = {};
  stats.forEach((s) => {
    if (s.kind !== 'audio') return;
    if (s.type === 'inbound-rtp') {
      Object.assign(out, {bytesReceived: s.bytesReceived, packetsReceived: s.packetsReceived,
        totalAudioEnergy: s.totalAudioEnergy});
    } else if (s.type === 'outbound-rtp') {
      Object.assign(out, {bytesSent: s.bytesSent, packetsSent: s.packetsSent});
    }
  });
  out.pair = nominatedPair(stats);
  return out;
}

async function main() {
  document.getElementById('farm').textContent = `farm.test through the balancer at ${wsUrl} (SIP.js ${SIP.LIBRARY_VERSION})`;
  const mic = await withTimeout(navigator.mediaDevices.getUserMedia({audio: true}), 'getUserMedia');
  mic.getTracks().forEach((t) => t.stop());
  await report({step: 'media'});

  // the callee answers the first call, rejects the next as busy, and lets the last one ring
  let calleeDoes = 'answer';
  const invitations = [];
  const nextInvitation = () => new Promise((resolve) => invitations.push(resolve));
  const messages = [];
  const callee = makeUA(params.get('callee'), 'callee', {
    onInvite(invitation) {
      if (calleeDoes === 'answer') invitation.accept({sessionDescriptionHandlerOptions: MEDIA});
      else if (calleeDoes === 'reject') invitation.reject({statusCode: 486});
      else invitation.progress();
      const resolve = invitations.shift();
      if (resolve) resolve(invitation);
    },
    onMessage(message) {
      message.accept();
      messages.push({from: message.request.from.uri.toString(), body: message.request.body});
    },
  });
  const caller = makeUA(params.get('caller'), 'caller', {});
  await withTimeout(Promise.all([caller.start(), callee.start()]), 'WebSocket connections');
  await Promise.all([register(caller), register(callee)]);
  await report({step: 'registered'});

  // MESSAGE, caller to callee
  const target = SIP.UserAgent.makeURI(`sip:${callee.user}@${domain}`);
  const text = `hello ${callee.user}, this is ${caller.user}`;
  const status = await withTimeout(new Promise((resolve, reject) => {
    new SIP.Messager(caller, target, text).message({requestDelegate: {
      onAccept: (r) => resolve(r.message.statusCode),
      onReject: (r) => reject(new Error(`MESSAGE rejected: ${r.message.statusCode}`)),
    }});
  }), 'MESSAGE answer');
  for (let i = 0; i < 50 && !messages.length; i += 1) await sleep(100);
  await report({step: 'message', sent: text, received: messages[0] || null, status});

  // the call
  const arriving = nextInvitation();
  const session = new SIP.Inviter(caller, target, {sessionDescriptionHandlerOptions: MEDIA});
  const callerUp = reaches(session, [SIP.SessionState.Established, SIP.SessionState.Terminated], 'call established');
  await session.invite();
  const answered = await withTimeout(arriving, 'INVITE at the callee');
  const calleeUp = reaches(answered, [SIP.SessionState.Established, SIP.SessionState.Terminated], 'answer established');
  const states = await Promise.all([callerUp, calleeUp]);
  if (states.some((s) => s !== SIP.SessionState.Established)) throw new Error(`call not established: ${states}`);
  await report({step: 'confirmed'});
  await Promise.all([session, answered].map(play));
  await sleep(talkMs);
  await report({step: 'stats', caller: await audioStats(session), callee: await audioStats(answered)});

  // hold and resume, SIP.js's way (its SessionManager's setHold): a re-INVITE whose offer the
  // session description handler makes a=sendonly; the callee's SIP.js answers a=recvonly and
  // sends nothing while its caller still does; then a re-INVITE offering sendrecv again
  const reinvite = (hold) => withTimeout(new Promise((resolve, reject) => {
    session.sessionDescriptionHandlerOptionsReInvite = {...MEDIA, hold};
    session.invite({requestDelegate: {
      onAccept: (r) => resolve({status: r.message.statusCode, answer: direction(r.message.body),
        offer: direction(session.sessionDescriptionHandler.peerConnection.localDescription.sdp)}),
      onReject: (r) => reject(new Error(`re-INVITE (hold ${hold}) rejected: ${r.message.statusCode}`)),
    }}).catch(reject);
  }), hold ? 'hold re-INVITE' : 'resume re-INVITE');
  const both = async () => ({caller: await audioStats(session), callee: await audioStats(answered)});
  const holding = await reinvite(true);
  await sleep(HOLD_SETTLE_MS);  // what was in flight before the answer
  const held = await both();
  await sleep(holdMs);
  const stillHeld = await both();
  const resuming = await reinvite(false);
  await sleep(HOLD_SETTLE_MS);
  const resumed = await both();
  await sleep(talkMs);
  const talking = await both();
  await report({step: 'hold', holding, resuming, held, stillHeld, resumed, talking});

  const calleeEnded = reaches(answered, [SIP.SessionState.Terminated], 'BYE at the callee');
  await session.bye();
  await calleeEnded;
  await report({step: 'ended', caller: session.state, callee: answered.state});

  // busy: the callee rejects the next call
  calleeDoes = 'reject';
  const rejected = nextInvitation();
  const busy = new SIP.Inviter(caller, target, {sessionDescriptionHandlerOptions: MEDIA});
  const busyStatus = withTimeout(new Promise((resolve) => {
    busy.invite({requestDelegate: {onReject: (r) => resolve(r.message.statusCode)}});
  }), 'busy call rejected');
  await withTimeout(rejected, 'second INVITE at the callee');
  await report({step: 'busy', status: await busyStatus});

  // no answer: the callee's phone rings until the caller gives up (CANCEL)
  calleeDoes = 'ring';
  const ringing = nextInvitation();
  const unanswered = new SIP.Inviter(caller, target, {sessionDescriptionHandlerOptions: MEDIA});
  let finalStatus = null;
  const progressed = withTimeout(new Promise((resolve) => {
    unanswered.invite({requestDelegate: {onProgress: resolve, onReject: (r) => { finalStatus = r.message.statusCode; }}});
  }), 'ringing at the caller');
  const rang = await withTimeout(ringing, 'third INVITE at the callee');
  const calleeCancelled = reaches(rang, [SIP.SessionState.Terminated], 'CANCEL at the callee');
  const callerGaveUp = reaches(unanswered, [SIP.SessionState.Terminated], '487 at the caller');
  await progressed;
  await sleep(500);
  await unanswered.cancel();
  await Promise.all([calleeCancelled, callerGaveUp]);
  await report({step: 'no answer', caller: unanswered.state, callee: rang.state, status: finalStatus});

  await Promise.all([caller.stop(), callee.stop()]);
  await report({step: 'done'});
}

main().catch((err) => report({step: 'failed', where: 'main', cause: String(err && err.stack || err)}));
