#!/usr/bin/env python3
"""Clawdspace process benchmark: streamed and background command output vs the docker SDK.

    python bench/bench_processes.py [--size-mb 100] [--processes 100] [--rounds 3]

One run starts its own service (``Service`` from bench_api.py: loopback port, random key, data
directory and name prefix, plus ``CLAWDSPACE_MAX_PROCESSES=128``), creates two spaces through
the API and measures:

* streaming: ``cat`` of a ``--size-mb`` text file (``base64 -w 76 /dev/urandom | head -c N``,
  written in the space first) three ways, in the same container, interleaved by round:
  ``POST .../exec {"stream": true}`` read as NDJSON up to its ``exit`` event; a
  ``{"background": true}`` process read with ``GET .../processes/:id/output?offset=0&
  follow=true`` (the command waits on its stdin until the reader is attached, so nothing
  leaves the 1 MiB ring before it is read); the same read through the ``.../attach``
  websocket (binary frames, up to the ``exit`` frame); and ``exec_create`` +
  ``exec_start(stream=True)`` straight on the engine. Every API run is checked: the decoded
  bytes add up to the file's size, the ``next`` offsets have no gap, the exit code is 0.
* memory: the service's VmRSS (every 50 ms, plus VmHWM) before, while and after
  ``--processes`` background processes in one space each print 1 MiB
  (``head -c 1048576 /dev/zero | tr '\\0' a``). They are all started first and held at a gate
  (a file they wait for), then released at once, so that they all print at the same time.

It prints a table per part and a target line (RSS growth < 64 MiB, complete output). Every
container, volume and temp directory it made is removed at the end, also on Ctrl-C, SIGTERM or
an error.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import docker
import docker.errors
import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_api import (  # noqa: E402 - bench/ is not a package
    WORKSPACE,
    BenchError,
    Service,
    Stop,
    engine_and_user,
    environment,
    fmt,
    median,
    signals_ignored,
    signals_raise,
    sweep,
)
from bench_inside import (  # noqa: E402
    SAMPLE_SECONDS,
    Watch,
    proc_status,
    sweep_networks,
)

MiB = 1 << 20
SPACE = "io"  # the streaming space
MANY = "many"  # the space that runs the --processes background processes
SPACE_MEMORY = "1g"  # room for the page cache of the file; the limit is not under test
MAX_PROCESSES = 128  # CLAWDSPACE_MAX_PROCESSES for the service under test
RSS_LIMIT_MIB = 64.0
PROCESS_BYTES = 1 << 20  # what each of the many processes prints
BIG = f"{WORKSPACE}/big.txt"
GATE = f"{WORKSPACE}/.go"  # the many processes wait for this file
READ_CHUNK = 1 << 16  # client-side read size for NDJSON answers
ENDED = ("exited", "killed", "timed-out")
WAIT_S = 300.0  # the longest the many processes may take to end



# ###########################################################################
# Streaming
# ###########################################################################

@dataclass
class Run:
    """One ``cat`` of the file: what arrived, how fast, and whether any of it went missing."""

    seconds: float = 0.0
    data_bytes: int = 0  # decoded stdout + stderr bytes
    events: int = 0  # NDJSON lines (all kinds); for the direct side, output chunks
    data_events: int = 0
    skipped: int = 0  # bytes the offsets jumped over (the reader fell out of the ring)
    start_offset: int = 0
    exit: dict[str, Any] | None = None
    service_cpu: float = float("nan")  # seconds of the service's CPU during the run
    rss_growth: int = 0

    @property
    def mib_s(self) -> float:
        return self.data_bytes / MiB / self.seconds

    @property
    def events_s(self) -> float:
        return self.events / self.seconds

    def complete(self, size: int) -> bool:
        ok_exit = self.exit is None or self.exit.get("exitCode") == 0
        return self.data_bytes == size and self.skipped == 0 and self.start_offset == 0 \
            and ok_exit


@dataclass
class Mode:
    label: str
    runs: list[Run] = field(default_factory=list)


def ndjson(reply: requests.Response) -> Iterator[dict[str, Any]]:
    """The events of an NDJSON answer, as they arrive."""
    pending = b""
    for chunk in reply.iter_content(READ_CHUNK):
        pending += chunk
        if b"\n" not in chunk:
            continue
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line:
                yield json.loads(line)
    if pending.strip():
        yield json.loads(pending)


def tally(events: Iterator[dict[str, Any]], run: Run) -> None:
    """Count an output stream's events into ``run`` until its ``exit`` event."""
    expected = 0
    for event in events:
        run.events += 1
        kind = event.get("type")
        if kind == "start":
            run.start_offset = expected = int(event.get("offset", 0))
        elif kind in ("stdout", "stderr"):
            if "b64" in event:
                size = len(base64.b64decode(event["b64"]))
            else:
                size = len(event["data"].encode("utf-8"))
            following = int(event["next"])
            begin = following - size
            if begin != expected:
                run.skipped += begin - expected
            expected = following
            run.data_bytes += size
            run.data_events += 1
        elif kind == "exit":
            run.exit = event
            return
        elif kind == "more":
            raise BenchError(f"the output ended without an exit event: {event}")
    raise BenchError("the NDJSON answer ended without an exit event")


class Streams:
    """The three ways to read ``cat`` of the file, on one container."""

    def __init__(self, svc: Service, api: docker.APIClient, cid: str, user: str) -> None:
        self.svc = svc
        self.api = api
        self.cid = cid
        self.user = user
        self.stdin_session = svc.new_session()  # the gate write, while a follow is open

    def via_stream(self) -> Run:
        run = Run()
        with Watch(self.svc.pid, {}) as watch:
            started = time.perf_counter()
            with self.svc.session.post(
                    f"{self.svc.base}/api/spaces/{SPACE}/exec", stream=True, timeout=600,
                    json={"command": f"cat {BIG}", "stream": True, "timeout": 600}) as reply:
                if reply.status_code != 200:
                    raise BenchError(f"stream exec: HTTP {reply.status_code}: {reply.text[:300]}")
                tally(ndjson(reply), run)
            run.seconds = time.perf_counter() - started
        run.service_cpu, run.rss_growth = watch.cpu.get("service", float("nan")), watch.growth
        return run

    def via_background(self) -> Run:
        run = Run()
        base = f"{self.svc.base}/api/spaces/{SPACE}"
        with Watch(self.svc.pid, {}) as watch:
            started = time.perf_counter()
            # The command waits for one byte on its stdin, written once the reader is attached:
            # a reader that came after 1 MiB of output would start at the ring's oldest byte.
            process = self.svc.call("POST", f"/api/spaces/{SPACE}/exec", 202, {
                "command": f"head -c 1 >/dev/null; exec cat {BIG}", "background": True,
                "stdin": True, "timeout": 600})["process"]
            process_id = process["id"]
            with self.svc.session.get(f"{base}/processes/{process_id}/output",
                                      params={"offset": "0", "follow": "true"},
                                      stream=True, timeout=600) as reply:
                if reply.status_code != 200:
                    raise BenchError(f"follow: HTTP {reply.status_code}: {reply.text[:300]}")
                events = ndjson(reply)
                first = next(events)
                if first.get("type") != "start":
                    raise BenchError(f"follow: the first event is no start: {first}")
                gate = self.stdin_session.post(f"{base}/processes/{process_id}/stdin",
                                               json={"data": "g"}, timeout=60)
                if gate.status_code != 200:
                    raise BenchError(f"stdin: HTTP {gate.status_code}: {gate.text[:300]}")

                def replay() -> Iterator[dict[str, Any]]:
                    yield first
                    yield from events

                tally(replay(), run)
            run.seconds = time.perf_counter() - started
        run.service_cpu, run.rss_growth = watch.cpu.get("service", float("nan")), watch.growth
        return run

    def via_attach(self) -> Run:
        run = Run()
        with Watch(self.svc.pid, {}) as watch:
            started = time.perf_counter()
            process = self.svc.call("POST", f"/api/spaces/{SPACE}/exec", 202, {
                "command": f"head -c 1 >/dev/null; exec cat {BIG}", "background": True,
                "stdin": True, "timeout": 600})["process"]
            asyncio.run(self._attach(process["id"], run))
            run.seconds = time.perf_counter() - started
        run.service_cpu, run.rss_growth = watch.cpu.get("service", float("nan")), watch.growth
        return run

    async def _attach(self, process_id: str, run: Run) -> None:
        """Read the attach websocket to its exit frame; the gate byte goes in as stdin once
        it is open (so the output is read from its first byte)."""
        url = f"{self.svc.base}/api/spaces/{SPACE}/processes/{process_id}/attach?offset=0"
        async with aiohttp.ClientSession(headers={
                "Authorization": f"Bearer {self.svc.key}"}) as http, http.ws_connect(
                    url, max_msg_size=0) as ws:
            await ws.send_bytes(b"g")
            async for message in ws:
                run.events += 1
                if message.type == aiohttp.WSMsgType.BINARY:
                    run.data_bytes += len(message.data)
                    run.data_events += 1
                elif message.type == aiohttp.WSMsgType.TEXT:
                    event = json.loads(message.data)
                    if event.get("type") == "exit":
                        run.exit = event
                elif message.type == aiohttp.WSMsgType.ERROR:
                    raise BenchError(f"attach: websocket error {message.data!r}")
        if run.exit is None:
            raise BenchError(f"attach: closed without an exit frame ({ws.close_code})")

    def via_docker(self) -> Run:
        run = Run()
        started = time.perf_counter()
        exec_id = self.api.exec_create(self.cid, ["sh", "-c", f"cat {BIG}"], stdout=True,
                                       stderr=True, stdin=False, tty=False, workdir=WORKSPACE,
                                       user=self.user)["Id"]
        for chunk in self.api.exec_start(exec_id, stream=True):
            run.data_bytes += len(chunk)
            run.events += 1
        code = self.api.exec_inspect(exec_id)["ExitCode"]
        run.seconds = time.perf_counter() - started
        run.exit = {"exitCode": code}
        return run

    def close(self) -> None:
        self.stdin_session.close()


def bench_streams(streams: Streams, rounds: int, size: int) -> list[Mode]:
    modes = [Mode('API exec {"stream": true} (NDJSON)'),
             Mode("API background + /output?offset=0&follow=true"),
             Mode("API background + /attach websocket"),
             Mode("direct exec_create + exec_start(stream=True)")]
    sides = [streams.via_stream, streams.via_background, streams.via_attach,
             streams.via_docker]
    for round_no in range(rounds):
        order = [(round_no + k) % len(sides) for k in range(len(sides))]  # rotate who is first
        for index in order:
            run = sides[index]()
            modes[index].runs.append(run)
            state = "ok" if run.complete(size) else (
                f"INCOMPLETE: {run.data_bytes} of {size} bytes, {run.skipped} skipped, "
                f"start {run.start_offset}, exit {run.exit}")
            print(f"  round {round_no + 1} {modes[index].label}: {run.mib_s:.1f} MiB/s, "
                  f"{run.events} events in {run.seconds:.2f} s ({state})", flush=True)
    return modes


def print_streams(modes: list[Mode], size: int) -> None:
    direct = median([r.mib_s for r in modes[-1].runs])
    title = f"cat {size / MiB:g} MiB of text"
    width = max(len(m.label) for m in modes + [Mode(title)]) + 2
    head = (f"{title:<{width}}{'MiB/s':>8}{'min':>8}{'events/s':>10}{'KiB/ev':>8}"
            f"{'srv cpu':>9}{'rss +MiB':>9}{'api/dir':>9}{'bytes':>8}{'n':>4}")
    print(head)
    print("-" * len(head))
    for mode in modes:
        runs = mode.runs
        speed = median([r.mib_s for r in runs])
        per_event = median([r.data_bytes / max(1, r.data_events or r.events) / 1024
                            for r in runs])
        cpu = median([100 * r.service_cpu / r.seconds for r in runs])
        is_direct = mode is modes[-1]
        ratio = "-" if is_direct else f"{direct / speed:.2f}x"
        ok = "ok" if all(r.complete(size) for r in runs) else "SHORT"
        print(f"{mode.label:<{width}}{speed:>8.1f}{min(r.mib_s for r in runs):>8.1f}"
              f"{median([r.events_s for r in runs]):>10.0f}{per_event:>8.1f}"
              f"{'-' if is_direct else fmt(cpu) + '%':>9}"
              f"{'-' if is_direct else fmt(max(r.rss_growth for r in runs) / MiB):>9}"
              f"{ratio:>9}{ok:>8}{len(runs):>4}")
    print("  MiB/s and events/s: medians over rounds (min = slowest round), from the request to "
          "the exit event (direct: exec_create to the end of the stream); KiB/ev = decoded "
          "bytes per stdout event (direct: per chunk docker-py yields); srv cpu = the service's "
          "CPU as % of one core; rss + = the service's peak VmRSS growth during the run; "
          "api/dir = ratio of times; bytes ok = every run's decoded bytes add up to the file, "
          "with no gap in the offsets and exit code 0.")


# ###########################################################################
# Memory: many background processes at once
# ###########################################################################

@dataclass
class Many:
    count: int
    before: int = 0
    at_gate: int = 0  # all started, none printing yet
    after: int = 0
    watch: Watch | None = None
    start_s: float = 0.0  # to start all of them (POSTs)
    run_s: float = 0.0  # from the gate's opening until all had ended
    ok: int = 0  # seen ended, exit 0, 1 MiB of stdout
    bad: list[str] = field(default_factory=list)
    forgotten: int = 0  # ended but no longer listed when first looked for
    max_running: int = 0

    @property
    def growth(self) -> int:
        return self.watch.growth if self.watch is not None else 0


def bench_many(svc: Service, api: docker.APIClient, cid: str, user: str,
               count: int) -> Many:
    result = Many(count)
    command = (f"while [ ! -e {GATE} ]; do sleep 0.05; done; "
               f"head -c {PROCESS_BYTES} /dev/zero | tr '\\0' a")
    # Warm-up (not measured): the first background process and listing of a fresh service.
    warm = svc.call("POST", f"/api/spaces/{MANY}/exec", 202,
                    {"command": "echo warm", "background": True})["process"]["id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listed = svc.call("GET", f"/api/spaces/{MANY}/processes", 200)["processes"]
        if any(p["id"] == warm and p["status"] in ENDED for p in listed):
            break
        time.sleep(0.1)
    time.sleep(1.0)
    result.before = proc_status(svc.pid)["VmRSS"]
    ids: list[str] = []
    seen: dict[str, dict[str, Any]] = {}
    with Watch(svc.pid, {}) as watch:
        started = time.perf_counter()
        for _ in range(count):
            ids.append(svc.call("POST", f"/api/spaces/{MANY}/exec", 202, {
                "command": command, "background": True, "timeout": 600})["process"]["id"])
        result.start_s = time.perf_counter() - started
        result.at_gate = proc_status(svc.pid)["VmRSS"]
        listed = svc.call("GET", f"/api/spaces/{MANY}/processes", 200)["processes"]
        result.max_running = sum(p["id"] in ids and p["status"] == "running" for p in listed)
        gate = api.exec_create(cid, ["touch", GATE], user=user)["Id"]
        opened = time.perf_counter()
        api.exec_start(gate)
        deadline = time.monotonic() + WAIT_S
        missing = set(ids)
        while missing and time.monotonic() < deadline:
            listed = svc.call("GET", f"/api/spaces/{MANY}/processes", 200)["processes"]
            by_id = {p["id"]: p for p in listed}
            for process_id in list(missing):
                found = by_id.get(process_id)
                if found is None:  # swept: only ended processes are (PROCESSES_KEPT)
                    result.forgotten += 1
                    missing.discard(process_id)
                elif found["status"] in ENDED:
                    seen[process_id] = found
                    missing.discard(process_id)
            if missing:
                time.sleep(0.1)
        result.run_s = time.perf_counter() - opened
        if missing:
            raise BenchError(f"{len(missing)} of {count} processes still run after {WAIT_S:g} s")
        time.sleep(1.0)  # what stays once all have ended
    result.watch = watch
    result.after = proc_status(svc.pid)["VmRSS"]
    for process_id, process in seen.items():
        if process["exitCode"] == 0 and process["stdoutBytes"] == PROCESS_BYTES \
                and process["status"] == "exited":
            result.ok += 1
        else:
            result.bad.append(f"{process_id}: {process['status']} exit {process['exitCode']}, "
                              f"{process['stdoutBytes']} bytes")
    return result


def print_many(many: Many) -> None:
    watch = many.watch
    if watch is None:
        return
    rows = [
        ("VmRSS before (after a warm-up process)", many.before),
        (f"VmRSS with all {many.count} started, held at the gate", many.at_gate),
        (f"VmRSS peak while they ran ({watch.samples} samples every "
         f"{SAMPLE_SECONDS * 1000:.0f} ms)", watch.peak),
        ("VmHWM at the end (lifetime high-water mark)", watch.hwm_after),
        ("VmRSS after (all ended, +1 s)", many.after),
        ("growth: peak - before (a risen VmHWM counts too)", many.growth),
        ("left over: after - before", many.after - many.before),
    ]
    title = f"service memory, {many.count} background processes x {PROCESS_BYTES // MiB} MiB"
    width = max(len(label) for label, _ in rows + [(title, 0)]) + 2
    print(f"{title:<{width}}{'MiB':>9}")
    print("-" * (width + 9))
    for label, value in rows:
        print(f"{label:<{width}}{value / MiB:>9.1f}")
    print(f"  started {many.count} in {many.start_s:.1f} s ({many.max_running} running at the "
          f"gate); all ended {many.run_s:.1f} s after it opened; {many.ok} seen ended with exit "
          f"0 and {PROCESS_BYTES} bytes, {many.forgotten} already gone from the list when "
          f"looked for (it keeps the last 64 ended per space)")
    for line in many.bad[:5]:
        print(f"  unexpected: {line}")


# ###########################################################################
# Main
# ###########################################################################

def make_file(svc: Service, size: int) -> None:
    """The text file ``cat`` prints, written (and read once, into the page cache) in the
    space; not timed."""
    made = svc.call("POST", f"/api/spaces/{SPACE}/exec", 200, {
        "command": f"base64 -w 76 /dev/urandom | head -c {size} > {BIG} && cat {BIG} "
                   f">/dev/null && stat -c %s {BIG}", "timeout": 600})
    if made["exitCode"] != 0 or made["stdout"].strip() != str(size):
        raise BenchError(f"could not write {BIG}: {made}")


def report(modes: list[Mode], many: Many, size: int) -> None:
    print()
    print_streams(modes, size)
    print()
    print_many(many)
    print()
    growth = many.growth / MiB
    complete = all(r.complete(size) for m in modes for r in m.runs)
    counts = ", ".join(f"{sum(r.complete(size) for r in m.runs)}/{len(m.runs)}"
                       for m in modes)
    all_ok = many.ok + many.forgotten == many.count and not many.bad
    marks = [
        f"RSS growth with {many.count} processes < {RSS_LIMIT_MIB:g} MiB: {growth:.1f} "
        f"{'✓' if growth < RSS_LIMIT_MIB else '✗'}",
        f"cat output complete (stream, background, attach, direct): {counts} "
        f"{'✓' if complete else '✗'}",
        f"{many.count} processes ended, exit 0, 1 MiB each: "
        f"{many.ok} seen + {many.forgotten} unlisted {'✓' if all_ok else '✗'}",
    ]
    print("targets: " + "   ".join(marks))
    stream, background, attach, direct = (median([r.mib_s for r in m.runs]) for m in modes)
    print(f"ratios (api/direct time): stream {direct / stream:.2f}x, background+follow "
          f"{direct / background:.2f}x, attach websocket {direct / attach:.2f}x "
          f"({size / MiB:g} MiB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=100,
                        help="size of the file cat prints, in MiB (default 100)")
    parser.add_argument("--processes", type=int, default=100,
                        help="background processes started at once in one space "
                             f"(default 100, at most {MAX_PROCESSES})")
    parser.add_argument("--rounds", type=int, default=3,
                        help="cat runs per way of reading it (default 3)")
    args = parser.parse_args(argv)
    if min(args.size_mb, args.processes, args.rounds) < 1 or args.processes > MAX_PROCESSES:
        parser.error(f"every option must be >= 1, --processes <= {MAX_PROCESSES}")
    size = args.size_mb * MiB

    found = engine_and_user(timeout=600, max_pool_size=16)
    if found is None:
        return 2
    client, user = found
    prefix = f"bench{secrets.token_hex(2)}-"
    data_dir = tempfile.mkdtemp(prefix="clawdspace-bench-")
    svc = Service(prefix, data_dir, extra_env={"CLAWDSPACE_MAX_PROCESSES": str(MAX_PROCESSES)})
    streams: Streams | None = None
    code = 1
    environment(client)
    print(f"service {svc.base}, prefix {prefix!r}, data {data_dir}; cat {args.size_mb} MiB x "
          f"{args.rounds} rounds, {args.processes} processes; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    try:
        with signals_raise():
            svc.start()
            for name in (SPACE, MANY):  # no network: no bridge or firewall chains to outlive us
                svc.call("POST", "/api/spaces", 201,
                         {"name": name, "memory": SPACE_MEMORY, "network": "none"})
            api = client.api
            cid = str(api.inspect_container(f"{prefix}{SPACE}")["Id"])
            many_cid = str(api.inspect_container(f"{prefix}{MANY}")["Id"])
            print(f"writing {BIG}: {args.size_mb} MiB of base64 text, 76-character lines "
                  "(not timed) ...", flush=True)
            make_file(svc, size)
            # Memory first, on a service that has streamed nothing yet: what 100 MiB of
            # streaming leaves in the allocator would hide growth here.
            print(f"starting {args.processes} background processes at a gate ...", flush=True)
            many = bench_many(svc, api, many_cid, user, args.processes)
            print("timing cat ...", flush=True)
            streams = Streams(svc, api, cid, user)
            modes = bench_streams(streams, args.rounds, size)
            report(modes, many, size)
            with open(svc.log_path, errors="replace") as log_file:
                errors = [line.rstrip() for line in log_file
                          if " ERROR " in line or " WARNING " in line or "Traceback" in line]
            print(f"service log: {len(errors)} warning/error lines"
                  + "".join(f"\n  {line[:300]}" for line in errors[-5:]))
            code = 0
    except (KeyboardInterrupt, Stop) as err:
        print(f"\ninterrupted ({type(err).__name__} {err}); cleaning up", file=sys.stderr)
        code = 130
    except (BenchError, docker.errors.DockerException, requests.RequestException,
            OSError, ValueError) as err:
        dead = svc.proc.poll() if svc.proc is not None else None
        print(f"\nerror: {type(err).__name__} {err}"
              + (f"\n(the service exited with {dead})" if dead is not None else "")
              + f"\n--- service log tail ---\n{svc.log_tail()}", file=sys.stderr)
    finally:
        with signals_ignored():
            if streams is not None:
                streams.close()
            svc.stop()
            containers, volumes = sweep(client, prefix)
            networks = sweep_networks(client, prefix)
            shutil.rmtree(data_dir, ignore_errors=True)
            sys.stdout.flush()
            print(f"cleanup: removed {containers} containers, {volumes} volumes and {networks} "
                  f"networks (prefix {prefix}), stopped the service", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
