"""Check a DALI graph for the GPU backend on any machine, before training starts.

DALI builds the *Python graph* of a ``device='gpu'`` pipeline without CUDA: defining it (the
``pipeline_def`` call) and ``pipe._build_graph()`` place every operator and refuse misplaced
arguments (e.g. a GPU tensor as a named argument), while ``pipe.build()`` (which needs a GPU)
comes later.  ``check_gpu_graph`` turns such a refusal into one line naming the operator, so
``data.pipeline=dali-gpu`` fails at once, not at the first batch; ``graph_ops`` lists where each
operator runs (the tests check that the heavy ones are on the GPU).
"""

from __future__ import annotations

import re
from typing import Callable, List, Optional, Tuple

_PREFIX = "nvidia.dali."
_ADVICE = "use data.pipeline=dali-cpu or data.pipeline=torch"


class PipelineBuildError(ValueError):
    """A DALI graph the chosen backend cannot build; the message is one line."""


def op_name(op) -> str:
    """The API name of an operator instance of a built graph, e.g. 'fn.warp_affine', 'math.clamp'."""
    return op._op._operator_name().replace(_PREFIX, "", 1)


def graph_ops(pipe) -> List[Tuple[str, str]]:
    """Build the Python graph of ``pipe`` (no CUDA needed) and return (op name, device) pairs,
    device 'cpu', 'gpu' or 'mixed'."""
    pipe._build_graph()
    return [(op_name(o), o._op.device) for o in pipe._ops]


def describe(e: Exception) -> str:
    """DALI's refusal as 'fn.op: reason' on one line."""
    msg = (str(e).strip() or type(e).__name__).splitlines()[0]
    named = re.search(
        r"argument '(\w+)' of operator '(?:nvidia\.dali\.)?([\w.]+)'\. (Named arguments must be on \w+)", msg
    )
    if named:
        return f"{named[2]}: {named[3]} ({named[1]})"
    msg = re.sub(r'^Assert on ".*?" failed: ', "", msg)  # the C++ condition says nothing to a user
    op = re.search(r"nvidia\.dali\.((?:fn|math|ops)\.[\w.]+)", msg)
    return f"{op[1]}: {msg.replace(_PREFIX, '')}" if op else msg


def dali_problem() -> Optional[str]:
    """Why NVIDIA DALI cannot be used in this process, in one line (None: it loads).  Importing
    it loads its native libraries, so a build for another CUDA, or a missing library, shows here
    as well as a missing package."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401  (the iterator every DALI executor uses)
    except Exception as e:  # ImportError, OSError from a native library, anything its import raises
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first}"[:300] if first else type(e).__name__
    return None


def check_gpu_graph(build: Callable[[], object], what: str) -> None:
    """Define (``build()``, returning the pipeline) and build the Python graph of a dali-gpu
    pipeline; raise PipelineBuildError (one line: the operator, the reason, the way out) when
    DALI refuses it, or fails in any other way while building it."""
    try:
        graph_ops(build())
    except Exception as e:  # ValueError/TypeError/RuntimeError for a refused graph; anything else is as fatal
        raise PipelineBuildError(f"data.pipeline=dali-gpu: {what} cannot be built: {describe(e)}; {_ADVICE}") from e


def crop_pipeline(recipe, source, split, batch_size: int, reader_workers: int = 0, hw_decoder_load: float = 0.65):
    """``recipe``'s dali-gpu pipeline on ``split`` as build_loader configures it, fed by an empty
    source (for its graph only: it is never run, so device 0 need not exist)."""
    from fastssl.data.executors.base import over_whole_images, whole_image
    from fastssl.data.executors.dali import FileReader, build_dali_pipeline, reads_in_workers

    whole = whole_image(split, recipe)
    reader = (
        FileReader(split.files, batch_size, 0, 0, 1, 0, 0) if reads_in_workers(split, recipe, reader_workers) else None
    )
    return build_dali_pipeline(
        [],
        over_whole_images(recipe) if whole else recipe,
        "gpu",
        batch_size,
        1,
        0,
        source.image_size,
        split.encoded,
        source.mean,
        source.std,
        whole=whole,
        reader=reader,
        reader_workers=reader_workers,
        hw_decoder_load=hw_decoder_load,
    )
