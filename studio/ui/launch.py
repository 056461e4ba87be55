"""Start the web UI: local by default; ``--share`` adds a public link that is never open without a login.

A shared studio knows its visitors by their login: accounts from ``--auth user:password`` (repeatable) and
``--auth-file`` (salted hashes, made with ``studio add-user``); ``--admin USER`` names the one account that
may see and stop every run. Failed logins are throttled per client and per account (``login_guard.py``).
"""

from __future__ import annotations

import os
import secrets
import signal
import threading

from studio.errors import StudioError


def parse_auth(auth: str | list[str] | None) -> list[tuple[str, str]]:
    """--auth user:password, given once per account; the same user twice is an error (not a silent replace)."""
    accounts: list[tuple[str, str]] = []
    for item in [auth] if isinstance(auth, str) else auth or []:
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise StudioError("--auth must look like user:password (both parts non-empty).")
        if any(user == known for known, _ in accounts):
            raise StudioError(f"--auth names the user {user!r} twice; give each account once.")
        accounts.append((user, password))
    return accounts


def settings(share: bool, auth: str | list[str] | None, share_local: bool = False, auth_file: str | None = None,
             admin: str | None = None) -> dict:
    """Everything launch() needs besides host and port. share_local: share mode's login and limits,
    without Gradio's public tunnel (for testing, or for a trusted local network)."""
    from studio.accounts import Accounts
    from studio.paths import studio_home
    from studio.service import Policy
    restricted = share or share_local
    pairs = parse_auth(auth)
    generated = None
    if restricted and not pairs and not auth_file:
        generated = ("studio", secrets.token_urlsafe(12))
        pairs = [generated]
    accounts = Accounts.from_options(pairs, auth_file)
    if admin and admin not in accounts.hashes:
        raise StudioError(f"--admin {admin!r} is not one of the accounts (--auth or --auth-file).")
    policy = Policy(share=restricted, max_upload_mb=int(os.environ.get("STUDIO_MAX_UPLOAD_MB", 50)),
                    admins=frozenset([admin] if admin else []))
    exports = studio_home() / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    return {"policy": policy, "accounts": accounts, "generated": generated, "tunnel": share and not share_local,
            "allowed_paths": [str(exports)], "max_file_size": f"{policy.max_upload_mb}mb"}


def build(share: bool = False, auth: str | list[str] | None = None, share_local: bool = False,
          auth_file: str | None = None, admin: str | None = None):
    from studio.service import Studio
    from studio.ui.app import build_app
    opts = settings(share, auth, share_local, auth_file, admin)
    studio = Studio(opts["policy"])
    return build_app(studio), studio, opts


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, auth: str | list[str] | None = None,
           share_local: bool = False, block: bool = True, keep_training: bool = False, auth_file: str | None = None,
           admin: str | None = None):
    import gradio as gr
    from starlette.middleware import Middleware

    from studio.accounts import Throttle
    from studio.ui.app import css
    from studio.ui.login_guard import LoginGuard
    app, studio, opts = build(share, auth, share_local, auth_file, admin)
    # Convert the bundled model now (first launch only, ~30 s) so the page opens with it ready.
    threading.Thread(target=studio.warm_up, name="warm-up", daemon=True).start()
    if opts["generated"]:
        user, password = opts["generated"]
        print(f"Shared studio login -> user: {user}  password: {password}", flush=True)
    accounts = opts["accounts"]
    if block and threading.current_thread() is threading.main_thread():
        # Started in the background of a script, the process inherits Ctrl-C ignored, and Python then never raises
        # KeyboardInterrupt: `kill -INT` would neither close the studio nor stop and save its runs.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, share=opts["tunnel"],
               auth=accounts.verify if accounts else None,
               auth_message="This studio is shared: log in with the user and password you were given.",
               allowed_paths=opts["allowed_paths"], max_file_size=opts["max_file_size"], enable_monitoring=False,
               show_error=False, ssr_mode=False, quiet=False, prevent_thread_lock=not block, css=css(),
               theme=gr.themes.Soft(primary_hue="indigo"), footer_links=[] if opts["policy"].share else None,
               app_kwargs={"middleware": [Middleware(LoginGuard, throttle=Throttle())]})
    if not block:
        return app
    from studio import launcher
    launcher.close_spare()
    stop_runs_started_here(keep_training)
    return 0


def stop_runs_started_here(keep_training: bool) -> None:
    """After Ctrl-C closed the server: the runs it started stop after their current step and save, unless
    --keep-training asked to leave them (they run on in their own processes either way)."""
    from studio import launcher
    running = launcher.started_here()
    if not running:
        return
    names = ", ".join(item.run.id for item in running)
    if keep_training:
        print(f"Leaving {names} training (--keep-training); start the studio again to follow it.", flush=True)
        return
    print(f"Stopping {names} after the current step and saving the adapter (start the studio with "
          "--keep-training to leave runs training when it closes)...", flush=True)
    for item in running:
        launcher.stop(item.run)
    for item in running:
        launcher.wait(item)
        print(f"{item.run.id}: {item.run.status().message}", flush=True)
