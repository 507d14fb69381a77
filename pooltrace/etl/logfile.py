"""TRACE_LOGFILE_HEADER (the payload of the first record of an .etl file) and clock conversion.

Offsets: ../shared/reference/etl-format.md §1.5; conversion rules: §1.6.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

CLOCK_NAMES = {1: "QPC", 2: "system time", 3: "CPU cycles"}
FILETIME_EPOCH = datetime(1601, 1, 1, tzinfo=UTC)
MIN_TICKS_PER_SECOND, MAX_TICKS_PER_SECOND = 1_000, 100_000_000_000

# Fixed part of TRACE_LOGFILE_HEADER, up to LogFileName (same offsets for both pointer sizes).
_HEAD = struct.Struct("<IIIIqIIIIIIII")  # BufferSize .. CpuSpeedInMHz, 0x00..0x38
# Tail after the 0xAC TIME_ZONE_INFORMATION (+4 pad): BootTime, PerfFreq, StartTime, ReservedFlags, BuffersLost.
_TAIL = struct.Struct("<qqqII")
_TAIL_OFFSET = {8: 0xF8, 4: 0xF0}
_STRINGS_OFFSET = {8: 0x118, 4: 0x110}


def filetime_to_datetime(ft: int) -> datetime | None:
    if ft <= 0:
        return None
    try:
        return FILETIME_EPOCH + timedelta(microseconds=ft // 10)
    except OverflowError:
        return None


def _utf16z(data: bytes, pos: int) -> tuple[str, int]:
    end = pos
    while end + 1 < len(data) and (data[end] or data[end + 1]):
        end += 2
    return data[pos:end].decode("utf-16-le", errors="replace"), end + 2


@dataclass
class LogfileHeader:
    buffer_size: int
    version: int
    os_build: int
    cpus: int
    end_time: int  # FILETIME
    timer_resolution: int
    max_file_size_mb: int
    log_file_mode: int
    buffers_written: int
    start_buffers: int
    pointer_size: int
    events_lost: int
    cpu_speed_mhz: int
    boot_time: int  # FILETIME
    perf_freq: int
    start_time: int  # FILETIME
    clock_type: int  # ReservedFlags
    buffers_lost: int
    logger_name: str
    logfile_name: str
    start_ticks: int  # raw clock at StartTime: the SystemTime of the header record

    @property
    def os_version(self) -> str:
        """OS major.minor from the Version field (byte 0 major, byte 1 minor)."""
        return f"{self.version & 0xFF}.{(self.version >> 8) & 0xFF}"

    @property
    def layout_version(self) -> str:
        return f"{(self.version >> 16) & 0xFF}.{(self.version >> 24) & 0xFF}"

    @property
    def clock_name(self) -> str:
        return CLOCK_NAMES.get(self.clock_type, f"unknown ({self.clock_type})")

    @property
    def ticks_per_second(self) -> int | None:
        """Clock frequency; None when unknown or implausible (a damaged header: outside 1 kHz..100 GHz,
        where nanosecond times would lose all precision or overflow int64)."""
        if self.clock_type == 1:
            freq = self.perf_freq
        elif self.clock_type == 2:
            freq = 10_000_000
        elif self.clock_type == 3:
            freq = self.cpu_speed_mhz * 1_000_000
        else:
            return None
        return freq if MIN_TICKS_PER_SECOND <= freq <= MAX_TICKS_PER_SECOND else None

    @property
    def clock_problem(self) -> str | None:
        """Why times cannot be converted, when the header says something impossible (None when fine)."""
        if self.ticks_per_second is not None:
            return None
        if self.clock_type not in CLOCK_NAMES:
            return f"the logfile header names an unknown clock type {self.clock_type}"
        freq = self.perf_freq if self.clock_type == 1 else self.cpu_speed_mhz * 1_000_000
        return f"the logfile header gives an implausible {self.clock_name} frequency ({freq} ticks/s)"

    @property
    def start_datetime(self) -> datetime | None:
        return filetime_to_datetime(self.start_time)

    @property
    def end_datetime(self) -> datetime | None:
        return filetime_to_datetime(self.end_time)

    @property
    def boot_datetime(self) -> datetime | None:
        return filetime_to_datetime(self.boot_time)

    def ticks_to_ns(self, ticks: np.ndarray | int) -> np.ndarray | int:
        """Raw clock values to integer nanoseconds since trace start (exact, no float rounding)."""
        freq = self.ticks_per_second
        if freq is None:
            raise ValueError(f"cannot convert timestamps: clock type {self.clock_type}, frequency unknown")
        if isinstance(ticks, np.ndarray):
            delta = ticks.astype(np.int64) - np.int64(self.start_ticks)
            if 1_000_000_000 % freq == 0:  # a whole number of ns per tick (10 MHz: 100): the same, no division
                return delta * np.int64(1_000_000_000 // freq)
            q, r = np.divmod(delta, np.int64(freq))
            return q * np.int64(1_000_000_000) + (r * np.int64(1_000_000_000)) // np.int64(freq)
        q, r = divmod(int(ticks) - self.start_ticks, freq)
        return q * 1_000_000_000 + (r * 1_000_000_000) // freq

    @classmethod
    def parse(cls, payload: bytes, start_ticks: int, pointer_size_hint: int) -> LogfileHeader:
        """Parse the payload of the hook-0 record. The PointerSize field decides the layout; when it
        is not 4 or 8 the record's header type (32/64) does."""
        if len(payload) < _HEAD.size:
            raise ValueError("logfile header record too short")
        head = _HEAD.unpack_from(payload, 0)
        ptr = head[10] if head[10] in (4, 8) else pointer_size_hint
        tail_off = _TAIL_OFFSET[ptr]
        if len(payload) < tail_off + _TAIL.size:
            raise ValueError("logfile header record too short")
        boot, freq, start, clock, blost = _TAIL.unpack_from(payload, tail_off)
        logger, pos = _utf16z(payload, _STRINGS_OFFSET[ptr])
        logfile, _ = _utf16z(payload, pos)
        return cls(
            buffer_size=head[0], version=head[1], os_build=head[2], cpus=head[3], end_time=head[4],
            timer_resolution=head[5], max_file_size_mb=head[6], log_file_mode=head[7],
            buffers_written=head[8], start_buffers=head[9], pointer_size=ptr, events_lost=head[11],
            cpu_speed_mhz=head[12], boot_time=boot, perf_freq=freq, start_time=start, clock_type=clock,
            buffers_lost=blost, logger_name=logger, logfile_name=logfile, start_ticks=start_ticks,
        )
