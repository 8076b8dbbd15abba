"""What a speed figure was measured on: the CPU's model and instruction set, torch's version. Torch-free except
where it asks torch for its version (so that ``lstmlab --help`` stays fast)."""

from __future__ import annotations

import os
import platform


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (Linux); empty elsewhere."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name, e.g. "AMD EPYC" (``platform.processor()`` where /proc/cpuinfo has none)."""
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine() or "unknown CPU"


def isa() -> str:
    """The widest vector instruction set the CPU has, as the docs label figures: AVX-512, AVX2, SSE (x86), aarch64
    with SVE or NEON; with oneDNN's cap when ONEDNN_MAX_CPU_ISA is set, and the CPU level the compiled loops are
    built for when LSTMLAB_NATIVE_ARCH is set."""
    machine = platform.machine().lower()
    flags = set((_cpuinfo().get("flags") or _cpuinfo().get("Features") or "").split())
    if machine in ("x86_64", "amd64", "i686", "x86"):
        name = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "AVX" if "avx" in flags else "SSE"
    elif machine in ("aarch64", "arm64"):
        name = "aarch64 " + ("SVE" if "sve" in flags else "NEON")
    else:
        name = machine or "unknown ISA"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    arch = os.environ.get("LSTMLAB_NATIVE_ARCH", "").strip()
    return name + (f", oneDNN capped at {cap}" if cap else "") + (f", lstmlab's loops built for {arch}" if arch else "")


def summary() -> str:
    """One line: CPU model (ISA), torch version, threads."""
    import torch

    return f"{cpu_model()} ({isa()}), torch {torch.__version__}, {torch.get_num_threads()} threads"
