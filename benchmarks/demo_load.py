"""Load test of ``lstmlab demo``: N drawings sent at once through gradio_client; prints how many were answered and
the latency percentiles.

    python benchmarks/demo_load.py                      # 100 concurrent predictions, a fresh H=128 model
    python benchmarks/demo_load.py --checkpoint runs/x/best.safetensors --requests 50

The demo runs as the real command (``python -m lstmlab demo``) in a child process bound to 127.0.0.1 on a free
port; the script stops by itself: every request has a deadline, the whole run has one, and the server is stopped
(SIGINT, then SIGKILL) whatever happens. Latency is from the moment a request is submitted to its answer, so
with N sent at once it includes the time spent waiting in the demo's queue. Without --checkpoint, a model of the
default recipe's shape with random weights is used: its cost per drawing is that of a trained one.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import wait
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_checkpoint(folder: Path) -> Path:
    """A rows-view MNIST model of the default shape (H=128, one layer), random weights."""
    import torch

    from lstmlab.checkpoint import save_checkpoint
    from lstmlab.config import Config, DataConfig, ModelConfig
    from lstmlab.model import SequenceClassifier

    torch.manual_seed(0)
    config = Config(model=ModelConfig(hidden_size=128), data=DataConfig(mean=0.1307, std=0.3081))
    path = folder / "model.safetensors"
    save_checkpoint(path, SequenceClassifier(config.model), config)
    return path


def _drawing(folder: Path, k: int) -> Path:
    """The k-th drawing: a 7 as the sketchpad sends it (black strokes on a transparent 400 x 400 layer), its
    corner moved a little for each k. Different drawings, as different users send: gradio names its output files
    by their content, and identical answers written at once race on the same file (a download then fails)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (400, 400), (0, 0, 0, 0))
    dx, dy = k % 10 * 6 - 27, k // 10 % 10 * 6 - 27
    ImageDraw.Draw(img).line([(100, 80), (300 + dx, 80 + dy), (170, 340)], fill="black", width=22, joint="curve")
    path = folder / f"seven-{k}.png"
    img.save(path)
    return path


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def _peak_rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a .safetensors checkpoint (default: a random model of default shape)")
    parser.add_argument("--requests", type=int, default=100, help="predictions sent at once (default 100)")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request counts as lost")
    parser.add_argument("--startup-timeout", type=float, default=120.0, help="seconds for the server to come up")
    args = parser.parse_args(argv)

    from gradio_client import Client, handle_file

    with tempfile.TemporaryDirectory(prefix="lstmlab-demo-load-") as tmp:
        folder = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else _make_checkpoint(folder)
        drawings = [_drawing(folder, k) for k in range(args.requests + 1)]
        port = _free_port()
        env = dict(os.environ, GRADIO_TEMP_DIR=str(folder / "gradio"), GRADIO_ANALYTICS_ENABLED="False")
        log = open(folder / "server.log", "w")  # noqa: SIM115 - closed in the finally below
        server = subprocess.Popen(
            [sys.executable, "-m", "lstmlab", "demo", str(checkpoint), "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        try:
            url = f"http://127.0.0.1:{port}/"
            client = None
            deadline = time.monotonic() + args.startup_timeout
            while client is None:
                if server.poll() is not None:
                    print(f"the demo exited with status {server.returncode}:\n"
                          f"{(folder / 'server.log').read_text()}", file=sys.stderr)
                    return 1
                try:
                    client = Client(url, verbose=False, max_workers=args.requests,
                                    download_files=str(folder / "downloads"))
                except Exception:  # noqa: BLE001 - not up yet
                    if time.monotonic() > deadline:
                        print(f"the demo did not come up within {args.startup_timeout:.0f} s", file=sys.stderr)
                        return 1
                    time.sleep(0.5)
            values = [{"background": None, "layers": [], "composite": handle_file(str(d)), "id": None}
                      for d in drawings]
            client.predict(values[-1], api_name="/predict")  # one warm-up request: first figures are built once

            done_at: dict[int, float] = {}
            lock = threading.Lock()

            def finished(k: int):
                def record(_job) -> None:
                    with lock:
                        done_at[k] = time.perf_counter()
                return record

            load = os.getloadavg()
            print(f"lstmlab demo on {url}: sending {args.requests} predictions at once", flush=True)
            server_cpu, client_cpu = _cpu_seconds(server.pid), time.process_time()
            start = time.perf_counter()
            jobs = []
            for k in range(args.requests):
                job = client.submit(values[k], api_name="/predict")
                job.add_done_callback(finished(k))
                jobs.append(job)
            wait(jobs, timeout=args.request_timeout)
            wall = time.perf_counter() - start
            server_cpu, client_cpu = _cpu_seconds(server.pid) - server_cpu, time.process_time() - client_cpu
            latencies, failures = [], []
            for k, job in enumerate(jobs):
                if not job.done():
                    failures.append("no answer in time")
                    job.cancel()
                    continue
                try:
                    message = job.result(timeout=0)[4]
                except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
                    failures.append(f"{type(e).__name__}: {e}")
                    continue
                if not str(message).startswith("**Prediction"):
                    failures.append(f"unexpected answer {message!r}")
                    continue
                latencies.append(done_at[k] - start)
            ok = len(latencies)
            print(f"answered {ok}/{args.requests}; failed {len(failures)}"
                  + (f" (first: {failures[0]})" if failures else ""))
            if latencies:
                print(f"latency s: p50 {statistics.median(latencies):.2f}  p95 {_percentile(latencies, 95):.2f}  "
                      f"max {max(latencies):.2f}  (all {args.requests} sent at once; wall {wall:.1f} s, "
                      f"{ok / wall:.1f} answers/s)")
            print(f"CPU s per request: server {server_cpu / args.requests:.3f}, client "
                  f"{client_cpu / args.requests:.3f}; load average before the run {load[0]:.1f}")
            rss = _peak_rss_mib(server.pid)
            if rss is not None:
                print(f"server peak memory {rss:.0f} MiB")
            return 0 if ok == args.requests else 1
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGINT)
                try:
                    server.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
            log.close()


if __name__ == "__main__":
    sys.exit(main())
