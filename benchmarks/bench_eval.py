"""Evaluation at scale: ITC ranking on Ray eval actors + every metric, from precomputed embeddings.

    .venv/bin/python benchmarks/bench_eval.py [--sizes 2000,20000,100000] [--actors 1,2]
                                              [--languages 10] [--dim 256] [--json OUT]

For each gallery size G and actor count A, a fresh child process starts Ray (num_cpus = 2), makes
G random-but-structured 256-d image embeddings (clustered) and G×10 caption embeddings (the image
plus language-dependent noise, so recall differs by language and is neither 0 nor 100%), then
times ``rank_on_actors`` (object-store put, actor start, sharded ranking) and the report (R@k,
MedR, MeanR, mAP, SumR, MRV, rank correlation, rank spread), and each actor's CPU seconds (what
the wall time would be on otherwise idle cores). Memory: the peak of the summed PSS
(proportional set size: shared object-store pages counted once) of the child and all its
descendants (Ray's raylet, GCS and the eval actors), sampled every second (reading smaps is not
free: at 0.2 s the sampler took a fifth of a core), and its rise
over the value just before the embeddings were made; also the driver's and each actor's peak RSS.

At G = 2,000 (``--compare-at``) a straightforward implementation (full score matrix per language, per-row
argsort as in the original CCRK/X-VLM code) runs in the same child on the same embeddings, in
float32 as the original and in float64: the metrics must be identical to the float64 one (ranks
here follow exact scores; float32 can misorder candidates within rounding of the true score, and
the number of ranks that differ is printed). The speed ratio is printed; both run single-threaded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")     # before numpy: one BLAS thread per process

import numpy as np

GIB = 1 << 30


def structured_embeddings(g: int, k: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm images around g/20 cluster centres; caption (i, l) = image i + noise of a
    language-dependent size, renormalised. float32 throughout (no float64 copies of G×K×d)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, g // 20), d), dtype=np.float32)
    img = centres[rng.integers(0, len(centres), g)] + 1.2 * rng.standard_normal((g, d), dtype=np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = np.empty((g, k, d), dtype=np.float32)
    for lang, sigma in enumerate(np.linspace(0.15, 0.45, k)):
        noise = rng.standard_normal((g, d), dtype=np.float32)
        noise *= sigma
        txt[:, lang] = img + noise
        txt[:, lang] /= np.linalg.norm(txt[:, lang], axis=1, keepdims=True)
    return img, txt


class PssSampler:
    """Peak of the summed PSS of this process and its descendants, sampled in a thread."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _tree() -> list[int]:
        parent: dict[int, int] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        tree, frontier = [os.getpid()], [os.getpid()]
        while frontier:
            frontier = [p for p, pp in parent.items() if pp in frontier]
            tree += frontier
        return tree

    @classmethod
    def now(cls, pids: list[int] | None = None) -> int:
        total = 0
        for pid in pids if pids is not None else cls._tree():
            try:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    for line in f:
                        if line.startswith("Pss:"):
                            total += int(line.split()[1]) * 1024
                            break
            except OSError:
                pass
        return total

    def _run(self):
        tree, listed, samples = [], 0.0, 0
        while not self._stop.is_set():
            samples += 1                                  # listing every process is the costly part:
            if samples <= 10 or time.monotonic() - listed > 10:  # each second at first, then every 10 s
                tree, listed = self._tree(), time.monotonic()
            self.peak = max(self.peak, self.now(tree))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def full_report(t2i: np.ndarray, i2t: np.ndarray, langs: list[str]) -> dict:
    from ccrk_ray.eval.report import build_report, language_rank_correlation, rank_spread

    report = build_report(t2i, i2t, langs)
    report["rank_correlation"] = {d: language_rank_correlation(r) for d, r in (("t2i", t2i), ("i2t", i2t))}
    report["rank_spread_mean"] = {d: float(rank_spread(r).mean()) for d, r in (("t2i", t2i), ("i2t", i2t))}
    return report


def straightforward_ranks(img: np.ndarray, txt: np.ndarray, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The original code's way: the whole score matrix, then an argsort of every row."""
    img, txt = img.astype(dtype), txt.astype(dtype)
    n, k = txt.shape[:2]
    t2i, i2t = np.empty((n, k), dtype=np.int64), np.empty((n, k), dtype=np.int64)
    for lang in range(k):
        scores = txt[:, lang] @ img.T
        for i in range(n):
            t2i[i, lang] = np.where(np.argsort(scores[i])[::-1] == i)[0][0]
        scores_i2t = img @ txt[:, lang].T
        for i in range(n):
            i2t[i, lang] = np.where(np.argsort(scores_i2t[i])[::-1] == i)[0][0]
    return t2i, i2t


def run_one(g: int, actors: int, k: int, d: int, compare: bool) -> dict:
    import ray

    from ccrk_ray.eval.actors import rank_on_actors
    from ccrk_ray.eval.retrieval import rank_sharded
    from ccrk_ray.core.languages import CCRK_LANGUAGES

    langs = list(CCRK_LANGUAGES[:k]) if k <= len(CCRK_LANGUAGES) else [f"l{j}" for j in range(k)]
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False,
             object_store_memory=max(256 << 20, int(2.5 * g * (k + 1) * d * 4)))
    time.sleep(1.0)
    baseline = PssSampler.now()
    out: dict = {"G": g, "actors": actors, "languages": k, "dim": d, "baseline_pss_gib": baseline / GIB}
    with PssSampler() as mem:
        t0 = time.perf_counter()
        img, txt = structured_embeddings(g, k, d)
        out["make_embeddings_s"] = time.perf_counter() - t0
        stats: dict = {}
        t0 = time.perf_counter()
        t2i, i2t = rank_on_actors(img, txt, languages=langs, num_actors=actors, stats=stats).matrices()
        out["rank_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = full_report(t2i, i2t, langs)
        out["metrics_s"] = time.perf_counter() - t0
    out["rank_and_metrics_s"] = out["rank_s"] + out["metrics_s"]
    out["tasks"] = len(stats["tasks"])
    out["peak_pss_gib"] = mem.peak / GIB
    out["peak_pss_rise_gib"] = (mem.peak - baseline) / GIB
    out["driver_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    out["actor_peak_rss_gib"] = [b / GIB for b in stats["actor_peak_rss_bytes"]]
    out["actor_cpu_s"] = stats["actor_cpu_seconds"]
    out["mean_R@1"] = {dd: report["mean"][dd]["R@1"] for dd in ("t2i", "i2t")}
    out["R@1_range_t2i"] = [min(m["t2i"]["R@1"] for m in report["languages"].values()),
                            max(m["t2i"]["R@1"] for m in report["languages"].values())]
    out["mrv"] = report["mrv"]
    if compare:
        t0 = time.perf_counter()
        fast = rank_sharded(img, txt, languages=langs).matrices()
        out["sharded_in_process_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        slow = straightforward_ranks(img, txt)
        out["straightforward_s"] = time.perf_counter() - t0
        mine = full_report(*fast, langs)
        for name, ranks in (("float32", slow), ("float64", straightforward_ranks(img, txt, np.float64))):
            ref = full_report(*ranks, langs)
            out[f"straightforward_{name}_equal_metrics"] = (ref["languages"] == mine["languages"]
                                                            and ref["mrv"] == mine["mrv"] and ref["mean"] == mine["mean"])
            out[f"straightforward_{name}_rank_differences"] = int((ranks[0] != fast[0]).sum() + (ranks[1] != fast[1]).sum())
        out["actors_equal_in_process"] = bool((fast[0] == t2i).all() and (fast[1] == i2t).all())
        out["speedup_vs_straightforward"] = out["straightforward_s"] / out["sharded_in_process_s"]
    ray.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2000,20000,100000")
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--languages", type=int, default=10)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--compare-at", type=int, default=2000,
                    help="gallery size of the straightforward comparison (it holds full G×G matrices)")
    ap.add_argument("--one", nargs=2, type=int, metavar=("G", "ACTORS"), help=argparse.SUPPRESS)
    ap.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(*args.one, args.languages, args.dim, args.compare)), flush=True)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    actor_counts = [int(x) for x in args.actors.split(",")]
    results = []
    for g in sizes:
        for a in actor_counts:
            cmd = [sys.executable, __file__, "--one", str(g), str(a), "--languages", str(args.languages),
                   "--dim", str(args.dim)] + (["--compare"] if g == args.compare_at and a == min(actor_counts) else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"G={g}, {a} actor(s) failed:\n{proc.stderr[-3000:]}")
            r = json.loads(lines[-1][len("RESULT "):])
            results.append(r)
            print(f"G={g:>7} actors={a}  rank {r['rank_s']:7.1f} s (actor CPU "
                  f"{', '.join(f'{x:.1f}' for x in r['actor_cpu_s'])} s)  metrics {r['metrics_s']:5.2f} s  "
                  f"peak PSS {r['peak_pss_gib']:.2f} GiB (+{r['peak_pss_rise_gib']:.2f} over Ray idle)  "
                  f"driver RSS {r['driver_peak_rss_gib']:.2f}  actor RSS "
                  f"{', '.join(f'{x:.2f}' for x in r['actor_peak_rss_gib'])} GiB  "
                  f"mean R@1 t2i {r['mean_R@1']['t2i']:.1f} (langs {r['R@1_range_t2i'][0]:.1f}-"
                  f"{r['R@1_range_t2i'][1]:.1f})  MRV t2i {r['mrv']['t2i']:.2f}", flush=True)
            if "straightforward_s" in r:
                print(f"  straightforward (full float32 matrix + argsort per row) {r['straightforward_s']:.1f} s vs "
                      f"sharded {r['sharded_in_process_s']:.2f} s, one thread each: "
                      f"{r['speedup_vs_straightforward']:.1f}x; identical metrics: float32 "
                      f"{r['straightforward_float32_equal_metrics']} ({r['straightforward_float32_rank_differences']} "
                      f"ranks differ), float64 {r['straightforward_float64_equal_metrics']} "
                      f"({r['straightforward_float64_rank_differences']} differ); actors == in-process: "
                      f"{r['actors_equal_in_process']}", flush=True)
    for g in sizes:
        one = [r for r in results if r["G"] == g and r["actors"] == 1]
        two = [r for r in results if r["G"] == g and r["actors"] == 2]
        if one and two:
            print(f"G={g}: 2 actors {one[0]['rank_s'] / two[0]['rank_s']:.2f}x faster than 1 (ranking)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
