"""`tunesmith export RUN --merge|--gguf`: the command-line layer over merge_to_dir and export_gguf."""

from __future__ import annotations

from pathlib import Path

from tunesmith.output import json_stdout, print_json


def run_export_command(args) -> int:
    with json_stdout(args.json):
        out = _export(args)
    if args.json:
        print_json({"format": "merge" if args.merge else "gguf", "path": str(out), "bytes": _bytes(out),
                    "dtype": None if args.merge else args.dtype, "source": str(args.model)})
    elif args.merge:
        print(f"merged model written to {out} ({_bytes(out) / 1e6:.1f} MB)")
        print(f"next: tunesmith chat {out}    or    tunesmith export {out} --gguf --out model.gguf")
    else:
        print(f"GGUF ({args.dtype}) written to {out} ({_bytes(out) / 1e6:.1f} MB)")
        print(f"next: tunesmith generate {out} --prompt 'Hello'    or with llama.cpp: llama-cli -m {out} -cnv")
    return 0


def _export(args) -> Path:
    if args.merge:
        from tunesmith.export.merge import merge_to_dir

        return merge_to_dir(args.model, args.out, overwrite=args.overwrite)
    from tunesmith.export.gguf import export_gguf

    return export_gguf(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite)


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
