"""The ``studio`` command: the web UI by default, and the same engine headless.

  studio [--host H] [--port P] [--share] [--auth user:pass] [--keep-training]    open the web UI
  studio train CONFIG.yaml [--set section.field=value ...]      train; the last line is the run folder
  studio resume RUN                                             continue an interrupted run
  studio chat RUN [--prompt TEXT] [--source adapter|merged|base]
  studio merge RUN                                              write RUN/merged
  studio export RUN --format adapter|merged|gguf-f16|gguf-q8_0|gguf-q4_k_m [--out DIR]   a checked export
  studio runs [--json]                                          list runs
  studio demo-eval RUN                                          base vs tuned on the demo's held-out prompts
  studio add-user FILE USER                                     a login for --auth-file (salted hash)

Errors print one paragraph and exit 1; add --debug for the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from studio.errors import StudioError
from studio.quiet import quiet_libraries


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="studio", description="Fine-tune language models in your browser or from the shell.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--host", default="127.0.0.1", help="address for the web UI (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(os.environ.get("STUDIO_PORT", 7860)), help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="make a public Gradio link (always behind a login)")
    p.add_argument("--auth", action="append", default=None, metavar="USER:PASSWORD",
                   help="a login for the UI; repeat for several accounts (share mode makes one if omitted)")
    p.add_argument("--share-local", action="store_true",
                   help="share mode (login, limits) without the public link, e.g. on a trusted network")
    p.add_argument("--auth-file", default=None, metavar="FILE",
                   help="logins as salted password hashes, one user a line (make them with: studio add-user FILE USER)")
    p.add_argument("--admin", default=None, metavar="USER",
                   help="on a shared studio, the one account that may see and stop every visitor's runs")
    p.add_argument("--keep-training", action="store_true",
                   help="when the web UI is closed with Ctrl-C, leave its runs training (default: stop them after "
                        "their current step, saving the adapter)")
    sub = p.add_subparsers(dest="command")

    t = sub.add_parser("train", help="train from a YAML preset")
    t.add_argument("config", help="a run preset, e.g. presets/demo.yaml")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set training.epochs=1 (repeatable)")
    t.add_argument("--quiet", action="store_true", help="print only the run folder")
    t.add_argument("--gpus", help="GPUs to train on: 'all', a count such as 2, or numbers such as 0,1 "
                                  "(devices.gpus; on a machine without GPUs, a count of CPU processes)")
    t.add_argument("--nodes", type=int, help="machines training this run together (devices.nodes); run the same "
                                             "command on each, with its own --node-rank")
    t.add_argument("--node-rank", type=int, help="this machine's number among them, from 0 (devices.node_rank)")
    t.add_argument("--master", metavar="HOST:PORT", help="machine 0's address and a free port, the same on every "
                                                         "machine (devices.master)")

    e = sub.add_parser("eval", help="a run against its base (or another run): measures, loss, a forgetting check")
    e.add_argument("run", help="the finished run to evaluate")
    e.add_argument("--data", default="", help="a file of conversations (default: the run's held-out rows)")
    e.add_argument("--against", default="", help="another finished run to compare with (default: the base)")
    e.add_argument("--metrics", default="auto", help="comma-separated measures, or auto (default)")
    e.add_argument("--regex", default="", help="a pattern good answers match (the regex measure)")
    e.add_argument("--max-rows", type=int, default=100)
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--no-forgetting", action="store_true", help="skip the general-questions check")
    e.add_argument("--judge", default="", help="a model or run that grades the answers against --rubric")
    e.add_argument("--rubric", default="")
    e.add_argument("--benchmark", default="", help="an lm-eval task (needs lm-eval and its data offline)")

    tb = sub.add_parser("tensorboard", help="open a run's TensorBoard logs")
    tb.add_argument("run")
    tb.add_argument("--port", type=int, default=6006)

    r = sub.add_parser("resume", help="resume an interrupted or stopped run from its last checkpoint")
    r.add_argument("run")

    c = sub.add_parser("chat", help="chat with a run's result")
    c.add_argument("run", help="run id or folder")
    c.add_argument("--prompt", help="answer this one prompt and exit (interactive without it)")
    c.add_argument("--source", choices=("adapter", "merged", "base"), default="adapter")
    c.add_argument("--max-new-tokens", type=int, default=200)
    c.add_argument("--temperature", type=float, default=0.0)

    m = sub.add_parser("merge", help="merge a run's adapter into its base model")
    m.add_argument("run")

    x = sub.add_parser("export", help="write a run as an adapter, a merged model or a checked GGUF (with an Ollama "
                                      "Modelfile), each with a model card")
    x.add_argument("run", help="run id or folder")
    x.add_argument("--format", default="adapter", help="adapter, merged, gguf-f16, gguf-bf16, gguf-q8_0 or gguf-q4_k_m")
    x.add_argument("--out", default=".", help="the folder to write RUN-FORMAT/ into (default: here)")

    ls = sub.add_parser("runs", help="list runs")
    ls.add_argument("--json", action="store_true")

    d = sub.add_parser("demo-eval", help="how often base and tuned answer the demo's taught way")
    d.add_argument("run")

    u = sub.add_parser("add-user", help="add or replace a login in an auth file (asks for the password)")
    u.add_argument("file")
    u.add_argument("user")
    u.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_libraries()
    if args.debug:
        # The page's handlers log a person's mistakes (with their tracebacks) at debug level, kept out otherwise.
        import logging
        logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s")
        logging.getLogger("studio").setLevel(logging.DEBUG)
    try:
        return _dispatch(args)
    except StudioError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug: say so briefly unless debugging
        if args.debug:
            raise
        print(f"Error: unexpected {type(err).__name__}: {err}. Run again with --debug for details, and please "
              "report it.", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    if args.command is None:
        from studio.ui.launch import launch
        return launch(host=args.host, port=args.port, share=args.share, auth=args.auth, share_local=args.share_local,
                      keep_training=args.keep_training, auth_file=args.auth_file, admin=args.admin)
    if args.command == "train":
        from studio import launcher
        from studio.presets import load_run_config
        overrides = [*args.overrides, *(f"devices.{name}={value}" for name, value in (
            ("gpus", args.gpus), ("nodes", args.nodes), ("node_rank", args.node_rank), ("master", args.master))
            if value is not None)]
        return _follow(launcher.start(load_run_config(args.config, overrides)), quiet=args.quiet)
    if args.command == "eval":
        return _evaluate(args)
    if args.command == "tensorboard":
        return _tensorboard(args)
    if args.command == "resume":
        from studio import launcher
        return _follow(launcher.resume(args.run), quiet=False)
    if args.command == "chat":
        return _chat(args)
    if args.command == "merge":
        from studio.inference import merge_run
        run = merge_run(args.run)
        print(run.merged_dir)
        return 0
    if args.command == "export":
        return _export(args)
    if args.command == "runs":
        return _runs(args.json)
    if args.command == "demo-eval":
        return _demo_eval(args.run)
    if args.command == "add-user":
        return _add_user(args)
    raise AssertionError(args.command)


def _export(args) -> int:
    """Write the export into --out/RUN-FORMAT/; the last line is that folder. Exit 1 when its check failed."""
    from pathlib import Path

    from studio.export import write_export
    from studio.runs import open_run
    run = open_run(args.run)
    folder = Path(args.out).expanduser().resolve() / f"{run.id}-{args.format}"
    if folder.exists():
        raise StudioError(f"{folder} exists already; remove it or pick another --out.")
    report = write_export(run, args.format, folder, say=lambda line: print(line, file=sys.stderr))
    print(report.summary(), file=sys.stderr)
    commands = report.facts.get("ollama", {}).get("commands")
    if commands:
        print(f"Ollama: cd {folder} && " + " && ".join(commands), file=sys.stderr)
    print(folder)
    return 1 if report.verified is False else 0


def _follow(launched, quiet: bool) -> int:
    """Show a worker's run in the terminal until it ends; Ctrl-C asks it to stop and save (twice: at once)."""
    from studio import launcher
    run = launched.run
    shown = _Shown()
    try:
        while launched.alive():
            time.sleep(1.0)
            _print_progress(run, shown, quiet)
    except KeyboardInterrupt:
        print(launcher.stop(run) + " (Ctrl-C again to stop at once, without saving)", file=sys.stderr)
        try:
            while launched.alive():
                time.sleep(0.5)
                _print_progress(run, shown, quiet)
        except KeyboardInterrupt:
            launched.process.send_signal(signal.SIGKILL)
    launcher.wait(launched)
    _print_progress(run, shown, quiet)
    status = run.status()
    print(f"{status.state.value}: {status.message}", file=sys.stderr)
    print(run.path)
    return 0 if status.state.value == "completed" else 1


class _Shown:
    """What the terminal has shown of a run so far."""

    def __init__(self):
        self.records = 0
        self.plan = False
        self.message = ""
        self.data = False


def _print_progress(run, shown: _Shown, quiet: bool) -> None:
    from studio.records import format_loss as fmt
    records = run.metrics()
    if quiet:
        return
    status = run.stored_status()
    if status.stage == "evaluate" and status.message != shown.message:
        print(status.message, file=sys.stderr)
        shown.message = status.message
    if not shown.data:  # what was read from the data: format, rows used and skipped (why), cut, unused columns
        from studio.data_summary import lines
        found = run.read_json("data.json")
        if found:
            print("\n".join(lines(found)), file=sys.stderr)
            shown.data = True
    if status.plan_summary and not shown.plan:
        print(f"Training with {status.plan_summary}.", file=sys.stderr)
        shown.plan = True
    for r in records[shown.records:]:
        if r.is_training:
            print(f"step {r.step}/{status.total_steps or '?'}  loss {fmt(r.loss)}  lr {r.learning_rate or 0:.2e}  "
                  f"{r.tokens_per_s or 0:.0f} tok/s  {r.elapsed_s:.0f}s", file=sys.stderr)
        elif r.is_evaluation:
            print(f"step {r.step}  eval loss {fmt(r.eval_loss)}", file=sys.stderr)
    shown.records = len(records)


def _evaluate(args) -> int:
    from studio import launcher
    from studio.stages.evaluate import config_for
    cfg = config_for(args.run, data=args.data, against=args.against, metrics=args.metrics, regex=args.regex,
                     max_rows=args.max_rows, max_new_tokens=args.max_new_tokens, forgetting=not args.no_forgetting,
                     judge=args.judge, rubric=args.rubric, benchmark=args.benchmark)
    launched = launcher.start(cfg)
    code = _follow(launched, quiet=False)
    page = launched.run.path / "report.html"
    if page.is_file():
        print(f"The report: {page}", file=sys.stderr)
    return code


def _tensorboard(args) -> int:
    import shutil
    import subprocess

    from studio.runs import open_run
    run = open_run(args.run)
    logs = run.path / "tensorboard"
    if not logs.is_dir():
        print(f"Run {run.id} has no TensorBoard logs (runs write them when the tensorboard package is installed).",
              file=sys.stderr)
        return 1
    command = shutil.which("tensorboard")
    if command is None:
        print(f"TensorBoard is not installed: pip install tensorboard, then tensorboard --logdir {logs}",
              file=sys.stderr)
        return 1
    print(f"TensorBoard for {run.id} at http://127.0.0.1:{args.port} (Ctrl-C ends it)", file=sys.stderr)
    return subprocess.call([command, "--logdir", str(logs), "--port", str(args.port), "--host", "127.0.0.1"])


def _chat(args) -> int:
    from studio.inference import load_chat_model, stream_reply
    chat = load_chat_model(args.source, args.run)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    if args.prompt is not None:
        text = ""
        for text in stream_reply(chat, [{"role": "user", "content": args.prompt}], **settings):
            pass
        print(text.strip())
        return 0
    print(f"Chatting with {chat.label}. Empty line or Ctrl-D to quit.", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if not line:
            return 0
        history.append({"role": "user", "content": line})
        shown = ""
        for text in stream_reply(chat, history, **settings):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
        print()
        history.append({"role": "assistant", "content": shown.strip()})


def _runs(as_json: bool) -> int:
    from studio.launcher import reconcile_all
    from studio.records import format_loss as fmt
    from studio.runs import list_runs
    reconcile_all()
    rows = [r.summary() for r in list_runs()]
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("No runs yet. Start one with: studio train presets/demo.yaml")
        return 0
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"] or 0))
        loss = f"{fmt(r['first_loss'])} -> {fmt(r['last_loss'])}" if r["last_loss"] is not None else "-"
        if r["state"] == "unreadable":
            print(f"{r['id']:32} {r['message']}")
            continue
        print(f"{r['id']:32} {r['state']:12} {when}  step {r['step']}/{r['total_steps'] or '?'}  loss {loss}")
    return 0


def _add_user(args) -> int:
    import getpass

    from studio.accounts import add_user
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"Password for {args.user}: ")
        if getpass.getpass("Again: ") != password:
            raise StudioError("The two passwords differ; nothing was changed.")
    add_user(args.file, args.user, password)
    print(f"{args.user} can now log in to a studio started with --auth-file {args.file}")
    return 0


def _demo_eval(run_ref: str) -> int:
    from studio.demo import evaluate
    result = evaluate(run_ref)
    for row in result["rows"]:
        print(f"Q: {row['prompt']}\n  base : {row['base'][:100]!r}\n  tuned: {row['tuned'][:100]!r}")
    n = result["prompts"]
    if result["stage"] == "grpo":
        print(f"Mean reward on {n} held-out prompts: base {result['base_total'] / n:.3f}, "
              f"tuned {result['tuned_total'] / n:.3f}")
    else:
        print(f"{result['measure'].capitalize()} on {n} held-out prompts: base {int(result['base_total'])}/{n}, "
              f"tuned {int(result['tuned_total'])}/{n}")
    return 0
