import json
import threading

import pytest
import torch

from studio import launcher
from studio.errors import BusyError, StudioError
from studio.records import State
from studio.runs import new_run, open_run
from tests.conftest import machine, sft_trainer, tiny_config, train_here, wait_until


def test_lora_changes_only_adapter_weights_and_loss_falls(tiny_model):
    cfg = tiny_config(tiny_model, method={"rank": 8, "alpha": 32},
                      training={"max_steps": 30, "learning_rate": 3e-2, "save_steps": 100, "eval_steps": 100})
    trainer, prep = sft_trainer(cfg)
    before = {n: p.detach().clone() for n, p in prep.model.named_parameters()}
    trainer.train()
    trainable = {n for n, p in prep.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, param in prep.model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        if "lora_B" in name:
            assert changed, f"{name} did not train"
        if name not in trainable:
            assert not changed, f"frozen {name} changed"
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.8


def test_run_writes_complete_files_and_adapter_reloads_with_same_logits(tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    run = new_run(tiny_config(tiny_model))
    status = train_here(run)
    assert status.state is State.COMPLETED, status
    records = run.metrics()
    steps = [r.step for r in records if r.is_training]
    assert steps == list(range(1, 9))
    for r in records:
        assert r.is_training != r.is_evaluation and r.elapsed_s > 0
        assert not r.is_training or (r.learning_rate is not None and r.tokens_per_s is not None)
    assert any(r.is_evaluation for r in records)
    assert status.total_steps == 8 and status.step == 8
    assert json.loads((run.path / "status.json").read_text())["state"] == "completed"
    assert run.read_json("data.json")["train_rows"] == 95
    assert [c.name for c in run.complete_checkpoints()] == ["checkpoint-4", "checkpoint-8"]

    # Reload from disk twice (fresh base each time) and compare with the in-memory trained result.
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base_logits = base(ids).logits
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(run.adapter_dir)).eval()
    tuned_logits = tuned(ids).logits
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(run.adapter_dir)).eval()
    assert torch.allclose(tuned_logits, again(ids).logits)
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-3)

    from studio.inference import merge_run
    merge_run(run.id)
    merged = AutoModelForCausalLM.from_pretrained(run.merged_dir).eval()
    assert torch.allclose(merged(ids).logits, tuned_logits, atol=1e-4)


def test_stop_mid_run_leaves_loadable_adapter(tiny_model):
    """A worker process trains; a second start anywhere is refused at once; Stop (twice) saves the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    launched = launcher.start(tiny_config(tiny_model, name="long", training={"max_steps": 100000,
                                                                            "save_steps": 100000}))
    run = launched.run
    with pytest.raises(BusyError, match="busy: long is training"):
        launcher.start(tiny_config(tiny_model))
    wait_until(lambda: len([r for r in run.metrics() if r.is_training]) >= 3 or not launched.alive())
    assert launcher.active_run().id == "long", run.status()
    assert "Stopping" in launcher.stop()
    assert "already stopping" in launcher.stop()
    assert run.status().state is State.STOPPING
    assert launcher.wait(launched, timeout=300)
    status = run.status()
    assert status.state is State.COMPLETED and status.stopped_early is True, status
    assert 3 <= status.step < 100000
    assert "nothing to stop" in launcher.stop()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(run.adapter_dir))


def test_interrupted_run_resumes_and_step_count_continues(tiny_model, inject):
    cfg = tiny_config(tiny_model, training={"max_steps": 6, "save_steps": 2, "eval_steps": 100})
    run = new_run(cfg)
    stop = threading.Event()
    inject("on_step_end", lambda args, state, control, **kw: stop.set() if state.global_step == 3 else None)
    train_here(run, stop)  # stands in for a crash right after step 3
    assert run.last_checkpoint().name == "checkpoint-2"
    # Pretend the worker died while training: state running, its process long gone, nobody holding the slot.
    run.update_status(state=State.RUNNING, message="Training.", worker_pid=2**22 + 12345)
    assert launcher.reconcile_all() == [run.id]
    assert open_run(run.id).status().state is State.INTERRUPTED

    assert launcher.wait(launcher.resume(run.id), timeout=300)
    assert run.status().state is State.COMPLETED, run.status()
    steps = [r.step for r in run.metrics() if r.is_training]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 3 was trained again after resuming from checkpoint-2
    elapsed = [r.elapsed_s for r in run.metrics()]
    assert elapsed == sorted(elapsed)


def test_torn_checkpoint_is_skipped_on_resume(tiny_model):
    run = new_run(tiny_config(tiny_model, training={"max_steps": 4, "save_steps": 2, "eval_steps": 100}))
    train_here(run)
    (run.checkpoints_dir / "checkpoint-4" / "COMPLETE").unlink()  # as if killed while writing it
    assert run.last_checkpoint().name == "checkpoint-2"


@pytest.mark.parametrize("method", ["dora", "rslora", "full", "prompt_tuning", "prefix_tuning", "adalora", "ia3"])
def test_other_methods_train_and_save(tiny_model, method):
    from studio.inference import load_chat_model, reply
    extra = {"target_modules": ["attention"]} if method == "dora" else {}
    run = new_run(tiny_config(tiny_model, method={"method": method, **extra},
                              training={"max_steps": 3, "learning_rate": 1e-3}))
    status = train_here(run)
    assert status.state is State.COMPLETED, status
    assert run.has_adapter()
    assert run.is_full_model() == (method == "full")
    chat = load_chat_model("adapter", run.id)
    assert isinstance(reply(chat, "What is the capital of France?", max_new_tokens=5), str)


def _first_layer_output_needs_grad(prep):
    """A list that records, at each training forward, whether the lowest decoder layer's output joined the autograd
    graph (the sample replies' and evaluations' forwards run without gradients and are left out), and the hook's
    handle to remove it."""
    seen = []
    layer = next(m for name, m in prep.model.named_modules() if name.endswith("layers.0"))
    handle = layer.register_forward_hook(lambda module, args, output: seen.append(
        (output[0] if isinstance(output, tuple) else output).requires_grad) if torch.is_grad_enabled() else None)
    return seen, handle


@pytest.mark.parametrize("last_layers", [1, 0, 5])
def test_lora_in_the_last_layers_only_stops_the_backward_pass_below_them(tiny_model, last_layers):
    from studio.inference import load_chat_model, reply
    cfg = tiny_config(tiny_model, method={"last_layers": last_layers},
                      training={"max_steps": 12, "learning_rate": 3e-2, "save_steps": 100, "eval_steps": 100})
    trainer, prep = sft_trainer(cfg)
    seen, handle = _first_layer_output_needs_grad(prep)
    trainer.train()
    handle.remove()
    adapted = {n.split("layers.")[1].split(".")[0] for n, p in prep.model.named_parameters() if p.requires_grad}
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])
    if last_layers != 1:  # 0, or more than the model has: every layer
        assert adapted == {"0", "1"} and seen and all(seen)
        return
    # the tiny model has 2 layers: only the top one adapts, and nothing flows back below it
    assert adapted == {"1"} and seen and not any(seen)
    # the saved adapter (with its layer list) loads back for chatting
    run = new_run(tiny_config(tiny_model, method={"last_layers": 1}, training={"max_steps": 2}))
    assert train_here(run).state is State.COMPLETED
    chat = load_chat_model("adapter", run.id)
    assert isinstance(reply(chat, "What is the capital of France?", max_new_tokens=4), str)


def test_with_checkpointing_the_backward_still_stops_below_the_adapted_layers(tiny_model):
    """PEFT makes the input embeddings' output need a gradient whenever the model checkpoints; the studio's
    checkpointing does not need that, and takes it off again: the frozen layer below joins no autograd graph, so
    the backward (and the recomputation of a checkpointed layer) stops above it, and neither does the embeddings'
    output. (Checked without the fix: the layer's output needed a gradient at every step.)"""
    cfg = tiny_config(tiny_model, method={"last_layers": 1},
                      training={"max_steps": 3, "gradient_checkpointing": "on", "save_steps": 100,
                                "eval_steps": 100})
    trainer, prep = sft_trainer(cfg)
    assert prep.plan.gradient_checkpointing and not prep.plan.plain
    seen, handle = _first_layer_output_needs_grad(prep)
    embedded = []
    embeddings = prep.model.get_base_model().get_input_embeddings()
    embedded_handle = embeddings.register_forward_hook(
        lambda module, args, output: embedded.append(output.requires_grad) if torch.is_grad_enabled() else None)
    before = {n: p.detach().clone() for n, p in prep.model.named_parameters() if p.requires_grad}
    trainer.train()
    handle.remove()
    embedded_handle.remove()
    micro_batches = trainer.state.global_step * trainer.args.gradient_accumulation_steps
    assert trainer.state.global_step == 3
    assert len(seen) == micro_batches and not any(seen)
    assert embedded and not any(embedded)
    # and the adapted layer above still learned: its add-on's B weights moved from their zeros
    moved = [n for n, p in prep.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("layers.1." in n and "lora_B" in n for n in moved), moved


def test_last_layers_is_refused_for_methods_without_lora_add_ons(tiny_model):
    for method in ("ia3", "full", "prompt_tuning"):
        with pytest.raises(StudioError, match="method.last_layers"):
            tiny_config(tiny_model, method={"method": method, "last_layers": 1}).validate()


def test_quantized_methods_on_cpu_fail_with_a_clear_message(tiny_model):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = new_run(tiny_config(tiny_model, method={"method": "qlora"}))
    status = train_here(run)
    assert status.state is State.FAILED and "NVIDIA GPU" in status.message


def test_unknown_target_layer_is_refused_with_the_real_names(tiny_model):
    run = new_run(tiny_config(tiny_model, method={"target_modules": ["attn_qkv"]}))
    status = train_here(run)
    assert status.state is State.FAILED
    assert "attn_qkv" in status.message and "q_proj" in status.message


def test_nan_loss_stops_the_run_and_nothing_is_saved(tiny_model, inject):
    run = new_run(tiny_config(tiny_model, training={"max_steps": 50}))

    def poison(args, state, control, model=None, **kwargs):  # a numerical blow-up in the middle of training
        if state.global_step == 2:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    inject("on_step_end", poison)
    status = train_here(run)
    assert status.state is State.FAILED and "NaN or infinite" in status.message, status
    assert status.error_kind.value == "non-finite loss"
    assert max(r.step for r in run.metrics()) <= 4
    assert not run.has_adapter()
    from studio.inference import merge_run
    with pytest.raises(StudioError, match="NaN"):
        merge_run(run.id)


def test_packed_rows_train_and_the_plan_is_recorded(tiny_model):
    run = new_run(tiny_config(tiny_model, training={"packing": "on", "attention": "sdpa", "max_steps": 3}))
    status = train_here(run)
    assert status.state is State.COMPLETED, status
    assert status.plan["packing"] is True and status.plan["attention"] == "sdpa"
    assert status.plan["gradient_checkpointing"] is False
    assert status.plan_summary.startswith("packed rows, SDPA attention")
    # 95 conversations of ~40 tokens packed into rows of 128: far fewer rows than conversations per epoch.
    assert run.metrics()[0].epoch > 2 * 8 / 95  # one step covers over twice the rows it would unpacked


LLAMA_8B = dict(hidden=4096, layers=32, intermediate=14336, attention_width=4096, kv_width=1024, vocab=128256)


def test_speed_plan_defaults_per_device(tiny_model):
    from studio.shapes import ModelShape
    from studio.training.fast.plan import plan_speed
    cfg = tiny_config(tiny_model, data={"max_length": 4096}, training={"batch_size": 2})
    cpu = plan_speed(cfg, machine("cpu"))
    assert (cpu.packing, cpu.attention, cpu.liger, cpu.gradient_checkpointing) == (False, "sdpa", False, False)
    shape = ModelShape(**LLAMA_8B)
    gpu = plan_speed(cfg, machine(shape=shape, free_gib=79))
    assert gpu.packing and gpu.attention == "flex_attention" and not gpu.gradient_checkpointing
    # 16-bit weights alone fill most of it: every layer checkpointed and every memory technique on (at 17 GiB the
    # input embeddings in host memory and the MLP in tiles just fit), and still over
    tight = plan_speed(cfg, machine(shape=shape, free_gib=16))
    assert tight.gradient_checkpointing and tight.uncheckpointed_layers == 0
    assert tight.host_embeddings and tight.mlp_tile_tokens
    assert "may not fit" in " ".join(tight.reasons)


def test_checkpointing_only_the_layers_memory_needs():
    """QLoRA of an 8B shape under a 12 GiB limit: some layers checkpointed, not all, and the estimate fits;
    more memory means fewer checkpointed layers, down to none."""
    from studio.shapes import ModelShape
    from studio.training.fast.plan import plan_speed
    shape = ModelShape(**LLAMA_8B)
    gpu = machine(shape=shape, free_gib=79)
    qlora = tiny_config("unused", method={"method": "qlora", "rank": 16}, data={"max_length": 4096},
                        training={"batch_size": 1, "memory_limit_gib": 12})
    plan = plan_speed(qlora, gpu)
    assert 0 < plan.uncheckpointed_layers < shape.layers and plan.gradient_checkpointing
    assert plan.memory_budget_gib == 12 and plan.memory_estimate_gib <= 12 and plan.memory_limit_gib == 12
    assert f"checkpointing on {shape.layers - plan.uncheckpointed_layers} of 32 layers" in plan.summary()
    roomier = plan_speed(tiny_config("unused", method={"method": "qlora", "rank": 16}, data={"max_length": 4096},
                                     training={"batch_size": 1, "memory_limit_gib": 16}), gpu)
    assert roomier.uncheckpointed_layers > plan.uncheckpointed_layers
    unlimited = plan_speed(tiny_config("unused", method={"method": "qlora", "rank": 16}, data={"max_length": 4096},
                                       training={"batch_size": 1}), gpu)
    assert not unlimited.gradient_checkpointing
    forced = plan_speed(tiny_config("unused", training={"gradient_checkpointing": "on"}), gpu)
    assert forced.gradient_checkpointing and forced.uncheckpointed_layers == 0


@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpointing_plan_reaches_the_model_for_every_method(tiny_model, method):
    """The plan's checkpointing is applied by the studio for full fine-tuning as for LoRA (the Trainer's own
    switch stays off, so nothing else would turn it on)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import GradientCheckpointingLayer

    from studio.training.fast.plan import plan_speed
    from studio.training.loop import add_adapters
    cfg = tiny_config(tiny_model, method={"method": method}, training={"gradient_checkpointing": "on"})
    plan = plan_speed(cfg, machine("cpu"))
    model = add_adapters(AutoModelForCausalLM.from_pretrained(tiny_model), cfg, None, plan, torch.float32)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and all(m.gradient_checkpointing for m in layers)


def test_memory_estimate_matches_the_h100_measurements():
    """The estimate against peaks measured by bench/bench.py on the H100 (bench/NOTES.md), LoRA rank 16."""
    from studio.shapes import ModelShape
    from studio.training.fast.memory import peak_gib
    eight = ModelShape(**LLAMA_8B)
    one = ModelShape(hidden=2048, layers=16, intermediate=8192, attention_width=2048, kv_width=512, vocab=128256,
                     tied_embeddings=True)
    assert peak_gib(eight, "lora", 16, 2 * 4096, 0, liger=True) == pytest.approx(50.2, rel=0.05)
    assert peak_gib(one, "lora", 16, 8 * 4096, 0, liger=True) == pytest.approx(40.4, rel=0.05)
    all_checkpointed = peak_gib(eight, "qlora", 16, 4096, 32, liger=True)
    assert 7.8 <= all_checkpointed <= 7.8 * 1.2  # on the safe side, not far off


def test_layers_checkpointed_as_planned(tiny_model):
    """checkpoint_layers: the first layers checkpoint, the last `uncheckpointed` do not, and training
    through the mix gives the same gradients as without checkpointing."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import GradientCheckpointingLayer

    from studio.training.fast.apply import checkpoint_layers

    def grads(uncheckpointed):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        model.train()
        if uncheckpointed is not None:
            assert checkpoint_layers(model, uncheckpointed) == len(layers_of(model)) - uncheckpointed
            assert [m.gradient_checkpointing for m in layers_of(model)] == \
                [True] * (len(layers_of(model)) - uncheckpointed) + [False] * uncheckpointed
        ids = torch.randint(0, model.config.vocab_size, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    def layers_of(model):
        return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    reference = grads(None)
    for got in (grads(1), grads(0)):
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(reference, got))


def test_lora_inputs_stay_16_bit_only_when_training_under_autocast(tiny_model):
    from transformers import AutoModelForCausalLM

    from studio.training.fast.plan import plan_speed
    from studio.training.loop import add_adapters
    cfg = tiny_config(tiny_model)
    plan = plan_speed(cfg, machine("cpu"))

    def cast_flags(dtype):
        model = add_adapters(AutoModelForCausalLM.from_pretrained(tiny_model), cfg, None, plan, dtype)
        return {m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")}
    assert cast_flags(torch.bfloat16) == {False}  # autocast runs the adapters in bf16; no fp32 copies
    assert cast_flags(torch.float32) == {True}


def test_a_resume_refused_while_busy_changes_nothing(tiny_model):
    done = new_run(tiny_config(tiny_model, training={"max_steps": 4, "save_steps": 2, "eval_steps": 100}))
    train_here(done)
    (done.checkpoints_dir / "checkpoint-4" / "COMPLETE").unlink()  # resume would go back to step 2
    before = done.metrics()
    busy = launcher.start(tiny_config(tiny_model, training={"max_steps": 100000, "save_steps": 100000}))
    try:
        with pytest.raises(BusyError):
            launcher.resume(done.id)
        assert done.metrics() == before and max(r.step for r in before) == 4
        assert done.status().state is State.COMPLETED
    finally:
        launcher.stop(busy.run)
        assert launcher.wait(busy, 300)


def test_speed_plan_fused_lora_and_data_workers():
    """Fused LoRA on for the LoRA family unless fused_kernels is off; batches built in workers only on GPUs."""
    from studio.training.fast.plan import plan_speed
    lora, gpu, cpu = tiny_config("unused"), machine(), machine("cpu")
    assert plan_speed(lora, gpu).fused_lora is True
    assert plan_speed(lora, cpu).fused_lora is False  # measured no faster there
    assert plan_speed(tiny_config("unused", training={"fused_kernels": "on"}), cpu).fused_lora is True
    assert plan_speed(lora, cpu).data_workers == 0
    assert plan_speed(lora, gpu).data_workers >= 1
    assert "fused kernels (LoRA)" in plan_speed(lora, gpu).summary()
    assert plan_speed(tiny_config("unused", training={"fused_kernels": "off"}), gpu).fused_lora is False
    assert plan_speed(tiny_config("unused", method={"method": "dora"}), gpu).fused_lora is False
    assert plan_speed(tiny_config("unused", method={"method": "full"}), gpu).fused_lora is False


def test_training_through_fused_lora_learns_and_saves(tiny_model, tmp_path):
    """A whole run through the fused path (forced on, with dropout so both node kinds run): loss falls, the
    adapter is saved and loads back through PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    cfg = tiny_config(tiny_model, method={"dropout": 0.1}, training={"fused_kernels": "on", "max_steps": 12})
    run = new_run(cfg)
    status = train_here(run)
    assert status.state is State.COMPLETED, status
    assert status.plan["fused_lora"] is True
    losses = [m.loss for m in run.metrics() if m.is_training]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3  # PEFT's own path falls the same (7.6 -> 6.2)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), str(run.adapter_dir))
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_status_written_from_two_threads_at_once_is_never_lost_or_broken(tmp_path):
    """Inside the worker the training loop logs progress while a signal's handler may record a state: each
    write must land whole (no error from a shared temporary file) and a state set by one thread must not be
    put back by the other's progress update."""
    from studio.runs import Run
    run = Run(tmp_path)
    run.update_status(state=State.RUNNING, message="start")
    errors = []

    def progress():
        try:
            for i in range(400):
                run.update_status(message=f"step {i}", step=i)
        except Exception as err:  # noqa: BLE001 - collected for the assertion below
            errors.append(err)

    def stop():
        try:
            for _ in range(400):
                run.update_status(state=State.STOPPING, message="Stopping after the current step")
        except Exception as err:  # noqa: BLE001
            errors.append(err)
    threads = [threading.Thread(target=progress), threading.Thread(target=stop)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert run.status().state is State.STOPPING and run.status().step == 399


def test_expandable_segments_on_for_gpu_runs_unless_the_user_chose(monkeypatch):
    """The planner fills most of the memory a run may use, so GPU runs turn on the allocator's expandable
    segments; a PYTORCH_CUDA_ALLOC_CONF naming them is the user's choice and stays. No GPU here: the
    allocator call is recorded instead."""
    from studio.training.fast import apply
    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    apply._use_expandable_segments()
    assert calls == ["expandable_segments:True"]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:False")
    apply._use_expandable_segments()
    assert calls == ["expandable_segments:True"]


def test_adalora_moves_its_rank_budget_and_its_adapter_reloads_as_trained(tiny_model):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    run = new_run(tiny_config(tiny_model, method={"method": "adalora", "rank": 4},
                              training={"max_steps": 20, "save_steps": 100, "eval_steps": 100}))
    assert train_here(run).state is State.COMPLETED
    saved = {k: v for k, v in load_file(run.adapter_dir / "adapter_model.safetensors").items() if "lora_E" in k}
    kept = [int((v != 0).sum()) for v in saved.values()]
    # It starts at rank 6 everywhere and ends with a budget of 4 per layer on average, spread unevenly.
    assert kept and sum(kept) <= 4 * len(kept), kept
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(run.adapter_dir))
    loaded = {n: p for n, p in reloaded.named_parameters() if "lora_E" in n}
    assert sorted(int((p != 0).sum()) for p in loaded.values()) == sorted(kept)
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
        assert not torch.allclose(reloaded.eval()(ids).logits, base, atol=1e-3)
