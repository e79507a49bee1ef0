"""HBONE: HTTP/2 CONNECT tunnels over mutual TLS, a pure transport.

The sans-IO HTTP/2 core: frames.py (framing), events.py, stream.py (the stream state
table), windows.py (flow control), settings.py, headers.py, and connection.py, the
connection that ties them together. aio.py drives a connection over an asyncio
transport; server.py is the TLS server that hands accepted CONNECT streams, with the
peer's identity, to a handler; keepalive.py and limits.py are the pure bookkeeping
both ends and the server share. What a tunnel may reach, and the client pool, are
nodeagent.proxy's.
"""
