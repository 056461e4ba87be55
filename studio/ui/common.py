"""Helpers shared by the tabs: readable errors, and form fields generated from the config dataclasses."""

from __future__ import annotations

import functools
import inspect
import logging
import os

import gradio as gr

from studio.config import field_info
from studio.errors import StudioError

log = logging.getLogger("studio.ui")
# The page's label of each setting ('training.warmup_ratio' -> 'Warm-up share'), so an error about a setting names
# the field the person sees.
FIELD_LABELS: dict[str, str] = {}


def friendly(fn):
    """Show StudioError text in the page; any other failure as one readable line (the log keeps the trace)."""
    def translate(err: Exception) -> gr.Error:
        if isinstance(err, (gr.Error, StudioError)):
            # A person's mistake ("Pick a run first"): said on the page, and kept out of the console, where
            # Gradio would print a traceback for it; the debug log keeps one (studio --debug).
            log.debug("handler %s refused: %s", fn.__name__, err, exc_info=True)
            if isinstance(err, gr.Error):
                err.print_exception = False
                return err
            return gr.Error(with_field_label(str(err)), print_exception=False)
        log.exception("handler %s failed", fn.__name__)
        return gr.Error(f"Something went wrong ({type(err).__name__}: {err}). The studio keeps running; "
                        "try again, and see the console for details.", print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001
                raise translate(err) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            raise translate(err) from None
    return wrapper


def with_field_label(text: str) -> str:
    """An engine message about a setting ('training.warmup_ratio = 5 is out of range...') with the field's label
    on the page in front, so the person knows which box to fix."""
    key = text.split(" = ", 1)[0] if " = " in text else ""
    label = FIELD_LABELS.get(key)
    return f"{label} ({key}){text[len(key):]}" if label else text


def setting_field(section: str, name: str, label: str | None = None, **overrides) -> gr.components.Component:
    """A form component for one config field: its help text, default, choices and range come from config.py.
    A number's allowed range is said in its help and checked by the engine when the run starts, which names the
    field in its message (Gradio's own check would say only "Value 5 is greater than maximum value 1.0")."""
    info = field_info(section, name)
    default = overrides.pop("value", info["default"])
    label = label or name.replace("_", " ").capitalize()
    FIELD_LABELS[f"{section}.{name}"] = label
    common = {"label": label, "info": info["help"], "elem_id": f"{section}-{name}".replace("_", "-"),
              "interactive": True}
    common.update(overrides)
    if info.get("choices"):
        return gr.Dropdown(choices=list(info["choices"]), value=default, **common)
    if isinstance(default, bool):
        return gr.Checkbox(value=default, **common)
    if isinstance(default, (int, float)):
        lo, hi = info.get("min"), info.get("max")
        if lo is not None and hi is not None and "info" not in overrides:
            common["info"] = f"{info['help']} Allowed: {_number(lo)} to {_number(hi)}."
        return gr.Number(value=default, precision=0 if isinstance(default, int) else None, **common)
    return gr.Textbox(value=default, **common)


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else f"{value:,}"


class Form:
    """A group of setting fields keyed by 'section.name', read back as a nested config dict."""

    def __init__(self, initial: dict | None = None):
        """initial: a nested config dict (e.g. a preset) whose values the fields start with."""
        self.fields: dict[str, gr.components.Component] = {}
        self.initial = initial or {}

    def add(self, key: str, component: gr.components.Component) -> gr.components.Component:
        self.fields[key] = component
        return component

    def field(self, section: str, name: str, **kwargs) -> gr.components.Component:
        if name in self.initial.get(section, {}):
            kwargs.setdefault("value", self.initial[section][name])
        return self.add(f"{section}.{name}", setting_field(section, name, **kwargs))

    def to_dict(self, values: dict) -> dict:
        """values: {component: value} as Gradio passes when inputs is a set."""
        nested: dict = {}
        for key, component in self.fields.items():
            if component in values:
                section, name = key.split(".", 1)
                nested.setdefault(section, {})[name] = values[component]
        return nested

    def updates_from(self, cfg: dict) -> dict:
        """{component: value} to fill the form from a nested config dict (a preset)."""
        out = {}
        for key, component in self.fields.items():
            section, name = key.split(".", 1)
            if name in cfg.get(section, {}):
                out[component] = cfg[section][name]
        return out


def bind(handler, studio):
    """`handler(studio, ...)` as an event function of the rest of its parameters. Gradio reads the bound
    function's signature to pass inputs, and its annotations to pass the gr.Request (which a functools.partial
    would hide from it)."""
    signature = inspect.signature(handler)
    params = list(signature.parameters.values())[1:]
    if inspect.isgeneratorfunction(handler):
        def bound(*args, **kwargs):
            yield from handler(studio, *args, **kwargs)
    else:
        def bound(*args, **kwargs):
            return handler(studio, *args, **kwargs)
    bound.__name__ = bound.__qualname__ = handler.__name__
    bound.__doc__ = handler.__doc__
    bound.__signature__ = signature.replace(parameters=params)
    bound.__annotations__ = {p.name: gr.Request for p in params if p.annotation in (gr.Request, "gr.Request")}
    return bound


def visitor(request: gr.Request | None) -> str:
    """Who is asking, as the server knows it: the verified login's user name (everyone who shares one login is
    one visitor), or "local" without a login. Never a value the client sends."""
    return (getattr(request, "username", None) or "local") if request is not None else "local"


def run_alone(build, title: str) -> None:
    """Serve one tab by itself on http://127.0.0.1:7860 (``python -m studio.ui.<tab>``), for working on it."""
    from studio.service import Studio
    studio = Studio()
    with gr.Blocks(title=title) as page:
        build(studio)
    port = int(os.environ.get("STUDIO_PORT", 7860))
    page.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1", server_port=port, ssr_mode=False)


def run_picker(choices: list[str], current: str | None) -> gr.Dropdown:
    """A run picker's choices, newest first, keeping the person's pick while it is still there; else the newest,
    so a page with one finished run needs no picking."""
    value = current if current in choices else (choices[0] if choices else None)
    return gr.Dropdown(choices=choices, value=value)
