"""An asyncio web server (Starlette, the toolkit FastAPI is built on) whose model joins the mesh.

Run: python examples/asyncio_server.py [--port 8000] [--selftest]

The model is an asyncio async generator. The same function serves HTTP
clients at /generate and mesh peers under the capability "shout". The peer runs
on its own thread with its own trio loop, so the asyncio loop is never blocked
and never shared. With --selftest the script asks itself once over HTTP and
once over the mesh, prints both answers and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from modelnet_p2p import Capability, InferenceRequest
from modelnet_p2p.threaded import AsyncioPeer


async def shout(request: InferenceRequest):
    """The "model": an asyncio async generator, as a vLLM or FastAPI app would have."""
    for word in str(request.input).split():
        await asyncio.sleep(0.01)
        yield word.upper() + "!"


peer = AsyncioPeer()


async def generate(http_request: Request) -> JSONResponse:
    body = await http_request.json()

    class _Req:  # the handler only reads .input
        input = body.get("prompt", "")

    words = [w async for w in shout(_Req())]  # type: ignore[arg-type]
    return JSONResponse({"text": " ".join(words), "peer_id": peer.peer_id, "addrs": peer.addrs})


@contextlib.asynccontextmanager
async def lifespan(app: Starlette):
    async with peer:
        peer.serve(Capability(name="shout", task="text-generation"), shout)
        print(f"mesh peer {peer.peer_id} serves 'shout' at {peer.addrs[0]}")
        yield


app = Starlette(routes=[Route("/generate", generate, methods=["POST"])], lifespan=lifespan)


async def selftest(port: int) -> None:
    import httpx

    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    async with httpx.AsyncClient() as http:
        r = await http.post(f"http://127.0.0.1:{port}/generate", json={"prompt": "hello mesh"})
        print("over HTTP:", r.json()["text"])
    async with AsyncioPeer() as client:
        chunks = [c async for c in client.infer(peer.addrs[0], "shout", "hello mesh")]
        print("over the mesh:", " ".join(chunks))
    server.should_exit = True
    await task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--selftest", action="store_true")
    args = parser.parse_args()
    if args.selftest:
        asyncio.run(selftest(args.port))
    else:
        uvicorn.run(app, host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
