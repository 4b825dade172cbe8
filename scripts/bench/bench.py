#!/usr/bin/env python3
"""Measurement helpers for scripts/bench.sh (standard library only).

Subcommands print one JSON document on stdout:

  latency   change-to-restart latency, contenders in turns: write a watched file, wait until supervisord reports the
            program RUNNING with a new pid
  burst     many writes to watched files, as fast as possible
  cpu       wall, user and system time of a command, per run (os.wait4: microseconds)
  spawnstamp  like cpu, but also reports when a wrapped program was exec'd (its stamp file)
  revert    a bad config commit: from its release published to the program RUNNING again on
            the good release (the agent reverted it)
  idle      RSS and context switches of process trees over a window
  render    the markdown page from the results folder
"""

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import xmlrpc.client


# --- supervisord over its unix socket ------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=30):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path):
        super().__init__()
        self._path = path

    def make_connection(self, host):
        # Keep one connection alive between calls (supervisord speaks HTTP/1.1).
        if self._connection and host == self._connection[0]:
            return self._connection[1]
        self._connection = host, _UnixHTTPConnection(self._path)
        return self._connection[1]


def supervisor(sock):
    return xmlrpc.client.ServerProxy("http://localhost", transport=_UnixTransport(sock)).supervisor


def read_pid(pidfile):
    try:
        with open(pidfile) as f:
            s = f.read().strip()
        return int(s) if s else None
    except (OSError, ValueError):
        return None


def write_in_place(path, content):
    with open(path, "w") as f:
        f.write(content)


def write_by_rename(path, content):
    tmp = os.path.join(os.path.dirname(path), "__salt.tmp.bench")
    with open(tmp, "w") as f:
        f.write(content)
    os.rename(tmp, path)


# --- latency -------------------------------------------------------------------------------------


class Inotify:
    """Close-write and moved-to events of one folder, through ctypes (blocking, no polling)."""

    def __init__(self, folder):
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, folder.encode(), 0x08 | 0x80) < 0:
            sys.exit(f"inotify on {folder}: {os.strerror(ctypes.get_errno())}")

    def names(self, timeout):
        """Names with an event, waiting up to timeout seconds for the first."""
        import select
        import struct

        r, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not r:
            return []
        buf, off, out = os.read(self.fd, 65536), 0, []
        while off < len(buf):
            _wd, _mask, _cookie, length = struct.unpack_from("iIII", buf, off)
            out.append(buf[off + 16 : off + 16 + length].rstrip(b"\0").decode())
            off += 16 + length
        return out


def cmd_latency(a):
    """Each change: write the file in place (a new content each time), then wait for the program
    to be RUNNING with a new pid. The program writes its pid to a file as it starts; we wait for
    that file with inotify (no CPU used while the contender works: a polling probe would steal
    CPU from it on a small machine) and only then ask supervisord over XML-RPC, every 1 ms,
    until it reports RUNNING with that pid. The contenders take turns change by change, in a new
    random order each round, so none is measured only first or only last (after an idle phase, in
    a warmer cache)."""
    sv = supervisor(a.socket)
    contenders = []
    for spec in a.contender:
        name, rest = spec.split("=", 1)
        program, path, pidfile = rest.split(",")
        contenders.append((name, program, path, pidfile))
    watch = Inotify(os.path.dirname(contenders[0][3]))
    rng = random.Random(7)
    out = {name: {"ms": [], "missed": 0} for name, *_ in contenders}
    for i in range(a.warmup + a.count):
        order = contenders[:]
        rng.shuffle(order)
        for name, program, path, pidfile in order:
            base = os.path.basename(pidfile)
            info = sv.getProcessInfo(program)
            old = info["pid"]
            if info["statename"] != "RUNNING":
                sys.exit(f"latency: {program} is {info['statename']} before change {i}")
            watch.names(0)  # drop stale events
            write_in_place(path, f"change {i} {time.time_ns()}\n")
            t0 = time.perf_counter()
            deadline = t0 + a.timeout
            new = None
            while new is None and time.perf_counter() < deadline:
                if base in watch.names(deadline - time.perf_counter()):
                    p = read_pid(pidfile)
                    if p and p != old:
                        new = p
            t1 = None
            while new and time.perf_counter() < deadline:
                info = sv.getProcessInfo(program)
                if info["statename"] == "RUNNING" and info["pid"] == new:
                    t1 = time.perf_counter()
                    break
                time.sleep(0.001)
            if t1 is None:
                out[name]["missed"] += 1
                time.sleep(1.0)
            elif i >= a.warmup:
                out[name]["ms"].append((t1 - t0) * 1000)
            # Let the contender go idle again; jitter avoids locking onto any periodic behaviour.
            time.sleep(rng.uniform(a.gap_ms, a.gap_ms * 1.5) / 1000)
    json.dump(out, sys.stdout)


# --- burst ---------------------------------------------------------------------------------------


def cmd_burst(a):
    files = [os.path.join(a.dir, f) for f in a.files.split(",")]
    t0 = time.perf_counter()
    for i in range(a.count):
        path = files[i % len(files)]
        content = f"burst {a.tag} {i}\n"
        if i % 3 == 0:
            write_by_rename(path, content)
        else:
            write_in_place(path, content)
    json.dump({"writes": a.count, "ms": (time.perf_counter() - t0) * 1000}, sys.stdout)


# --- cpu -----------------------------------------------------------------------------------------


def run_timed(argv, env=None):
    """Runs argv with stdout and stderr to /dev/null; returns wall, user, sys seconds and the exit
    status. rusage from wait4 covers the process and every descendant it waited for (git)."""
    t0 = time.perf_counter()
    pid = os.posix_spawnp(
        argv[0],
        argv,
        env if env is not None else os.environ,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0),
        ],
    )
    _, status, ru = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    return wall, ru.ru_utime, ru.ru_stime, os.waitstatus_to_exitcode(status), t0


def cmd_fleet(a):
    """`builder fleet` listing a.count moto instances, each with the agent's report tags, against
    boto3 paginating the same DescribeInstances (what moto alone costs)."""
    import boto3

    kw = dict(endpoint_url=a.endpoint, region_name="eu-west-1",
              aws_access_key_id="testing", aws_secret_access_key="testing")
    ec2 = boto3.client("ec2", **kw)
    ami = sorted(i["ImageId"] for i in ec2.describe_images(Owners=["amazon"])["Images"])[0]
    ids = []
    while len(ids) < a.count:
        n = min(250, a.count - len(ids))
        r = ec2.run_instances(ImageId=ami, MinCount=n, MaxCount=n, TagSpecifications=[{
            "ResourceType": "instance", "Tags": [{"Key": "stackless:service", "Value": "bench"}]}])
        ids += [i["InstanceId"] for i in r["Instances"]]
    report = {"stackless:salt-commit": "a" * 40, "stackless:config-commit": "c" * 40,
              "stackless:outcome": "ready", "stackless:failed-states": "0",
              "stackless:problems": "", "stackless:reported-at": "2026-01-01T00:00:00Z"}
    for i in range(0, len(ids), 500):
        ec2.create_tags(Resources=ids[i:i + 500], Tags=[{"Key": k, "Value": v} for k, v in report.items()])
    env = dict(os.environ, AWS_ENDPOINT_URL=a.endpoint, AWS_REGION="eu-west-1",
               AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_EC2_METADATA_DISABLED="true")
    out = subprocess.run([a.builder, "fleet", "bench", "--output", "json"], env=env,
                         capture_output=True, check=True).stdout
    listed = len(json.loads(out)["instances"])
    if listed != a.count:
        sys.exit(f"fleet: builder listed {listed} of {a.count} instances")
    ours, theirs = [], []
    filters = [{"Name": "tag:stackless:service", "Values": ["bench"]},
               {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "shutting-down"]}]
    for _ in range(a.runs):
        wall, _, _, code, _ = run_timed([a.builder, "fleet", "bench", "--output", "json"], env)
        if code != 0:
            sys.exit(f"fleet: builder exited {code}")
        ours.append(wall)
        t0 = time.perf_counter()
        n = sum(len(r["Instances"]) for page in ec2.get_paginator("describe_instances").paginate(
            Filters=filters, PaginationConfig={"PageSize": 1000}) for r in page["Reservations"])
        theirs.append(time.perf_counter() - t0)
        if n != a.count:
            sys.exit(f"fleet: boto3 listed {n}")
    json.dump({"count": a.count, "builder_s": ours, "boto3_s": theirs}, sys.stdout)


def cmd_cpu(a):
    runs = []
    for i in range(a.warmup + a.runs):
        wall, user, sys_, code, _ = run_timed(a.argv)
        if code != 0:
            sys.exit(f"cpu: {' '.join(a.argv)} exited {code}")
        if i >= a.warmup:
            runs.append({"wall_ms": wall * 1000, "user_ms": user * 1000, "sys_ms": sys_ * 1000})
    json.dump({"runs": runs}, sys.stdout)


def status_json(binary, root):
    out = subprocess.run([binary, "--root", root, "status", "--json"], check=True, capture_output=True)
    return json.loads(out.stdout)


def cmd_boot(a):
    """`boot --once` again and again on a root whose repositories are present (each run after the
    first is a reboot): the agent's own time is its boot total minus the highstate step (salt),
    from its status timeline. The hand-written shell bootstrap runs as often, for comparison."""
    agent, shell, steps = [], [], {}
    for i in range(a.warmup + a.runs):
        wall, user, sys_, code, _ = run_timed([a.bin, "--root", a.root, "boot", "--once"])
        if code != 0:
            sys.exit(f"boot: stackless-init boot --once exited {code}")
        st = status_json(a.bin, a.root)["boot"]
        hs = sum(s["ms"] for s in st["steps"] if s["name"] == "highstate")
        if i < a.warmup:
            continue
        for s in st["steps"]:
            steps.setdefault(s["name"], []).append(s["ms"])
        agent.append(
            {
                "total_ms": st["total_ms"],
                "highstate_ms": hs,
                "own_ms": st["total_ms"] - hs,
                "steps_ms": sum(s["ms"] for s in st["steps"]) - hs,
                "wall_ms": round(wall * 1000, 1),
                "cpu_ms": round((user + sys_) * 1000, 1),
            }
        )
    for i in range(a.warmup + a.runs):
        wall, user, sys_, code, _ = run_timed([a.shell, a.shell_dir])
        if code != 0:
            sys.exit(f"boot: {a.shell} exited {code}")
        if i >= a.warmup:
            shell.append({"wall_ms": round(wall * 1000, 1), "cpu_ms": round((user + sys_) * 1000, 1)})
    json.dump(
        {
            "agent": agent,
            "shell": shell,
            "median_steps": {k: med(v) for k, v in steps.items()},
        },
        sys.stdout,
    )


def cmd_revert(a):
    """The shell has just pushed a bad config commit. t0: the agent published it (`current`
    points at it: the commit reached the instance). t1: `current` points at the good release
    again and supervisord reports the program RUNNING with the new pid it wrote as it started
    on the good configuration (it writes no pid on the bad one). Polls every 2 ms."""
    sv = supervisor(a.socket)
    old = read_pid(a.pidfile)
    deadline = time.perf_counter() + a.timeout

    def points_at(sha):
        try:
            return os.readlink(a.current).endswith(sha)
        except OSError:
            return False

    t0 = None
    while time.perf_counter() < deadline:
        if points_at(a.bad):
            t0 = time.perf_counter()
            break
        time.sleep(0.002)
    if t0 is None:
        sys.exit("revert: the bad commit was never published")
    while time.perf_counter() < deadline:
        p = read_pid(a.pidfile)
        if p and p != old and points_at(a.good):
            info = sv.getProcessInfo(a.program)
            if info["statename"] == "RUNNING" and info["pid"] == p:
                json.dump({"ms": (time.perf_counter() - t0) * 1000}, sys.stdout)
                return
        time.sleep(0.002)
    sys.exit("revert: the program did not run again on the good release in time")


def cmd_spawnstamp(a):
    """One run of argv; the stamp file gets the wall clock (bash $EPOCHREALTIME) of the moment a
    wrapped program was exec'd. Prints the run's times and the delay to that moment."""
    try:
        os.unlink(a.stamp)
    except FileNotFoundError:
        pass
    start = time.time()
    wall, user, sys_, code, _ = run_timed(a.argv)
    stamps = []
    if os.path.exists(a.stamp):
        with open(a.stamp) as f:
            stamps = [float(x) for x in f.read().split()]
    out = {
        "code": code,
        "wall_ms": wall * 1000,
        "cpu_ms": (user + sys_) * 1000,
        "to_stamp_ms": (stamps[0] - start) * 1000 if stamps else None,
    }
    if a.timeline_root:
        steps = status_json(a.bin, a.timeline_root)["last_sync"]["steps"]
        names = [s["name"] for s in steps]
        if "highstate" not in names:
            sys.exit(f"spawnstamp: the sync ran no highstate: {steps}")
        out["before_highstate_ms"] = sum(s["ms"] for s in steps[: names.index("highstate")])
        out["steps"] = steps
    if code != 0 or out["to_stamp_ms"] is None:
        sys.exit(f"spawnstamp: {' '.join(a.argv)} exited {code}, stamp {stamps}")
    json.dump(out, sys.stdout)


# --- idle ----------------------------------------------------------------------------------------


def descendants(roots):
    """Pids of the process trees rooted at roots (from /proc/*/stat ppid)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], list(roots)
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def status_fields(path, keys):
    vals = {}
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    vals[k] = int(v.split()[0])
    except OSError:
        pass
    return vals


def switches(pids):
    """Context switches of every thread, keyed by (pid, tid)."""
    out = {}
    for p in pids:
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            v = status_fields(
                f"/proc/{p}/task/{t}/status",
                ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"),
            )
            if v:
                out[(p, int(t))] = sum(v.values())
    return out


def comm(p):
    try:
        with open(f"/proc/{p}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def inotify_watches(pid):
    """(inode, mask) of every inotify watch the process holds (/proc/PID/fdinfo)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("inotify wd:"):
                        kv = dict(x.split(":", 1) for x in line.split()[1:] if ":" in x)
                        out.append((int(kv["ino"], 16), int(kv["mask"], 16)))
        except OSError:
            pass
    return out


# IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE: a watch that any new or removed entry wakes.
ENTRY_EVENTS = 0x40 | 0x80 | 0x100 | 0x200


def ancestors(path):
    out = [path]
    while path != "/":
        path = os.path.dirname(path)
        out.append(path)
    return out


def cmd_idle(a):
    """Every NAME=PID is measured over the same window: the RSS (VmRSS) of its process tree, its
    threads, and the context switches of all its threads (each wake-up of a sleeping thread is
    one voluntary switch). With --agent and --agent-dirs, also which folders the agent holds
    inotify watches on, and how many entries other processes created, removed or renamed in the
    ancestors among them during the window (counted by an inotifywait of our own)."""
    trees = {}
    for spec in a.trees:
        name, _, pid = spec.partition("=")
        trees[name] = descendants([int(pid)])
    watched, observer, log = [], None, None
    if a.agent:
        by_ino = {}
        for d in a.agent_dirs:
            for p in ancestors(d):
                try:
                    by_ino[os.stat(p).st_ino] = p
                except OSError:
                    pass
        leaves = set(a.agent_dirs)
        for ino, mask in inotify_watches(a.agent):
            watched.append({"path": by_ino.get(ino, f"inode {ino}"), "mask": hex(mask)})
        anc = sorted({w["path"] for w in watched if w["path"] not in leaves and int(w["mask"], 16) & ENTRY_EVENTS})
        if anc:
            log = open(os.path.join(a.workdir, "idle-ancestor-events"), "w+")
            observer = subprocess.Popen(
                ["inotifywait", "-m", "-q", "-e", "create,delete,moved_from,moved_to", "--format", "%w", *anc],
                stdout=log,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
    before = {n: switches(p) for n, p in trees.items()}
    time.sleep(a.secs)
    after_all = {n: switches(p) for n, p in trees.items()}
    out = {}
    if observer:
        observer.terminate()
        observer.wait()
        log.seek(0)
        counts = {}
        for line in log:
            counts[line.strip()] = counts.get(line.strip(), 0) + 1
        out["ancestor_events"] = counts
    if a.agent:
        out["agent_watches"] = watched
    for n, pids in trees.items():
        after = after_all[n]
        delta = sum(after[k] - before[n][k] for k in after if k in before[n])
        rss = sum(status_fields(f"/proc/{p}/status", ("VmRSS",)).get("VmRSS", 0) for p in pids)
        out[n] = {
            "rss_kb": rss,
            "processes": [comm(p) for p in pids],
            "threads": len(after),
            "switches": delta,
            "secs": a.secs,
            "per_min": delta * 60.0 / a.secs,
        }
    json.dump(out, sys.stdout)


# --- render --------------------------------------------------------------------------------------


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def p95(xs):
    """Nearest-rank 95th percentile."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, -(-95 * len(s) // 100) - 1))
    return s[k]


def load(d, name):
    with open(os.path.join(d, name)) as f:
        return json.load(f)


def fmt(x, unit="", nd=1):
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    if isinstance(x, float):
        x = f"{x:.{nd}f}"
    return f"{x}{(' ' + unit) if unit else ''}"


def ratio(alt, ours, nd=1):
    """How many times the alternative's figure is ours (bigger is better for us)."""
    if alt is None or ours is None:
        return "n/a"
    if ours == 0:
        return "∞" if alt else "1×"
    r = alt / ours
    return f"{r:.{nd}f}×" if r < 100 else f"{r:.0f}×"


def mib(b):
    return b / 1048576


def busy_info(m):
    def count(x, k):
        return int(x.split(k + "=")[1].split()[0]) if k + "=" in x else 0

    return {
        "loads": [float(x.split("load=")[1].split()[0]) for x in m["busy"]],
        "rustc": sum(1 for x in m["busy"] if count(x, "rustc")),
        "cargo": sum(1 for x in m["busy"] if count(x, "cargo")),
    }


def make_notes(m, size, boot, idle, lat, b, s, c, hb=None):
    n = []
    w = n.append
    bi = busy_info(m)
    w("## Method")
    w("")
    w("- Everything runs on this machine in one run: salt 3008.4 and supervisord from the repository's")
    w("  `.venv`, one supervisord with one program per contender (`sh -c 'echo $$ > PIDFILE; exec sleep'`,")
    w("  `startsecs=0`), the IMDS emulator (`target/debug/imds-emulator`) on loopback, and a bare git")
    w("  repository on local disk reached through `file://`, holding a one-state tree (`test.nop`) and a")
    w("  one-task `local.yml` for ansible-pull. The agent is the shipped static musl binary.")
    w("- **Size**: the alternative for pulling on a schedule is ansible-pull, which needs ansible-core in a")
    w("  python environment. Its figure includes the engine that applies the configuration (ansible); the")
    w("  agent's does not include salt, which it calls, so this row compares what each adds on a host, not")
    w("  equal function.")
    w("- **Boot**: `boot --once` on a root whose salt repository is already published (a reboot), after")
    w("  2 warm-ups. The agent's own time is `boot.total_ms` of its status timeline minus its `highstate`")
    w("  step (the `salt-call` process, reported on its own row). The hand-written bootstrap does what a")
    w("  user-data shell script does before salt: IMDSv2 token, user-data and identity with `curl`, the")
    w("  minion id, `git fetch --depth 1` and `reset --hard` in the existing checkout; it runs no salt.")
    w("- **Idle**: all three watchers are up at once, each watching its own folder; after 2 s, RSS is")
    w("  `VmRSS` summed over each process tree, and wake-ups are the voluntary plus involuntary context")
    w(f"  switches of every thread over the same {idle['agent']['secs']:.0f} s window (`/proc/PID/task/*/status`), scaled to a minute.")
    w("  The agent has one watch rule and a schedule of `@every 15m`, so no tick falls in the window.")
    w("- **Latency**: each change writes the watched file in place with new content; the clock runs from")
    w("  the write's `close()` until supervisord reports the program `RUNNING` with a new pid. The probe")
    w("  waits with inotify for the program to write its pid file, then polls supervisord's")
    w("  `getProcessInfo` every 1 ms until it says `RUNNING` with that pid, so it takes no CPU and puts no")
    w("  load on supervisord while the contender works. The contenders take turns, change by change, in a")
    w("  new random order each round (none is always measured first). 5 warm-up rounds, then changes spaced")
    w("  250-375 ms apart at random. The agent runs with its defaults (`quiet = 100ms`); the diagnostic row")
    w("  is a second agent with `quiet = \"10ms\"`, to separate the debounce window from the action itself.")
    w("  The hand-written loop is `scripts/bench/handloop.py`: inotify through ctypes, and per event")
    w("  `stopProcess` and `startProcess` over XML-RPC (what `supervisorctl restart` does, without")
    w("  starting a python per event); like the naive loop it has no debounce.")
    w("- **Burst**: 1,000 writes, as fast as python makes them, alternating two files of the watched folder,")
    w("  every third by writing a temporary file and renaming it over (as salt and editors do). Restarts")
    w("  are counted from supervisord's log (`spawned:` lines); an independent `inotifywait -m` with the same")
    w("  mask counts the events delivered (the loops restart once per event; the rename's temporary file")
    w("  counts too, as it would for the naive loop). The agent is given until 3 s pass without a restart;")
    w(f"  the loops, which would go on for minutes, get a {b['naive']['window_s']:.0f} s window and are then stopped.")
    w("- **Highstate burst**: a salt commit whose states write the agent's watched file three times, 0.3 s")
    w("  apart (`file.managed`, a temporary file renamed over; `file.append`; `file.replace`), applied by")
    w("  `stackless-init sync` beside the resident agent, which holds back its actions while a sync holds the")
    w("  lock; the hand-written loop's file gets the same states from `salt-call --local`. Restarts are counted")
    w("  until 3 s pass without one.")
    w("- **No-op sync**: `stackless-init sync` on a booted root, nothing new upstream, against")
    w("  `ansible-pull --only-if-changed -U file://REPO -d DIR local.yml` with its checkout present")
    w(f"  ({m['tools'].split('ansible-pull ')[1].split(',')[0]}, pip-installed in a throwaway virtualenv). CPU is user + system time")
    w("  from `wait4`, which includes every child the command waited for (git); `/usr/bin/time` reads the")
    w("  same counters but prints them in 10 ms steps. Medians after warm-ups.")
    w("- **New commit**: a commit is pushed before each pair of runs. The timeline figure is the sum of the")
    w("  sync's steps before its `highstate` step; exec to exec runs `salt-call` (through `[salt] salt_call`)")
    w("  and `ansible-playbook` (found by ansible-pull beside itself) through a two-line bash wrapper that")
    w("  writes `$EPOCHREALTIME` and execs the real program.")
    w("")
    w("## Figures far from their goals, and other observations")
    w("")
    if bi["rustc"] or bi["cargo"] or med(bi["loads"]) > m["nproc"]:
        w(f"- **The machine was busy** during this run (median 1-minute load {med(bi['loads']):.2f} on {m['nproc']} CPUs"
          + (f"; other work, `rustc` or `cargo`, was running at {max(bi['rustc'], bi['cargo'])} of {len(bi['loads'])} samples"
             if bi["rustc"] or bi["cargo"] else "")
          + "): figures that depend on getting a CPU at once (boot, latency) are pessimistic, for every contender.")
    own = med([r["own_ms"] for r in boot["agent"]])
    st = boot["median_steps"]
    ls_wall = med([r["wall_ms"] for r in s["lsremote"]["runs"]])
    if own >= 20:
        parts = ", ".join(f"{k} {v:g} ms" for k, v in st.items() if k != "highstate" and v)
        w(f"- **Boot overhead {own:.0f} ms, goal under 20 ms.** Its largest steps (medians): {parts}. The"
          " `imds` step is three HTTP requests to the emulator, a debug build here; on EC2 IMDS answers in about"
          " a millisecond per request.")
    gap = med([r["total_ms"] - r["highstate_ms"] - r["steps_ms"] for r in boot["agent"]])
    if own >= 20 and gap >= 2:
        w(f"  Another {gap:.0f} ms (median) of the boot's total lies outside the timed steps (writing the state"
          " record and the ready marker, and the rounding of each step down to whole milliseconds).")
    syncstep = st.get("sync-salt", 0)
    if syncstep - ls_wall > 2:
        w(f"- The `sync-salt` step of an unchanged repository takes {syncstep:g} ms while `git ls-remote` alone"
          f" takes {ls_wall:.1f} ms of wall clock. Most of the difference is the agent noticing late that git has"
          " exited: `init/src/repos.rs` polls the child with `try_wait` and sleeps of 2, 4, 8, 16 ... ms, so a"
          " git that exits after 4.5 ms is seen at 6 ms and one that exits after 6.5 ms at 14 ms. Waiting on the"
          " output pipes (the reader threads' channel, with the deadline as timeout) and then `wait()` would"
          " remove it; `salt/highstate.rs` polls salt-call every 20 ms the same way.")
    la, ln, lh = lat["agent"]["ms"], lat["naive"]["ms"], lat["hand"]["ms"]
    if med(la) >= med(ln) or med(la) > 1.25 * med(lh):
        q = lat.get("agent_quiet")
        diag = ""
        if q:
            diag = (f" With `quiet = \"{q['quiet']}\"` the agent's median is {med(q['ms']):.0f} ms, so its own"
                    f" work after the window (hashing, `stopProcess`, `startProcess`, `getProcessInfo`) is about"
                    f" {med(q['ms']) - 10:.0f} ms, against {med(lh):.0f} ms for the hand-written loop doing the same calls.")
        if med(la) >= med(ln):
            verdict = f"loses to the naive loop ({med(ln):.0f} ms)" + (
                f" and to the hand-written loop ({med(lh):.0f} ms)" if med(la) > med(lh) else "")
        else:
            verdict = f"beats the naive loop ({med(ln):.0f} ms) but loses to the hand-written loop ({med(lh):.0f} ms)"
        w(f"- **Latency: the agent ({med(la):.0f} ms) {verdict}"
          + ", goal at most 1.25x the hand-written loop's.** A finished lone write waits 1 ms of empty queue"
            " before the agent acts, and a burst waits the whole quiet window; the loops act on the first event"
            " (and pay for it in the burst below)." + diag)
    if b["agent"]["restarts"] != 1:
        ba = b["agent"]
        why = ""
        if ba["write_ms"] > 2000:
            why = (f" The 1,000 writes took {ba['write_ms']} ms here, longer than `max_delay` (2 s by default): the"
                   " agent acts at the latest 2 s after the first change of a burst, then once more for what"
                   " came after, as designed. The writer was slow because the machine was busy and the agent"
                   f" itself used {ba.get('agent_cpu_ms', 0):.0f} ms of CPU during the burst (it reads and hashes a"
                   " changed file as its events arrive), on 2 CPUs.")
        w(f"- **Burst: the agent restarted {ba['restarts']} times, goal exactly 1.**{why}")
    if hb and hb["agent"] != 1:
        w(f"- **Highstate burst: the agent restarted {hb['agent']} times, goal exactly 1** (after the highstate).")
    for k, name in (("naive", "naive loop"), ("hand", "hand-written loop")):
        x = b[k]
        if x.get("kills"):
            w(f"- During its burst the {name}'s program had to be killed by supervisord {x['kills']} time(s):"
              " a `stopProcess` sent 2 or 3 ms after the spawn leaves the program running (the SIGTERM most"
              " likely lands before the child has exec'd, while it still carries supervisord's own handlers),"
              " and supervisord then waits `stopwaitsecs` (5 s here) before SIGKILL. Restarting once per event"
              " runs straight into this; it is also why the loop's restarts in the window are few.")
    ag = idle["agent"]
    ws = idle.get("agent_watches", [])
    entry = [x["path"] for x in ws if int(x["mask"], 16) & ENTRY_EVENTS]
    selfonly = [x["path"] for x in ws if not int(x["mask"], 16) & ENTRY_EVENTS]
    watches = (f" It holds {len(ws)} inotify watches: for entries created, removed or renamed on "
               + ", ".join(f"`{p}`" for p in entry)
               + (("; only for their own removal or renaming on " + ", ".join(f"`{p}`" for p in selfonly)) if selfonly else "")
               + ".") if ws else ""
    if ag["switches"]:
        why = watches
        ev = idle.get("ancestor_events", {})
        if ev:
            tot = sum(ev.values())
            top = ", ".join(f"`{k}` {v}" for k, v in sorted(ev.items(), key=lambda kv: -kv[1])[:4])
            why += (f" In the same window other processes created, removed or renamed {tot} entries in the"
                    f" folders it watches for entries, apart from its watched folders (counted by an `inotifywait`"
                    f" of our own: {top}); each wakes the agent although none concerns a watched path.")
        w(f"- **Idle: the agent woke {ag['switches']} times in {ag['secs']:.0f} s, goal none.**{why}")
    elif ws:
        w(f"- Idle: no wake-up in {ag['secs']:.0f} s.{watches} Folders on the way to a watched path that exist"
          " and are not symlinks are watched only for their own removal or renaming, so files coming and"
          " going in them (in `/tmp`, say) do not wake the agent.")
    if ag["rss_kb"] * 1024 >= 4_000_000:
        w(f"- **Idle RSS {ag['rss_kb'] / 1024:.1f} MiB, goal under 4 MB.**")
    acpu = med([r["user_ms"] + r["sys_ms"] for r in s["agent"]["runs"]])
    pcpu = med([r["user_ms"] + r["sys_ms"] for r in s["ansible"]["runs"]])
    if acpu >= 30 or pcpu / acpu < 30:
        w(f"- **No-op sync: {acpu:.1f} ms of CPU, {pcpu / acpu:.0f}× cheaper than ansible-pull; goal under 30 ms and 30×.**")
    awall = med([r["wall_ms"] for r in s["agent"]["runs"]])
    if awall > 2 * acpu:
        w(f"- The no-op sync's wall clock ({awall:.1f} ms) is well above its CPU time ({acpu:.1f} ms): the"
          " process is waiting, mostly for git's exit to be noticed (see `sync-salt` above).")
    if n[-1] == "":
        w("Every figure met its goal in this run.")
    return n


def cmd_render(a):
    d = a.results
    m = load(d, "machine.json")
    rows = []

    def row(what, ours, alt_name, alt, r, goal, met):
        rows.append((what, ours, alt_name, alt, r, goal, "yes" if met else "**no**" if met is not None else ""))

    # binary size
    size = load(d, "size.json")
    for what, key, alt_name, goal in (
        ("static `stackless-init` binary", "bytes", "ansible-core and its dependencies, pip-installed (`du`)", "< 2 MiB (round two; < 3 MB before)"),
        ("same, aarch64 (Graviton)", "aarch64_bytes", "same", "< 2 MiB"),
    ):
        if size.get(key):
            row(
                what,
                fmt(mib(size[key]), "MiB", 3),
                alt_name,
                fmt(mib(size["alt_bytes"]), "MiB", 1),
                ratio(size["alt_bytes"], size[key]),
                goal,
                size[key] < 2 * 1024 * 1024,
            )

    # boot
    boot = load(d, "boot.json")
    own = [r["own_ms"] for r in boot["agent"]]
    salt = [r["highstate_ms"] for r in boot["agent"]]
    wall_own = [r["wall_ms"] - r["highstate_ms"] for r in boot["agent"]]
    shell = [r["wall_ms"] for r in boot["shell"]]
    row(
        "boot overhead, own time (salt excluded), median",
        fmt(med(own), "ms", 0),
        "hand-written bootstrap: curl IMDSv2 + `git fetch`, salt excluded",
        fmt(med(shell), "ms", 0),
        ratio(med(shell), med(own)),
        "< 20 ms",
        med(own) < 20,
    )
    row(
        "boot, same, process wall clock minus salt, median",
        fmt(med(wall_own), "ms", 0),
        "same bootstrap, wall clock",
        fmt(med(shell), "ms", 0),
        ratio(med(shell), med(wall_own)),
        "",
        None,
    )
    row(
        "boot: salt's own highstate (trivial tree), median",
        fmt(med(salt), "ms", 0),
        "(the same salt for both)",
        "",
        "",
        "",
        None,
    )

    # fleet listing
    if os.path.exists(os.path.join(d, "fleet.json")):
        fl = load(d, "fleet.json")
        row(
            f"`builder fleet` listing {fl['count']:,} moto instances, median of {len(fl['builder_s'])}",
            fmt(med(fl["builder_s"]), "s", 2),
            "boto3 paginating the same `DescribeInstances` (moto's own time)",
            fmt(med(fl["boto3_s"]), "s", 2),
            ratio(med(fl["boto3_s"]), med(fl["builder_s"]), 2),
            "< 5 s",
            med(fl["builder_s"]) < 5,
        )

    # idle
    idle = load(d, "idle.json")
    ag, nv, hd = idle["agent"], idle["naive"], idle["hand"]
    row(
        "idle RSS after boot",
        fmt(ag["rss_kb"] / 1024, "MiB", 1),
        "naive loop (bash + inotifywait) / hand-written python loop",
        f"{nv['rss_kb'] / 1024:.1f} / {hd['rss_kb'] / 1024:.1f} MiB",
        f"{ratio(nv['rss_kb'], ag['rss_kb'])} / {ratio(hd['rss_kb'], ag['rss_kb'])}",
        "< 4 MB",
        ag["rss_kb"] * 1024 < 4_000_000,
    )
    anc = sum(idle.get("ancestor_events", {}).values())
    row(
        f"wake-ups per minute while idle ({ag['secs']:.0f} s window)",
        fmt(ag["per_min"], "", 1)
        + (f" ({min(anc, ag['switches'])} of {ag['switches']} wake-ups: other processes' entries in ancestor folders)" if ag["switches"] and anc else ""),
        "naive loop / hand-written python loop",
        f"{nv['per_min']:.1f} / {hd['per_min']:.1f}",
        "",
        "0",
        ag["switches"] == 0,
    )

    # latency
    lat = load(d, "latency.json")
    la, ln, lh = lat["agent"]["ms"], lat["naive"]["ms"], lat["hand"]["ms"]
    row(
        f"change-to-restart latency, median (n = {len(la)})",
        fmt(med(la), "ms", 0),
        "naive loop (`inotifywait -m` piped into `supervisorctl restart`)",
        fmt(med(ln), "ms", 0),
        ratio(med(ln), med(la), 2),
        "below the naive loop's",
        med(la) < med(ln),
    )
    row(
        "change-to-restart latency, 95th percentile",
        fmt(p95(la), "ms", 0),
        "naive loop",
        fmt(p95(ln), "ms", 0),
        ratio(p95(ln), p95(la), 2),
        "",
        None,
    )
    row(
        "change-to-restart latency, median / p95",
        f"{med(la):.0f} / {p95(la):.0f} ms",
        "hand-written loop (python, inotify + supervisord XML-RPC)",
        f"{med(lh):.0f} / {p95(lh):.0f} ms",
        f"{ratio(med(lh), med(la), 2)} / {ratio(p95(lh), p95(la), 2)}",
        "median at most 1.25x the hand-written loop's",
        med(la) <= 1.25 * med(lh),
    )
    if "agent_quiet" in lat:
        lq = lat["agent_quiet"]["ms"]
        row(
            f"diagnostic: latency with `quiet = \"{lat['agent_quiet']['quiet']}\"` (not the default), median / p95",
            f"{med(lq):.0f} / {p95(lq):.0f} ms",
            "naive loop",
            f"{med(ln):.0f} / {p95(ln):.0f} ms",
            f"{ratio(med(ln), med(lq), 2)} / {ratio(p95(ln), p95(lq), 2)}",
            "",
            None,
        )

    # burst
    b = load(d, "burst.json")
    ba, bn, bh = b["agent"], b["naive"], b["hand"]
    row(
        f"burst of {ba['writes']} writes: restarts (events delivered)",
        f"{ba['restarts']} ({ba['events']} events)",
        f"naive loop: one restart per event; restarts done in the {bn['window_s']:.0f} s after the burst",
        f"{bn['events']} owed ({bn['restarts']} done)",
        ratio(bn["events"], ba["restarts"], 0),
        "1 per program",
        ba["restarts"] == 1,
    )
    row(
        f"burst of {ba['writes']} writes: restarts",
        f"{ba['restarts']}",
        f"hand-written loop: same",
        f"{bh['events']} owed ({bh['restarts']} done)",
        ratio(bh["events"], ba["restarts"], 0),
        "",
        None,
    )

    hb = load(d, "highstate_burst.json") if os.path.exists(os.path.join(d, "highstate_burst.json")) else None
    if hb:
        row(
            f"a highstate writing a watched file {hb['writes']} times, 0.3 s apart: restarts",
            f"{hb['agent']}",
            "hand-written loop, the same states by `salt-call --local` beside it",
            f"{hb['hand']}",
            ratio(hb["hand"], hb["agent"], 0),
            "1, after the highstate",
            hb["agent"] == 1,
        )

    # no-op sync
    s = load(d, "sync_noop.json")
    acpu = [r["user_ms"] + r["sys_ms"] for r in s["agent"]["runs"]]
    awall = [r["wall_ms"] for r in s["agent"]["runs"]]
    pcpu = [r["user_ms"] + r["sys_ms"] for r in s["ansible"]["runs"]]
    pwall = [r["wall_ms"] for r in s["ansible"]["runs"]]
    row(
        f"no-op sync, CPU (user + sys, incl. git), median of {len(acpu)}",
        fmt(med(acpu), "ms", 1),
        f"`ansible-pull --only-if-changed`, median of {len(pcpu)}",
        fmt(med(pcpu), "ms", 0),
        ratio(med(pcpu), med(acpu), 0),
        "< 30 ms and ≥ 30× cheaper",
        med(acpu) < 30 and med(pcpu) / max(med(acpu), 1e-9) >= 30,
    )
    row(
        "no-op sync, wall clock, median",
        fmt(med(awall), "ms", 1),
        "`ansible-pull --only-if-changed`",
        fmt(med(pwall), "ms", 0),
        ratio(med(pwall), med(awall), 0),
        "",
        None,
    )
    row(
        "`git ls-remote` alone on that repository, CPU / wall, median",
        f"{med([r['user_ms'] + r['sys_ms'] for r in s['lsremote']['runs']]):.1f} / "
        f"{med([r['wall_ms'] for r in s['lsremote']['runs']]):.1f} ms",
        "(floor for both)",
        "",
        "",
        "",
        None,
    )

    # new commit
    c = load(d, "sync_commit.json")
    tl = [r["before_highstate_ms"] for r in c["agent"]]
    ext = [r["to_stamp_ms"] for r in c["agent"]]
    anx = [r["to_stamp_ms"] for r in c["ansible"]]
    row(
        f"sync with a new commit: time to highstate starting, timeline, median of {len(tl)}",
        fmt(med(tl), "ms", 0),
        "",
        "",
        "",
        "",
        None,
    )
    row(
        "same, exec of `stackless-init sync` to exec of `salt-call`, median",
        fmt(med(ext), "ms", 0),
        "`ansible-pull --only-if-changed`: exec to exec of `ansible-playbook`",
        fmt(med(anx), "ms", 0),
        ratio(med(anx), med(ext)),
        "",
        None,
    )

    # a bad config commit, reverted by the agent
    rv = load(d, "revert.json") if os.path.exists(os.path.join(d, "revert.json")) else None
    if rv:
        row(
            f"bad config commit → program running again on the good release (published to RUNNING), median of {len(rv['ms'])}",
            fmt(med(rv["ms"]), "ms", 0),
            "without the agent: down until someone pushes a fix",
            "",
            "",
            "",
            None,
        )

    # a one-line commit on a 32 MB repository: the agent's object store against a persistent clone
    inc = load(d, "incremental.json") if os.path.exists(os.path.join(d, "incremental.json")) else None
    if inc:
        runs = [{x["name"]: x for x in pair} for pair in inc["runs"]]
        cpu_of = lambda x: x["cpu"]["runs"][0]["user_ms"] + x["cpu"]["runs"][0]["sys_ms"]
        wall_of = lambda x: x["cpu"]["runs"][0]["wall_ms"]
        iw, gw = med([wall_of(r["agent"]) for r in runs]), med([wall_of(r["git"]) for r in runs])
        ic, gc = med([cpu_of(r["agent"]) for r in runs]), med([cpu_of(r["git"]) for r in runs])
        ib, gb = med([r["agent"]["bytes"] for r in runs]), med([r["git"]["bytes"] for r in runs])
        idisk, gdisk = med([r["agent"]["disk"] for r in runs]), med([r["git"]["disk"] for r in runs])
        mb = inc["packed_bytes"] / 1e6
        row(
            f"one-line commit on a {mb:.0f} MB repository: sync wall clock, median of {len(runs)}",
            fmt(iw, "ms", 0),
            "`git fetch` + `git reset --hard` in a persistent clone",
            fmt(gw, "ms", 0),
            ratio(gw, iw),
            "≤ 2× git's",
            iw <= 2 * gw,
        )
        row(
            "same: CPU (user + sys, incl. git), median",
            fmt(ic, "ms", 0),
            "same",
            fmt(gc, "ms", 0),
            ratio(gc, ic),
            "≤ 2× git's",
            ic <= 2 * gc,
        )
        row(
            "same: bytes the git server sent (smart HTTP), median",
            f"{ib:.0f} B",
            "same (git's own incremental fetch)",
            f"{gb:.0f} B",
            ratio(gb, ib),
            "≤ 2× git's",
            ib <= 2 * gb,
        )
        row(
            "same: new bytes on disk per commit (releases and object store; `du`), median",
            fmt(idisk / 1024, "KiB", 0),
            "same (the clone's objects, index and file)",
            fmt(gdisk / 1024, "KiB", 0),
            ratio(gdisk, idisk),
            "< 1 MB",
            idisk < 1_000_000,
        )
        row(
            "same: first fetch, bytes the server sent",
            fmt(inc["first_agent_bytes"] / 1e6, "MB", 1),
            "`git clone`",
            fmt(inc["first_clone_bytes"] / 1e6, "MB", 1),
            ratio(inc["first_clone_bytes"], inc["first_agent_bytes"]),
            "",
            None,
        )

    # the boot race (BENCH_BOOT=1): the same work at boot, the agent against cloud-init, in qemu
    br = load(d, "boot-race.json") if os.path.exists(os.path.join(d, "boot-race.json")) else None
    if br:

        def spread(ms):
            # The runs' range beside the median: how far one run can be from another here.
            return f" ({min(ms) / 1000:.1f} to {max(ms) / 1000:.1f})" if len(ms) > 1 else ""

        accel = "/".join(br["accel"]).upper()
        ps, ci = med(br["web_ms"]["preseeded"]) / 1000, med(br["web_ms"]["cloud-init"]) / 1000
        row(
            f"boot: qemu start to the highstate done and the web program answering, preseeded image ({accel}), median of {len(br['web_ms']['preseeded'])}",
            fmt(ps, "s", 1) + spread(br["web_ms"]["preseeded"]),
            "cloud-init (Debian's, Ec2 datasource on the same IMDS emulator; `runcmd` clones the same repositories and runs `salt-call --local state.highstate`), the preseeded image with the agent's unit off",
            fmt(ci, "s", 1) + spread(br["web_ms"]["cloud-init"]),
            ratio(ci, ps),
            "≤ 0.5× cloud-init's",
            ps <= 0.5 * ci,
        )
        if br["web_ms"].get("bare"):
            bs = med(br["web_ms"]["bare"]) / 1000
            row(
                "same, bare image (salt pip-installed at first boot, its C dependencies compiled)",
                fmt(bs, "s", 0),
                "cloud-init on the preseeded image (salt baked in)",
                fmt(ci, "s", 1),
                ratio(ci, bs),
                "",
                None,
            )
        if br.get("rebake_ms"):
            rb = med(br["rebake_ms"]) / 1000
            nc = br["rebake_nocache_ms"] / 1000
            row(
                f"re-bake of preseeded after a template change (`bake --force --target local`; base, packages layer and pip wheelhouse cached), median of {len(br['rebake_ms'])}",
                fmt(rb, "s", 1) + spread(br["rebake_ms"]),
                "the same bake with `--no-cache`: the Debian base alone, apt installs the packages and pip builds salt's dependencies, as on a fresh machine",
                fmt(nc, "s", 1),
                ratio(nc, rb),
                "< 30 s",
                rb < 30,
            )

    out = []
    w = out.append
    w("# Benchmarks")
    w("")
    w("Generated by `scripts/bench.sh`; do not edit by hand. Each figure of the agent stands beside the")
    w("same work done by the alternative a team would otherwise use, measured in the same run. The")
    w("ratio is the alternative's figure divided by the agent's: above 1× the agent is smaller,")
    w("faster or cheaper.")
    w("")
    w("## Machine")
    w("")
    w(f"- date: {m['date']}")
    w(f"- CPU: {m['cpu']}, {m['nproc']} CPUs (`nproc`)")
    w(f"- kernel: {m['kernel']}; {m['os']}")
    w(f"- memory: {m['mem']}")
    w(f"- tools: {m['tools']}")
    bz = busy_info(m)
    w(
        f"- load: 1-minute load average {min(bz['loads']):.2f} to {max(bz['loads']):.2f} (median {med(bz['loads']):.2f})"
        f" over {len(bz['loads'])} samples between phases; "
        + (f"**other work was running: `rustc` at {bz['rustc']}, `cargo` at {bz['cargo']} of them**"
           if bz["rustc"] or bz["cargo"] else "no `rustc` or `cargo` running at any of them")
    )
    w(f"- the run took {m['elapsed_s']:.0f} s, {m['elapsed_s'] - m.get('prepare_s', 0):.0f} s of it measuring (the rest: dependencies and builds)")
    if m.get("quick"):
        w("- **quick mode (`BENCH_QUICK=1`): few iterations, figures for checking the script only**")
    w("")
    w("## Results")
    w("")
    w("| what | stackless-init | alternative | its figure | ratio | goal | met |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        w("| " + " | ".join(str(x) for x in r) + " |")
    w("")
    for line in make_notes(m, size, boot, idle, lat, b, s, c, hb):
        w(line)
    w("")
    w("## Raw figures")
    w("")
    w(f"- boot, own ms per run: {', '.join(str(x) for x in own)}; salt's highstate ms: {', '.join(str(x) for x in salt)}")
    w(f"- boot, median step times: {boot['median_steps']}")
    w(f"- latency ms, agent: {' '.join(f'{x:.0f}' for x in sorted(la))}")
    w(f"- latency ms, naive loop: {' '.join(f'{x:.0f}' for x in sorted(ln))}")
    w(f"- latency ms, hand-written loop: {' '.join(f'{x:.0f}' for x in sorted(lh))}")
    if "agent_quiet" in lat:
        w(f"- latency ms, agent with quiet = {lat['agent_quiet']['quiet']}: {' '.join(f'{x:.0f}' for x in sorted(lat['agent_quiet']['ms']))}")
    w(f"- missed changes (no restart within the timeout): agent {lat['agent']['missed']}, naive {lat['naive']['missed']}, hand-written {lat['hand']['missed']}")
    w(f"- idle: {json.dumps(idle)}")
    w(f"- burst: {json.dumps(b)}")
    w(f"- no-op sync CPU ms, agent: {' '.join(f'{x:.1f}' for x in acpu)}; ansible-pull: {' '.join(f'{x:.0f}' for x in pcpu)}")
    if rv:
        w(f"- bad config commit to running again on the good release, ms: {' '.join(f'{x:.0f}' for x in rv['ms'])} (program: startsecs={rv['startsecs']}, startretries={rv['startretries']})")
    if inc:
        w(f"- one-line commits on the {inc['packed_bytes'] / 1e6:.0f} MB repository, agent / git, wall ms: "
          + ", ".join(f"{wall_of(r['agent']):.0f}/{wall_of(r['git']):.0f}" for r in runs)
          + "; CPU ms: " + ", ".join(f"{cpu_of(r['agent']):.0f}/{cpu_of(r['git']):.0f}" for r in runs)
          + "; bytes sent: " + ", ".join(f"{r['agent']['bytes']}/{r['git']['bytes']}" for r in runs)
          + "; new bytes on disk: " + ", ".join(f"{r['agent']['disk']}/{r['git']['disk']}" for r in runs)
          + ". The agent's sync is `git ls-remote` (the no-op check) then a fetch by commit id into its object"
          " store, `git diff-tree` and `git restore` of the changed files; the clone's is `git fetch` (which"
          " lists the refs itself) and `git reset --hard`. The agent's disk figure counts a new release"
          " (hard links to the previous one's unchanged files) and the store's new objects; it falls when an"
          " old release is pruned.")
    if br:
        w(f"- boot race ({', '.join(br['accel'])}), qemu start to the web program answering, ms: "
          + "; ".join(f"{k} {' '.join(str(x) for x in v)}" for k, v in br["web_ms"].items() if v)
          + "; when each said it was done (the agent's result line, cloud-init's 'finished' line, on the"
          " console), ms from the same start: "
          + "; ".join(f"{k} {' '.join(str(x) for x in v)}" for k, v in br["said_done_ms"].items() if v)
          + f"; bakes, ms: {json.dumps(br['bake_ms'])}"
          + (f"; re-bakes of preseeded (--force), ms: {' '.join(map(str, br['rebake_ms']))}; with --no-cache: {br['rebake_nocache_ms']}"
             if br.get("rebake_ms") else ""))
    w(f"- new commit, ms to highstate (timeline / exec to exec): {' '.join(str(x) for x in tl)} / {' '.join(f'{x:.0f}' for x in ext)}; ansible-pull exec to exec: {' '.join(f'{x:.0f}' for x in anx)}")
    print("\n".join(out))
    # Also a compact JSON of the headline figures, for whoever updates the README.
    with open(os.path.join(d, "headline.json"), "w") as f:
        json.dump(
            {
                "binary_mib": round(mib(size["bytes"]), 2),
                "boot_own_ms": med(own),
                "idle_rss_mib": round(ag["rss_kb"] / 1024, 1),
                "idle_wakeups_per_min": ag["per_min"],
                "latency_median_ms": round(med(la)),
                "latency_p95_ms": round(p95(la)),
                "naive_latency_median_ms": round(med(ln)),
                "burst_restarts": ba["restarts"],
                "noop_sync_cpu_ms": round(med(acpu), 1),
                "ansible_noop_cpu_ms": round(med(pcpu)),
            },
            f,
        )


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("latency")
    p.add_argument("--socket", required=True)
    p.add_argument("--contender", action="append", required=True,
                   help="NAME=PROGRAM,FILE,PIDFILE; repeated, measured in turns")
    p.add_argument("--count", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--gap-ms", type=float, default=250)
    p.add_argument("--timeout", type=float, default=10)

    p = sub.add_parser("burst")
    p.add_argument("--dir", required=True)
    p.add_argument("--files", default="a.conf,b.conf")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--tag", default="")

    p = sub.add_parser("cpu")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("argv", nargs="+")

    p = sub.add_parser("boot")
    p.add_argument("--bin", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--shell", required=True)
    p.add_argument("--shell-dir", required=True)

    p = sub.add_parser("spawnstamp")
    p.add_argument("--stamp", required=True)
    p.add_argument("--timeline-root")
    p.add_argument("--bin")
    p.add_argument("argv", nargs="+")

    p = sub.add_parser("idle")
    p.add_argument("--secs", type=float, default=30)
    p.add_argument("--agent", type=int, help="pid of the agent, to list its inotify watches")
    p.add_argument("--agent-dirs", nargs="*", default=[], help="the folders the agent watches")
    p.add_argument("--workdir", default="/tmp")
    p.add_argument("trees", nargs="+", help="NAME=PID")

    p = sub.add_parser("fleet")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--builder", required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3)
    p = sub.add_parser("revert")
    p.add_argument("--socket", required=True)
    p.add_argument("--program", required=True)
    p.add_argument("--pidfile", required=True)
    p.add_argument("--current", required=True)
    p.add_argument("--bad", required=True)
    p.add_argument("--good", required=True)
    p.add_argument("--timeout", type=float, default=60)

    p = sub.add_parser("render")
    p.add_argument("results")

    a = ap.parse_args()
    {
        "latency": cmd_latency,
        "burst": cmd_burst,
        "cpu": cmd_cpu,
        "fleet": cmd_fleet,
        "spawnstamp": cmd_spawnstamp,
        "boot": cmd_boot,
        "idle": cmd_idle,
        "render": cmd_render,
        "revert": cmd_revert,
    }[a.cmd](a)


if __name__ == "__main__":
    main()
