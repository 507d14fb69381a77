"""Configure a started session and read back what the kernel actually put in effect.

Set (etw-collector.md §6): the pool-tag filter first (class 10, before POOL is on, so no burst of
unfiltered events), then stacks (TraceSetInformation(TraceStackTracingInfo), falling back to the native
class-6 call with hook ids), then the group mask last (TraceSetInformation(TraceSystemTraceEnableFlagsInfo),
falling back to the native class-1 query-OR-set), which starts the pool events and the rundown.

Success codes prove little: TraceSetInformation silently ignores a CLASSIC_EVENT_ID it does not accept
(Geoff Chappell, TraceSetInformation). So every setting is read back with
``NtQuerySystemInformation(SystemPerformanceTraceInformation, ...)`` and the session handle: class 1
(48 bytes, the logger's group masks), class 6 (16 + 4n: the hook ids with a stack walk) and class 10
(16 + 4n: the logger's tag filter); the kernel returns 16 + 4n as the length and STATUS_BUFFER_TOO_SMALL
when n does not fit (EtwQueryPerformanceTraceInformation, decompiled 11-24H2). Missing stacks or the POOL
bit are set again with the native call and read again; what is still not in effect stops the recording.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pooltrace.collector.boundary import WindowsApi
from pooltrace.collector.config import constants
from pooltrace.collector.messages import message, nt, win32
from pooltrace.collector.plan import SessionPlan
from pooltrace.collector.structs import (
    classic_event_ids,
    group_mask,
    parse_group_mask_information,
    parse_ulong_list,
    perf_information,
)
from pooltrace.collector.tagfilter import pattern_text
from pooltrace.errors import PooltraceError


class KernelRefused(PooltraceError):
    """Windows accepted a setting but did not apply it; ``state`` holds what the read-back found."""

    def __init__(self, text: str, state: KernelState):
        super().__init__(text)
        self.state = state


@dataclass
class KernelState:
    """What the read-back found (None: could not be read, see ``unverified``)."""

    group_masks: tuple[int, ...] | None = None
    pool_enabled: bool | None = None
    stack_hooks: tuple[int, ...] | None = None
    stacks_enabled: bool | None = None
    stacks_set_by: str = "TraceSetInformation"
    group_mask_set_by: str = "TraceSetInformation"
    tag_filter: list[str] | None = None
    tag_filter_in_effect: bool | None = None
    unverified: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "pool_enabled": self.pool_enabled,
            "group_masks": [f"0x{m:08x}" for m in self.group_masks] if self.group_masks else None,
            "stacks_enabled": self.stacks_enabled,
            "stack_hooks": [f"0x{h:04x}" for h in self.stack_hooks] if self.stack_hooks is not None else None,
            "stacks_set_by": self.stacks_set_by, "group_mask_set_by": self.group_mask_set_by,
            "tag_filter": self.tag_filter, "tag_filter_in_effect": self.tag_filter_in_effect,
            "unverified": self.unverified,
        }


class Configurator:
    def __init__(self, api: WindowsApi, plan: SessionPlan, handle: int, warn: Callable[[str], None]):
        self.api, self.plan, self.handle, self.warn = api, plan, handle, warn
        c = constants()
        self.spti = c["system_info_class"]["SystemPerformanceTraceInformation"]
        self.cls = c["event_trace_info_class"]
        self.state = KernelState()

    # -- setting
    def _native(self, cls: str, ulongs) -> int:
        return self.api.nt_set_system_information(self.spti, perf_information(self.cls[cls], self.handle, ulongs))

    def set_all(self) -> None:
        c, api, plan = constants(), self.api, self.plan
        tic = c["trace_info_class"]
        denied = win32("ERROR_ACCESS_DENIED")
        if plan.tags:
            status = self._native("PoolTagFilter", plan.tag_values)
            if status:
                raise PooltraceError(message("tag_filter", code=c.ntstatus_name(status)))
        status = api.trace_set_information(self.handle, tic["TraceStackTracingInfo"],
                                           classic_event_ids(plan.stack_events))
        if status == denied:
            raise PooltraceError(message("admin"))
        if status:
            self.state.stacks_set_by = "NtSetSystemInformation"
            native = self._native("StackTracing", plan.stack_hook_ids)
            if native:
                raise PooltraceError(message("stacks", code=c.win32_name(status), native=c.ntstatus_name(native)))
        status = api.trace_set_information(self.handle, tic["TraceSystemTraceEnableFlagsInfo"],
                                           group_mask(plan.group_masks))
        if status == denied:
            raise PooltraceError(message("admin"))
        if status:
            native = self._native_group_mask()
            if native:
                raise PooltraceError(message("group_mask", code=c.win32_name(status), native=c.ntstatus_name(native)))

    def _native_group_mask(self) -> int:
        """Query the logger's masks, OR ours in, set them (EVENT_TRACE_GROUPMASK_INFORMATION, 48 bytes)."""
        self.state.group_mask_set_by = "NtSetSystemInformation"
        status, current = self.read_group_masks()
        masks = [a | b for a, b in zip(current or (0,) * 8, self.plan.group_masks, strict=True)]
        return self._native("GroupMask", masks)

    # -- reading back
    def _query(self, cls: str, ulongs: int) -> tuple[int, bytearray, int]:
        buf = bytearray(perf_information(self.cls[cls], self.handle, [0] * ulongs))
        status, returned = self.api.nt_query_system_information(self.spti, buf)
        return status, buf, returned

    def read_group_masks(self) -> tuple[int, tuple[int, ...] | None]:
        status, buf, _ = self._query("GroupMask", 8)
        return status, parse_group_mask_information(buf) if status == 0 else None

    def _read_list(self, cls: str, room: int) -> tuple[int, tuple[int, ...] | None]:
        too_small = (nt("STATUS_BUFFER_TOO_SMALL"), nt("STATUS_INFO_LENGTH_MISMATCH"))
        for _ in range(3):
            status, buf, returned = self._query(cls, room)
            if status in too_small and returned > len(buf):
                room = (returned - 16 + 3) // 4
                continue
            break
        if status:
            return status, None
        try:
            return 0, parse_ulong_list(buf, returned)
        except ValueError:
            return nt("STATUS_INFO_LENGTH_MISMATCH"), None

    def _unverified(self, what: str, status: int) -> None:
        text = f"{what}: {constants().ntstatus_name(status)}"
        self.state.unverified.append(text)
        self.warn(f"could not read back {text}; the trace may lack it — check with `pooltrace info`")

    def verify(self) -> KernelState:
        """Read back classes 10, 6 and 1; set missing stacks and POOL again natively; raise KernelRefused
        naming whatever is still not in effect."""
        plan, st = self.plan, self.state
        refused: list[str] = []
        if plan.tags:
            status, tags = self._read_list("PoolTagFilter", 4)
            if tags is None:
                self._unverified("the pool-tag filter", status)
            else:
                st.tag_filter = [pattern_text(t) for t in tags]
                st.tag_filter_in_effect = sorted(tags) == sorted(plan.tag_values)
                if not st.tag_filter_in_effect:
                    refused.append(f"the pool-tag filter (asked {', '.join(t.text for t in plan.tags)}; in effect: "
                                   f"{', '.join(st.tag_filter) or 'none'})")
        want = set(plan.stack_hook_ids)
        status, hooks = self._read_list("StackTracing", 64)
        if hooks is not None and not want <= set(hooks):
            st.stacks_set_by = "NtSetSystemInformation"
            if self._native("StackTracing", plan.stack_hook_ids) == 0:
                status, hooks = self._read_list("StackTracing", 64)
        if hooks is None:
            self._unverified("the stack-walk hooks", status)
        else:
            st.stack_hooks = tuple(sorted(hooks))
            st.stacks_enabled = want <= set(hooks)
            if not st.stacks_enabled:
                names = [n for n, h in zip(plan.stack_hooks, plan.stack_hook_ids, strict=True) if h not in hooks]
                refused.append(f"stack walking for {', '.join(names)}")
        status, masks = self.read_group_masks()
        if masks is not None and not self._has_masks(masks):
            self._native_group_mask()
            status, masks = self.read_group_masks()
        if masks is None:
            self._unverified("the group mask", status)
        else:
            st.group_masks = masks
            st.pool_enabled = self._has_masks(masks)
            if not st.pool_enabled:
                refused.append("pool events (the POOL bit of the group mask is not set)")
        if refused:
            raise KernelRefused(message("refused", what="; ".join(refused)), st)
        return st

    def _has_masks(self, masks) -> bool:
        return all(m & want == want for m, want in zip(masks, self.plan.group_masks, strict=True))


def configure(api: WindowsApi, plan: SessionPlan, handle: int, warn: Callable[[str], None]) -> KernelState:
    """Set filter, stacks and group mask; read them back. Raises PooltraceError (KernelRefused when a
    setting was accepted but is not in effect)."""
    cfg = Configurator(api, plan, handle, warn)
    cfg.set_all()
    return cfg.verify()
