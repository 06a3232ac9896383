// Local, offline IPFS node for development and tests (no Kubo binary can be installed here).
//
// Helia with a filesystem blockstore and datastore, serving the subset of Kubo's interfaces that
// OpenLoRA uses, with Kubo's request and response shapes:
//   gateway port: GET|HEAD /ipfs/<cid>[/path] (trustless gateway: ?format=car|raw, and plain files)
//   API port:     POST /api/v0/version, /api/v0/dag/import, /api/v0/pin/add, /api/v0/add
// It never dials other peers: Helia "light" has no libp2p, no routers and no block brokers, and
// every read is offline. When the HTTP servers listen it prints one JSON line on stdout:
//   {"event":"ready","api":"http://127.0.0.1:PORT","gateway":"http://127.0.0.1:PORT",...}
// Usage: node node.js --repo DIR [--host 127.0.0.1] [--api-port 0] [--gateway-port 0]
//                     [--exit-on-stdin-close]
import './polyfills.js'

import { createReadStream, createWriteStream, mkdirSync, rmSync } from 'node:fs'
import { closeSync, openSync, readFileSync, unlinkSync, writeSync } from 'node:fs'
import { createServer } from 'node:http'
import { join, resolve } from 'node:path'
import { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { parseArgs } from 'node:util'

import { unixfs } from '@helia/unixfs'
import { createVerifiedFetchWithHelia } from '@helia/verified-fetch'
import { CarBlockIterator } from '@ipld/car'
import * as dagPb from '@ipld/dag-pb'
import { FsBlockstore } from 'blockstore-fs'
import busboy from 'busboy'
import { FsDatastore } from 'datastore-fs'
import { createHeliaLight } from 'helia'
import { fixedSize } from 'ipfs-unixfs-importer/chunker'
import { balanced } from 'ipfs-unixfs-importer/layout'
import { equals } from 'multiformats/bytes'
import { CID } from 'multiformats/cid'
import { identity } from 'multiformats/hashes/identity'
import { sha256 } from 'multiformats/hashes/sha2'

const VERSION = '0.1.0'
const HELIA_VERSION = JSON.parse(readFileSync(new URL('./node_modules/helia/package.json', import.meta.url))).version
const KUBO_DEFAULT_CHUNK = 262144
const KUBO_MAX_LINKS = 174
const FORMAT_MEDIA_TYPES = {
  car: 'application/vnd.ipld.car',
  raw: 'application/vnd.ipld.raw',
  tar: 'application/x-tar'
}

/** An error answered as Kubo does: `{"Message": ..., "Code": 0|1, "Type": "error"}`. */
class RpcError extends Error {
  constructor (message, status = 500) {
    super(message)
    this.status = status
  }
}

function parseCli () {
  const { values } = parseArgs({
    options: {
      repo: { type: 'string' },
      host: { type: 'string', default: '127.0.0.1' },
      'api-port': { type: 'string', default: '0' },
      'gateway-port': { type: 'string', default: '0' },
      'exit-on-stdin-close': { type: 'boolean', default: false }
    }
  })
  if (values.repo === undefined) {
    throw new Error('--repo DIR is required')
  }
  return values
}

/** One node per repo: a second one would share the blockstore without any coordination. */
function lockRepo (repo) {
  const path = join(repo, 'repo.lock')
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fd = openSync(path, 'wx')
      writeSync(fd, String(process.pid))
      closeSync(fd)
      return () => rmSync(path, { force: true })
    } catch (err) {
      if (err.code !== 'EEXIST') throw err
      const owner = Number(readFileSync(path, 'utf8'))
      if (isAlive(owner)) {
        throw new Error(`repo ${repo} is in use by process ${owner}`)
      }
      unlinkSync(path) // stale: its process is gone
    }
  }
  throw new Error(`cannot lock repo ${repo}`)
}

function isAlive (pid) {
  if (!Number.isInteger(pid) || pid <= 0) return false
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return err.code === 'EPERM'
  }
}

function flag (params, name, fallback) {
  const value = params.get(name)
  if (value === null) return fallback
  if (value === '' || value === 'true') return true
  if (value === 'false') return false
  throw new RpcError(`invalid value for option "${name}": ${value}`, 400)
}

function parseCid (text) {
  try {
    return CID.parse(text.replace(/^\/ipfs\//, ''))
  } catch {
    throw new RpcError(`invalid CID: ${text}`, 400)
  }
}

/** Yields the file parts of a multipart request one at a time, each fully consumed in turn. */
async function * multipartFiles (req) {
  const parts = []
  let wake = () => {}
  let done = false
  let failure = null
  const bb = busboy({ headers: req.headers, preservePath: true })
  bb.on('file', (name, stream, info) => {
    parts.push({ name, stream, ...info })
    wake()
  })
  bb.on('close', () => { done = true; wake() })
  bb.on('error', (err) => { failure = err; wake() })
  req.pipe(bb)
  while (true) {
    if (failure !== null) throw new RpcError(`bad multipart body: ${failure.message}`, 400)
    if (parts.length > 0) {
      const part = parts.shift()
      yield part
      part.stream.resume() // drain whatever the consumer left
      continue
    }
    if (done) return
    await new Promise((resolve) => { wake = resolve })
  }
}

async function verifyBlock (cid, bytes) {
  let digest
  if (cid.multihash.code === sha256.code) {
    digest = await sha256.digest(bytes)
  } else if (cid.multihash.code === identity.code) {
    digest = identity.digest(bytes)
  } else {
    throw new RpcError(`block ${cid}: unsupported hash function 0x${cid.multihash.code.toString(16)}`)
  }
  if (!equals(digest.bytes, cid.multihash.bytes)) {
    throw new RpcError(`block ${cid}: content does not match its CID`)
  }
}

// Like Kubo, a pin means every block of the DAG is here. Helia's pinning does not read raw
// leaves, so walk the DAG first: offline, a missing block is an error, never a network fetch.
async function assertComplete (helia, root, signal) {
  const seen = new Set()
  const stack = [root]
  while (stack.length > 0) {
    const cid = stack.pop()
    const key = cid.toV1().toString()
    if (seen.has(key)) continue
    seen.add(key)
    if (!await helia.blockstore.has(cid, { signal })) {
      throw new RpcError(`block ${cid} is not on this node (offline: it cannot be fetched)`)
    }
    if (cid.code === dagPb.code) {
      const chunks = []
      for await (const chunk of helia.blockstore.get(cid, { signal, offline: true })) chunks.push(chunk)
      for (const link of dagPb.decode(Buffer.concat(chunks)).Links) stack.push(link.Hash)
    }
  }
}

async function pinRecursive (helia, cid, signal) {
  if (await helia.pins.isPinned(cid, { signal })) return
  try {
    await assertComplete(helia, cid, signal)
    for await (const _ of helia.pins.add(cid, { signal, offline: true })) { /* records the pin */ }
  } catch (err) {
    throw new RpcError(`pin ${cid}: ${err.message}`)
  }
}

function createApi (helia, fs, tmpDir) {
  return {
    async version () {
      return [{
        Version: VERSION,
        Commit: '',
        Repo: '',
        System: `${process.arch}/${process.platform}`,
        Golang: '',
        Agent: `openlora-ipfs-node/${VERSION} helia/${HELIA_VERSION} node/${process.version}`
      }]
    },

    // Kubo: import every block of every uploaded CAR, then pin each header root (pin-roots=true).
    async 'dag/import' (params, req, signal) {
      const pinRoots = flag(params, 'pin-roots', true)
      const stats = flag(params, 'stats', false)
      const roots = []
      let blockCount = 0
      let blockBytes = 0
      for await (const part of multipartFiles(req)) {
        let car
        try {
          car = await CarBlockIterator.fromIterable(part.stream)
        } catch (err) {
          throw new RpcError(`invalid CAR: ${err.message}`)
        }
        roots.push(...await car.getRoots())
        try {
          for await (const { cid, bytes } of car) {
            await verifyBlock(cid, bytes)
            await helia.blockstore.put(cid, bytes, { signal })
            blockCount++
            blockBytes += bytes.length
          }
        } catch (err) {
          throw err instanceof RpcError ? err : new RpcError(`invalid CAR: ${err.message}`)
        }
      }
      const out = []
      for (const root of roots) {
        let pinError = ''
        if (pinRoots) {
          try {
            await pinRecursive(helia, root, signal)
          } catch (err) {
            pinError = err.message
          }
        }
        out.push({ Root: { Cid: { '/': root.toString() }, PinErrorMsg: pinError } })
      }
      if (stats) out.push({ Stats: { BlockCount: blockCount, BlockBytesCount: blockBytes } })
      return out
    },

    async 'pin/add' (params, req, signal) {
      const args = params.getAll('arg')
      if (args.length === 0) throw new RpcError('argument "ipfs-path" is required', 400)
      if (!flag(params, 'recursive', true)) throw new RpcError('only recursive pins are supported', 400)
      const pins = []
      for (const arg of args) {
        const cid = parseCid(arg)
        await pinRecursive(helia, cid, signal)
        pins.push(cid.toString())
      }
      return [{ Pins: pins }]
    },

    // Kubo's `ipfs add` defaults: 256 KiB chunks, balanced DAG with at most 174 links per node,
    // raw leaves exactly when cid-version=1, single-chunk files reduced to their leaf.
    async add (params, req, signal) {
      const cidVersion = Number(params.get('cid-version') ?? '0')
      if (cidVersion !== 0 && cidVersion !== 1) throw new RpcError('cid-version must be 0 or 1', 400)
      const rawLeaves = flag(params, 'raw-leaves', cidVersion === 1)
      const chunker = params.get('chunker') ?? `size-${KUBO_DEFAULT_CHUNK}`
      const chunk = /^size-(\d+)$/.exec(chunker)
      if (chunk === null) throw new RpcError(`unsupported chunker: ${chunker}`, 400)
      if (flag(params, 'trickle', false)) throw new RpcError('trickle layout is not supported', 400)
      if ((params.get('hash') ?? 'sha2-256') !== 'sha2-256') throw new RpcError('only sha2-256 is supported', 400)
      const pin = flag(params, 'pin', true)
      const wrap = flag(params, 'wrap-with-directory', false)

      // Spool the parts to disk first: the importer reads its candidates concurrently, a
      // multipart body can only be read in order.
      const candidates = []
      const spool = join(tmpDir, `add-${process.pid}-${Date.now()}-${Math.random().toString(16).slice(2)}`)
      mkdirSync(spool)
      try {
        for await (const part of multipartFiles(req)) {
          const path = decodeURIComponent(part.filename ?? '')
          if (part.mimeType === 'application/x-directory') {
            candidates.push({ path })
            continue
          }
          const file = join(spool, String(candidates.length))
          await pipeline(part.stream, createWriteStream(file))
          candidates.push({ path, file })
        }
        const source = candidates.map(({ path, file }) =>
          file === undefined ? { path } : { path, content: createReadStream(file) })
        const out = []
        const tops = []
        for await (const entry of fs.addAll(source, {
          cidVersion,
          rawLeaves,
          leafType: 'file',
          reduceSingleLeafToSelf: true,
          chunker: fixedSize({ chunkSize: Number(chunk[1]) }),
          layout: balanced({ maxChildrenPerNode: KUBO_MAX_LINKS }),
          wrapWithDirectory: wrap,
          signal
        })) {
          const name = entry.path ?? entry.cid.toString()
          out.push({ Name: name, Hash: entry.cid.toString(), Size: String(entry.size) })
          if (!name.includes('/')) tops.push(entry.cid)
        }
        if (pin) {
          for (const cid of tops) await pinRecursive(helia, cid, signal)
        }
        return out
      } finally {
        rmSync(spool, { recursive: true, force: true })
      }
    }
  }
}

function sendJsonLines (res, status, objects) {
  res.writeHead(status, { 'content-type': 'application/json' })
  res.end(objects.map((o) => JSON.stringify(o) + '\n').join(''))
}

function abortOnClose (req, res) {
  const controller = new AbortController()
  res.on('close', () => { if (!res.writableFinished) controller.abort() })
  return controller.signal
}

function apiHandler (api) {
  return async (req, res) => {
    const url = new URL(req.url, 'http://localhost')
    const command = url.pathname.replace(/^\/api\/v0\//, '')
    if (!url.pathname.startsWith('/api/v0/') || !Object.hasOwn(api, command)) {
      return sendJsonLines(res, 404, [{ Message: `unknown command: ${url.pathname}`, Code: 0, Type: 'error' }])
    }
    if (req.method !== 'POST') {
      res.writeHead(405, { allow: 'POST' })
      return res.end(`405 - Method Not Allowed\n`)
    }
    try {
      sendJsonLines(res, 200, await api[command](url.searchParams, req, abortOnClose(req, res)))
    } catch (err) {
      const status = err instanceof RpcError ? err.status : 500
      if (!(err instanceof RpcError)) console.error(err)
      sendJsonLines(res, status, [{ Message: err.message, Code: status === 400 ? 1 : 0, Type: 'error' }])
    }
  }
}

function sendText (res, status, text) {
  res.writeHead(status, { 'content-type': 'text/plain' })
  res.end(`${text}\n`)
}

function gatewayHandler (helia, verifiedFetch) {
  return async (req, res) => {
    const url = new URL(req.url, 'http://localhost')
    if (!url.pathname.startsWith('/ipfs/')) return sendText(res, 404, 'only /ipfs/<cid> paths are served')
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD' })
      return res.end()
    }
    let root
    try {
      root = CID.parse(url.pathname.split('/')[2])
    } catch {
      return sendText(res, 400, `invalid CID in ${url.pathname}`)
    }
    // Offline: a root we do not hold is a plain 404 (Kubo online would search the network).
    if (!await helia.blockstore.has(root)) return sendText(res, 404, `${root}: not found on this node (offline)`)
    const signal = abortOnClose(req, res)
    try {
      const headers = {}
      for (const name of ['accept', 'range', 'if-none-match']) {
        if (req.headers[name] !== undefined) headers[name] = req.headers[name]
      }
      // The trustless gateway spec lets ?format= stand for the Accept header (and win over it);
      // verified-fetch reads only the header. CAR parameters (order, dups) stay in the header.
      const format = url.searchParams.get('format')
      if (format !== null) {
        const mediaType = FORMAT_MEDIA_TYPES[format]
        if (mediaType === undefined) return sendText(res, 400, `unsupported format: ${format}`)
        if (!(headers.accept ?? '').startsWith(mediaType)) headers.accept = mediaType
        url.searchParams.delete('format')
      }
      const response = await verifiedFetch(`ipfs://${url.pathname.slice('/ipfs/'.length)}${url.search}`, {
        method: req.method,
        headers,
        signal,
        session: false,
        offline: true,
        redirect: 'manual'
      })
      res.writeHead(response.status, Object.fromEntries(response.headers))
      if (response.body === null || req.method === 'HEAD') return res.end()
      await pipeline(Readable.fromWeb(response.body), res)
    } catch (err) {
      if (signal.aborted) return
      console.error(err)
      if (!res.headersSent) {
        sendText(res, 500, err.message)
      } else {
        res.destroy(err) // mid-body: the client must see a broken response, not a short one
      }
    }
  }
}

function listen (server, host, port) {
  return new Promise((resolve, reject) => {
    server.once('error', reject)
    server.listen(Number(port), host, () => resolve(server.address().port))
  })
}

async function main () {
  const args = parseCli()
  const repo = resolve(args.repo)
  for (const dir of ['blocks', 'datastore', 'tmp']) mkdirSync(join(repo, dir), { recursive: true })
  const unlock = lockRepo(repo)

  const blockstore = new FsBlockstore(join(repo, 'blocks'))
  const datastore = new FsDatastore(join(repo, 'datastore'))
  await blockstore.open()
  await datastore.open()
  const helia = createHeliaLight({ blockstore, datastore })
  await helia.start()
  const verifiedFetch = await createVerifiedFetchWithHelia(helia)

  const apiServer = createServer(apiHandler(createApi(helia, unixfs(helia), join(repo, 'tmp'))))
  const gatewayServer = createServer(gatewayHandler(helia, verifiedFetch))
  const apiPort = await listen(apiServer, args.host, args['api-port'])
  const gatewayPort = await listen(gatewayServer, args.host, args['gateway-port'])

  let stopping = false
  const shutdown = async (reason) => {
    if (stopping) return
    stopping = true
    console.error(`ipfs-node: stopping (${reason})`)
    for (const server of [apiServer, gatewayServer]) {
      server.close()
      server.closeAllConnections()
    }
    await verifiedFetch.stop()
    await helia.stop()
    await blockstore.close()
    await datastore.close()
    unlock()
    process.exit(0)
  }
  // A DAG with a block missing fails inside the CAR exporter's walker, outside any request's
  // promise chain: that request's body breaks off, the node keeps serving.
  process.on('unhandledRejection', (err) => console.error(`ipfs-node: ${err?.message ?? err}`))
  process.on('SIGTERM', () => shutdown('SIGTERM'))
  process.on('SIGINT', () => shutdown('SIGINT'))
  if (args['exit-on-stdin-close']) {
    // The parent holds our stdin open; if it dies without stopping us, we go too.
    process.stdin.on('close', () => shutdown('stdin closed'))
    process.stdin.on('end', () => shutdown('stdin closed'))
    process.stdin.resume()
  }

  const host = args.host.includes(':') ? `[${args.host}]` : args.host
  process.stdout.write(JSON.stringify({
    event: 'ready',
    api: `http://${host}:${apiPort}`,
    gateway: `http://${host}:${gatewayPort}`,
    repo,
    pid: process.pid,
    agent: `openlora-ipfs-node/${VERSION} helia/${HELIA_VERSION}`
  }) + '\n')
}

main().catch((err) => {
  console.error(`ipfs-node: ${err.message}`)
  process.exit(1)
})
