"""The browser page of the token-reward API: GET / (and /ui) serves serve/static/index.html.

The page needs no auth; the calls it makes (POST v1/token-rewards, GET v1/model) send the API key the
user types, which the page keeps in memory only. Its script and stylesheet are same-origin files next to
it (no CDN), so a strict Content-Security-Policy holds: nothing inline runs, and the page can talk to
this origin only. The routes stay out of /openapi.json (they are not part of the API).
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent / "static"

# URL path -> (file in serve/static, media type). Relative references in the page ("ui.js",
# "v1/token-rewards") resolve the same from "/" and "/ui" and under any route prefix.
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui": ("index.html", "text/html; charset=utf-8"),
    "/ui.js": ("ui.js", "text/javascript; charset=utf-8"),
    "/ui.css": ("ui.css", "text/css; charset=utf-8"),
}

HEADERS = {
    # Styles set from the script go through the CSSOM, which style-src does not restrict.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_ui_routes(app: FastAPI) -> None:
    """Serve the page and its two assets; no auth, not in the OpenAPI schema."""
    missing = [name for name, _ in FILES.values() if not (STATIC / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{STATIC}: missing {', '.join(sorted(set(missing)))} "
                                "(is serve/static shipped with the package?)")
    for path, (name, media_type) in FILES.items():
        app.add_api_route(path, _file_route(STATIC / name, media_type), methods=["GET"], include_in_schema=False)


def _file_route(file: Path, media_type: str):
    async def page() -> FileResponse:
        return FileResponse(file, media_type=media_type, headers=HEADERS)

    page.__name__ = f"ui_{file.stem}_{file.suffix.lstrip('.')}"
    return page
