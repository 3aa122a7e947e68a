"""One rank of a spawned 2-process gloo test: init, run, clean exit."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch.distributed as dist


@contextlib.contextmanager
def gloo_rank(init_file: str, rank: int, world: int) -> Iterator[None]:
    """Run the body as one rank of a gloo group; on success wait for every rank, destroy the group and end the
    process with ``os._exit(0)``.

    Why the hard exit: gloo's C++ worker threads (and functional-collective work objects) can still hold tensors
    when the interpreter finalizes, and tearing them down then aborts the process now and then ("terminate called
    without an active exception", SIGABRT; seen once in CI on a loaded 2-core machine). The results are already on
    disk at that point, and the abort is not what these tests check. On failure the exception propagates so that
    ``torch.multiprocessing`` reports it.
    """
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()  # no rank tears down while another still has collectives in flight
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
