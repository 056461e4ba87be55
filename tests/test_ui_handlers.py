"""The tabs' handlers are module functions of (studio, ...): called here without building or serving a page,
and each tab file serves itself alone."""

import os
import subprocess
import sys

import pytest

from studio.service import Studio
from tests.conftest import wait_until
from tests.servers import free_port

pytestmark = pytest.mark.filterwarnings("ignore")


def test_model_and_data_handlers_without_a_page(tiny_model):
    from studio.ui import data_tab, model_tab
    studio = Studio()
    info, memory, layers, status = model_tab.describe(studio, str(tiny_model))
    assert "q_proj" in layers and "LlamaForCausalLM" in info.to_string() and "Loaded" in status
    shown = data_tab.check(studio, {"path": "demo", "max_length": 64}, str(tiny_model), 1)
    assert "95 usable of 95 rows" in shown["summary"] and len(shown["preview"]) == 10
    assert any(label == "trained" for _, label in shown["sample"])
    assert shown["sample_rejected"] is None


def test_a_preference_stage_through_the_handlers(tiny_model):
    """DPO from the tabs' handlers: the pair shown side by side, the stage's own curves while it trains."""
    from studio.ui import data_tab, train_tab
    studio = Studio()
    path, source = data_tab.demo_for("dpo")
    assert path == "demo-dpo" and "demo-dpo" in source
    shown = data_tab.check(studio, {"path": path, "max_length": 128}, str(tiny_model), 1, None, "dpo")
    assert "preference format" in shown["summary"]
    assert {"prompt", "chosen", "rejected"} <= set(shown["preview"].columns)
    chosen = "".join(text for text, label in shown["sample"] if label == "trained")
    rejected = "".join(text for text, label in shown["sample_rejected"] if label == "trained")
    assert chosen.startswith("Certainly!") and not rejected.startswith("Certainly!") and rejected in chosen
    # A stage the studio does not have, sent straight to the check, is refused with the ones it has.
    with pytest.raises(Exception, match="is not one of: sft"):
        data_tab.check(studio, {"path": path, "max_length": 128}, str(tiny_model), 1, None, "rm -rf")
    # The same file read for supervised fine-tuning is refused, naming the stages that read it.
    with pytest.raises(Exception, match="DPO"):
        data_tab.check(studio, {"path": path, "max_length": 128}, str(tiny_model), 1, None, "sft")
    cfg = {"name": "prefer", "stage": "dpo", "model": {"name_or_path": str(tiny_model)},
           "data": {"path": path, "max_length": 128},
           "training": {"max_steps": 4, "batch_size": 2, "save_steps": 100, "eval_steps": 2}}
    train_tab.start_run(studio, cfg, None)
    wait_until(lambda: "completed" in train_tab.tick(studio, "prefer")[0])
    _, _, plot, _, stage_plot, samples, _, _, _ = train_tab.tick(studio, "prefer")
    assert "training loss" in set(plot["series"])
    assert {"reward margin (chosen - rejected)", "chosen beats rejected (share)"} <= set(stage_plot["value"]["series"])


def test_train_handlers_follow_a_run_without_a_page(tiny_model):
    from studio.ui import train_tab
    studio = Studio()
    assert train_tab.reattach(studio, None)[0] == "No run is training."
    cfg = {"name": "handled", "model": {"name_or_path": str(tiny_model)},
           "training": {"max_steps": 100000, "batch_size": 2, "save_steps": 100000}}
    started = train_tab.start_run(studio, cfg, None)
    assert started[-1] == "handled" and "handled" in started[0]
    assert train_tab.reattach(studio, None)[-1] == "handled"  # a page opened now follows the live run
    wait_until(lambda: "loss" in train_tab.tick(studio, "handled")[3])
    status, progress, plot, log, stage_plot, samples, panel, chat_with, timer = train_tab.tick(studio, "handled")
    assert "running" in status and "Training with padded rows, SDPA attention" in progress
    assert panel["visible"] and not chat_with["visible"]  # the live panel shows; nothing to chat with yet
    assert "studio-data" in progress and "usable of" in progress  # what the run read from its data
    assert set(plot["series"]) == {"training loss", "held-out loss"} and "loss" in log
    train_tab.stop_run(studio, None)
    wait_until(lambda: "completed" in train_tab.tick(studio, "handled")[0])
    assert train_tab.tick(studio, "handled")[7]["visible"]  # "Chat with it" once the adapter is saved
    table, picker = train_tab.runs_table(studio)
    assert list(table["id"]) == ["handled"] and list(table["state"]) == ["completed"]
    text, settings, _ = train_tab.open_run(studio, "handled")
    assert "Stopped by you" in text and "max_steps: 100000" in settings
    # The Chat and Export pickers start on the newest finished run; a pick still listed is kept.
    from studio.ui import chat_tab, export_tab
    for tab in (chat_tab, export_tab):
        picker = tab.finished_runs(studio, None)
        assert picker.choices == [("handled", "handled")] and picker.value == "handled"
        assert tab.finished_runs(studio, "handled").value == "handled"
        assert tab.finished_runs(studio, "gone-since").value == "handled"


def test_each_tab_serves_alone():
    """`python -m studio.ui.<tab>` serves that tab by itself."""
    import httpx
    tabs = ("model_tab", "data_tab", "train_tab", "chat_tab", "export_tab")
    servers = {}
    for tab in tabs:
        port = free_port()
        env = {**os.environ, "STUDIO_PORT": str(port)}
        servers[tab] = (port, subprocess.Popen([sys.executable, "-m", f"studio.ui.{tab}"], env=env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        for tab, (port, process) in servers.items():
            def serving():
                assert process.poll() is None, process.stderr.read()
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False
            wait_until(serving, timeout=300, every=0.5)
            assert httpx.get(f"http://127.0.0.1:{port}/config").json()["title"] == tab.split("_")[0].capitalize()
    finally:
        for _, process in servers.values():
            process.terminate()
            process.wait(30)


def test_the_two_replies_are_written_together():
    """Chat's streams run side by side: the first stream cannot go on until the second has written something, so
    read one after the other they would never finish (each wait gives up after a minute and says so)."""
    import threading

    from studio.ui.chat_tab import side_by_side
    first_wrote, second_wrote = threading.Event(), threading.Event()

    def first():
        yield "a"
        first_wrote.set()
        assert second_wrote.wait(60), "the second reply never started while the first was being written"
        yield "a b"

    def second():
        assert first_wrote.wait(60), "the first reply never started"
        yield "x"
        second_wrote.set()

    seen = list(side_by_side({"tuned": first(), "base": second()}))
    assert seen == [("tuned", "a"), ("base", "x"), ("tuned", "a b")]

    def broken():
        yield "half"
        raise RuntimeError("the model fell over")
    with pytest.raises(RuntimeError, match="fell over"):
        list(side_by_side({"tuned": broken(), "base": iter(["fine", "fine too"])}))


def test_a_setting_out_of_range_is_named_as_the_page_shows_it(tiny_model):
    """Start with a number past its range: one message that names the field by its label on the page and its
    config key, with the allowed range; and the field's help says the range before anyone types."""
    import gradio as gr

    from studio.ui import app, common, train_tab
    studio = Studio()
    page = app.build_app(studio)
    try:
        cfg = {"model": {"name_or_path": str(tiny_model)}, "training": {"warmup_ratio": 5}}
        with pytest.raises(gr.Error) as raised:
            train_tab.start_run(studio, cfg, None)
        assert "Warm-up share (training.warmup_ratio) = 5.0 is out of range: use a value from 0.0 to 0.5." == \
            raised.value.message
        info = next(c for c in page.blocks.values() if getattr(c, "elem_id", None) == "training-warmup-ratio").info
        assert info.endswith("Allowed: 0 to 0.5.")
    finally:
        common.FIELD_LABELS.clear()


def test_a_persons_mistake_prints_no_traceback(caplog):
    """'Pick a run first' and engine refusals reach the page without Gradio printing a traceback to the console;
    the debug log keeps the details."""
    import logging

    import gradio as gr

    from studio.errors import StudioError
    from studio.ui.common import friendly

    @friendly
    def picks(kind):
        raise gr.Error("Pick a run first.") if kind == "page" else StudioError("No such run.")
    for kind, text in (("page", "Pick a run first."), ("engine", "No such run.")):
        with caplog.at_level(logging.DEBUG, logger="studio.ui"), pytest.raises(gr.Error) as raised:
            picks(kind)
        assert raised.value.message == text and raised.value.print_exception is False
    assert sum(bool("refused" in r.getMessage() and r.exc_info) for r in caplog.records) == 2


def test_only_the_settings_a_method_uses_are_shown():
    from studio.ui.train_tab import applies_to
    assert applies_to("lora") == {"method.rank": True, "method.alpha": True, "method.dropout": True,
                                  "method.last_layers": True, "method.num_virtual_tokens": False, "targets": True}
    assert applies_to("prompt_tuning") == {"method.rank": False, "method.alpha": False, "method.dropout": False,
                                           "method.last_layers": False, "method.num_virtual_tokens": True,
                                           "targets": False}
    assert not any(applies_to("full").values())
    assert applies_to("ia3")["targets"] and not applies_to("ia3")["method.rank"]
