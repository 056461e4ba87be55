"""Exports (studio/export/): a portable adapter, a merged model that ends its replies, GGUF through llama.cpp's
own converter and quantiser, loaded back and checked, an Ollama Modelfile and a model card in each.

The GGUF tests need llama.cpp as set-up builds it (scripts/build_llama_cpp.sh); they run on the bundled model."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from studio.errors import StudioError
from studio.records import State
from studio.runs import new_run
from tests.conftest import tiny_config, train_here

FAKE_HUB_ID = "studio-test/tiny-llama"


def _fake_hub_cache(root, model_dir, repo_id):
    """A Hugging Face hub cache holding `model_dir` as `repo_id`, laid out as huggingface_hub writes it."""
    import shutil
    owner, name = repo_id.split("/")
    repo = root / f"models--{owner}--{name}"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return root


@pytest.fixture()
def hub_cache(tmp_path, tiny_model, monkeypatch):
    import huggingface_hub.constants
    cache = _fake_hub_cache(tmp_path / "hub", tiny_model, FAKE_HUB_ID)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory):
    """A run on the bundled model: two small steps (the export's behaviour, not the training's, is tested)."""
    home = tmp_path_factory.mktemp("export-home")
    old = os.environ.get("STUDIO_HOME")
    os.environ["STUDIO_HOME"] = str(home)
    try:
        cfg = tiny_config("bundled", training={"max_steps": 2, "batch_size": 2, "learning_rate": 1e-4,
                                               "save_steps": 100, "eval_steps": 100, "samples": 0,
                                               "forgetting_check": "off"})
        run = new_run(cfg)
        assert train_here(run).state is State.COMPLETED
    finally:
        if old is not None:
            os.environ["STUDIO_HOME"] = old
    return home, run


@pytest.fixture()
def in_bundled_home(bundled_run, monkeypatch):
    home, run = bundled_run
    monkeypatch.setenv("STUDIO_HOME", str(home))
    return run


def test_the_bundled_models_hub_id_loads_the_bundled_copy(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from studio import models
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    assert models.resolve(models.BUNDLED_HUB_ID) == models.resolve("bundled")


def test_an_exported_adapter_names_its_hub_id_and_loads_in_plain_peft_elsewhere(hub_cache, tmp_path):
    import torch

    from studio.export import write_export
    from studio.inference import load_chat_model
    run = new_run(tiny_config(FAKE_HUB_ID, training={"max_steps": 4}))
    assert train_here(run).state is State.COMPLETED
    folder = tmp_path / "elsewhere" / "adapter"
    report = write_export(run, "adapter", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == FAKE_HUB_ID
    assert (folder / "README.md").is_file() and FAKE_HUB_ID in (folder / "README.md").read_text()
    assert report.verified is None and "adapter_model.safetensors" in report.files
    # Another process, no studio code: PEFT reads the hub id and the hub cache (offline) supplies the base.
    script = textwrap.dedent(f"""
        import json, sys, torch
        from peft import AutoPeftModelForCausalLM
        model = AutoPeftModelForCausalLM.from_pretrained({str(folder)!r}).eval()
        ids = torch.tensor([[1, 5, 9, 14, 3]])
        print(json.dumps(model(ids).logits[0, -1].tolist()))
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    ours = load_chat_model("adapter", run.id).model
    with torch.inference_mode():
        expected = ours(torch.tensor([[1, 5, 9, 14, 3]])).logits[0, -1]
    assert torch.allclose(theirs, expected, atol=1e-4)


def test_an_adapter_on_a_local_folder_says_it_has_no_hub_id(tiny_model, tmp_path):
    from studio.export import write_export
    run = new_run(tiny_config(tiny_model, training={"max_steps": 2}))
    assert train_here(run).state is State.COMPLETED
    # An evaluation's report, where studio/stages/evaluate.py leaves it in the run: it travels with the export and
    # its numbers are in the card.
    report = {"evaluation_run": "eval-1", "labels": {"base": "base", "tuned": run.id}, "headline": "Tuned wins.",
              "summary": {"rouge_l": {"base_mean": 0.125, "tuned_mean": 0.5, "tuned_wins": 3, "base_wins": 1,
                                      "ties": 0}},
              "loss": {"base": {"loss": 2.5}, "tuned": {"loss": 1.25}}}
    (run.path / "evaluations" / "eval-1").mkdir(parents=True)
    (run.path / "evaluations" / "eval-1" / "report.json").write_text(json.dumps(report))
    (run.path / "evaluations" / "eval-1" / "report.html").write_text("<h1>Evaluation</h1>")
    write_export(run, "adapter", tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    assert "| rouge_l | 0.125 | 0.500 | 3 / 1 / 0 |" in card and "| held-out loss | 2.500 | 1.250 |" in card
    assert (tmp_path / "a" / "evaluations" / "eval-1" / "report.html").is_file()
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    assert "no hub id" in (tmp_path / "a" / "README.md").read_text()
    # Through the service: a zip of the folder, model card included; a shared studio bounds the size.
    import zipfile

    from studio.limits import Limits
    from studio.service import Policy, Studio
    result = Studio().export_with_report(run.id, "adapter", "local")
    with zipfile.ZipFile(result["path"]) as zf:
        assert {f"{run.id}-adapter/README.md", f"{run.id}-adapter/adapter_config.json"} <= set(zf.namelist())
    assert result["verified"] is None
    shared = Studio(Policy(share=True, admins=frozenset({"boss"}), limits=Limits(export_max_mb=0)))
    with pytest.raises(StudioError, match="this shared studio allows 0 MB"):
        shared.export_with_report(run.id, "merged", "boss")


def test_the_ollama_template_writes_what_the_training_template_wrote(tiny_model):
    from transformers import AutoTokenizer

    from studio.export import ollama
    from studio.rendering import BUILTIN_TEMPLATES
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    conversations = [[{"role": "user", "content": "Hi there"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again?"}]]
    for name in ("chatml", "llama3"):
        tokenizer.chat_template = BUILTIN_TEMPLATES[name]
        pieces = ollama.derive_pieces(tokenizer)
        assert ollama.check_pieces(pieces, tokenizer, conversations) == [], name
        template = ollama.go_template(pieces)
        assert "{{ range .Messages }}" in template and "{{ .Content }}" in template and "{{-" not in template
    # A template that is not a sequence of role turns is reported, not guessed.
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(StudioError, match="could not be derived"):
        ollama.derive_pieces(tokenizer)


def test_without_llama_cpp_the_export_says_what_to_run(tiny_model, tmp_path, monkeypatch):
    from studio.export import llamacpp, write_export
    from studio.ui.export_tab import gguf_status
    run = new_run(tiny_config(tiny_model, training={"max_steps": 2, "samples": 0}))
    assert train_here(run).state is State.COMPLETED
    monkeypatch.setenv("STUDIO_LLAMA_CPP_TOOLS", str(tmp_path / "nothing-here"))
    assert "scripts/setup.sh" in llamacpp.missing()
    with pytest.raises(StudioError, match="scripts/setup.sh"):
        write_export(run, "gguf-q8_0", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    class Page:  # the Export tab's notice, from the same engine call the page makes
        gguf_missing = staticmethod(llamacpp.missing)
    assert "not available here" in gguf_status(Page()) and "scripts/setup.sh" in gguf_status(Page())


@pytest.mark.slow
def test_the_merged_model_loads_in_plain_transformers_and_ends_its_replies(in_bundled_home, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from studio.export import write_export
    from studio.export.portable import export_tokenizer
    from studio.rendering import render_text
    folder = tmp_path / "merged"
    write_export(in_bundled_home, "merged", folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in model.generation_config.eos_token_id
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    # The template in the folder renders what the studio rendered in training (its default system prompt left out).
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        render_text(export_tokenizer(in_bundled_home), messages, add_generation_prompt=True)
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**inputs, max_new_tokens=96, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert len(out) < 96 and out[-1].item() == end, tokenizer.decode(out)
    assert "README.md" in os.listdir(folder)


@pytest.mark.slow
def test_a_gguf_round_trip_on_the_bundled_model(in_bundled_home, tmp_path):
    """f16 through llama.cpp's converter, loaded back: template, tokens, stop and reply all checked; then a copy with
    a wrong end token fails the stop check, and Q4_K_M from llama.cpp's quantiser loads and stops too."""
    from transformers import AutoTokenizer  # noqa: F401  (the check loads the merged model itself)

    from studio.export import llamacpp, write_export
    from studio.export.estimate import estimated_bytes
    from studio.export.portable import end_of_turn, export_tokenizer
    from studio.export.verify import verify_gguf
    from studio.export.writer import held_out_conversations
    run = in_bundled_home
    folder = tmp_path / "f16"
    report = write_export(run, "gguf-f16", folder)
    checks = {c["name"]: c for c in report.checks}
    assert report.verified, report.summary()
    assert set(checks) == {"template", "tokens", "stops", "reply"}
    assert all(c["passed"] for c in checks.values())
    gguf = folder / f"{run.id}-f16.gguf"
    meta = llamacpp.read_metadata(gguf)
    tokenizer = export_tokenizer(run)
    eot_id, eot = end_of_turn(tokenizer)
    assert eot == "<|im_end|>" and meta["tokenizer.ggml.eot_token_id"] == eot_id
    assert meta["tokenizer.ggml.eos_token_id"] == eot_id and "im_start" in meta["tokenizer.chat_template"]
    # Ollama: the derived template and the stop lines; the card says how to run it.
    modelfile = (folder / "Modelfile").read_text()
    assert f"FROM ./{gguf.name}" in modelfile and 'TEMPLATE """' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and report.facts["ollama"]["template_derived"]
    card = (folder / "README.md").read_text()
    assert "ollama create" in card and "llama-cli" in card and "Checked after export" in card
    assert sorted(os.listdir(folder)) == sorted(["Modelfile", "README.md", "export.json", gguf.name])
    assert 0.8 < estimated_bytes(run, "gguf-f16") / gguf.stat().st_size < 1.2

    # The same file with the end of sequence set to <|endoftext|> and no end-of-turn id: it no longer stops.
    wrong = tmp_path / "wrong.gguf"
    llamacpp.set_end_tokens(gguf, wrong, tokenizer.convert_tokens_to_ids("<|endoftext|>"), None)
    conversations = held_out_conversations(run)
    stops = {c.name: c for c in verify_gguf(wrong, tokenizer, eot_id, conversations, max_new=96)}["stops"]
    assert stops.passed is False and "does not declare" in stops.detail, stops.detail

    # Q4_K_M by llama.cpp's quantiser from the f16 file: it keeps the end tokens and still ends its turn.
    q4 = llamacpp.quantize(gguf, tmp_path / "q4.gguf", "q4_k_m")
    assert q4.stat().st_size < gguf.stat().st_size / 2
    found = {c.name: c for c in verify_gguf(q4, tokenizer, eot_id, conversations)}
    assert found["stops"].passed and found["template"].passed and found["reply"].passed is None
