#!/usr/bin/env python3
"""Interop test peer: a Vigil *service* built on the PyPI `rsocket` package (0.4.20).

It connects to the broker over TCP (the broker is the RSocket server), registers in its
SETUP metadata (composite entry `message/x.vigil.register.v0`) and then answers the
requests the broker forwards to it.

    python3 service.py --broker 127.0.0.1:PORT --service NAME --version V --instance-id ID
                       [--capacity N] [--fail-every K] [--keepalive-ms MS] [--lifetime-ms MS]

stdout: one line "ready" once the SETUP frame has been written to the socket.
stderr: why it stopped.
Exit codes: 0 broker closed the connection (or SIGTERM/SIGINT), 2 could not connect,
3 broker sent a connection-level ERROR frame (stream 0, e.g. REJECTED_SETUP).
"""
import argparse
import asyncio
import json
import signal
import sys
from datetime import timedelta
from typing import Optional

from reactivestreams.publisher import Publisher
from reactivestreams.subscriber import Subscriber
from reactivestreams.subscription import Subscription
from rsocket.extensions.composite_metadata import CompositeMetadata
from rsocket.extensions.helpers import composite, metadata_item
from rsocket.extensions.mimetypes import WellKnownMimeTypes
from rsocket.frame import MAX_REQUEST_N, SetupFrame
from rsocket.helpers import create_future
from rsocket.payload import Payload
from rsocket.request_handler import BaseRequestHandler
from rsocket.rsocket_client import RSocketClient
from rsocket.streams.stream_from_generator import StreamFromGenerator
from rsocket.transports.tcp import TransportTCP

REGISTER_MIME = b'message/x.vigil.register.v0'
COMPOSITE_MIME = WellKnownMimeTypes.MESSAGE_RSOCKET_COMPOSITE_METADATA
DATA_MIME = WellKnownMimeTypes.APPLICATION_OCTET_STREAM


def log(msg: str):
    print(f'service.py: {msg}', file=sys.stderr, flush=True)


def mime_name(encoding) -> str:
    if isinstance(encoding, (bytes, bytearray)):
        return bytes(encoding).decode('utf-8', 'replace')
    if hasattr(encoding, 'name'):  # WellKnownMimeType
        return encoding.name.decode()
    return str(encoding)


def parse_composite(metadata: Optional[bytes]):
    """Returns (list of mime strings, {mime: raw bytes of first entry})."""
    if not metadata:
        return [], {}
    parsed = CompositeMetadata().parse(bytes(metadata))
    mimes, values = [], {}
    for item in parsed.items:
        name = mime_name(item.encoding)
        mimes.append(name)
        if name not in values:
            values[name] = item.content if item.content is not None else b''
    return mimes, values


class EchoUpperChannel(Publisher, Subscriber, Subscription):
    """Responder side of request-channel: every incoming payload is echoed upper-cased;
    completes when the requester completes. Respects the requester's demand."""

    def __init__(self, first: Payload):
        self._out: Optional[Subscriber] = None
        self._buffer = [self._upper(first)]
        self._demand = 0
        self._complete_pending = False
        self._done = False

    @staticmethod
    def _upper(payload: Payload) -> Payload:
        return Payload((payload.data or b'').upper())

    # Publisher (towards the requester)
    def subscribe(self, subscriber: Subscriber):
        self._out = subscriber
        subscriber.on_subscribe(self)

    # Subscription (demand from the requester)
    def request(self, n: int):
        self._demand = min(MAX_REQUEST_N, self._demand + n)
        self._flush()

    def cancel(self):
        self._done = True

    # Subscriber (payloads from the requester)
    def on_subscribe(self, subscription: Subscription):
        subscription.request(MAX_REQUEST_N)

    def on_next(self, value, is_complete=False):
        self._buffer.append(self._upper(value))
        if is_complete:
            self._complete_pending = True
        self._flush()

    def on_error(self, exception: Exception):
        log(f'channel error from requester: {exception}')
        self._done = True

    def on_complete(self):
        self._complete_pending = True
        self._flush()

    def _flush(self):
        if self._out is None or self._done:
            return
        while self._buffer and self._demand > 0:
            self._demand -= 1
            self._out.on_next(self._buffer.pop(0))
        if self._complete_pending and not self._buffer:
            self._done = True
            self._out.on_complete()


class ServiceHandler(BaseRequestHandler):
    def __init__(self, args, state):
        super().__init__()
        self.args = args
        self.state = state
        self.rr_count = 0
        self.fnf_count = 0

    async def request_response(self, payload: Payload):
        future = create_future()
        data = bytes(payload.data or b'')
        if data == b'fnf-count':
            future.set_result(Payload(str(self.fnf_count).encode()))
            return future
        self.rr_count += 1
        k = self.args.fail_every
        if k and self.rr_count % k == 0:
            # -> ERROR frame, code APPLICATION_ERROR (0x201), data = this message
            future.set_exception(RuntimeError(
                f'injected failure #{self.rr_count} from {self.args.instance_id}'))
            return future
        try:
            mimes, values = parse_composite(payload.metadata)
        except Exception as exc:  # report instead of failing the request
            mimes, values = [f'<unparseable composite metadata: {exc}>'], {}
        tp = values.get('traceparent')
        body = {
            'instance_id': self.args.instance_id,
            'version': self.args.version,
            'echo': data.decode('utf-8', 'replace'),
            'metadata_entries': mimes,
            'traceparent': tp.decode('utf-8', 'replace') if tp is not None else None,
        }
        future.set_result(Payload(json.dumps(body).encode()))
        return future

    async def request_stream(self, payload: Payload):
        n = int((payload.data or b'0').decode().strip() or 0)
        iid = self.args.instance_id

        def items():
            if n <= 0:
                yield None, True  # complete without NEXT
                return
            for i in range(n):
                yield Payload(f'{iid}:{i}'.encode()), i == n - 1

        return StreamFromGenerator(items)

    async def request_channel(self, payload: Payload):
        echo = EchoUpperChannel(payload)
        return echo, echo

    async def request_fire_and_forget(self, payload: Payload):
        self.fnf_count += 1

    async def on_error(self, error_code, payload: Payload):
        msg = bytes(payload.data or b'').decode('utf-8', 'replace')
        # Only connection-level (stream 0) ERROR frames reach here.
        log(f'broker sent connection ERROR {error_code.name} (0x{int(error_code):x}): {msg}')
        self.state['exit_code'] = 3
        self.state['closed'].set()

    async def on_close(self, rsocket, exception=None):
        if not self.state['closed'].is_set():
            log('connection closed by broker')
        self.state['closed'].set()

    async def on_keepalive_timeout(self, time_since_last_keepalive, rsocket):
        log(f'no KEEPALIVE from broker for {time_since_last_keepalive}; giving up')
        self.state['exit_code'] = 4
        self.state['closed'].set()


class ReadyTransport(TransportTCP):
    """TransportTCP that signals once the SETUP frame has been written."""

    def __init__(self, reader, writer, setup_sent: asyncio.Event):
        super().__init__(reader, writer)
        self._setup_sent = setup_sent

    async def send_frame(self, frame):
        await super().send_frame(frame)
        if isinstance(frame, SetupFrame):
            self._setup_sent.set()


async def main(args) -> int:
    host, _, port = args.broker.rpartition(':')
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
    except (OSError, ValueError) as exc:
        log(f'cannot connect to broker {args.broker}: {exc}')
        return 2

    state = {'closed': asyncio.Event(), 'exit_code': 0}
    setup_sent = asyncio.Event()
    register = json.dumps({'service': args.service, 'version': args.version,
                           'instance_id': args.instance_id, 'capacity': args.capacity}).encode()
    setup_metadata = composite(metadata_item(register, REGISTER_MIME))

    async def transport_provider():
        yield ReadyTransport(reader, writer, setup_sent)
        # no reconnect: a second transport is never offered

    client = RSocketClient(transport_provider(),
                           handler_factory=lambda: ServiceHandler(args, state),
                           data_encoding=DATA_MIME,
                           metadata_encoding=COMPOSITE_MIME,
                           keep_alive_period=timedelta(milliseconds=args.keepalive_ms),
                           max_lifetime_period=timedelta(milliseconds=args.lifetime_ms),
                           setup_payload=Payload(b'', setup_metadata))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: (log('terminated by signal'), state['closed'].set()))

    await client.connect()
    waiter = asyncio.ensure_future(state['closed'].wait())
    await asyncio.wait([asyncio.ensure_future(setup_sent.wait()), waiter],
                       return_when=asyncio.FIRST_COMPLETED)
    if setup_sent.is_set():
        print('ready', flush=True)
    await waiter
    try:
        await asyncio.wait_for(client.close(), 2)
    except Exception:
        pass
    return state['exit_code']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Vigil interop service peer (python rsocket 0.4.20)')
    p.add_argument('--broker', required=True, help='HOST:PORT of the broker')
    p.add_argument('--service', required=True)
    p.add_argument('--version', required=True)
    p.add_argument('--instance-id', required=True)
    p.add_argument('--capacity', type=int, default=16)
    p.add_argument('--fail-every', type=int, default=0,
                   help='every K-th request-response returns an APPLICATION_ERROR')
    p.add_argument('--keepalive-ms', type=int, default=500, help='SETUP keepalive interval (package default 500)')
    p.add_argument('--lifetime-ms', type=int, default=600000, help='SETUP max lifetime (package default 600000)')
    return p.parse_args(argv)


if __name__ == '__main__':
    sys.exit(asyncio.run(main(parse_args())))
