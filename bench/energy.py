"""The GPU's energy counter, read through NVML (the driver's library) with ctypes: no Python package needed.

On a GPU held at its power limit a step's time follows its energy, not its kernels' time (bench/NOTES.md, session
16), so the benchmarks report joules as well as seconds. `EnergyMeter().joules()` is the energy the GPU has used
since the meter was made, or None where NVML or the counter is missing (CPU machines, older GPUs). The counter is
the board's, in millijoules: whatever else runs on the GPU meanwhile is counted too.
"""

from __future__ import annotations

import ctypes


class EnergyMeter:
    """`uuid`: the GPU's (torch's `get_device_properties(i).uuid`), since NVML numbers GPUs in bus order and ignores
    CUDA_VISIBLE_DEVICES; without it, NVML's GPU `index`."""

    def __init__(self, index: int = 0, uuid: str | None = None):
        self._read = None
        try:
            nvml = ctypes.CDLL("libnvidia-ml.so.1")
            if nvml.nvmlInit_v2() != 0:
                return
            handle = ctypes.c_void_p()
            found = nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}".encode(), ctypes.byref(handle)) if uuid else 1
            if found != 0:  # (on a machine of one GPU, index 0 is that GPU whatever the UUID's spelling)
                found = nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle))
            if found != 0:
                return
            counter = ctypes.c_ulonglong()

            def read() -> float | None:
                if nvml.nvmlDeviceGetTotalEnergyConsumption(handle, ctypes.byref(counter)) != 0:
                    return None
                return counter.value / 1000.0

            if read() is not None:
                self._read = read
        except OSError:
            return
        self.start = self._read() if self._read else None

    def joules(self) -> float | None:
        """Energy used since the meter was made (or last `restart`), in joules."""
        if self._read is None:
            return None
        now = self._read()
        return None if now is None else now - self.start

    def restart(self) -> None:
        if self._read is not None:
            self.start = self._read()
