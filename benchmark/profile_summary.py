"""Where a node's Python time goes: py-spy's raw stacks summarised by thread and function.

    .venv/bin/python -m benchmark.profile_summary \\
        benchmark/results/bench-*/profiles/profile-rabbitmq-bench-rabbitmq-1.txt --messages 200000

The benchmark's ``--profile`` records the nodes with ``py-spy record --gil
--threads --rate 250 --format raw``: only the thread holding the GIL is
sampled, so each sample stands for 1/250 s of Python work in the node. Per
thread, this prints the functions with the most samples, inclusive (anywhere
on the stack) and self (top of the stack), and with ``--messages`` the
microseconds of GIL time per message each stands for. Time in system calls
with the GIL released (socket writes) is not in these samples; the benchmark's
``cpu_us_per_msg`` has the total.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

THREAD = re.compile(r"^thread \((\w+)\)(?::\s*\"?([^;\"]*)\"?)?")


def parse(path: Path) -> dict[str, list[tuple[list[str], int]]]:
    """Stacks per thread: ``{thread: [(frames root first, samples), ...]}``."""
    threads: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        match = THREAD.match(stack)
        thread = "all"
        if match:
            thread = match.group(2) or match.group(1)
            frames = [f for f in frames if not f.startswith(("thread (", "process "))]
        threads[thread].append((frames, int(count)))
    return threads


def function_name(frame: str) -> str:
    # "function (path/module.py:123)" -> "function (module.py)"
    match = re.match(r"^(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    return f"{match.group(1)} ({Path(match.group(2)).name})"


def summarise(path: Path, messages: int | None, rate: int, top: int, cpu_us_per_msg: float | None = None) -> str:
    """With ``cpu_us_per_msg`` (the node's measured CPU per message), shares of samples are
    scaled to it; else each sample counts 1/``rate`` s of GIL time spread over ``messages``.
    On a busy machine GIL time exceeds CPU time (a thread can hold the GIL while preempted),
    so the scaled figures are the better estimate."""
    threads = parse(path)
    total = sum(count for stacks in threads.values() for _, count in stacks)
    us_per_sample = 1e6 / rate / messages if messages else None
    lines = [f"# {path.name}: {total} samples = {total / rate:.1f} s holding the GIL"]
    if us_per_sample:
        lines[0] += f" = {total * us_per_sample:.1f} µs per message"
    if cpu_us_per_msg and total:
        us_per_sample = cpu_us_per_msg / total
        lines[0] += f"; scaled to the measured {cpu_us_per_msg} µs CPU per message"
    ranked = sorted(threads.items(), key=lambda item: -sum(c for _, c in item[1]))
    for thread, stacks in ranked:
        inclusive: Counter[str] = Counter()
        own: Counter[str] = Counter()
        busy = 0
        for frames, count in stacks:
            busy += count
            for name in {function_name(f) for f in frames}:
                inclusive[name] += count
            if frames:
                own[function_name(frames[-1])] += count
        cost = f", {busy * us_per_sample:.1f} µs/msg" if us_per_sample else ""
        lines.append(f"\n## thread {thread}: {busy} samples ({100 * busy / max(total, 1):.1f}%){cost}")
        for title, counter in (("inclusive", inclusive), ("self", own)):
            lines.append(f"{title}:")
            for name, count in counter.most_common(top):
                extra = f"{count * us_per_sample:7.1f} µs/msg  " if us_per_sample else ""
                lines.append(f"  {100 * count / max(busy, 1):5.1f}%  {extra}{name}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.profile_summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("files", nargs="+", type=Path, help="py-spy record --format raw --threads output")
    parser.add_argument("--messages", type=int, help="messages the node handled while profiled")
    parser.add_argument("--cpu-us-per-msg", type=float, help="scale to the node's CPU per message (results JSON)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy's sampling rate (--rate of the recording)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    for path in args.files:
        print(summarise(path, args.messages, args.rate, args.top, args.cpu_us_per_msg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
