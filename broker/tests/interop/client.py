#!/usr/bin/env python3
"""Interop test peer: a Vigil *requester* built on the PyPI `rsocket` package (0.4.20).

    python3 client.py --broker 127.0.0.1:PORT --route TAG [--route TAG ...] [--timeout S] COMMAND
      rr DATA [--count N]            request-response (N sequential requests)
      stream N                       request-stream, request data = str(N)
      channel ITEM [ITEM ...]        request-channel, one payload per ITEM
      fnf DATA                       fire-and-forget
      rr-traceparent DATA TRACEPARENT [--tracestate S]   request-response with trace entries

The first --route is the service name; later ones are e.g. alias=NAME, version=V, key=K.
Request metadata is composite metadata built with the package's own helpers
(`composite(route(...), metadata_item(..., b'traceparent'))`).

stdout: one JSON value per line. rr / rr-traceparent: the response data itself when it is
valid JSON (service.py answers a JSON object; "fnf-count" answers a number), otherwise the
data as a JSON string. stream / channel: each item's data as a JSON string, in order.
fnf: {"sent": "fnf"} once the frame is written. An RSocket error is printed as
{"error": {"code": int, "message": str}} (code 513 = 0x201 APPLICATION_ERROR); a timeout
as {"error": {"code": -1, ...}}.
Exit codes: 0 done (also after application errors), 1 connection lost / protocol-level
error, 2 could not connect, 4 timeout.
"""
import argparse
import asyncio
import json
import sys

from rsocket.awaitable.awaitable_rsocket import AwaitableRSocket
from rsocket.error_codes import ErrorCode
from rsocket.exceptions import RSocketProtocolError
from rsocket.extensions.helpers import composite, route, metadata_item
from rsocket.extensions.mimetypes import WellKnownMimeTypes
from rsocket.payload import Payload
from rsocket.request_handler import BaseRequestHandler
from rsocket.rsocket_client import RSocketClient
from rsocket.streams.stream_from_generator import StreamFromGenerator
from rsocket.transports.tcp import TransportTCP


def log(msg: str):
    print(f'client.py: {msg}', file=sys.stderr, flush=True)


def emit(obj):
    print(json.dumps(obj), flush=True)


def rr_line(payload: Payload):
    """rr: the response data itself when it is JSON (the service answers JSON), else a JSON string."""
    text = bytes(payload.data or b'').decode('utf-8', 'replace')
    try:
        return json.loads(text)
    except ValueError:
        return text


def item_line(payload: Payload):
    """stream / channel items: always a JSON string."""
    return bytes(payload.data or b'').decode('utf-8', 'replace')


class ConnectionLost(Exception):
    pass


def error_line(exc: Exception):
    """Maps the package's exceptions back to the RSocket error code."""
    if isinstance(exc, RSocketProtocolError):
        return {'error': {'code': int(exc.error_code), 'message': exc.data or ''}}
    # the package turns ERROR(APPLICATION_ERROR) into a plain RuntimeError(message)
    return {'error': {'code': int(ErrorCode.APPLICATION_ERROR), 'message': str(exc)}}


def is_connection_error(exc: Exception) -> bool:
    return isinstance(exc, RSocketProtocolError) and exc.error_code in (
        ErrorCode.CONNECTION_ERROR, ErrorCode.CONNECTION_ERROR_NO_RETRY)


class ClientHandler(BaseRequestHandler):
    def __init__(self, state):
        super().__init__()
        self.state = state

    async def on_error(self, error_code, payload):
        msg = bytes(payload.data or b'').decode('utf-8', 'replace')
        log(f'broker sent connection ERROR {error_code.name} (0x{int(error_code):x}): {msg}')
        self.state['conn_error'] = (int(error_code), msg)

    async def on_close(self, rsocket, exception=None):
        self.state['closed'] = True


def build_metadata(routes, traceparent=None, tracestate=None) -> bytes:
    items = [route(*routes)]
    if traceparent is not None:
        items.append(metadata_item(traceparent.encode(), b'traceparent'))
    if tracestate is not None:
        items.append(metadata_item(tracestate.encode(), b'tracestate'))
    return composite(*items)


async def run_command(args, rs: RSocketClient, state) -> int:
    ars = AwaitableRSocket(rs)
    cmd = args.command
    rc = 0

    if cmd in ('rr', 'rr-traceparent'):
        tp = args.traceparent if cmd == 'rr-traceparent' else None
        ts = getattr(args, 'tracestate', None) if cmd == 'rr-traceparent' else None
        md = build_metadata(args.route, tp, ts)
        for _ in range(getattr(args, 'count', 1) or 1):
            try:
                resp = await ars.request_response(Payload(args.data.encode(), md))
                emit(rr_line(resp))
            except Exception as exc:
                emit(error_line(exc))
                if is_connection_error(exc) or state.get('closed'):
                    return 1
    elif cmd == 'stream':
        md = build_metadata(args.route)
        try:
            for p in await ars.request_stream(Payload(str(args.n).encode(), md)):
                emit(item_line(p))
        except Exception as exc:
            emit(error_line(exc))
            rc = 1 if is_connection_error(exc) else 0
    elif cmd == 'channel':
        md = build_metadata(args.route)
        first, rest = args.items[0], args.items[1:]

        def more():
            for i, item in enumerate(rest):
                yield Payload(item.encode()), i == len(rest) - 1

        publisher = StreamFromGenerator(more) if rest else None
        try:
            for p in await ars.request_channel(Payload(first.encode(), md), publisher):
                emit(item_line(p))
        except Exception as exc:
            emit(error_line(exc))
            rc = 1 if is_connection_error(exc) else 0
    elif cmd == 'fnf':
        md = build_metadata(args.route)
        await ars.fire_and_forget(Payload(args.data.encode(), md))
        emit({'sent': 'fnf'})
    if state.get('conn_error'):
        rc = 1
    return rc


async def main(args) -> int:
    host, _, port = args.broker.rpartition(':')
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), args.timeout)
    except (OSError, ValueError, asyncio.TimeoutError) as exc:
        log(f'cannot connect to broker {args.broker}: {exc!r}')
        return 2

    state = {}

    async def transport_provider():
        yield TransportTCP(reader, writer)

    rs = RSocketClient(transport_provider(),
                       handler_factory=lambda: ClientHandler(state),
                       data_encoding=WellKnownMimeTypes.APPLICATION_OCTET_STREAM,
                       metadata_encoding=WellKnownMimeTypes.MESSAGE_RSOCKET_COMPOSITE_METADATA)
    await rs.connect()
    try:
        rc = await asyncio.wait_for(run_command(args, rs, state), args.timeout)
    except asyncio.TimeoutError:
        emit({'error': {'code': -1, 'message': f'timeout after {args.timeout}s'}})
        rc = 4
    try:
        await asyncio.wait_for(rs.close(), 2)
    except Exception:
        pass
    return rc


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Vigil interop requester peer (python rsocket 0.4.20)')
    p.add_argument('--broker', required=True, help='HOST:PORT of the broker')
    p.add_argument('--route', action='append', required=True,
                   help='routing tag; first = service name, then alias=NAME, version=V, key=K')
    p.add_argument('--timeout', type=float, default=10.0, help='seconds for the whole command')
    sub = p.add_subparsers(dest='command', required=True)
    rr = sub.add_parser('rr')
    rr.add_argument('data')
    rr.add_argument('--count', type=int, default=1)
    st = sub.add_parser('stream')
    st.add_argument('n', type=int)
    ch = sub.add_parser('channel')
    ch.add_argument('items', nargs='+')
    ff = sub.add_parser('fnf')
    ff.add_argument('data')
    rt = sub.add_parser('rr-traceparent')
    rt.add_argument('data')
    rt.add_argument('traceparent')
    rt.add_argument('--tracestate', default=None)
    rt.add_argument('--count', type=int, default=1)
    return p.parse_args(argv)


if __name__ == '__main__':
    sys.exit(asyncio.run(main(parse_args())))
