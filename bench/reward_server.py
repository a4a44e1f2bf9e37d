"""RewardServer throughput against calling the same reward in-process.

Both sides score the same tiny reward (same seed, so the same weights) on the same images, in
one run, through the DRaFT-K path: scores and ``d(weight * sum(scores)) / d(images)``.

- ``inproc``: ``callers`` threads in this process each call the colocated reward handle
  (:class:`rewards.handles.LocalReward`, what a generator worker runs for ``placement:
  colocated``);
- ``server``: ``callers`` threads each call :meth:`RewardClient.score_and_grad` on one
  RewardServer actor, which batches what arrives together.

Each cell is ``callers x calls`` requests of ``batch`` images; throughput is images/s over
the cell's wall time. Repeats alternate the two sides; the ratio (server / in-process) is
taken per repeat pair, then min/median/max. The server gets as many CPUs as this process
uses torch threads, so both sides have the same cores.

    python -m bench.reward_server [--short] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import threading
import time

import torch

from bench.common import stats


def _images(batch: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=g)
    return x, [f"a photo of object {seed}-{i}" for i in range(batch)]


def _proc(pid: int):
    try:
        import psutil

        return psutil.Process(pid)
    except Exception:  # psutil missing: CPU columns read 0
        return None


def _cpu(proc) -> float:
    if proc is None:
        return 0.0
    t = proc.cpu_times()
    return t.user + t.system


def _run_threads(fn, inputs: list, calls: int) -> float:
    """Wall time for ``len(inputs)`` threads each calling ``fn(*inputs[i])`` ``calls`` times."""
    start = threading.Barrier(len(inputs) + 1)
    errors = []

    def worker(args):
        start.wait()
        try:
            for _ in range(calls):
                fn(*args)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(a,)) for a in inputs]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return wall


def run(args) -> dict:
    import ray

    from actors.options import ActorResources
    from actors.reward_client import RewardClient
    from actors.server_config import ServerConfig
    from rewards.handles import build_handles
    from rewards.registry import RewardSpec

    cpus = args.cpus or os.cpu_count() or 1
    torch.set_num_threads(cpus)
    spec = {"name": args.reward, "options": {"backbone": "tiny"}}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        # address="local": a fresh Ray for this run, never a cluster already up on the machine.
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
        )
    cfg = ServerConfig(
        resources=ActorResources(num_cpus=cpus),
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        forward_threads=args.forward_threads,
    )
    t0 = time.perf_counter()
    client = RewardClient(spec, cfg, seed=args.seed).start()
    startup_s = time.perf_counter() - t0
    # Built as a worker builds a colocated reward: same seed, so the server's weights.
    local = build_handles([RewardSpec.from_dict(spec)], {}, "cpu", seed=args.seed)[0]
    here, server_proc = _proc(os.getpid()), _proc(client.info()["pid"])

    # Same answers on both sides, or the comparison means nothing.
    x, p = _images(4, args.image_size, 0)
    s_srv, g_srv = client.score_and_grad(x, p, 1.0)
    s_loc, g_loc = local.score_and_grad(x, p, 1.0)
    torch.testing.assert_close(s_srv, s_loc, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_srv, g_loc, rtol=1e-4, atol=1e-6)

    rows = []
    for callers in args.callers:
        for batch in args.batches:
            inputs = [_images(batch, args.image_size, 100 + c) for c in range(callers)]
            calls = max(args.min_calls, -(-args.images // (batch * callers)))
            n_images = callers * calls * batch
            # Warm-up: one call per caller on each side.
            _run_threads(lambda x, p: local.score_and_grad(x, p, 1.0), inputs, 1)
            _run_threads(lambda x, p: client.score_and_grad(x, p, 1.0), inputs, 1)
            inproc, server, ratio, busy, cpu_in, cpu_srv = [], [], [], [], [], []
            before = client.info()
            for _ in range(args.repeats):
                h0 = _cpu(here)
                wi = _run_threads(lambda x, p: local.score_and_grad(x, p, 1.0), inputs, calls)
                cpu_in.append((_cpu(here) - h0) / n_images * 1000)
                c0 = client.info()["compute_s"]
                h0, s0 = _cpu(here), _cpu(server_proc)
                ws = _run_threads(lambda x, p: client.score_and_grad(x, p, 1.0), inputs, calls)
                h1, s1 = _cpu(here), _cpu(server_proc)
                cpu_srv.append((h1 - h0 + s1 - s0) / n_images * 1000)
                busy.append((client.info()["compute_s"] - c0) / ws)
                inproc.append(n_images / wi)
                server.append(n_images / ws)
                ratio.append(server[-1] / inproc[-1])
            after = client.info()
            reqs = after["requests"] - before["requests"]
            row = {
                "batch": batch,
                "callers": callers,
                "calls_per_caller": calls,
                "images_per_repeat": n_images,
                "inproc_images_per_s": stats(inproc),
                "server_images_per_s": stats(server),
                "ratio": stats(ratio),
                "server_busy_fraction": statistics.median(busy),
                # CPU ms per image: this process (in-process), this process + the server.
                "inproc_cpu_ms_per_image": statistics.median(cpu_in),
                "server_path_cpu_ms_per_image": statistics.median(cpu_srv),
                "server_requests_per_forward": reqs / max(1, after["batches"] - before["batches"]),
            }
            rows.append(row)
            print(_row_line(row), flush=True)
    server_info = client.info()
    client.shutdown()
    return {
        "bench": "reward_server",
        "path": "score_and_grad",
        "reward": spec,
        "seed": args.seed,
        "image_size": args.image_size,
        "cpus": cpus,
        "torch_threads": torch.get_num_threads(),
        "server": {
            "max_batch_size": cfg.max_batch_size,
            "batch_wait_ms": cfg.batch_wait_ms,
            "forward_threads": server_info["forward_threads"],
            "torch_threads": server_info["torch_threads"],
            "num_cpus": cpus,
        },
        "repeats": args.repeats,
        "server_startup_s": startup_s,
        "rows": rows,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": sys.version.split()[0],
    }


def _row_line(r: dict) -> str:
    i, s, q = r["inproc_images_per_s"], r["server_images_per_s"], r["ratio"]
    return (
        f"| {r['batch']} | {r['callers']} | {i['median']:.0f} ({i['min']:.0f}-{i['max']:.0f}) "
        f"| {s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f}) "
        f"| {q['median']:.2f} ({q['min']:.2f}-{q['max']:.2f}) "
        f"| {r['server_requests_per_forward']:.2f} | {r['server_busy_fraction']:.2f} "
        f"| {r['inproc_cpu_ms_per_image']:.2f} / {r['server_path_cpu_ms_per_image']:.2f} |"
    )


TABLE_HEADER = (
    "| batch | callers | in-process img/s median (min-max) | server img/s median (min-max) "
    "| ratio server/in-process median (min-max) | requests per forward | server busy "
    "| CPU ms/img in-process / server path |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- |"
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--short", action="store_true", help="a quick run that checks it works")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--reward", default="ict", help="a built-in reward, tiny backbone")
    ap.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--callers", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--images", type=int, help="images per caller-cell and repeat (at least)")
    ap.add_argument("--min-calls", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--batch-wait-ms", type=float, default=0.0)
    ap.add_argument("--forward-threads", type=int, default=0, help="0: the server's default")
    ap.add_argument("--cpus", type=int, help="torch threads here and the server's num_cpus")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.batches = args.batches or ([16] if args.short else [1, 4, 16, 64])
    args.callers = args.callers or ([1, 4] if args.short else [1, 4])
    args.repeats = args.repeats or (2 if args.short else 5)
    args.images = args.images or (32 if args.short else 128)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "randomly initialised" notes

    print(TABLE_HEADER, flush=True)
    out = run(args)
    out["command"] = "python -m bench.reward_server " + " ".join(argv or sys.argv[1:])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
