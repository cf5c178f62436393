"""A bounded load test of ``tracin-index serve`` (issue [5/5] item 4), and the explorer's screenshot.

Run from the repository root, after ``tracin-index demo`` (defaults: its index)::

    python benchmarks/serve_load.py --index tracin-demo/index

Starts ``tracin-index serve INDEX`` on 127.0.0.1 (a free port) in a subprocess, waits for
``/api/health``, warms it up, then runs ``--clients`` (8) concurrent clients for ``--seconds`` (60),
each sending ``GET /api/query`` for the run's test triples in turn (top 10, tail direction) and
timing every response; it stops by itself and stops the server. Reports p50 / p99 latency, requests
per second, errors (any non-200 response or failed request: must be 0), and the server's resident
memory (``/proc/PID/status``) after the warm-up and at the end. With ``--screenshot PATH`` it first
opens the explorer in headless Chromium (Playwright pointed at Debian's ``chromium``), explains the
first test triple and saves the page.

Writes ``benchmarks/results/serve_load.json`` and the summary keys ``serve_p50_ms``, ``serve_p99_ms``,
``serve_errors``, ``serve_rss_growth_mb``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_counters, foreign_cores, update_summary, write_results  # noqa: E402

NAME = "serve_load"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def screenshot(url: str, triple: dict, path: Path) -> None:
    from playwright.sync_api import sync_playwright

    browser_path = os.environ.get("TRACIN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1700, "height": 900})
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('health').textContent.includes('training facts')")
        for field in ("head", "relation", "tail"):
            page.fill(f"#{field}", triple[field])
        page.click("#explain-button")
        page.wait_for_selector("#chart .bar")
        page.screenshot(path=str(path))
        browser.close()


def report(figures: dict, label: str) -> None:
    print(f"{label}: {figures['requests']} requests in {figures['wall_s']:.0f} s ({figures['requests_per_s']:.1f}/s): "
          f"p50 {figures['serve_p50_ms']:.0f} ms, p99 {figures['serve_p99_ms']:.0f} ms, {figures['serve_errors']} errors; "
          f"server RSS {figures['server_rss_mb_before']:.0f} -> {figures['server_rss_mb_after']:.0f} MB", flush=True)


def load_test(args, batching: bool, shot: Path | None) -> tuple[dict, float]:
    """One server, ``args.clients`` clients for ``args.seconds``: the figures, and the cores other processes used."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([shutil.which("tracin-index") or "tracin-index", "serve", str(args.index), "--port", str(port),
                               "--batching" if batching else "--no-batching"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        started = time.perf_counter()
        while True:
            try:
                if httpx.get(url + "/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.perf_counter() - started > 120:
                raise SystemExit(f"the server did not start:\n{server.stdout.read() if server.stdout else ''}")
            time.sleep(0.2)
        startup_s = time.perf_counter() - started
        tests = httpx.get(url + "/api/test-triples", params={"limit": 200}).json()
        if not tests:
            raise SystemExit("the index's run has no test triples to query")
        for t in tests[:5]:  # warm-up
            httpx.get(url + "/api/query", params=t, timeout=60)
        if shot is not None:
            screenshot(url, tests[0], shot)
        rss_before = rss_mb(server.pid)
        counters = cpu_counters()
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        deadline = time.perf_counter() + args.seconds

        def client(k: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                i = k
                while time.perf_counter() < deadline:
                    t = tests[i % len(tests)]
                    i += args.clients
                    start = time.perf_counter()
                    try:
                        response = http.get("/api/query", params={**t, "top_k": 10})
                        ok = response.status_code == 200 and len(response.json()["results"]) == 1
                        problem = None if ok else f"{response.status_code}: {response.text[:200]}"
                    except httpx.HTTPError as error:
                        problem = f"{type(error).__name__}: {error}"
                    elapsed = 1000 * (time.perf_counter() - start)
                    with lock:
                        latencies.append(elapsed)
                        if problem:
                            errors.append(problem)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        rss_after = rss_mb(server.pid)
        others = foreign_cores(counters, cpu_counters())
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    ordered = sorted(latencies)
    figures = {
        "serve_p50_ms": statistics.median(ordered),
        "serve_p99_ms": ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))],
        "serve_errors": len(errors),
        "serve_rss_growth_mb": rss_after - rss_before,
        "requests": len(ordered),
        "requests_per_s": len(ordered) / wall,
        "server_rss_mb_before": rss_before,
        "server_rss_mb_after": rss_after,
        "server_startup_s": startup_s,
        "first_errors": errors[:5],
        "wall_s": wall,
    }
    return figures, others


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=Path, default=Path("tracin-demo/index"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--screenshot", type=Path, default=None, help="save the explorer's page here first")
    parser.add_argument("--no-summary", action="store_true")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="skip the second run without batching (--no-batching)")
    args = parser.parse_args()
    figures, others = load_test(args, True, args.screenshot)
    report(figures, "batching")
    plain, plain_others = load_test(args, False, None) if args.compare else (None, None)
    if plain is not None:
        report(plain, "no batching")
        figures["serve_batch_throughput_speedup"] = figures["requests_per_s"] / plain["requests_per_s"]
        print(f"batching: {figures['serve_batch_throughput_speedup']:.2f}x the requests per second", flush=True)
    data = {"protocol": {"index": str(args.index), "clients": args.clients, "seconds": args.seconds,
                         "request": "GET /api/query?head&relation&tail&top_k=10 over the run's test triples in turn",
                         "server": "tracin-index serve, 127.0.0.1, one query at a time, requests that arrive "
                                   "meanwhile batched (the no_batching run: --no-batching, right after, same load)"},
            "figures": figures, "no_batching": plain, "other_processes_cores_during_run": others,
            "other_processes_cores_no_batching": plain_others}  # fmt: skip
    path = write_results(NAME, data)
    if not args.no_summary:
        update_summary({k: round(figures[k], 2) if isinstance(figures[k], float) else figures[k]
                        for k in ("serve_p50_ms", "serve_p99_ms", "serve_errors", "serve_rss_growth_mb", "serve_batch_throughput_speedup")
                        if k in figures})  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
