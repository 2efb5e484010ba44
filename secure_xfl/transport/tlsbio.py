"""The TLS/TCP server's TLS layer: OpenSSL through memory BIOs over a plain TCP stream.

asyncio's own SSL transport aborts the TCP connection when a server-side handshake
fails, without sending OpenSSL's alert, so a client whose certificate was refused at
the TLS layer (not issued by the federation CA, no key for it) would see only a bare
close, indistinguishable from a server that died. Driving the same ``ssl`` objects by
hand lets the alert reach the client first. No cryptography here: OpenSSL does it all.
"""

from __future__ import annotations

import asyncio
import ssl

__all__ = ["TlsStream"]

_READ = 1 << 20


class TlsStream:
    """One server-side TLS connection over ``reader``/``writer`` (plain TCP)."""

    def __init__(
        self, ctx: ssl.SSLContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self._in, self._out, server_side=True)
        self.reader, self.writer = reader, writer

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def _feed(self) -> None:
        data = await self.reader.read(_READ)
        if not data:
            self._in.write_eof()
        else:
            self._in.write(data)

    async def handshake(self) -> None:
        """Complete the handshake; a refused one sends OpenSSL's alert, then raises."""
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if self._in.eof:
                    raise ConnectionError("closed during the TLS handshake") from None
                await self._feed()
                continue
            except ssl.SSLError:
                await self._flush()  # the alert that tells the client why
                raise
            await self._flush()
            return

    def peer_certificate(self) -> bytes | None:
        """The peer's leaf certificate (DER) OpenSSL accepted, if it sent one."""
        return self.obj.getpeercert(binary_form=True)

    async def read_exactly(self, n: int) -> bytes:
        """``n`` plaintext bytes; :class:`asyncio.IncompleteReadError` at the end."""
        buf = bytearray(n)
        await self.read_into(memoryview(buf))
        return bytes(buf)

    async def read_into(self, view: memoryview) -> None:
        """Fill ``view`` with plaintext (no intermediate copies of a large request)."""
        n, pos = len(view), 0
        while pos < n:
            try:
                got = self.obj.read(min(n - pos, _READ), view[pos:])
            except ssl.SSLWantReadError:
                if self._in.eof:
                    raise asyncio.IncompleteReadError(bytes(view[:pos]), n) from None
                await self._flush()  # e.g. a key update the peer asked for
                await self._feed()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                raise asyncio.IncompleteReadError(bytes(view[:pos]), n) from None
            if not got:
                raise asyncio.IncompleteReadError(bytes(view[:pos]), n)
            pos += int(got)  # read(len, buffer) returns a count

    async def write(self, data: bytes) -> None:
        """Encrypt and send ``data``."""
        view = memoryview(data)
        while view:
            done = self.obj.write(view[:_READ])
            view = view[done:]
            await self._flush()

    async def close(self) -> None:
        """Send close_notify (best effort) and close the TCP stream."""
        try:
            self.obj.unwrap()
        except (ssl.SSLError, ValueError):
            pass
        try:
            await self._flush()
        except (ConnectionError, OSError):
            pass
        self.writer.close()
