// webtorrent 3 as a real client for magnetar's interop tests, on its default settings
// (encryption `secure: 1`: MSE first; TCP and uTP) except what would leave the machine:
// DHT, LSD, UPnP and NAT-PMP are off. Usage:
//   node fetch.mjs MAGNET OUT [TIMEOUT_S]
// Writes the info dict webtorrent received to OUT and prints one JSON line
// {"ok":true,"seconds":..,"info_len":..,"wires":[{"addr":..,"type":..}]}; exit 1 on timeout.
import fs from 'node:fs'
import path from 'node:path'
import WebTorrent from 'webtorrent'

const [magnet, out, timeoutArg] = process.argv.slice(2)
if (!magnet || !out) {
  console.error('usage: node fetch.mjs MAGNET OUT [TIMEOUT_S]')
  process.exit(2)
}
const timeoutS = Number(timeoutArg ?? 30)
const client = new WebTorrent({ dht: false, lsd: false, natUpnp: false, natPmp: false })
client.on('error', err => console.error('client error:', err.message))
// Metadata only: nothing lands in it. Beside OUT (the test's own temporary directory, gone
// with it even when the test kills this process), and removed on every exit of ours.
const dir = fs.mkdtempSync(path.join(path.dirname(path.resolve(out)), 'wt-fetch-'))
process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }))
const start = process.hrtime.bigint()
const timer = setTimeout(() => {
  console.error(`timed out after ${timeoutS} s waiting for metadata`)
  process.exit(1)
}, timeoutS * 1000)

const torrent = client.add(magnet, { path: dir, deselect: true })
torrent.on('warning', w => console.error('warning:', w.message ?? w))
torrent.on('metadata', () => {
  const seconds = Number(process.hrtime.bigint() - start) / 1e9
  fs.writeFileSync(out, torrent.infoBuffer)
  const wires = torrent.wires.map(w => ({ addr: w.remoteAddress + ':' + w.remotePort, type: w.type }))
  console.log(JSON.stringify({ ok: true, seconds: Number(seconds.toFixed(3)), info_len: torrent.infoBuffer.length, wires }))
  clearTimeout(timer)
  client.destroy(() => process.exit(0))
})
