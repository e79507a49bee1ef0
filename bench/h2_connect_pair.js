// A Node.js HTTP/2 CONNECT tunnel pair over mutual TLS 1.3: `bench.connections`' reference
// for the rate of new connections (issue 21). Node's built-in modules only (http2, net, tls).
//
//   node bench/h2_connect_pair.js client LISTEN_PORT SERVER_HOST SERVER_PORT TARGET [LISTEN_PORT TARGET ...]
//   node bench/h2_connect_pair.js server LISTEN_PORT
//
// The client listens in plain TCP on 127.0.0.1:LISTEN_PORT and carries each accepted
// connection as one CONNECT stream (`:authority` TARGET, host:port as the server side sees it)
// on ONE pooled http2 session to SERVER_HOST:SERVER_PORT, reopened only if it closes, so a
// new connection costs a stream, never a handshake: the HBONE shape. The server answers each
// CONNECT by dialling the authority and replying 200, then pipes both ways.
// Certificates come from the environment: H2_CERT, H2_KEY, H2_CA (PEM files); both sides
// require the peer's certificate, signed by H2_CA. Runs until killed.
// (`bench.harness.NodeH2Pair` starts it, with --expose-gc: see SIGUSR2 below.)
"use strict";

const fs = require("fs");
const http2 = require("http2");
const net = require("net");
const tls = require("tls");

const WINDOW = 4 << 20; // per-stream and per-session receive window: bulk traffic is not window-bound

function tlsOptions() {
  return {
    cert: fs.readFileSync(process.env.H2_CERT),
    key: fs.readFileSync(process.env.H2_KEY),
    ca: fs.readFileSync(process.env.H2_CA),
    minVersion: "TLSv1.3",
  };
}

const settings = { initialWindowSize: WINDOW, maxConcurrentStreams: 1 << 20 };

// Both ways; an end travels as END_STREAM / FIN (so a response is never cut short), a failure
// (a reset stream, a broken socket) destroys the other side.
function pipeBoth(socket, stream) {
  socket.pipe(stream);
  stream.pipe(socket);
  socket.on("error", () => stream.destroy());
  stream.on("error", () => socket.destroy());
  stream.on("close", () => {
    if (stream.rstCode) socket.destroy();
  });
}

function client(args) {
  const [serverHost, serverPort] = [args[1], Number(args[2])];
  const options = {
    ...tlsOptions(),
    settings,
    maxSessionMemory: 1 << 16, // MB: thousands of open streams must not trip the session's cap
    checkServerIdentity: () => undefined, // SPIFFE certificates: a URI SAN, no host name
  };
  let session = null;
  function pooled() {
    if (session === null || session.closed || session.destroyed) {
      session = http2.connect(`https://${serverHost}:${serverPort}`, {
        ...options,
        createConnection: () => {
          const socket = tls.connect({ ...options, host: serverHost, port: serverPort, ALPNProtocols: ["h2"] });
          socket.setNoDelay(true);
          return socket;
        },
      });
      const mine = session;
      mine.on("connect", () => mine.setLocalWindowSize(WINDOW * 16));
      mine.on("error", () => {});
      mine.on("close", () => {
        if (session === mine) session = null;
      });
    }
    return session;
  }
  // LISTEN_PORT TARGET pairs: the first one is split around SERVER_HOST SERVER_PORT.
  const listeners = [[args[0], args[3]]];
  for (let i = 4; i + 1 < args.length; i += 2) listeners.push([args[i], args[i + 1]]);
  for (const [listenPort, target] of listeners) {
    net
      .createServer({ noDelay: true }, (socket) => {
        socket.pause(); // early bytes wait for the 200
        const stream = pooled().request({ ":method": "CONNECT", ":authority": target });
        stream.on("response", (headers) => {
          if (headers[":status"] !== 200) return socket.destroy();
          pipeBoth(socket, stream);
          socket.resume();
        });
        stream.on("error", () => socket.destroy());
        socket.on("error", () => stream.destroy());
      })
      .listen(Number(listenPort), "127.0.0.1");
  }
  pooled();
}

function server(args) {
  const h2 = http2.createSecureServer({
    ...tlsOptions(),
    settings,
    maxSessionMemory: 1 << 16,
    requestCert: true,
    rejectUnauthorized: true, // mutual TLS: no client certificate, no session
  });
  h2.on("connection", (socket) => socket.setNoDelay(true));
  h2.on("session", (session) => {
    session.on("connect", () => session.setLocalWindowSize(WINDOW * 16));
    session.on("error", () => {});
  });
  h2.on("stream", (stream, headers) => {
    if (headers[":method"] !== "CONNECT") {
      stream.respond({ ":status": 405 }, { endStream: true });
      return;
    }
    const authority = headers[":authority"];
    const at = authority.lastIndexOf(":");
    const upstream = net.connect({
      host: authority.slice(0, at).replace(/^\[|\]$/g, ""),
      port: Number(authority.slice(at + 1)),
      noDelay: true,
    });
    upstream.once("connect", () => {
      stream.respond({ ":status": 200 });
      pipeBoth(upstream, stream);
    });
    upstream.once("error", () => {
      if (!stream.headersSent) stream.respond({ ":status": 502 }, { endStream: true });
      stream.destroy();
    });
    stream.on("error", () => upstream.destroy());
  });
  h2.on("error", () => {});
  h2.listen(Number(args[0]), "0.0.0.0");
}

// SIGUSR2 collects garbage now (with --expose-gc), so the benchmark's RSS readings per held
// connection are not moved by a collection that happens to fall between them.
process.on("SIGUSR2", () => global.gc && global.gc());

const [mode, ...rest] = process.argv.slice(2);
if (mode === "client" && rest.length >= 4 && rest.length % 2 === 0) client(rest);
else if (mode === "server" && rest.length === 1) server(rest);
else {
  console.error(
    "usage: h2_connect_pair.js client LISTEN_PORT SERVER_HOST SERVER_PORT TARGET [LISTEN_PORT TARGET ...]\n" +
      "       h2_connect_pair.js server LISTEN_PORT",
  );
  process.exit(2);
}
