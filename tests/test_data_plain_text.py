"""Plain text is its own kind of run: the Data tab says it detected plain text and that the run is continued
pretraining (every word trained), and the run's status (Train tab) and `studio train` name it."""

import pytest

from studio.data_summary import lines, run_kind_line
from tests.conftest import tiny_config, train_here

pytestmark = pytest.mark.filterwarnings("ignore")
TEXT = ("Ahoy, matey! The sea be wide and the wind be fair.\n\nA ship sails at dawn, arr! Her crew sings as the "
        "anchor rises.\n\nThe captain keeps a map of every island, and the parrot keeps the captain.\n")


def test_the_kind_of_run_is_named_for_plain_text_only():
    assert run_kind_line("text") == ("Kind of run: continued pretraining (teach the model the style and facts of "
                                     "your text: every word is trained).")
    assert run_kind_line("alpaca") == "" and run_kind_line(None) == ""
    shown = lines({"format": "text", "file": "notes.md", "rows": 3, "usable": 3, "train_rows": 3, "eval_rows": 0})
    assert shown[0].startswith("Kind of run: continued pretraining") and shown[1].startswith("Data: notes.md, text")
    assert not lines({"format": "alpaca", "file": "d.jsonl", "rows": 1, "usable": 1})[0].startswith("Kind of run")


def test_the_data_tab_says_plain_text_means_continued_pretraining(tmp_path, tiny_model):
    from studio.service import Studio
    from studio.ui import data_tab
    studio = Studio()
    path = tmp_path / "notes.md"
    path.write_text(TEXT, encoding="utf-8")
    shown = data_tab.check(studio, {"path": str(path), "max_length": 64}, str(tiny_model), 1)
    assert "Plain text detected, so this is a **continued pretraining** run: teach the model the style and facts " \
           "of your text: every word is trained." in shown["summary"]
    assert shown["summary"].count("Kind of run") == 0 and "split into blocks of max length" in shown["summary"]
    conversations = data_tab.check(studio, {"path": "demo", "max_length": 64}, str(tiny_model), 1)
    assert "continued pretraining" not in conversations["summary"]
    # Said only for the stage that trains it so: another stage refuses the file with its own message.
    assert data_tab.data_kind_line("text", "dpo") == "" and data_tab.data_kind_line("alpaca") == ""


def test_a_plain_text_run_is_named_in_its_status_and_in_the_terminal(tmp_path, tiny_model, capsys):
    from studio import cli
    from studio.runs import new_run
    from studio.service import Studio
    path = tmp_path / "wiki.txt"
    path.write_text(TEXT, encoding="utf-8")
    run = new_run(tiny_config(tiny_model, data={"path": str(path), "max_length": 32, "eval_fraction": 0},
                              training={"max_steps": 1, "eval_steps": 100, "save_steps": 100, "samples": 0,
                                        "forgetting_check": "off"}))
    train_here(run)
    summary = Studio().snapshot(run.id, "local")["data_summary"]
    assert summary[0] == run_kind_line("text") and summary[1].startswith("Data: wiki.txt, text format")
    cli._print_progress(run, cli._Shown(), quiet=False)
    err = capsys.readouterr().err
    assert "Kind of run: continued pretraining (teach the model the style and facts of your text: every word is " \
           "trained)." in err
