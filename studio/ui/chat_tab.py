"""Chat tab: the same prompt to the base model and the fine-tuned one, side by side, streamed.

Run it alone with ``python -m studio.ui.chat_tab``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import gradio as gr

from studio.ui.common import bind, friendly, run_alone, run_picker, visitor


def build(studio) -> SimpleNamespace:
    gr.Markdown("### 4. Talk to the result\nAsk both models the same thing and compare. Replies come from the "
                "fine-tuned weights merged into the base (the model being trained is never used here).")
    with gr.Row():
        run_pick = gr.Dropdown([], label="Fine-tuned run", scale=3, elem_id="chat-run",
                               info="Finished runs with a saved adapter.")
        refresh = gr.Button("Refresh", scale=1)
        source = gr.Radio([("Merged model", "merged"), ("Adapter on base", "adapter")], value="merged",
                          label="Serve the tuned model as", scale=2,
                          info="Same replies either way; merged is what you would export.")
    with gr.Accordion("Sampling", open=False):
        with gr.Row():
            temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature",
                                    info="0 always picks the likeliest word (repeatable); higher is more varied.")
            top_p = gr.Slider(0.1, 1.0, value=0.9, step=0.05, label="Top-p",
                              info="With temperature above 0: sample only from the likeliest words making up this share.")
            longest = studio.limits.chat_max_new_tokens if studio.limits is not None else 1024
            max_new = gr.Slider(16, longest, value=min(160, longest), step=16, label="Max new tokens",
                                info="Longest reply.")
    with gr.Row():
        base_chat = gr.Chatbot(label="Base model", height=380, elem_id="chat-base")
        tuned_chat = gr.Chatbot(label="Fine-tuned", height=380, elem_id="chat-tuned")
    with gr.Row():
        prompt = gr.Textbox(placeholder="Ask something, e.g. What is the capital of Portugal?", scale=5,
                            show_label=False, elem_id="chat-prompt")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        clear = gr.Button("Clear", scale=1)

    inputs = [prompt, run_pick, source, temperature, top_p, max_new, base_chat, tuned_chat]
    outputs = [prompt, base_chat, tuned_chat]
    send.click(bind(respond, studio), inputs, outputs, concurrency_id="chat")
    prompt.submit(bind(respond, studio), inputs, outputs, concurrency_id="chat")
    clear.click(lambda: ([], []), None, [base_chat, tuned_chat])
    refresh.click(bind(finished_runs, studio), run_pick, run_pick)
    return SimpleNamespace(run_pick=run_pick, refresh=refresh, prompt=prompt, send=send,
                           base_chat=base_chat, tuned_chat=tuned_chat)


@friendly
def respond(studio, text, run_id, how, temp, p, limit, base_history, tuned_history, request: gr.Request = None):
    """Stream the tuned and the base model's replies to `text` into the two chat panels, both at once."""
    text = (text or "").strip()
    if not text:
        raise gr.Error("Type a message first.")
    if not run_id:
        raise gr.Error("Pick a finished run first (train one on the Train tab).")
    settings = {"temperature": temp, "top_p": p, "max_new_tokens": int(limit)}
    base_history = [*(base_history or []), {"role": "user", "content": text}]
    tuned_history = [*(tuned_history or []), {"role": "user", "content": text}]
    who = visitor(request)
    streams = {}
    for name, history in (("tuned", tuned_history), ("base", base_history)):
        turns = [{"role": m["role"], "content": _text(m["content"])} for m in history]
        history.append({"role": "assistant", "content": ""})
        streams[name] = studio.chat(how if name == "tuned" else "base", run_id, turns, settings, who)
    histories = {"tuned": tuned_history, "base": base_history}
    for name, partial in side_by_side(streams):
        histories[name][-1]["content"] = partial
        yield "", base_history, tuned_history
    yield "", base_history, tuned_history


def side_by_side(streams: dict) -> Iterator[tuple[str, str]]:
    """(name, text so far) from several reply streams at once, as each grows: both models write together, so
    the person compares them as they appear instead of waiting for one to finish before the other starts. Each
    stream is drained in a thread of its own; the first error, if any, is raised here once the others end."""
    updates: queue.Queue = queue.Queue()
    done = object()

    def drain(name: str, stream) -> None:
        try:
            for partial in stream:
                updates.put((name, partial))
        except BaseException as err:  # noqa: BLE001 - handed to the reader below
            updates.put((name, err))
        finally:
            updates.put((name, done))

    threads = [threading.Thread(target=drain, args=item, daemon=True) for item in streams.items()]
    for thread in threads:
        thread.start()
    running, failure = len(threads), None
    while running:
        name, item = updates.get()
        if item is done:
            running -= 1
        elif isinstance(item, BaseException):
            failure = failure or item
        else:
            yield name, item
    if failure is not None:
        raise failure


def finished_runs(studio, current: str | None = None, request: gr.Request = None) -> gr.Dropdown:
    """Runs to chat with: finished ones that write replies (a reward model scores them instead)."""
    return run_picker(studio.finished_runs(visitor(request), writes_replies=True), current)


def _text(content) -> str:
    """Chatbot messages may come back as lists of parts; the model needs plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)


if __name__ == "__main__":
    run_alone(build, "Chat")
