"""RewardServer throughput against calling the same reward in-process, per transport.

Every side scores the same tiny reward (same seed, so the same weights) on the same images, in
one run, through the DRaFT-K path: scores and ``d(weight * sum(scores)) / d(images)``.

- ``inproc``: ``callers`` threads each call the colocated reward handle
  (:class:`rewards.handles.LocalReward`, what a generator worker runs for ``placement:
  colocated``);
- ``object_store`` / ``gloo``: ``callers`` threads each call
  :meth:`RewardClient.score_and_grad` on one server of that ``reward_server.transport``, which
  batches what arrives together.

All sides run inside one caller actor (declared with ``enable_tensor_transport=True``, as the
direct transport needs; see :mod:`actors.direct_transport`) on the same torch threads. Each
cell is ``callers x calls`` requests of ``batch`` images of ``size`` px; throughput is images/s
over the cell's wall time. Repeats alternate the sides; each server's ratio to in-process is
taken per repeat, then min/median/max. Each server gets as many CPUs as the caller uses torch
threads, so every side has the same cores (only one side runs at a time).

    python -m bench.reward_server [--short] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

import torch

from bench.common import stats


def _images(batch: int, size: int, seed: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=g).to(device)
    return x, [f"a photo of object {seed}-{i}" for i in range(batch)]


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


class BenchCaller:
    """The calling side of every cell (a Ray actor): the reward in-process, and the clients."""

    def __init__(self, spec: dict, seed: int, cpus: int, device: str = "cpu"):
        from rewards.handles import build_handles
        from rewards.registry import RewardSpec

        torch.set_num_threads(cpus)
        self.device = device
        # Built as a worker builds a colocated reward: same seed, so the servers' weights.
        self.local = build_handles([RewardSpec.from_dict(spec)], {}, device, seed=seed)[0]

    def check(self, clients: dict, size: int) -> None:
        """Same answers on every side, or the comparison means nothing."""
        x, p = _images(4, size, 0, self.device)
        s_ref, g_ref = self.local.score_and_grad(x, p, 1.0)
        for client in clients.values():
            s, g = client.score_and_grad(x, p, 1.0)
            torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)

    def cell(self, clients: dict, size: int, batch: int, callers: int, calls: int, repeats: int):
        """Images/s per side and repeat: ``{"inproc": [...], transport: [...]}``."""
        inputs = [_images(batch, size, 100 + c, self.device) for c in range(callers)]
        sides = {"inproc": self.local, **clients}
        n_images = callers * calls * batch
        for h in sides.values():  # warm-up: one call per caller
            _run_threads(lambda x, p, h=h: h.score_and_grad(x, p, 1.0), inputs, 1)
        out = {name: [] for name in sides}
        for _ in range(repeats):
            for name, h in sides.items():
                wall = _run_threads(lambda x, p, h=h: h.score_and_grad(x, p, 1.0), inputs, calls)
                out[name].append(n_images / wall)
        return out


def run(args) -> dict:
    import ray

    from actors.reward_client import RewardClient
    from rlhf.resources import ActorResources
    from rlhf.run_config import ServerConfig

    cpus = args.cpus or os.cpu_count() or 1
    spec = {"name": args.reward, "options": {"backbone": "tiny"}}
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        # address="local": a fresh Ray for this run, never a cluster already up on the machine.
        # Logical CPUs for the caller and each server: only one side computes at a time.
        ray.init(
            address="local",
            num_cpus=cpus * (1 + len(args.transports)),
            num_gpus=1 if args.gpu else 0,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
        )
    # --gpu: the caller and every server on a share of one GPU, images and gradients on it.
    gpu_share = 1 / (1 + len(args.transports)) if args.gpu else 0
    clients, t0 = {}, time.perf_counter()
    for transport in args.transports:
        cfg = ServerConfig(
            resources=ActorResources(num_cpus=cpus, num_gpus=gpu_share),
            max_batch_size=args.max_batch_size,
            batch_wait_ms=args.batch_wait_ms,
            forward_threads=args.forward_threads,
            transport=transport,
        )
        clients[transport] = RewardClient(spec, cfg, seed=args.seed).start()
    startup_s = time.perf_counter() - t0
    caller_cls = ray.remote(enable_tensor_transport=True)(BenchCaller)
    caller = caller_cls.options(num_cpus=cpus, num_gpus=gpu_share).remote(
        spec, args.seed, cpus, "cuda" if args.gpu else "cpu"
    )

    rows = []
    for size in args.image_sizes:
        ray.get(caller.check.remote(clients, size))
        # Fewer images per repeat at large sizes: a 1024 px image is 256x a 64 px one.
        images = max(1, args.images * 64 // size)
        repeats = args.repeats if size <= 256 else max(1, args.repeats // 2)
        for callers in args.callers:
            for batch in args.batches:
                calls = max(args.min_calls, -(-images // (batch * callers)))
                before = {t: c.info() for t, c in clients.items()}
                per_side = ray.get(
                    caller.cell.remote(clients, size, batch, callers, calls, repeats)
                )
                row = {
                    "size": size,
                    "batch": batch,
                    "callers": callers,
                    "calls_per_caller": calls,
                    "images_per_repeat": callers * calls * batch,
                    "repeats": repeats,
                    "images_per_s": {k: stats(v) for k, v in per_side.items()},
                    "ratio": {
                        t: stats([s / i for s, i in zip(per_side[t], per_side["inproc"])])
                        for t in clients
                    },
                    "requests_per_forward": {},
                }
                for t, c in clients.items():
                    after = c.info()
                    reqs = after["requests"] - before[t]["requests"]
                    forwards = max(1, after["batches"] - before[t]["batches"])
                    row["requests_per_forward"][t] = reqs / forwards
                rows.append(row)
                print(_row_line(row, list(clients)), flush=True)
    infos = {t: c.info() for t, c in clients.items()}
    ray.kill(caller)
    for c in clients.values():
        c.shutdown()
    return {
        "bench": "reward_server",
        "path": "score_and_grad",
        "reward": spec,
        "seed": args.seed,
        "transports": list(clients),
        "cpus": cpus,
        "gpu": torch.cuda.get_device_name() if args.gpu else None,
        "server": {
            "max_batch_size": args.max_batch_size,
            "batch_wait_ms": args.batch_wait_ms,
            "forward_threads": {t: i["forward_threads"] for t, i in infos.items()},
            "torch_threads": {t: i["torch_threads"] for t, i in infos.items()},
            "num_cpus": cpus,
        },
        "servers_startup_s": startup_s,
        "rows": rows,
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": sys.version.split()[0],
    }


def _fmt(s: dict, digits: int = 0) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def _row_line(r: dict, transports: list[str]) -> str:
    cells = [str(r["size"]), str(r["batch"]), str(r["callers"])]
    cells.append(_fmt(r["images_per_s"]["inproc"]))
    for t in transports:
        cells.append(_fmt(r["images_per_s"][t]))
        cells.append(_fmt(r["ratio"][t], 2))
    return "| " + " | ".join(cells) + " |"


def table_header(transports: list[str]) -> str:
    head = ["px", "batch", "callers", "in-process img/s"]
    for t in transports:
        head += [f"{t} img/s", f"{t} / in-process"]
    return "| " + " | ".join(head) + " |\n" + "|" + " --- |" * len(head)


def main(argv=None) -> int:
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--short", action="store_true", help="a quick run that checks it works")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--reward", default="ict", help="a built-in reward, tiny backbone")
    ap.add_argument("--transports", type=lambda s: s.split(","), default=None)
    ap.add_argument("--batches", type=ints)
    ap.add_argument("--image-sizes", type=ints)
    ap.add_argument("--callers", type=ints)
    ap.add_argument("--repeats", type=int, help="repeats per cell (halved above 256 px)")
    ap.add_argument("--images", type=int, help="images per cell and repeat at 64 px (at least)")
    ap.add_argument("--min-calls", type=int, default=2)
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--batch-wait-ms", type=float, default=0.0)
    ap.add_argument("--forward-threads", type=int, default=0, help="0: the server's default")
    ap.add_argument("--cpus", type=int, help="torch threads of the caller, num_cpus per server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpu", action="store_true", help="caller and servers share one CUDA GPU")
    args = ap.parse_args(argv)
    args.transports = args.transports or ["object_store", "gloo"]
    args.batches = args.batches or ([16] if args.short else [1, 4, 16, 64])
    args.image_sizes = args.image_sizes or ([64] if args.short else [64, 256, 1024])
    args.callers = args.callers or [1]
    args.repeats = args.repeats or (2 if args.short else 4)
    args.images = args.images or (32 if args.short else 128)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "randomly initialised" notes

    print(table_header(args.transports), flush=True)
    out = run(args)
    out["command"] = "python -m bench.reward_server " + " ".join(argv or sys.argv[1:])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
