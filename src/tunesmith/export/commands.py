"""`tunesmith export RUN --merge|--gguf` and `tunesmith verify`: the command-line layer over merge_to_dir,
export_gguf and verify. Export verifies what it wrote (one line; --no-verify skips it) and fails when the
export would not behave as the run did. A GGUF export also writes an Ollama Modelfile beside the file
(``model.gguf`` -> ``model.Modelfile``, export/ollama.py)."""

from __future__ import annotations

from pathlib import Path

from tunesmith.export.gguf import export_gguf
from tunesmith.export.merge import merge_to_dir
from tunesmith.export.ollama import modelfile_path
from tunesmith.export.verify import print_report, summary_line, verify
from tunesmith.output import finish_report, json_stdout, print_json


def run_export_command(args) -> int:
    with json_stdout(args.json):
        out = _export(args)
        report = None if args.no_verify else _verify_export(args, out)
    modelfile = _modelfile(args, out)
    if args.json:
        print_json({"format": "merge" if args.merge else "gguf", "path": str(out), "bytes": _bytes(out),
                    "dtype": None if args.merge else args.dtype, "source": str(args.model),
                    "modelfile": str(modelfile) if modelfile else None,
                    "verify": report.to_dict() if report else None})
    else:
        if args.merge:
            print(f"merged model written to {out} ({_bytes(out) / 1e6:.1f} MB)")
        else:
            print(f"GGUF ({args.dtype}) written to {out} ({_bytes(out) / 1e6:.1f} MB)")
            if modelfile:
                print(f"Ollama Modelfile written to {modelfile} (ollama create NAME -f {modelfile})")
        if report:
            print(f"{summary_line(report)} (ran automatically; details: tunesmith verify {args.model} "
                  f"{'--merged' if args.merge else '--gguf'} {out})")
        if args.merge:
            print(f"next: tunesmith chat {out}    or    tunesmith export {out} --gguf --out model.gguf")
        else:
            print(f"next: tunesmith generate {out} --prompt 'Hello'    "
                  f"or with llama.cpp: llama-cli -m {out} -cnv --jinja")
    return 1 if report and not report.ok else 0


def run_verify_command(args) -> int:
    with json_stdout(args.json):
        report = verify(args.model, gguf=args.gguf, merged=args.merged, data=args.data, prompts=args.prompts,
                        max_new_tokens=args.max_new_tokens)
    return finish_report(report, args.json, print_report)


def _verify_export(args, out: Path):
    if args.merge:
        return verify(args.model, merged=out)
    return verify(args.model, gguf=out)


def _export(args) -> Path:
    if args.merge:
        return merge_to_dir(args.model, args.out, overwrite=args.overwrite)

    return export_gguf(args.model, args.out, dtype=args.dtype, overwrite=args.overwrite, modelfile=True)


def _modelfile(args, out: Path) -> Path | None:
    path = None if args.merge else modelfile_path(out)
    return path if path and path.is_file() else None


def _bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
