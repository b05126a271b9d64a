"""An interactive multi-turn chat on the terminal, streaming each answer (tools/generate.py --chat)."""

from __future__ import annotations

import json

from loop.inference import sampling


def chat(model, tokenizer, cfg: sampling.SamplingConfig, stop, read=input, write=print) -> None:
    """An interactive multi-turn chat that streams each answer: line editing and history (readline, on a
    terminal), Ctrl-C cancels the answer being written (and at the prompt ends the chat), /reset starts
    over, /save FILE appends the conversation as a messages-schema JSON line, an empty line or /exit ends."""
    from transformers import TextStreamer

    try:
        import readline  # noqa: F401 - importing it gives input() line editing and history
    except ImportError:  # not on every platform
        pass
    conversation: list[dict] = []
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    write("chat: type a message; /reset starts over, /save FILE keeps the conversation, an empty line or /exit ends")
    while True:
        try:
            line = read("user> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("")
            return
        if not line or line == "/exit":
            return
        if line == "/reset":
            conversation = []
            continue
        if line.startswith("/save"):
            target = line.removeprefix("/save").strip()
            if not target:
                write("usage: /save FILE")
                continue
            with open(target, "a") as f:
                f.write(json.dumps({"messages": conversation}, ensure_ascii=False) + "\n")
            write(f"saved {len(conversation)} messages to {target}")
            continue
        conversation.append({"role": "user", "content": line})
        write("assistant> ", end="", flush=True)
        try:
            (reply,) = sampling.answer(model, tokenizer, [conversation], cfg, stop, streamer=streamer)
        except KeyboardInterrupt:
            write("\n(cancelled)")
            conversation.pop()
            continue
        conversation.append({"role": "assistant", "content": reply})
