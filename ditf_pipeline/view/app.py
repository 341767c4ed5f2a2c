"""The web layer of `ditf view`: FastAPI routes over one `Explorer`, and nothing else.

FastAPI validates every query parameter and JSON body against its declared type (a wrong
type is a 422 with the field named), `Explorer` raises `DitfError` for everything else a user
can get wrong (400, or 404 for an unknown key / pair / image); every error body is
``{"error": "<one line>"}``. Files are served only by key: a dataset image through the dataset
reader's own key -> path map (resolved inside the root), an upload by its 16-hex-digit id; no
route takes a path. Messages never carry an absolute path (`redact`); a crash says its type only.

`guard.Guard` wraps the app: the Host allow-list, the per-run token of every POST and the
body limits (`create_app`'s `token` and `hosts`; `app.state.token` holds the token).
"""

from __future__ import annotations

import base64
import binascii
import re
import sys
import traceback
from collections.abc import Iterable
from importlib import resources
from typing import Annotated, Optional

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.errors import DitfError
from .explorer import Explorer, KeyRef, ViewNotFound
from .guard import DEFAULT_BODY_LIMIT, Guard, allowed_hosts, new_token
from .uploads import MAX_UPLOAD_BYTES

#: the body limit of /api/upload: two base64 images and the JSON around them
UPLOAD_BODY_LIMIT = 2 * (MAX_UPLOAD_BYTES * 4 // 3 + 200) + DEFAULT_BODY_LIMIT
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s'\"():,/]+/)+([^\s'\"():,/]*)")


def redact(message: str) -> str:
    """The message with every absolute path cut to its last part ("…/name"): a web page learns no layout."""
    return _ABSOLUTE_PATH.sub(lambda m: "…/" + m.group(1), message)

Dataset = Annotated[str, Query(min_length=1, max_length=200)]
Name = Annotated[str, Query(min_length=1, max_length=200)]
Block = Annotated[int, Query(ge=0, le=10_000)]
Step = Annotated[int, Query(ge=0, le=1000)]
Protocol = Annotated[str, Query(max_length=20)]
Alpha = Annotated[float, Query(gt=0, le=1)]
PairId = Annotated[str, Query(min_length=1, max_length=300)]


class ClickRequest(BaseModel):
    """A click on the source image: a pixel (x, y) or the index of an annotated keypoint."""

    dataset: str = Field(min_length=1, max_length=200)
    model: str = Field(min_length=1, max_length=200)
    k: int = Field(ge=0, le=10_000)
    t: int = Field(ge=0, le=1000)
    pair_id: str = Field(min_length=1, max_length=300)
    variants: list[str] = Field(min_length=1, max_length=16)
    protocol: str = Field(default="dift", max_length=20)
    alpha: float = Field(default=0.1, gt=0, le=1)
    x: Optional[float] = None
    y: Optional[float] = None
    keypoint: Optional[int] = Field(default=None, ge=0)


class UploadRequest(BaseModel):
    """Two images of the user's (base64, a data: URL prefix allowed) and the model to run."""

    model: str = Field(min_length=1, max_length=100)
    k: Optional[int] = Field(default=None, ge=0, le=10_000)
    t: Optional[int] = Field(default=None, ge=0, le=1000)
    source: str = Field(min_length=1, max_length=MAX_UPLOAD_BYTES * 4 // 3 + 200)
    target: str = Field(min_length=1, max_length=MAX_UPLOAD_BYTES * 4 // 3 + 200)


def _decode(data: str, what: str) -> bytes:
    payload = data.split(",", 1)[1] if data.startswith("data:") and "," in data else data
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise DitfError(f"the {what} image is not valid base64") from None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": redact(message)}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'decode error')})")
            continue
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{where or 'body'}: {error.get('msg', 'invalid')}")
    return "bad request: " + "; ".join(parts)


def create_app(explorer: Explorer, token: str | None = None, hosts: Iterable[str] | None = None) -> FastAPI:
    """The ASGI app of one explorer (what uvicorn serves and what tests drive).

    `token`: the per-run token every POST must carry (a fresh one when None: `app.state.token`);
    `hosts`: the Host names served (default: the loopback names, `guard.allowed_hosts`).
    """

    def fresh() -> None:  # every request sees the store as it is now
        explorer.refresh()

    app = FastAPI(title="ditf view", docs_url=None, redoc_url=None, openapi_url=None, dependencies=[Depends(fresh)])
    app.state.token = token or new_token()
    app.state.explorer = explorer
    app.add_middleware(Guard, token=app.state.token, hosts=allowed_hosts("127.0.0.1") if hosts is None else hosts,
                       body_limits={"/api/upload": UPLOAD_BODY_LIMIT})
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    @app.exception_handler(ViewNotFound)
    async def not_found(request: Request, exc: ViewNotFound) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(DitfError)
    async def user_error(request: Request, exc: DitfError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:  # a bug: say so, keep serving
        traceback.print_exception(exc, file=sys.stderr)  # the details for the user at the terminal, not the page
        return _error(500, f"internal error ({type(exc).__name__}): see the terminal running `ditf view`")

    def feature_key(dataset: str, model: str, k: int, t: int) -> KeyRef:
        return explorer.key(dataset, model, k, t)

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/api/keys")
    def keys() -> dict:
        default, note = explorer.default_key()
        return {"keys": explorer.describe_keys(), "default": default, "note": note,
                "data_root": explorer.data_root is not None, "uploads": explorer.uploads is not None}

    @app.get("/api/models")
    def models() -> dict:
        """Models an upload can run (the only ones it runs): the built-in tiny ones and those of the store's keys.

        A separate route because listing models imports every adapter (diffusers: seconds).
        """
        return {"models": explorer.offered_models()}

    @app.get("/api/pairs")
    def pairs(dataset: Dataset, model: Name, k: Block, t: Step, variant: Name = "adaln+cd", protocol: Protocol = "dift",
              alpha: Alpha = 0.1, category: Annotated[Optional[str], Query(max_length=200)] = None,
              order: Annotated[str, Query(max_length=10)] = "id") -> dict:
        return explorer.pairs(feature_key(dataset, model, k, t), variant, protocol, alpha, category or None, order)

    @app.get("/api/pair")
    def pair(dataset: Dataset, model: Name, k: Block, t: Step, pair_id: PairId,
             variants: Annotated[str, Query(min_length=1, max_length=2000)] = "raw,adaln,adaln+cd",
             protocol: Protocol = "dift", alpha: Alpha = 0.1) -> dict:
        chosen = [v for v in variants.split(",") if v]
        return explorer.open_pair(feature_key(dataset, model, k, t), pair_id, chosen, protocol, alpha)

    @app.post("/api/click")
    def click(request: ClickRequest) -> dict:
        return explorer.click(feature_key(request.dataset, request.model, request.k, request.t), request.pair_id,
                              request.variants, request.protocol, request.x, request.y, request.keypoint, request.alpha)

    @app.get("/api/image")
    def image(dataset: Dataset, key: Annotated[str, Query(min_length=1, max_length=500)]) -> FileResponse:
        return FileResponse(explorer.image_path(dataset, key))

    @app.get("/api/magnitude.png")
    def magnitude(dataset: Dataset, model: Name, k: Block, t: Step) -> Response:
        return Response(explorer.magnitude_png(feature_key(dataset, model, k, t)), media_type="image/png")

    @app.get("/api/pca.png")
    def pca(dataset: Dataset, model: Name, k: Block, t: Step, pair_id: PairId) -> Response:
        return Response(explorer.pca_png(feature_key(dataset, model, k, t), pair_id), media_type="image/png")

    @app.post("/api/upload")
    def upload(request: UploadRequest) -> dict:
        source, target = _decode(request.source, "source"), _decode(request.target, "target")
        return explorer.upload(request.model, request.k, request.t, source, target)

    return app


def serve(explorer: Explorer, sock, token: str, hosts: Iterable[str], threads: int = 1) -> None:
    """Serve the app on an already bound socket (`server.bind`) until interrupted.

    torch runs on `threads` intra-op threads: a click is a few small products, and on a busy
    2-core machine two spinning threads made a 7-keypoint match 40x slower (measured: 340 ms
    vs 8 ms with one thread, load average 10).
    """
    import torch
    import uvicorn

    from .server import server_config

    torch.set_num_threads(max(1, int(threads)))
    uvicorn.Server(server_config(create_app(explorer, token, hosts))).run(sockets=[sock])
