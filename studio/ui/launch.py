"""Start the web UI: local by default; ``--share`` adds a public link that is never open without a login."""

from __future__ import annotations

import os
import secrets
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


def settings(share: bool, auth: str | list[str] | None, share_local: bool = False) -> dict:
    """Everything launch() needs besides host and port. share_local: share mode's login and limits,
    without Gradio's public tunnel (for testing, or for a trusted local network)."""
    from studio.paths import studio_home
    from studio.service import Policy
    restricted = share or share_local
    credentials = parse_auth(auth)
    generated = None
    if restricted and not credentials:
        generated = ("studio", secrets.token_urlsafe(12))
        credentials = [generated]
    policy = Policy(share=restricted, max_upload_mb=int(os.environ.get("STUDIO_MAX_UPLOAD_MB", 50)))
    exports = studio_home() / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    return {"policy": policy, "auth": credentials or None, "generated": generated, "tunnel": share and not share_local,
            "allowed_paths": [str(exports)], "max_file_size": f"{policy.max_upload_mb}mb"}


def build(share: bool = False, auth: str | list[str] | None = None, share_local: bool = False):
    from studio.service import Studio
    from studio.ui.app import build_app
    opts = settings(share, auth, share_local)
    studio = Studio(opts["policy"])
    return build_app(studio), studio, opts


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, auth: str | list[str] | None = None,
           share_local: bool = False, block: bool = True, keep_training: bool = False):
    import gradio as gr

    from studio.ui.app import css
    app, studio, opts = build(share, auth, share_local)
    # Convert the bundled model now (first launch only, ~30 s) so the page opens with it ready.
    threading.Thread(target=studio.warm_up, name="warm-up", daemon=True).start()
    if opts["generated"]:
        user, password = opts["generated"]
        print(f"Shared studio login -> user: {user}  password: {password}", flush=True)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, share=opts["tunnel"], auth=opts["auth"],
               auth_message="This studio is shared: log in with the user and password you were given.",
               allowed_paths=opts["allowed_paths"], max_file_size=opts["max_file_size"], enable_monitoring=False,
               show_error=False, ssr_mode=False, quiet=False, prevent_thread_lock=not block, css=css(),
               theme=gr.themes.Soft(primary_hue="indigo"), footer_links=[] if opts["policy"].share else None)
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
