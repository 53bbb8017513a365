"""pyeff.runtime: the opt-in malloc setting takes effect on glibc and leaves tensors working."""
import platform
import subprocess
import sys


def test_keep_freed_memory_in_a_fresh_process():
    code = ("import torch, pyeff.runtime as r; ok = r.keep_freed_memory(); "
            "x = [torch.ones(1 << 22) for _ in range(4)]; del x; y = torch.ones(1 << 22) * 2; "
            "print(ok, float(y.sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ok, total = out.stdout.split()
    assert float(total) == 2.0 * (1 << 22)
    # glibc takes the setting; any other C library leaves malloc alone and reports False
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert ok == str(glibc)
