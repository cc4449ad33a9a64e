"""``svdquant serve``: its checks (the model, the limits, the address bound once before minutes of loading) and
the command, which runs :mod:`svdquant.serve` (or its Ray Serve replicas)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .. import _checks
from .common import UsageError, check_optimize_flags, compile_arg, parse_loras, resolve_device, resolve_dtype


def validate_serve(args) -> None:
    import socket

    from ..checkpoint import META_FILE, base_of, read_metadata
    from ..pipelines import TINY_BASE, pipeline_class_of
    from ..pipelines.load import check_base

    try:  # dependencies of the package, but a hand-made environment may lack them: say which, not a traceback
        import fastapi, prometheus_client, uvicorn  # noqa: F401,E401
    except ImportError as e:
        raise UsageError(f"serving needs {e.name}: pip install fastapi uvicorn prometheus-client") from None
    args.device = resolve_device(args.device)
    check_optimize_flags(args)
    for flag, set_ in ((f"--attention {args.attention}", args.attention != "auto"),
                       ("--compile model", args.compile == "model")):
        if args.model == "tiny" and set_:
            raise UsageError(f"{flag} applies to checkpoints and 16-bit pipelines; the tiny model is served as it "
                             "is: leave it out")
    if args.model != TINY_BASE:
        model = Path(args.model).expanduser()
        if (model / META_FILE).is_file():
            meta = read_metadata(model)
            base = base_of(model, meta, None, allow_outside=args.allow_base_outside)
            # a missing base, or one outside the checkpoint's folder and here, fails now, not after loading
            check_base(model, meta, base)
        elif not ((model / "model_index.json").is_file() or (model / "pipeline.json").is_file()):
            what = "does not exist" if not model.exists() else "is neither an svdquant checkpoint nor a pipeline folder"
            raise UsageError(f"MODEL {args.model} {what}; pass 'tiny', a checkpoint folder (with {META_FILE}) or a "
                             "16-bit diffusers pipeline folder (with model_index.json)")
        else:
            base = model
        _refuse_non_image(pipeline_class_of(base))
        args.model = str(model)
    args.loras = parse_loras(args.lora)
    _checks.count("--port", args.port, lo=1, hi=65535)
    _checks.count("--max-queue", args.max_queue, hi=100_000)
    _checks.count("--max-batch", args.max_batch, hi=_checks.MAX_IMAGES)
    _checks.count("--batch-wait-ms", args.batch_wait_ms, lo=0, hi=60_000)
    _checks.count("--max-body-bytes", args.max_body_bytes, lo=1024, hi=64 << 20)
    _checks.count("--max-connections", args.max_connections, hi=100_000)
    for name, value, hi in (("--read-timeout", args.read_timeout, 600), ("--drain-timeout", args.drain_timeout, 3600)):
        _checks.real(name, value, lo=0)
        if (name == "--read-timeout" and value < 0.1) or value > hi:
            raise UsageError(f"{name} {value:g}: must be between {0.1 if name == '--read-timeout' else 0:g} and "
                             f"{hi} seconds")
    if args.api_key is None:
        args.api_key = os.environ.get("SVDQUANT_API_KEY") or None
    if args.api_key is not None and (len(args.api_key) < 8 or any(c.isspace() for c in args.api_key)):
        raise UsageError("--api-key (or SVDQUANT_API_KEY): use at least 8 characters and no spaces, e.g. the output "
                         "of: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    for origin in args.cors_origin or ():
        if not re.fullmatch(r"https?://[^/\s?#]+", origin):
            raise UsageError(f"--cors-origin {origin}: give a web origin, scheme://host[:port] with nothing after it, "
                             "e.g. https://app.example.com")
    for name in args.allowed_host or ():
        if name != "*" and not re.fullmatch(r"[A-Za-z0-9.\-:\[\]]{1,253}", name):
            raise UsageError(f"--allowed-host {name}: give a host name or address (no scheme, port or path), or '*' "
                             "for any")
    if args.replicas is not None:
        _checks.count("--replicas", args.replicas, hi=1024)
        try:
            import ray.serve  # noqa: F401 - large and optional: only --replicas needs it
        except ImportError:
            raise UsageError("--replicas runs on Ray Serve, which is not installed: pip install 'ray[serve]' (or svdquant[replicas])") from None
        if args.device.startswith("cuda") and args.replicas > torch.cuda.device_count():
            raise UsageError(f"--replicas {args.replicas}: one replica per GPU, and torch sees "
                             f"{torch.cuda.device_count()}")
    # bind once now: a taken port or an unknown host fails here, before minutes of model loading
    try:
        infos = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            sock.bind(infos[0][4])
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another "
                         "--host or --port") from None


def _refuse_non_image(cls: str | None) -> None:
    """The server draws images from a prompt alone (its API has no input image, its answers no video): a video or
    edit pipeline is refused before minutes of loading, with the command that runs it."""
    from ..models.pipeline_needs import makes_video, needs_images

    if cls is None or not (makes_video(cls) or needs_images(cls)):
        return
    what = {(True, False): "makes videos", (False, True): "edits an input image",
            (True, True): "makes videos from an input image"}[makes_video(cls), needs_images(cls)]
    how = "svdquant generate CHECKPOINT PROMPT" + (" --image FILE" if needs_images(cls) else "") + \
        (" -o video.webp" if makes_video(cls) else "")
    raise UsageError(f"serve draws images from a prompt alone, and {cls} {what}; run it with: {how}")


def cmd_serve(args) -> None:
    if args.replicas is not None:
        from ..serve.replicas import run_replicas

        run_replicas(args.model, host=args.host, port=args.port, replicas=args.replicas, device=args.device,
                     dtype=resolve_dtype(args.dtype, args.device), loras=args.loras, max_queue=args.max_queue,
                     max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                     # what the app itself enforces; Ray's proxy, not uvicorn, holds the connections
                     app_options=dict(api_key=args.api_key, cors_origins=tuple(args.cors_origin or ()),
                                      max_body_bytes=args.max_body_bytes, read_timeout=args.read_timeout,
                                      allowed_hosts=None if "*" in (args.allowed_host or ()) else
                                      ("localhost", "127.0.0.1", "::1", args.host, *(args.allowed_host or ()))),
                     engine_options=dict(optimize=args.optimize, attention=args.attention,
                                         compile=compile_arg(args)))
        return
    from ..serve import run_server

    run_server(args.model, host=args.host, port=args.port, device=args.device,
               dtype=resolve_dtype(args.dtype, args.device), loras=args.loras, max_queue=args.max_queue,
               max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
               api_key=args.api_key, allowed_hosts=args.allowed_host or (), cors_origins=args.cors_origin or (),
               max_body_bytes=args.max_body_bytes, read_timeout=args.read_timeout, drain_timeout=args.drain_timeout,
               max_connections=args.max_connections, allow_base_outside=args.allow_base_outside,
               optimize=args.optimize, attention=args.attention, compile=compile_arg(args))
