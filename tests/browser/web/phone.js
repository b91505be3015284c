// A JsSIP web phone driven by its URL, reporting every step to the page's server (POST /report).
//
// ?ws=ws://127.0.0.1:P&domain=farm.test&caller=alice:PW&callee=bob:PW&talk_ms=2000
//
// Two JsSIP user agents in one page register over the WebSocket; the caller calls the callee, the
// callee answers, both RTCPeerConnections exchange audio (Chromium's fake microphone) for talk_ms,
// then the caller hangs up. Reports: {step: "media" | "registered" | "confirmed" | "stats" |
// "ended" | "done"} or {step: "failed", where, cause}. The test reads them from its server.
'use strict';

const params = new URLSearchParams(location.search);
const wsUrl = params.get('ws');
const domain = params.get('domain');
const talkMs = Number(params.get('talk_ms') || 2000);
const STEP_TIMEOUT_MS = 10000;

function log(text) {
  document.getElementById('log').textContent += text + '\n';
}

function report(body) {
  log(JSON.stringify(body));
  return fetch('/report', {
    method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body),
  });
}

// JsSIP's debug output (the SIP messages) goes to the test's log through /report too.
JsSIP.debug.enable('JsSIP:Transport JsSIP:RTCSession JsSIP:Registrator JsSIP:DigestAuthentication');
JsSIP.debug.log = (...args) => { report({step: 'debug', text: args.map(String).join(' ').slice(0, 4000)}); };

function withTimeout(promise, what) {
  return Promise.race([
    promise,
    new Promise((_, reject) => setTimeout(() => reject(new Error(`timeout: ${what}`)), STEP_TIMEOUT_MS)),
  ]);
}

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
  stats.forEach((s) => {
    if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') {
      const local = stats.get(s.localCandidateId);
      const remote = stats.get(s.remoteCandidateId);
      out.pair = `${local.address}:${local.port} -> ${remote.address}:${remote.port}`;
    }
  });
  return out;
}

async function main() {
  // A granted microphone (fake device, fake permission prompt) lets candidates carry real
  // addresses instead of mDNS names, which nothing resolves in a loopback-only namespace.
  const mic = await navigator.mediaDevices.getUserMedia({audio: true});
  mic.getTracks().forEach((t) => t.stop());
  await report({step: 'media'});

  const caller = makeUA(params.get('caller'));
  const callee = makeUA(params.get('callee'));
  const calleeSession = new Promise((resolve) => {
    callee.on('newRTCSession', (e) => {
      if (e.originator !== 'remote') return;
      resolve(e.session);
      e.session.answer(CALL_OPTIONS);
    });
  });
  caller.start();
  callee.start();
  await withTimeout(Promise.all([caller.registeredPromise, callee.registeredPromise]), 'registration');
  await report({step: 'registered'});

  const session = caller.call(`sip:${callee.user}@${domain}`, CALL_OPTIONS);
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

  await new Promise((resolve) => setTimeout(resolve, talkMs));
  await report({
    step: 'stats',
    caller: await audioStats(session),
    callee: await audioStats(answered),
  });

  const ended = (s) => new Promise((resolve) => s.on('ended', (e) => resolve(`${e.originator}: ${e.cause}`)));
  const calleeEnded = ended(answered);
  const callerEnded = ended(session);
  session.terminate();
  const causes = await withTimeout(Promise.all([callerEnded, calleeEnded]), 'BYE');
  await report({step: 'ended', caller: causes[0], callee: causes[1]});

  for (const ua of [caller, callee]) {
    ua.stop();
  }
  await report({step: 'done'});
}

window.addEventListener('error', (e) => report({step: 'failed', where: 'window', cause: String(e.message)}));
main().catch((err) => report({step: 'failed', where: 'main', cause: String(err && err.message || err)}));
