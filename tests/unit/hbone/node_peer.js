// An independent HTTP/2 peer for interop tests: Node.js's built-in http2 module.
//   node node_peer.js server CERT KEY          -> prints {"port": N}, echoes every CONNECT tunnel
//   node node_peer.js client PORT CA SIZE      -> CONNECTs, sends SIZE random bytes, half-closes,
//                                                 reads the echo; prints a JSON summary
'use strict';
const http2 = require('http2');
const fs = require('fs');
const crypto = require('crypto');

const [mode, a, b, c] = process.argv.slice(2);

if (mode === 'server') {
  const server = http2.createSecureServer({
    cert: fs.readFileSync(a), key: fs.readFileSync(b), minVersion: 'TLSv1.3', ALPNProtocols: ['h2'],
  });
  server.on('stream', (stream, headers) => {
    if (headers[':method'] !== 'CONNECT') {
      stream.respond({ ':status': 400 }, { endStream: true });
      return;
    }
    stream.respond({ ':status': 200, 'baggage': 'service.name=node', 'x-authority': headers[':authority'],
                     'x-forwarded': headers['forwarded'] || '' });
    stream.pipe(stream); // echo; END_STREAM from the client ends our side after the echo
  });
  server.listen(0, '127.0.0.1', () => {
    process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n');
  });
} else if (mode === 'client') {
  const size = parseInt(c, 10);
  const session = http2.connect(`https://127.0.0.1:${a}`, { ca: fs.readFileSync(b), minVersion: 'TLSv1.3' });
  session.on('error', (e) => { console.log(JSON.stringify({ error: String(e) })); process.exit(2); });
  const req = session.request({ ':method': 'CONNECT', ':authority': '10.9.8.7:8080', 'baggage': 'k8s.namespace.name=node' });
  const payload = crypto.randomBytes(size);
  const got = [];
  let status = null;
  let respHeaders = null;
  req.on('response', (h) => { status = h[':status']; respHeaders = h; });
  req.on('data', (d) => got.push(d));
  req.on('end', () => {
    const echo = Buffer.concat(got);
    const sha = (x) => crypto.createHash('sha256').update(x).digest('hex');
    console.log(JSON.stringify({
      status, baggage: respHeaders && respHeaders['baggage'], sent: sha(payload), received: sha(echo), length: echo.length,
      alpn: session.alpnProtocol,
    }));
    session.close();
  });
  req.on('error', (e) => { console.log(JSON.stringify({ error: String(e) })); process.exit(3); });
  // write in 64 KiB pieces, then half-close
  for (let off = 0; off < size; off += 65536) req.write(payload.subarray(off, Math.min(size, off + 65536)));
  req.end();
}
