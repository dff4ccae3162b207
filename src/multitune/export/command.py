"""``multitune export OUTPUT_DIR [--merged DIR] [--gguf FILE] [--gguf-dtype f16|f32]``."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from multitune.export import GGUF_DTYPES, ExportError


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", type=Path, help="output folder of a `multitune train` run")
    parser.add_argument(
        "--merged",
        type=Path,
        metavar="DIR",
        help="write the base model with the adapter merged in (safetensors) to this new folder",
    )
    parser.add_argument(
        "--gguf",
        type=Path,
        metavar="FILE",
        help="write a GGUF file for llama.cpp (Llama-architecture models; needs the gguf extra)",
    )
    parser.add_argument(
        "--gguf-dtype", choices=GGUF_DTYPES, default="f16", help="GGUF weight type (default f16)"
    )


def cmd_export(args: argparse.Namespace) -> int:
    """Merge the run's adapter into its base, and/or convert the merged model to GGUF."""
    # Heavy imports (torch, transformers, peft) only once the command runs.
    from multitune.export.gguf import export_gguf, import_gguf
    from multitune.export.merge import export_merged

    if args.merged is None and args.gguf is None:
        raise ExportError("nothing to export: pass --merged DIR and/or --gguf FILE")
    if not (args.output_dir / "adapter").is_dir():
        raise ExportError(f"{args.output_dir} is not the output folder of a `multitune train` run")
    if args.gguf is not None:
        import_gguf()  # fail before a long merge if the optional package is missing
    name = args.output_dir.resolve().name
    source = base_gguf_file(args.output_dir) if args.gguf is not None else None
    if args.merged is not None:
        merged = export_merged(args.output_dir, args.merged)
        print(f"merged model: {merged}")
        if args.gguf is not None:
            print(f"GGUF: {export_gguf(merged, args.gguf, args.gguf_dtype, name, source)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="multitune-merge-") as scratch:
        merged = export_merged(args.output_dir, Path(scratch) / "merged")
        print(f"GGUF: {export_gguf(merged, args.gguf, args.gguf_dtype, name, source)}")
    return 0


def base_gguf_file(output_dir: Path) -> Path | None:
    """The GGUF file the run's base model was read from (GGUF in, fine-tune, GGUF out)."""
    import yaml

    from multitune.models.gguf import gguf_file_of

    config_path = output_dir / "config.yaml"
    model = (
        (yaml.safe_load(config_path.read_text()) or {}).get("model", {})
        if config_path.is_file()
        else {}
    )
    name = model.get("name")
    if not name:
        return None
    return gguf_file_of(name, model.get("gguf_file"), model.get("revision"))
