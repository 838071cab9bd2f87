"""`tunesmith export RUN --merge|--gguf`: the command-line layer over merge_to_dir and export_gguf."""

from __future__ import annotations

from pathlib import Path


def run_export_command(args) -> int:
    if args.merge:
        from tunesmith.export.merge import merge_to_dir

        out = merge_to_dir(args.model, args.out, overwrite=args.overwrite)
        print(f"merged model written to {out} ({_size(out)})")
        print(f"next: tunesmith chat {out}    or    tunesmith export {out} --gguf --out model.gguf")
        return 0
    from tunesmith.export.gguf import export_gguf

    out = export_gguf(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"GGUF ({args.dtype}) written to {out} ({_size(out)})")
    print(f"next: tunesmith generate {out} --prompt 'Hello'    or with llama.cpp: llama-cli -m {out} -cnv")
    return 0


def _size(path: Path) -> str:
    total = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return f"{total / 1e6:.1f} MB"
