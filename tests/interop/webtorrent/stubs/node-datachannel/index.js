// See package.json: WebRTC is unavailable in the test environment; TCP, uTP and MSE
// (what a magnet's x.pe address is dialled with) do not use it.
const unavailable = () => {
  throw new Error('WebRTC (node-datachannel) is not available in this test environment')
}
export class PeerConnection { constructor () { unavailable() } }
export class RtcpReceivingSession { constructor () { unavailable() } }
export class Video { constructor () { unavailable() } }
export class Audio { constructor () { unavailable() } }
export function cleanup () {}
export default { PeerConnection, RtcpReceivingSession, Video, Audio, cleanup }
