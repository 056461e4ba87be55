"""Start the web UI: local by default; ``--share`` adds a public link that is never open without a login."""

from __future__ import annotations

import os
import secrets
import threading

from studio.errors import StudioError


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    if not auth:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise StudioError("--auth must look like user:password (both parts non-empty).")
    return user, password


def settings(share: bool, auth: str | None, share_local: bool = False) -> dict:
    """Everything launch() needs besides host and port. share_local: share mode's login and limits,
    without Gradio's public tunnel (for testing, or for a trusted local network)."""
    from studio.paths import studio_home
    from studio.service import Policy
    restricted = share or share_local
    credentials = parse_auth(auth)
    generated = None
    if restricted and credentials is None:
        generated = ("studio", secrets.token_urlsafe(12))
        credentials = generated
    policy = Policy(share=restricted, max_upload_mb=int(os.environ.get("STUDIO_MAX_UPLOAD_MB", 50)))
    exports = studio_home() / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    return {"policy": policy, "auth": credentials, "generated": generated, "tunnel": share and not share_local,
            "allowed_paths": [str(exports)], "max_file_size": f"{policy.max_upload_mb}mb"}


def build(share: bool = False, auth: str | None = None, share_local: bool = False):
    from studio.service import Studio
    from studio.ui.app import build_app
    opts = settings(share, auth, share_local)
    studio = Studio(opts["policy"])
    return build_app(studio), studio, opts


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, auth: str | None = None,
           share_local: bool = False, block: bool = True):
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
    return app if not block else 0
