"""`make bench`, flash section: writing a node image of Bookworm Lite's size (2.75 GB,
1.9 GB of data) to loop devices over fresh sparse files, as a new card would be.

In one run, alternating: `dd bs=4M conv=fsync` of the whole image, `bmaptool copy`
with pibake's block map, and `pibake flash`; then one key is added to the profile,
the node is rebuilt, and `pibake flash` writes the same card again. Bytes written are
each device's own count (/sys/block/loopN/stat), times are wall clock to the end of
the flush. On a real card its write speed (10-90 MB/s) is the limit, so bytes
written is the figure that carries over, more than the times measured here.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bake import Bench, base_image  # noqa: E402
from flash_devices import Loops  # noqa: E402


def _timed(command: list[str], loop, **kwargs) -> dict:
    before = loop.sectors_written()
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    seconds = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    return {"seconds": seconds, "bytes": (loop.sectors_written() - before) * 512}


def bench_flash(work: Path, runs: int) -> dict:
    bench = Bench(work)
    folder = work / "flash-devices"
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.mkdir(parents=True)
    loops = Loops(folder)
    try:
        base = base_image(work, "realistic")
        bench.warm(base)
        bench.clean()
        project = bench.project(2)
        build = [sys.executable, "-m", "builder", "build", "cluster", "--image", str(base), "-q"]
        subprocess.run(build, cwd=project, env=bench.env, check=True)
        image = project / "output/worker1.img"
        size = image.stat().st_size
        card = size + (64 << 20)
        results: dict[str, list[dict]] = {"dd": [], "bmaptool": [], "pibake": []}
        for _ in range(runs):
            for tool in results:
                loop = loops.make(card)
                command = {
                    "dd": ["dd", f"if={image}", f"of={loop.device}", "bs=4M", "conv=fsync", "status=none"],
                    "bmaptool": ["bmaptool", "-q", "copy", str(image), loop.device],
                    "pibake": [sys.executable, "-m", "builder", "flash", "worker1", loop.device, "--yes", "--force", "-q"],
                }[tool]
                results[tool].append(_timed(command, loop, cwd=project, env=bench.env))
                subprocess.run(["losetup", "--detach", loop.device], check=True)
                loops.made.remove(loop)
                loop.backing.unlink()
        # The card pibake flashed last time, rebuilt with one more key and flashed again.
        loop = loops.make(card)
        flash = [sys.executable, "-m", "builder", "flash", "worker1", loop.device, "--yes", "--force", "-q"]
        subprocess.run(flash, cwd=project, env=bench.env, check=True, capture_output=True)
        second = work / "operator" / "second"
        if not second.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(second)], check=True)
        profile = project / "profiles/cluster.yaml"
        profile.write_text(profile.read_text().replace("ssh_keys: [", f"ssh_keys: [{second}.pub, "))
        subprocess.run(build, cwd=project, env=bench.env, check=True)
        again = _timed(flash, loop, cwd=project, env=bench.env)
    finally:
        loops.close()
        bench.close()
    medians = {tool: {"seconds": statistics.median(r["seconds"] for r in rs), "bytes": statistics.median(r["bytes"] for r in rs)}
               for tool, rs in results.items()}
    return {"image_bytes": size, "runs": runs, "results": results, "medians": medians, "reflash": again,
            "pibake_over_bmaptool_bytes": medians["pibake"]["bytes"] / medians["bmaptool"]["bytes"],
            "pibake_over_bmaptool_seconds": medians["pibake"]["seconds"] / medians["bmaptool"]["seconds"],
            "reflash_over_dd_bytes": again["bytes"] / medians["dd"]["bytes"]}


def print_flash(flash: dict, met) -> None:
    print(f"{'flash (2.75 GB image, loop devices)':<40}{'seconds':>9}{'MB written':>12}")
    for tool, m in flash["medians"].items():
        print(f"  {tool:<38}{m['seconds']:>9.1f}{m['bytes'] / 1e6:>12.1f}")
    r = flash["reflash"]
    print(f"  {'pibake flash again, one key added':<38}{r['seconds']:>9.1f}{r['bytes'] / 1e6:>12.1f}")
    print(f"  pibake/bmaptool bytes {flash['pibake_over_bmaptool_bytes']:.3f} (target <= 1: "
          f"{met(flash['pibake_over_bmaptool_bytes'] <= 1)}); time {flash['pibake_over_bmaptool_seconds']:.2f} "
          f"(target <= 1.1: {met(flash['pibake_over_bmaptool_seconds'] <= 1.1)})")
    print(f"  re-flash after one key / dd bytes: {100 * flash['reflash_over_dd_bytes']:.3f}% (target < 1%: "
          f"{met(flash['reflash_over_dd_bytes'] < 0.01)})")
    print("  on a real card its write speed (10-90 MB/s) is the limit: bytes written is the figure that carries over")
