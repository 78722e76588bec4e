"""Option groups declared once: a command takes a group as one parameter annotated with the group's dataclass,
and ``grouped`` shows typer the group's options (each a field of the dataclass, with its help and default) and
packs them back into the dataclass when the command runs. Every command with a group offers exactly its options
under the same names, in a help panel of its own.
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, get_type_hints

import typer

ENGINE = "Generation engine"


def grouped(command: Callable[..., Any]) -> Callable[..., Any]:
    """``command`` with each parameter whose type is a dataclass replaced by that dataclass's fields."""
    hints = get_type_hints(command, include_extras=True)
    params, groups = [], {}
    for param in inspect.signature(command).parameters.values():
        kind = hints.get(param.name, param.annotation)
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            fields = get_type_hints(kind, include_extras=True)
            groups[param.name] = kind
            params += [
                inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=fields[f.name])
                for f in dataclasses.fields(kind)
            ]
        else:
            params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=kind))

    @functools.wraps(command)
    def run(**kwargs: Any) -> Any:
        for name, kind in groups.items():
            kwargs[name] = kind(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(kind)})
        return command(**kwargs)

    del run.__wrapped__
    run.__signature__ = inspect.Signature(params)
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run


@dataclasses.dataclass
class EngineOptions:
    """Which engine generates, and how vLLM runs (``personalab.engine.vllm_engine``)."""

    engine: Annotated[
        str,
        typer.Option(
            help="hf (transformers generate with hooks) or vllm (steering inside vLLM).", rich_help_panel=ENGINE
        ),
    ] = "hf"
    tensor_parallel_size: Annotated[
        int, typer.Option(help="vLLM: GPUs that split each layer.", rich_help_panel=ENGINE)
    ] = 1
    data_parallel_size: Annotated[
        int, typer.Option(help="vLLM: replicas that split the requests.", rich_help_panel=ENGINE)
    ] = 1
    gpu_memory_utilization: Annotated[
        float | None,
        typer.Option(help="vLLM: share of the GPU's memory for its model and KV cache (default: 0.7 of what is "
                     "free; on CPU, of the RAM, default 0.25).", rich_help_panel=ENGINE),
    ] = None  # fmt: skip
    max_model_len: Annotated[
        int | None, typer.Option(help="vLLM: longest prompt + answer (default: the model's).", rich_help_panel=ENGINE)
    ] = None
    vllm_chunk: Annotated[
        int,
        typer.Option(help="vLLM: requests per call (each call's answers are stored together).", rich_help_panel=ENGINE),
    ] = 512
    ray: Annotated[
        bool, typer.Option(help="vLLM: place the ranks on a Ray cluster (several nodes).", rich_help_panel=ENGINE)
    ] = False
    vllm_graphs: Annotated[
        bool,
        typer.Option(help="vLLM: compiled, with CUDA graphs on a GPU (steering only; capture runs on transformers).",
                     rich_help_panel=ENGINE),
    ] = False  # fmt: skip
