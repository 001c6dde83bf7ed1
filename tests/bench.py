"""`make bench`: pibake's costs against the floor of doing the same work by hand.

Fetch section: fetch + verify + decompress a Bookworm-Lite-sized fixture (about
500 MB compressed, 2.7 GB decompressed) from a loopback server, against
`curl URL | tee file.xz | xz -dc -T0 > file.img` plus hashing both files (with
sha256sum, and with openssl, which is faster here),
the same bytes through the same server, runs alternating, medians compared.
pibake does more than the floor (it also checks an OpenPGP signature).

Bake section (tests/bench_bake.py): `pibake build cluster` against the copy
floor and against one appliance launch per image, at N = 6 on a base the size of
Bookworm Lite and N = 50 on a small one, and a rebuild after one worker changes.

Plan section: the memory the plans of a cluster hold (tracemalloc, in this process),
at N = 25, 125 and 250 workers; it must grow in proportion to N, not N squared.

Flash section (tests/bench_flash.py): dd, bmaptool and `pibake flash` writing a
Bookworm-Lite-sized node image to loop devices, and a re-flash after one key is added.

Backup section (tests/bench_backup.py): `pibake backup` of a node holding about 2 GB over ssh,
against tar over the same ssh and dd of the card; the next backup after a 10 MB change; and
an offline backup of the card in a reader, bytes read against bytes used.

`python tests/bench.py [fetch] [bake] [plan] [flash] [backup]` runs those sections; all by default. Prints a
table and writes the figures to output/bench/fetch.json and bake.json.
PIBAKE_BENCH_RUNS sets the runs per measurement (3); one appliance per image at
N = 50 takes about 20 minutes a run under TCG, so it is measured
PIBAKE_BENCH_NAIVE_RUNS_AT_50 times (1).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mirror import Mirror  # noqa: E402
from signer import make_signer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "output" / "bench"
FIXTURE_VERSION = "1"
IMAGE = "raspios_lite_arm64/images/raspios_lite_arm64-2025-11-24/2025-11-24-raspios-trixie-arm64-lite.img.xz"
RAW_SIZE = 2_751_463_424  # Bookworm Lite 2025-11-24, bytes
RANDOM_BYTES = 500 << 20  # what survives xz: about 500 MB compressed, like the real image
RUNS = int(os.environ.get("PIBAKE_BENCH_RUNS", "3"))


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, **kwargs)


def fixture() -> tuple[Path, dict]:
    """The mirror tree, made once and kept under output/bench/."""
    root = WORK / f"fixture-{FIXTURE_VERSION}"
    meta_path = root / "meta.json"
    if meta_path.exists():
        return root, json.loads(meta_path.read_text())
    shutil.rmtree(root, ignore_errors=True)
    target = root / "www" / IMAGE
    target.parent.mkdir(parents=True)
    raw = root / "raw.img"
    print(f"making the fixture in {root} (once) ...", flush=True)
    with open(raw, "wb") as f:
        with open("/dev/urandom", "rb") as random:
            for _ in range(RANDOM_BYTES >> 20):
                f.write(random.read(1 << 20))
                f.write(bytes(3 << 20))  # zeros between the data, as in a real image
        f.truncate(RAW_SIZE)
    with open(target, "wb") as out:
        run(["xz", "-1", "-T0", "-c", str(raw)], stdout=out)
    extract_sha = run(["sha256sum", str(raw)], capture_output=True, text=True).stdout.split()[0]
    raw.unlink()
    sha = run(["sha256sum", str(target)], capture_output=True, text=True).stdout.split()[0]
    target.with_name(target.name + ".sha256").write_text(f"{sha}  {target.name}\n")
    signer = make_signer(root / "gpg", "pibake bench signer")
    signer.sign(target, target.with_name(target.name + ".sig"))
    (root / "www/keys").mkdir()
    (root / "www/keys/signing.asc").write_bytes(signer.public())
    leaf = {"name": "Raspberry Pi OS Lite (64-bit)", "url": f"https://downloads.raspberrypi.com/{IMAGE}",
            "extract_size": RAW_SIZE, "extract_sha256": extract_sha, "image_download_size": target.stat().st_size,
            "release_date": "2025-11-24"}
    (root / "www/os_list_imagingutility_v4.json").write_text(json.dumps({"os_list": [leaf]}))
    meta = {"sha256": sha, "extract_sha256": extract_sha, "compressed": target.stat().st_size,
            "fingerprint": signer.fingerprint}
    meta_path.write_text(json.dumps(meta))
    return root, meta


def floor(url: str, scratch: Path, hasher: list[str]) -> float:
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    start = time.monotonic()
    run(["bash", "-c", f"set -o pipefail; curl -sf {url} | tee {scratch}/file.img.xz | xz -dc -T0 > {scratch}/file.img"])
    run([*hasher, f"{scratch}/file.img.xz", f"{scratch}/file.img"], capture_output=True)
    return time.monotonic() - start


# The floor as stated hashes with coreutils' sha256sum, which does not use the
# CPU's SHA instructions here; OpenSSL does, as pibake's hashlib does. The
# strict floor uses it, and the target is judged against the faster floor.
FLOORS = {"sha256sum": ["sha256sum"], "openssl": ["openssl", "dgst", "-sha256"]}


def pibake(mirror: Mirror, meta: dict, scratch: Path) -> tuple[float, float]:
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(scratch), "PIBAKE_DOWNLOAD_BASE": mirror.base,
           "PIBAKE_SIGNING_KEY_URL": f"{mirror.base}/keys/signing.asc", "PIBAKE_SIGNING_KEYS": meta["fingerprint"]}
    start = time.monotonic()
    result = run([sys.executable, "-m", "builder", "fetch", "-v"], env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    rss = re.search(r"peak RSS: ([\d.]+) MiB", result.stderr)
    if meta["extract_sha256"] not in result.stdout or rss is None:
        raise SystemExit(f"pibake fetch did not verify the image:\n{result.stdout}{result.stderr}")
    return seconds, float(rss[1])


def bench_fetch() -> dict:
    root, meta = fixture()
    mirror = Mirror(root / "www")
    url = f"{mirror.base}/{IMAGE}"
    scratch = WORK / "scratch"
    floors: dict[str, list[float]] = {name: [] for name in FLOORS}
    pibakes, rss = [], []
    try:
        for i in range(RUNS):
            for name, hasher in FLOORS.items():
                floors[name].append(floor(url, scratch / "floor", hasher))
            seconds, peak = pibake(mirror, meta, scratch / "pibake")
            pibakes.append(seconds)
            rss.append(peak)
            print(f"  run {i + 1}/{RUNS}: " + ", ".join(f"floor/{n} {v[-1]:.1f} s" for n, v in floors.items())
                  + f", pibake {pibakes[-1]:.1f} s, pibake peak RSS {peak:.0f} MiB", flush=True)
    finally:
        mirror.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in floors.items()}
    strict = min(medians.values())
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "fixture": {"compressed_bytes": meta["compressed"], "decompressed_bytes": RAW_SIZE},
        "runs": RUNS,
        "floor_seconds": floors,
        "floor_medians": medians,
        "pibake_seconds": pibakes,
        "floor_median": strict,
        "pibake_median": statistics.median(pibakes),
        "ratio": statistics.median(pibakes) / strict,
        "ratio_vs_sha256sum_floor": statistics.median(pibakes) / medians["sha256sum"],
        "pibake_peak_rss_mib": max(rss),
        "targets": {"ratio_at_most": 1.2, "peak_rss_mib_under": 200},
    }
    return result


def print_fetch(fetch: dict) -> None:
    print(f"{'fetch + verify + decompress':<34}{'median s':>10}{'runs':>26}")
    for name, values in fetch["floor_seconds"].items():
        label = f"  floor (curl|tee|xz, {name})"
        print(f"{label:<34}{fetch['floor_medians'][name]:>10.1f}   {', '.join(f'{s:.1f}' for s in values)}")
    print(f"{'  pibake fetch':<34}{fetch['pibake_median']:>10.1f}   {', '.join(f'{s:.1f}' for s in fetch['pibake_seconds'])}")
    ok_ratio = fetch["ratio"] <= 1.2
    ok_rss = fetch["pibake_peak_rss_mib"] < 200
    print(f"  pibake / strict floor: {fetch['ratio']:.2f} (target <= 1.2: {'met' if ok_ratio else 'NOT met'}); "
          f"pibake / sha256sum floor: {fetch['ratio_vs_sha256sum_floor']:.2f}")
    print(f"  pibake peak RSS: {fetch['pibake_peak_rss_mib']:.0f} MiB (target < 200: {'met' if ok_rss else 'NOT met'})")
    print(f"  figures: {WORK / 'fetch.json'}")


def bench_bake() -> dict:
    from bench_bake import CASES, Bench, run_case, run_rebuild
    bench = Bench(WORK)
    naive_runs = int(os.environ.get("PIBAKE_BENCH_NAIVE_RUNS_AT_50", "1"))
    try:
        cases = [run_case(bench, kind, nodes, RUNS, RUNS if nodes < 50 else min(RUNS, naive_runs)) for kind, nodes in CASES]
        rebuild = run_rebuild(bench, 50, RUNS)
    finally:
        bench.close()
    return {"machine": machine(), "runs": RUNS, "cases": cases, "rebuild": rebuild}


PLAN_SIZES = (25, 125, 250)


def bench_plan() -> dict:
    import tempfile
    import tracemalloc

    from builder.build import plans_for
    from builder.keys import KeyStore
    from builder.profile import load
    from builder.release import named

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "id_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
        for n in PLAN_SIZES:
            profile_path = Path(tmp) / f"cluster-{n}.yaml"
            profile_path.write_text(f"user:\n  ssh_keys: [{key}.pub]\nnetwork:\n  subnet: 10.5.0.0/16\n"
                                    f"workers:\n  count: {n}\n")
            profile = load(profile_path)
            keys = KeyStore(Path(tmp) / f"state-{n}")
            plans_for(profile, profile.nodes, named("bookworm"), keys)  # keys made, caches warm
            tracemalloc.start()
            started = time.perf_counter()
            plans = plans_for(profile, profile.nodes, named("bookworm"), keys)
            seconds = time.perf_counter() - started
            held, _ = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            rows.append({"workers": n, "nodes": len(plans), "bytes": held, "bytes_per_node": held / len(plans),
                         "seconds": seconds})
            del plans
    growth = rows[-1]["bytes_per_node"] / rows[0]["bytes_per_node"]
    return {"machine": machine(), "rows": rows, "per_node_growth": growth}


def print_plan(plan: dict) -> None:
    print(f"{'plan (held by the plans)':<30}{'nodes':>7}{'KiB':>9}{'KiB/node':>10}{'s':>7}")
    for row in plan["rows"]:
        print(f"{'':<30}{row['nodes']:>7}{row['bytes'] / 1024:>9.0f}{row['bytes_per_node'] / 1024:>10.1f}{row['seconds']:>7.2f}")
    first, last = plan["rows"][0], plan["rows"][-1]
    print(f"  per-node memory at N={last['nodes']} / at N={first['nodes']}: {plan['per_node_growth']:.2f} "
          f"(target <= 1.25, linear in nodes: {met(plan['per_node_growth'] <= 1.25)})")
    print(f"  figures: {WORK / 'plan.json'}")


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "kvm": os.path.exists("/dev/kvm")}


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_bake(bake: dict) -> None:
    print(f"{'bake':<30}{'floor s':>9}{'naive s':>9}{'pibake s':>10}{'pib/floor':>11}{'naive/pib':>11}{'launch s':>10}{'RSS MiB':>9}")
    for c in bake["cases"]:
        label = f"  {c['base']}, N={c['nodes']}"
        print(f"{label:<30}{c['floor_median']:>9.1f}{c['naive_median']:>9.1f}{c['pibake_median']:>10.1f}"
              f"{c['pibake_over_floor']:>11.2f}{c['naive_over_pibake']:>11.1f}{c['launch_median']:>10.1f}{c['peak_rss_mib']:>9.0f}")
    for c in bake["cases"]:
        need = 3 if c["nodes"] < 50 else 8
        print(f"  N={c['nodes']}: pibake - floor = {c['pibake_minus_floor']:.1f} s, allowed one launch + 1 s/node = "
              f"{c['allowed_over_floor']:.1f} s ({met(c['pibake_minus_floor'] <= c['allowed_over_floor'])}); "
              f"naive/pibake {c['naive_over_pibake']:.1f} (target >= {need}: {met(c['naive_over_pibake'] >= need)}); "
              f"accelerator {c['accelerator']}")
    big = bake["cases"][-1]
    print(f"  peak RSS at N={big['nodes']}: {big['peak_rss_mib']:.0f} MiB (target < 200: {met(big['peak_rss_mib'] < 200)})")
    r = bake["rebuild"]
    print(f"  nothing changed, N={r['nodes']}: {r['nothing_changed']['seconds']:.1f} s to check every image, "
          f"{r['nothing_changed']['baked']} baked")
    print(f"  rebuild after one worker's change, N={r['nodes']}: median {r['rebuild_median']:.1f} s over {len(r['rebuilds'])} runs, "
          f"{r['rebuilds'][0]['baked']} baked, {r['rebuilds'][0]['skipped']} skipped as unchanged; allowed one copy + one launch "
          f"+ 1 s per node baked = {r['allowed_median']:.1f} s (each run: {met(r['over_allowed_max'] <= 0)}, "
          f"worst {r['over_allowed_max']:+.1f} s)")
    print(f"  figures: {WORK / 'bake.json'}")


def main() -> None:
    sections = sys.argv[1:] or ["fetch", "bake", "plan", "flash", "backup"]
    WORK.mkdir(parents=True, exist_ok=True)
    if "fetch" in sections:
        if shutil.which("curl") is None:
            raise SystemExit("the fetch benchmark needs curl (apt-get install curl)")
        print(f"fetch: {RUNS} alternating runs of the floor and `pibake fetch` on loopback")
        fetch = bench_fetch()
        (WORK / "fetch.json").write_text(json.dumps(fetch, indent=2) + "\n")
    if "bake" in sections:
        print(f"bake: {RUNS} alternating runs of the floor, one appliance per image, and `pibake build cluster`")
        bake = bench_bake()
        (WORK / "bake.json").write_text(json.dumps(bake, indent=2) + "\n")
    if "plan" in sections:
        plan = bench_plan()
        (WORK / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    if "flash" in sections:
        from bench_flash import bench_flash
        print(f"flash: {RUNS} alternating runs of dd, bmaptool and pibake flash on loop devices, then a re-flash")
        flashed = {"machine": machine(), **bench_flash(WORK, RUNS)}
        (WORK / "flash.json").write_text(json.dumps(flashed, indent=2) + "\n")
    if "backup" in sections:
        from bench_backup import bench_backup
        print(f"backup: {RUNS} alternating runs of tar over ssh and a first pibake backup, then the next backup and an offline one")
        backed = {"machine": machine(), **bench_backup(WORK, RUNS)}
        (WORK / "backup.json").write_text(json.dumps(backed, indent=2) + "\n")
    print()
    if "fetch" in sections:
        print_fetch(fetch)
    if "bake" in sections:
        print_bake(bake)
    if "plan" in sections:
        print_plan(plan)
    if "flash" in sections:
        from bench_flash import print_flash
        print_flash(flashed, met)
        print(f"  machine: {flashed['machine']}; figures: {WORK / 'flash.json'}")
    if "backup" in sections:
        from bench_backup import print_backup
        print_backup(backed, met)
        print(f"  machine: {backed['machine']}; figures: {WORK / 'backup.json'}")


if __name__ == "__main__":
    main()
