"""HBONE: HTTP/2 CONNECT tunnels over mutual TLS.

frames.py and connection.py are the pure (sans-IO) HTTP/2 core; aio.py drives a connection
over an asyncio transport.
"""
