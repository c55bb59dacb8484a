// A js-libp2p peer for tests/test_psk_interop.py: TCP, Noise, yamux, ping and identify, with the
// private-network protector when given a swarm key file. It listens on 127.0.0.1, prints one JSON
// line per event on stdout, and stops when stdin closes.
//
//   node peer.mjs [--psk swarm.key] [--dial MULTIADDR]
//
// --dial pings MULTIADDR (a /p2p/ address) once and prints {"event": "ping", "ok": ..., ...}.
import { readFileSync } from 'node:fs'

// Node 20 lacks Promise.withResolvers (Node 22), which some of js-libp2p's dependencies call.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve, reject
    const promise = new this((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}
const { noise } = await import('@chainsafe/libp2p-noise')
const { yamux } = await import('@chainsafe/libp2p-yamux')
const { identify } = await import('@libp2p/identify')
const { ping } = await import('@libp2p/ping')
const { preSharedKey } = await import('@libp2p/pnet')
const { tcp } = await import('@libp2p/tcp')
const { multiaddr } = await import('@multiformats/multiaddr')
const { createLibp2p } = await import('libp2p')

const args = process.argv.slice(2)
const option = (name) => {
  const i = args.indexOf(name)
  return i >= 0 ? args[i + 1] : undefined
}
const pskFile = option('--psk')
const dial = option('--dial')
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

const node = await createLibp2p({
  addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  ...(pskFile ? { connectionProtector: preSharedKey({ psk: readFileSync(pskFile) }) } : {}),
  services: { ping: ping(), identify: identify() }
})
node.addEventListener('peer:connect', (evt) => emit({ event: 'connect', peer_id: evt.detail.toString() }))
emit({ event: 'ready', peer_id: node.peerId.toString(), addrs: node.getMultiaddrs().map(String) })

if (dial !== undefined) {
  try {
    const rtt = await node.services.ping.ping(multiaddr(dial), { signal: AbortSignal.timeout(10000) })
    emit({ event: 'ping', ok: true, rtt_ms: rtt })
  } catch (err) {
    emit({ event: 'ping', ok: false, error: String(err?.message ?? err) })
  }
}

process.stdin.resume()
process.stdin.on('end', () => {
  node.stop().finally(() => process.exit(0))
})
