// The ICE candidate pair an RTCPeerConnection's stats report as nominated and succeeded, as
// "local address:port -> remote address:port" (undefined before one is). Shared by phone.js
// (JsSIP) and sipjs.js (SIP.js).
'use strict';

function nominatedPair(stats) {
  let pair;
  stats.forEach((s) => {
    if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') {
      const local = stats.get(s.localCandidateId);
      const remote = stats.get(s.remoteCandidateId);
      pair = `${local.address}:${local.port} -> ${remote.address}:${remote.port}`;
    }
  });
  return pair;
}
