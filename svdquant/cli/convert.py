"""``svdquant convert``: Nunchaku checkpoints in (``convert nunchaku FILE -o DIR``) and out (``convert DIR --to
nunchaku -o FILE``), each checked whole before anything is written."""

from __future__ import annotations

from pathlib import Path

from .common import UsageError

CONVERT_FORMS = ("give 'nunchaku FILE.safetensors -o DIR' to import a Nunchaku checkpoint, or "
                 "'DIR --to nunchaku -o FILE.safetensors' to write one")


def validate_convert(args) -> None:
    from ..checkpoint import check_output_folder, read_metadata
    from ..convert.nunchaku import check_exportable, check_output_file, nunchaku_plan

    src = args.source
    if args.to is None:
        if len(src) != 2 or src[0] != "nunchaku":
            raise UsageError(f"convert {' '.join(src)[:100]}: {CONVERT_FORMS}")
        check_output_folder(args.output, args.overwrite, name="-o")  # cheap, and a typo here is the common one
        f = Path(src[1])
        if not f.exists():
            raise UsageError(f"no file at {f}; give the Nunchaku checkpoint (.safetensors)")
        if not f.is_file():
            raise UsageError(f"{f} is not a file; a Nunchaku checkpoint is one .safetensors file (python -m "
                             "nunchaku.merge_safetensors makes one from a folder)")
        args.plan = nunchaku_plan(f)  # the whole file checked (header, shapes, forms) before any conversion
        if args.base is not None:
            base = Path(args.base).expanduser()
            if args.base.startswith(("/", ".", "~")) and not base.exists():
                raise UsageError(f"--base {args.base} does not exist; pass the base pipeline's folder or hub id")
            if base.exists():
                from ..pipelines.load import check_base  # imports diffusers: only when there is a base to check

                check_base(f, args.plan.meta, str(base))
        return
    if args.to != "nunchaku":
        raise UsageError(f"--to {args.to}: svdquant writes 'nunchaku' (Nunchaku's single-file INT4 format)")
    if len(src) != 1:
        raise UsageError(f"convert {' '.join(src)[:100]} --to nunchaku: {CONVERT_FORMS}")
    for flag, given in (("--two-level", args.two_level), ("--base", args.base is not None)):
        if given:
            raise UsageError(f"{flag} applies to imports (svdquant convert nunchaku FILE -o DIR), not to --to nunchaku")
    check_output_file(args.output, args.overwrite, "-o")
    meta = read_metadata(src[0])
    check_exportable(meta["layers"], meta["model_class"], meta["model_config"], src[0])


def cmd_convert(args) -> None:
    if args.to is None:
        from ..checkpoint import save_quantized
        from ..convert import from_nunchaku, to_two_level

        model = from_nunchaku(args.plan.path)
        if args.two_level:
            print(to_two_level(model))
        save_quantized(model, args.output, base=args.base, overwrite=args.overwrite)
        base = "" if args.base else " (no base pipeline recorded: pass --base to generate / compare)"
        print(f"wrote {args.output}{base}")
        return
    from ..convert import to_nunchaku

    to_nunchaku(args.source[0], args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}")
