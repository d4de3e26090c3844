"""One GPU as S smaller ones. CUDA green contexts give each pipeline stage its own disjoint set of SMs and a stream
on it; the SMs left over serve the links (the emulated transfer delay and the copy, one stream per link). The S
stages then compute at the same time, each with 1/S of the SMs, and naive, chunked and overlapped compare the way
they would on S smaller GPUs. What this does not model: the stages still share one GPU's HBM bandwidth and L2 cache
(S real GPUs have S of each), and a copy between partitions is a device-local copy, not a transfer (the link's time
is the emulated one).

The partitions come from one split of the device's SM resource (`cuDevSmResourceSplitByCount`, driver API through
`cuda-bindings`), so they are disjoint by construction. (`torch.cuda.green_contexts.GreenContext.create(num_sms=)`
splits the whole device anew on each call, which does not promise disjoint sets, so it is not used.)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from . import checks

NOT_MODELLED = ("the stages share one GPU's HBM bandwidth and L2 cache (S GPUs would have S of each); a send is a "
                "device-local copy on the links' SMs, its time the emulated link's")


@dataclass(frozen=True)
class PartitionPlan:
    total_sms: int
    stages: int
    stage_sms: int  # each stage's SMs (equal, disjoint)
    link_sms: int  # what is left: the links' lanes
    granularity: int  # the split's unit on this architecture


def sm_granularity(capability: tuple[int, int]) -> int:
    """SMs come in groups of 8 on Hopper and later (a split is rounded to them), of 2 before."""
    return 8 if tuple(capability) >= (9, 0) else 2


def plan_partitions(total_sms: int, stages: int, granularity: int = 8, link_sms: int = 1) -> PartitionPlan:
    """Equal, disjoint SM sets for `stages` stages, each a multiple of `granularity`, as large as they can be while
    at least `link_sms` SMs are left for the links (a link's lane needs little: a one-warp wait and a copy)."""
    total_sms = checks.positive_int("total_sms", total_sms)
    stages = checks.positive_int("stages", stages)
    granularity = checks.positive_int("granularity", granularity)
    link_sms = checks.positive_int("link_sms", link_sms)
    per = (total_sms - link_sms) // stages // granularity * granularity
    if per < granularity:
        raise ValueError(f"{total_sms} SMs cannot make {stages} partitions of at least {granularity} SMs with "
                         f"{link_sms} left for the links: use at most {(total_sms - link_sms) // granularity} stages")
    return PartitionPlan(total_sms, stages, per, total_sms - per * stages, granularity)


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError:
        raise ValueError("SM partitions need the CUDA driver API from the `cuda-bindings` package "
                         "(pip install cuda-bindings)") from None
    return driver


def _ok(result):
    """cuda-bindings calls return (CUresult, values...): raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA driver call failed: {err}")
    return values[0] if len(values) == 1 else values


class SMPartitions:
    """Green contexts on `device`: one per stage (`stage_streams`) and one for the SMs left over, with a stream per
    link (`link_streams`). `describe()` says what was made, for the results."""

    def __init__(self, device, stages: int, links: int):
        dev = torch.device(device)
        if dev.type != "cuda" or not torch.cuda.is_available():
            raise ValueError("SM partitions split a CUDA GPU (green contexts); there is none here")
        driver = _driver()
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        self.plan = plan_partitions(props.multi_processor_count, stages, sm_granularity((props.major, props.minor)))
        torch.cuda.init()
        cu_dev = _ok(driver.cuDeviceGet(index))
        resource = _ok(driver.cuDeviceGetDevResource(cu_dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
        groups, n, remaining = _ok(driver.cuDevSmResourceSplitByCount(stages, resource, 0, self.plan.stage_sms))
        if n != stages:
            raise RuntimeError(f"the SM split made {n} partitions of {self.plan.stage_sms} SMs, {stages} were asked")
        self.stage_sm_counts = [int(g.sm.smCount) for g in list(groups)[:stages]]
        self.link_sm_count = int(remaining.sm.smCount)

        def context(res):
            desc = _ok(driver.cuDevResourceGenerateDesc([res], 1))
            return _ok(driver.cuGreenCtxCreate(desc, cu_dev, driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))

        def stream(ctx):
            raw = _ok(driver.cuGreenCtxStreamCreate(ctx, driver.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
            return torch.cuda.ExternalStream(int(raw), device=torch.device("cuda", index))

        self._contexts = [context(g) for g in list(groups)[:stages]]
        self.stage_streams = [stream(c) for c in self._contexts]
        self._contexts.append(context(remaining))
        self.link_streams = [stream(self._contexts[-1]) for _ in range(links)]

    def describe(self) -> dict:
        return dict(plan=asdict(self.plan), stage_sms=self.stage_sm_counts, link_sms=self.link_sm_count,
                    not_modelled=NOT_MODELLED)
