"""Drives an ArkNet node with the official Python clients, exactly as a user's code would.

    python clients.py --base http://127.0.0.2:8910 --model llama3.1:8b [--embed-model M]
                      [--openai-only] [--temperature 0] [--max-tokens N] [--min-chunks N]

OpenAI client: chat, streamed chat (with usage), model list, embeddings.
Ollama client (unless --openai-only): chat, streamed chat, list, ps, show, embed, streamed generate.

Prints a JSON summary on stdout; exits 1 with a clear message on stderr on any mismatch.
Run by tests/python_clients.rs with the venv made by setup.sh.
"""

import argparse
import json
import sys

import ollama
import openai


class Mismatch(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Mismatch(what)


def with_openai(args):
    client = openai.OpenAI(base_url=args.base + "/v1", api_key="unused", max_retries=0, timeout=60)
    opts = {"temperature": args.temperature, "max_tokens": args.max_tokens}
    messages = [{"role": "user", "content": "Say hello in one short sentence."}]
    out = {}

    rsp = client.chat.completions.create(model=args.model, messages=messages, **opts)
    text = rsp.choices[0].message.content or ""
    check(text.strip(), f"openai chat: empty answer: {rsp}")
    check(rsp.model, f"openai chat: no model in the response: {rsp}")
    out["chat"] = text
    out["chat_usage"] = rsp.usage.model_dump() if rsp.usage else None

    pieces, usage = [], None
    stream = client.chat.completions.create(
        model=args.model, messages=messages, stream=True, stream_options={"include_usage": True}, **opts
    )
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
    check(len(pieces) >= args.min_chunks, f"openai stream: {len(pieces)} content chunks, want >= {args.min_chunks}")
    check("".join(pieces).strip(), "openai stream: empty text")
    check(usage is not None, "openai stream: no usage chunk despite stream_options.include_usage")
    out.update(stream_chunks=len(pieces), stream_text="".join(pieces), stream_usage=usage)

    ids = [m.id for m in client.models.list()]
    check(args.model in ids, f"openai models.list: {args.model!r} not in {ids}")
    out["models"] = ids

    emb = client.embeddings.create(model=args.embed_model, input=["hello world", "goodbye"])
    dims = [len(d.embedding) for d in emb.data]
    check(len(dims) == 2 and min(dims) > 0, f"openai embeddings: dims {dims}")
    check([d.index for d in emb.data] == [0, 1], f"openai embeddings: indexes {[d.index for d in emb.data]}")
    out["embedding_dims"] = dims
    return out


def with_ollama(args):
    client = ollama.Client(host=args.base, timeout=60)
    opts = {"temperature": args.temperature, "num_predict": args.max_tokens}
    messages = [{"role": "user", "content": "Say hello in one short sentence."}]
    out = {}

    rsp = client.chat(model=args.model, messages=messages, options=opts)
    check(rsp.message.content.strip(), f"ollama chat: empty answer: {rsp}")
    check(rsp.done, f"ollama chat: not done: {rsp}")
    out["chat"] = rsp.message.content

    parts = list(client.chat(model=args.model, messages=messages, options=opts, stream=True))
    pieces = [p.message.content for p in parts if p.message.content]
    check(len(pieces) >= args.min_chunks, f"ollama chat stream: {len(pieces)} content chunks, want >= {args.min_chunks}")
    check(parts[-1].done, f"ollama chat stream: last part not done: {parts[-1]}")
    check("".join(pieces).strip(), "ollama chat stream: empty text")
    out.update(stream_chunks=len(pieces), stream_text="".join(pieces), prompt_eval_count=parts[-1].prompt_eval_count)

    listed = client.list().models
    names = [m.model for m in listed]
    check(args.model in names, f"ollama list: {args.model!r} not in {names} (Model.model comes from the 'model' key)")
    check(all(m.details is not None for m in listed), f"ollama list: a model without details: {listed}")
    out["models"] = names

    running = client.ps().models
    out["running"] = [m.model for m in running]

    shown = client.show(args.model)
    check(shown.details is not None or shown.modelinfo is not None, f"ollama show: neither details nor model_info: {shown}")
    out["show_family"] = shown.details.family if shown.details else None

    emb = client.embed(model=args.embed_model, input=["hello world", "goodbye"])
    dims = [len(e) for e in emb.embeddings]
    check(len(dims) == 2 and min(dims) > 0, f"ollama embed: dims {dims}")
    out["embedding_dims"] = dims

    parts = list(client.generate(model=args.model, prompt="Why is the sky blue?", options=opts, stream=True))
    pieces = [p.response for p in parts if p.response]
    check(len(pieces) >= args.min_chunks, f"ollama generate stream: {len(pieces)} chunks, want >= {args.min_chunks}")
    check(parts[-1].done, f"ollama generate stream: last part not done: {parts[-1]}")
    out.update(generate_chunks=len(pieces), generate_text="".join(pieces))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the node's API address, e.g. http://127.0.0.2:8910")
    p.add_argument("--model", required=True, help="model for chat, generate, show and listings")
    p.add_argument("--embed-model", help="model for embeddings (default: --model)")
    p.add_argument("--openai-only", action="store_true", help="skip the Ollama client")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--min-chunks", type=int, default=2, help="content chunks a streamed reply must have")
    args = p.parse_args()
    args.embed_model = args.embed_model or args.model

    summary = {"openai_version": openai.__version__}
    step = "openai"
    try:
        summary["openai"] = with_openai(args)
        if not args.openai_only:
            step = "ollama"
            summary["ollama"] = with_ollama(args)
    except Mismatch as e:
        print(f"clients.py: MISMATCH ({step} client): {e}", file=sys.stderr)
        return 1
    except (openai.APIError, ollama.ResponseError, ValueError) as e:
        # APIError covers connection errors and non-2xx; ValueError covers pydantic validation.
        print(f"clients.py: ERROR ({step} client): {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
