"""Programmatic dependent launch (PDL) for the decode chain's kernels.

A batch-1 decode step is ~240 short kernels in a row; each pays the launch of its grid and the ramp of its
first loads after the previous grid has fully drained. With PDL (sm_90+; CUDA programming guide, "Programmatic
Dependent Launch and Synchronization"; PTX ISA ``griddepcontrol``) a kernel launched with
``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`` may start once every program of the previous grid has
executed ``griddepcontrol.launch_dependents``; its programs then block in ``griddepcontrol.wait`` until that
grid has completed and its memory is visible. CUDA graph capture keeps these as programmatic edges.

The contract every kernel here follows (``grid_dep`` first thing in the kernel, before any load or store):
  * wait, so nothing of the previous grid is read early and nothing it still reads is overwritten; since every
    kernel of the chain waits before it can finish, completion is transitive (a grid's completion implies its
    predecessor's), so reading the output of any earlier kernel is safe;
  * then let the next grid launch, so at most two grids are in flight: the running one and the next, which
    waits with its programs already resident.
Kernels launched without PDL (torch's, cuBLAS's) keep plain stream order on both sides.

``MXQ_PDL=0`` turns it off (A/B timing, or a driver whose graph capture rejects programmatic edges).
"""
from __future__ import annotations

import functools
import os

import torch

from ._common import INTERPRET, tl, triton

USE_PDL = os.environ.get("MXQ_PDL", "1") != "0"


@functools.lru_cache(maxsize=None)
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_on(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL: a CUDA sm_90+ device, not the interpreter, and
    ``USE_PDL`` (read at every launch, so tests can switch it)."""
    return USE_PDL and not INTERPRET and t.is_cuda and _sm90(t.device.index)     # a CUDA tensor's index is set


def pdl_kw(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel with a ``PDL`` constexpr that calls ``grid_dep(PDL)`` first: the constexpr,
    and Triton's ``launch_pdl`` option when on."""
    return {"PDL": True, "launch_pdl": True} if pdl_on(t) else {"PDL": False}


if triton is not None:
    from triton.language.extra import cuda as _tl_cuda

    @triton.jit
    def grid_dep(PDL: tl.constexpr):
        """Wait for the previous grid (complete, memory visible), then allow the next one to launch. A no-op
        when ``PDL`` is False (the interpreter has no ``griddepcontrol``)."""
        if PDL:
            _tl_cuda.gdc_wait()
            _tl_cuda.gdc_launch_dependents()
