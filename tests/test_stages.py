"""The stage interface, and the fast path as one wing: `training.speed: plain` is stock TRL + PEFT, and it
trains to the same loss as the studio's planned path."""

from dataclasses import dataclass

import pytest

from studio import stages
from studio.config import from_dict, setting, to_dict
from studio.errors import StudioError
from studio.records import State
from studio.runs import new_run
from tests.conftest import sft_trainer, tiny_config, train_here


@dataclass
class EchoSettings:
    words: str = setting("hello", "What the echo stage writes into its run folder.")
    times: int = setting(1, "How many times it writes them.", minimum=1, maximum=10)


def _echo(job):
    settings = job.config.settings_of("echo")
    (job.run.path / "echo.txt").write_text(" ".join([settings.words] * settings.times))
    return stages.Outcome(f"Echoed {settings.times} times.")


ECHO = stages.Stage(name="echo", label="Echo", help="A stage made for this test: it writes words to a file.",
                    data_kind="none", run=_echo, settings=EchoSettings, trains=False, produces=("echo.txt",))


@pytest.fixture()
def echo_stage():
    stages.register(ECHO)
    yield ECHO
    stages.registry().pop("echo")


def test_a_new_stage_is_one_module_its_settings_a_section_of_the_config(echo_stage, tiny_model):
    """Registering a stage is all it takes for configs, the form's field help, run records and the worker's
    code path to know it."""
    from studio.config import field_info
    cfg = from_dict({"stage": "echo", "echo": {"words": "ahoy", "times": 3}, "model": {"name_or_path": str(tiny_model)}})
    assert cfg.settings_of("echo").words == "ahoy" and to_dict(cfg)["echo"] == {"words": "ahoy", "times": 3}
    assert field_info("echo", "times")["max"] == 10 and "writes" in field_info("echo", "words")["help"]
    with pytest.raises(StudioError, match="echo.times"):
        from_dict({"stage": "echo", "echo": {"times": 11}})
    with pytest.raises(StudioError, match="unknown setting 'echo.loud'"):
        from_dict({"stage": "echo", "echo": {"loud": True}})
    with pytest.raises(StudioError, match="stage = 'telepathy' is not one of: sft"):
        from_dict({"stage": "telepathy"})
    run = new_run(cfg)
    status = train_here(run)
    assert status.state is State.COMPLETED and status.message == "Echoed 3 times." and status.stage == "echo"
    assert (run.path / "echo.txt").read_text() == "ahoy ahoy ahoy"
    assert run.config().settings_of("echo").times == 3  # the section round-trips through config.yaml


def test_sft_is_found_in_the_stages_package():
    sft = stages.get("sft")
    assert sft.data_kind == "conversations" and sft.demo_preset == "demo"
    assert [m.key for m in sft.live_metrics] == ["loss", "eval_loss"]


def test_plain_speed_is_stock_trl_and_peft(tiny_model):
    """None of the studio's patches on the plain path: TRL's own trainer, PEFT's own layers, no collector
    freeze."""
    from trl import SFTTrainer
    trainer, prep = sft_trainer(tiny_config(tiny_model, training={"speed": "plain", "fused_kernels": "on"}))
    assert type(trainer) is SFTTrainer and prep.plan.plain
    names = {type(c).__name__ for c in trainer.callback_handler.callbacks}
    assert "FreezeSetupObjects" not in names
    lora_layers = [m for m in prep.model.modules() if hasattr(m, "lora_A")]
    assert lora_layers and not any("forward" in vars(m) for m in lora_layers)  # PEFT's own forward
    assert prep.plan.summary().startswith("stock TRL and PEFT")


def test_plain_and_planned_paths_train_to_the_same_loss(tiny_model):
    """The planned path (here with the fused LoRA path forced on, so the patches really run on the CPU) and the
    plain one compute the same losses step by step (the same rows in each step: packing off for both). Run
    twice in one process, this also shows that a run's seed fixes its result, whatever ran before it."""
    import torch

    def losses(speed: str) -> list[float]:
        run = new_run(tiny_config(tiny_model, name=f"path-{speed}",
                                  training={"speed": speed, "fused_kernels": "on", "max_steps": 6, "eval_steps": 100,
                                            "save_steps": 100, "packing": "off"}))
        status = train_here(run)
        assert status.state is State.COMPLETED, status
        return [m.loss for m in run.metrics() if m.is_training]
    planned, plain = losses("auto"), losses("plain")
    assert len(planned) == len(plain) == 6
    # float32 on the CPU; on a GPU both run in bf16, where Liger's and the fused kernels round differently
    assert planned == pytest.approx(plain, rel=2e-2 if torch.cuda.is_available() else 1e-4)
