"""Shared pieces of the benchmarks: building a big image with umoci, timing.

Each benchmark runs ckfs and a named peer on the same input in one run and
prints the ratio; nothing here asserts a time (machines are noisy).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".bench"

#: The proxy snapshotter's name in containerd's config, as the docs and the
#: integration tests name it: what ``ctr --snapshotter`` takes.
PROXY = "ckfs"


def ckfs_cmd(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ckfs_cli.main", "--root", str(root), *args]


def ckfs_client_cmd(address: str, *args: str) -> list[str]:
    """The ckfs command line of a client of the ckfsd at *address*."""
    return [sys.executable, "-m", "ckfs_cli.main", "--address", address, *args]


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def skopeo_copy(src: str, dst: str) -> None:
    """``skopeo copy`` as every benchmark runs it: quiet, no policy, plain HTTP allowed."""
    flags = ["--src-tls-verify=false"] if src.startswith("docker://") else []
    run(["skopeo", "--insecure-policy", "copy", "-q", *flags, src, dst])


def timed(setup: Callable[[], None], body: Callable[[], None], repeat: int = 3) -> float:
    """Median wall time of *body* over *repeat* runs, *setup* before each."""
    return timed_turns({"": (setup, body)}, repeat)[""]


def timed_turns(
    cases: dict[str, tuple[Callable[[], None], Callable[[], None]]], repeat: int = 3
) -> dict[str, float]:
    """Median wall time of each case's body, *setup* before each; the cases take turns.

    Taking turns spreads a shared machine's changing load over every case
    alike, where one case's runs after the other's would each meet a
    different load.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, (setup, body) in cases.items():
            setup()
            t0 = time.perf_counter()
            body()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def big_layout(
    mib: int = 260, layers: int = 4, files_per_layer: int = 2500, *, runnable: bool = False
) -> Path:
    """A multi-layer OCI layout of about *mib* MiB, built once with umoci and cached.

    Three quarters of each layer is random bytes (incompressible, like
    binaries), a quarter text (compressible, like sources and configs), spread
    over many files, so the compressed layout stays above 200 MB. With
    *runnable*, the data layers sit on the example image
    (``scripts/example-image.sh``: busybox-static, ``/bin/true``), so a
    runtime can start a container on it.
    """
    base = "busybox-" if runnable else ""
    name = f"layout-{base}{mib}m-{layers}l-{files_per_layer}f"
    out = CACHE / name
    if (out / "index.json").exists():
        return out
    CACHE.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE))
    rng = random.Random(1234)
    words = [f"word{i}" for i in range(5000)]
    per_layer = mib * (1 << 20) // layers
    try:
        layout = tmp / "layout"
        if runnable:
            run(["bash", str(REPO / "scripts" / "example-image.sh"), str(layout)])
        else:
            run(["umoci", "init", "--layout", str(layout)])
            run(["umoci", "new", "--image", f"{layout}:latest"])
        for n in range(layers):
            src = tmp / f"l{n}"
            per_file = per_layer // files_per_layer
            for i in range(files_per_layer):
                d = src / f"data{n}" / f"d{i % 50}"
                d.mkdir(parents=True, exist_ok=True)
                if i % 4:
                    data = rng.randbytes(per_file)
                else:
                    text = " ".join(rng.choices(words, k=per_file // 6))
                    data = text.encode()[:per_file]
                (d / f"f{i}").write_bytes(data)
            run(["umoci", "insert", "--image", f"{layout}:latest", str(src), "/"])
            shutil.rmtree(src)
        os.rename(layout, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def example_layout() -> Path:
    """The README's small example image (``scripts/example-image.sh``), built once and cached.

    What the benchmarks warm a daemon with before timing: a pull of it
    imports and connects what any pull needs, and shares no blob with
    `big_layout`'s data layers.
    """
    out = CACHE / "layout-example"
    if not (out / "index.json").exists():
        CACHE.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CACHE))
        try:
            run(["bash", str(REPO / "scripts" / "example-image.sh"), str(tmp / "layout")])
            os.rename(tmp / "layout", out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def layout_size(layout: Path) -> int:
    return sum(p.stat().st_size for p in (layout / "blobs").rglob("*") if p.is_file())


def bench_args(doc: str | None) -> argparse.Namespace:
    """The options every benchmark takes: image size and repetitions."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=260, help="image size before compression")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs; the median is shown")
    return ap.parse_args()


def report(title: str, rows: list[tuple[str, float]], target: str) -> None:
    """Print times and the ratio of the first row to each other row."""
    print(title)
    base = rows[0][1]
    for label, t in rows:
        print(f"  {label:<40} {t:8.3f} s")
    for label, t in rows[1:]:
        print(f"  ratio ckfs / {label:<27} {base / t:8.2f}x")
    print(f"  target: {target}")


@contextlib.contextmanager
def containerd(work: Path, proxy: str = "", name: str = PROXY) -> Iterator[Path]:
    """Debian's containerd on a private root, state and socket; yields the socket.

    A minimal config: no CRI plugin (it would start a network and image
    service nobody asks for here), logs only errors. With *proxy* (a ckfsd
    socket path), ckfsd serves the snapshotter ``ckfs`` through
    ``[proxy_plugins.ckfs]``, beside containerd's own (*name* renames it:
    another remote snapshotter on that socket). The daemon is stopped
    by its PID when the block ends.
    """
    work.mkdir(parents=True, exist_ok=True)
    sock = work / "containerd.sock"
    config = work / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{work / "root"}"\n'
        f'state = "{work / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{sock}"\n'
        f'[ttrpc]\n  address = "{sock}.ttrpc"\n'
        '[debug]\n  level = "error"\n'
        + (
            f"[proxy_plugins]\n  [proxy_plugins.{name}]\n"
            f'    type = "snapshot"\n    address = "{proxy}"\n'
            if proxy
            else ""
        )
    )
    log = open(work / "containerd.log", "ab")  # noqa: SIM115 (handed to the child)
    proc = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=log)
    log.close()
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(
            ["ctr", "--address", str(sock), "version"], capture_output=True
        ).returncode:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start; see {work / 'containerd.log'}")
            time.sleep(0.1)
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def import_seconds(module: str, repeat: int = 5) -> float:
    """Median wall time of ``python -c 'import MODULE'`` (``pass`` for bare start-up)."""
    code = "pass" if not module else f"import {module}"
    return timed(lambda: None, lambda: run([sys.executable, "-c", code]), repeat)
