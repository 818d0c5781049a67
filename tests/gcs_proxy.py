"""A fault-injecting reverse proxy between the project's GCS clients and a GCS emulator (tests).

The clients reach it as their endpoint (`STORAGE_EMULATOR_HOST` for gcsfs and
google-cloud-storage, `TENSORSTORE_GCS_HTTP_URL` for tensorstore); it forwards
every request to the emulator, except where a scripted `Fault` matches:

- `Fault('GET', r'/o/.*train\\.lock', 'status', nth=(1,), status=503)`: the
  1st matching call answers 503 (or 429, 500) without reaching the emulator;
- kind 'reset': the connection is closed without an answer;
- kind 'stall': no answer for `stall_s` seconds (past the client's timeout),
  then the connection is closed;
- kind 'lost': the request reaches the emulator (a write lands), then the
  connection is closed: the client never sees the answer.

Random mode (`proxy.randomly(RandomFaults(rate=0.05, seed=1))`, the chaos soak): each
request that no scripted fault takes is faulted with probability `rate`, of a kind drawn
uniformly from `kinds` ('503', '429', '500', 'reset', 'lost', 'stall'); `counts` says how
many of each were injected.

An upload's target ends with `#name={object}` (a multipart upload names its
object in its body, not its URL). `nth` counts the calls that match the fault's method and path regex (1 = the
first); `nth=None` hits every matching call (a fault that persists).

The emulator (gcp-storage-emulator) ignores generation preconditions; the
proxy enforces them as GCS does, answering 412 when `ifGenerationMatch` (an
upload, a delete) or `ifSourceGenerationMatch` (a copy, a rewrite, a compose's
source) is not the object's current generation ('0': absent). It looks the
generation up from the emulator first, and serialises the requests that carry
a precondition, so that a check and its write are one step (as in GCS).
"""

from __future__ import annotations

import asyncio
import dataclasses
import collections
import json
import random
import re
import socket
import threading
from typing import Sequence
from urllib.parse import quote, unquote

import aiohttp
from aiohttp import web

# Hop-by-hop and encoding headers the proxy sets itself.
_DROP = {'host', 'content-length', 'transfer-encoding', 'connection', 'content-encoding'}


@dataclasses.dataclass
class Fault:
  method: str  # 'GET', 'POST', ... or '*'
  path: str  # a regex searched in the request's path and query (unquoted)
  kind: str  # 'status', 'reset', 'stall' or 'lost'
  nth: Sequence[int] | None = (1,)  # which matching calls (1-based); None: all of them
  status: int = 503
  stall_s: float = 30.0
  seen: int = 0  # matching calls so far
  hits: int = 0  # faults injected

  def matches(self, method: str, target: str) -> bool:
    return self.method in ('*', method) and re.search(self.path, target) is not None


@dataclasses.dataclass
class RandomFaults:
  """Each request faulted with probability `rate` (seeded), of a kind drawn from `kinds`:
  '503', '429', '500' (an answer), 'reset', 'stall' (`stall_s`, keep it past the clients'
  request timeout) or 'lost' (forwarded, then the answer dropped). Only requests whose target
  matches the regex `path` are faulted."""

  rate: float
  kinds: Sequence[str] = ('503', '429', '500', 'reset', 'lost')
  seed: int = 0
  stall_s: float = 30.0
  path: str = ''
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def __post_init__(self):
    unknown = set(self.kinds) - {'503', '429', '500', 'reset', 'lost', 'stall'}
    if unknown or not 0 <= self.rate <= 1:
      raise ValueError(f'RandomFaults: rate={self.rate} (0..1), kinds={self.kinds} ({unknown}?)')
    self._random = random.Random(self.seed)

  def draw(self, method: str, target: str) -> Fault | None:
    """The fault for this request, or None (most of them)."""
    if not self.rate or not re.search(self.path, target):
      return None
    if self._random.random() >= self.rate:
      return None
    kind = self._random.choice(list(self.kinds))
    self.counts[kind] += 1
    if kind.isdigit():
      return Fault(method, '', 'status', status=int(kind))
    return Fault(method, '', kind, stall_s=self.stall_s)


class FaultProxy:
  """`with FaultProxy(upstream) as proxy:` serves on `proxy.url` from a background thread."""

  def __init__(self, upstream: str):
    self.upstream = upstream.rstrip('/')
    self.faults: list[Fault] = []
    self.random: RandomFaults | None = None
    self.log: list[tuple[str, str, str]] = []  # (method, target, what happened)
    self._loop = None
    self._runner = None
    self._thread = None
    self._session = None
    self._serial = None
    self._closing = None
    self.port = None

  @property
  def url(self) -> str:
    return f'http://localhost:{self.port}'

  def script(self, *faults: Fault) -> None:
    """Replaces the faults (and forgets the counts): `script()` clears them."""
    self.faults = list(faults)

  def randomly(self, faults: RandomFaults | None) -> None:
    """Faults every request at random from now on (None: stops); scripted faults come first."""
    self.random = faults

  def injected(self) -> int:
    return sum(f.hits for f in self.faults)

  # -- life cycle ------------------------------------------------------------

  def __enter__(self) -> FaultProxy:
    with socket.socket() as s:
      s.bind(('localhost', 0))
      self.port = s.getsockname()[1]
    ready = threading.Event()
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
    self._thread.start()
    if not ready.wait(30):
      raise RuntimeError('the fault proxy did not start')
    return self

  def __exit__(self, *exc) -> None:
    asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(30)

  def _serve(self, ready: threading.Event) -> None:
    asyncio.set_event_loop(self._loop)
    self._loop.run_until_complete(self._start())
    ready.set()
    self._loop.run_forever()

  async def _start(self) -> None:
    self._session = aiohttp.ClientSession(auto_decompress=False)
    self._serial = asyncio.Lock()
    self._closing = asyncio.Event()
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route('*', '/{tail:.*}', self._handle)
    self._runner = web.AppRunner(app, access_log=None)
    await self._runner.setup()
    await web.TCPSite(self._runner, 'localhost', self.port).start()

  async def _stop(self) -> None:
    self._closing.set()
    await self._runner.cleanup()
    await self._session.close()

  # -- requests --------------------------------------------------------------

  async def _handle(self, request: web.Request) -> web.StreamResponse:
    body = await request.read()
    target = unquote(request.path_qs)
    if request.method == 'POST' and request.path.startswith('/upload/'):
      name = request.query.get('name') or _name_in_body(body)
      target += f'#name={name}'  # a multipart upload names its object in the body
    fault = self._fault(request.method, target)
    if fault is not None and fault.kind == 'status':
      self.log.append((request.method, target, str(fault.status)))
      return web.json_response(
          {'error': {'code': fault.status, 'message': 'injected by the fault proxy'}},
          status=fault.status,
      )
    if fault is not None and fault.kind in ('reset', 'stall'):
      self.log.append((request.method, target, fault.kind))
      if fault.kind == 'stall':  # cut short when the proxy stops
        try:
          await asyncio.wait_for(self._closing.wait(), fault.stall_s)
        except asyncio.TimeoutError:
          pass
      return _drop_connection(request)
    if _preconditions(request):
      async with self._serial:  # check and write as one step
        refused = await self._refuse(request, body)
        response = refused or await self._forward(request, body)
    else:
      response = await self._forward(request, body)
    if fault is not None:  # 'lost': the write landed, its answer does not reach the client
      self.log.append((request.method, target, 'lost'))
      return _drop_connection(request)
    self.log.append((request.method, target, str(response.status)))
    return response

  def _fault(self, method: str, target: str) -> Fault | None:
    """The first fault that fires on this call; every matching fault counts it."""
    fired = None
    for fault in self.faults:
      if fault.matches(method, target):
        fault.seen += 1
        if fired is None and (fault.nth is None or fault.seen in fault.nth):
          fault.hits += 1
          fired = fault
    if fired is None and self.random is not None:
      fired = self.random.draw(method, target)
    return fired

  async def _forward(self, request: web.Request, body: bytes) -> web.Response:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
    async with self._session.request(
        request.method,
        self.upstream + request.raw_path,
        headers=headers,
        data=body,
        allow_redirects=False,
    ) as r:
      data = await r.read()
      out = {k: v for k, v in r.headers.items() if k.lower() not in _DROP}
      return web.Response(status=r.status, body=data, headers=out)

  # -- generation preconditions ----------------------------------------------

  async def _generation(self, bucket: str, name: str) -> str:
    url = f'{self.upstream}/storage/v1/b/{bucket}/o/{quote(name, safe="")}'
    async with self._session.get(url) as r:
      if r.status == 404:
        return '0'
      return str(json.loads(await r.read())['generation'])

  async def _refuse(self, request: web.Request, body: bytes) -> web.Response | None:
    """412 when a generation precondition of the request does not hold, else None."""
    # The raw (quoted) path: an object name's slashes are %2F there.
    match = re.match(
        r'/(?:upload/|download/)?storage/v1/b/([^/]+)/o(?:/([^/]+))?(.*)',
        request.raw_path.split('?', 1)[0],
    )
    if match is None:
      return None
    bucket, name, rest = match.group(1), match.group(2), match.group(3)
    checks = []
    wanted = request.query.get('ifGenerationMatch')
    if wanted is not None:
      target = name
      if rest.startswith(('/copyTo/', '/rewriteTo/')):
        target = rest.split('/o/', 1)[1]
      elif name == 'compose' or rest == '/compose':
        target = None
      if target is None and request.query.get('name'):
        target = request.query['name']
      if target is None:
        target = _name_in_body(body)
      if target is not None:
        checks.append((unquote(target), wanted))
    source = request.query.get('ifSourceGenerationMatch')
    if source is not None and name is not None:
      checks.append((unquote(name), source))
    if rest.endswith('/compose') or name == 'compose':
      try:
        for s in json.loads(body).get('sourceObjects', []):
          g = s.get('objectPreconditions', {}).get('ifGenerationMatch')
          if g is not None:
            checks.append((s['name'], str(g)))
      except ValueError:
        pass
    for obj, want in checks:
      if await self._generation(bucket, obj) != str(want):
        self.log.append((request.method, unquote(request.path_qs), '412'))
        return web.json_response(
            {'error': {'code': 412, 'message': f'precondition failed for {obj}'}}, status=412
        )
    return None


def _preconditions(request: web.Request) -> bool:
  query = request.query
  return (
      'ifGenerationMatch' in query
      or 'ifSourceGenerationMatch' in query
      or request.path.endswith('/compose')
  )


def _name_in_body(body: bytes) -> str | None:
  """The object name of a multipart upload or a JSON resumable start (its metadata part)."""
  match = re.search(rb'"name"\s*:\s*"([^"]+)"', body[:4096])
  return match.group(1).decode() if match else None


def _drop_connection(request: web.Request) -> web.Response:
  """Closes the client's connection without an answer (a reset, as the client sees it)."""
  if request.transport is not None:
    request.transport.abort()
  raise ConnectionResetError('dropped by the fault proxy')
