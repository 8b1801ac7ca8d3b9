r"""Soak: train.py on the default config, SIGKILLed and resumed every few steps, against one
uninterrupted run (issue 17, item 11). Not part of the default tests (minutes of CPU).

  python benchmarks/soak.py                     # 120 steps, checkpoint every 5, kill every 20
  python benchmarks/soak.py --steps 300 --kill_every 25 --out benchmarks/results/soak.json

Checks, and writes to --out (JSON) and --out with .md:
  * the final parameters, batch statistics and optimizer state of the killed-and-resumed run
    equal the uninterrupted run's, bit for bit;
  * no temporary checkpoint directory (``*.orbax-checkpoint-tmp-*``) is left in the workdir;
  * the resident memory (RSS, sampled every 0.2 s) of the uninterrupted run is flat: its
    growth from the first logged step after warm-up to the last is reported (MiB, and MiB per
    100 steps), and each killed segment's peak.

The kills land wherever the process is when the watcher sees the log line of the kill step
(mid-step, mid-save or mid-log); every segment resumes from the last complete checkpoint.
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = re.compile(r"\] step (\d+): train_loss")


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_segment(args, workdir, log, kill_at=None, timeout=900):
    """Runs train.py until it exits or (kill_at) logs a step >= kill_at, then SIGKILLs it.
    Returns {'rc', 'killed_after_step', 'samples': [(t, rss, last_logged_step)], 'seconds'}."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--workdir", workdir] + args
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    samples, step, pos, killed = [], None, 0, None
    while p.poll() is None:
        if time.monotonic() - t0 > timeout:
            p.kill()
            raise SystemExit(f"soak: train.py ran past {timeout} s: {open(log).read()[-3000:]}")
        with open(log) as f:
            f.seek(pos)
            chunk = f.read()
            pos = f.tell()
        for m in STEP.finditer(chunk):
            step = int(m.group(1))
        r = rss_mib(p.pid)
        if r is not None:
            samples.append((round(time.monotonic() - t0, 2), round(r, 1), step))
        if kill_at is not None and step is not None and step >= kill_at:
            p.send_signal(signal.SIGKILL)
            killed = step
            p.wait()
            break
        time.sleep(0.2)
    return {"rc": p.wait(), "killed_after_step": killed, "samples": samples,
            "seconds": round(time.monotonic() - t0, 1)}


def final_state(workdir):
    """The latest checkpoint's state as a flat {path: np.ndarray}."""
    import orbax.checkpoint as ocp
    ckpts = os.path.join(workdir, "checkpoints")
    step = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
    tree = ocp.PyTreeCheckpointer().restore(os.path.join(ckpts, str(step), "state"))
    flat = {}

    def walk(prefix, t):
        if isinstance(t, dict):
            for k, v in t.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(t, (list, tuple)):
            for i, v in enumerate(t):
                walk(f"{prefix}/{i}", v)
        else:
            flat[prefix] = np.asarray(t)
    walk("", tree)
    return step, flat


def leftovers(workdir):
    """Temporary checkpoint directories (orbax's ``*.orbax-checkpoint-tmp-*``) anywhere in workdir."""
    return [os.path.relpath(os.path.join(d, n), workdir) for d, dirs, files in os.walk(workdir)
            for n in dirs + files if "tmp" in n and "orbax" in n]


def growth(samples, warm_step, before_step=None):
    """RSS (MiB) at the first sample with a logged step >= warm_step, at the last logged step
    (< before_step when given), the peak, and the growth per 100 steps between them."""
    logged = [(t, r, s) for t, r, s in samples if s is not None and s >= warm_step
              and (before_step is None or s < before_step)]
    if len(logged) < 2:
        return None
    (_, r0, s0), (_, r1, s1) = logged[0], logged[-1]
    return {"from_step": s0, "to_step": s1, "rss_from_mib": r0, "rss_to_mib": r1,
            "growth_mib": round(r1 - r0, 1),
            "growth_mib_per_100_steps": round(100 * (r1 - r0) / max(s1 - s0, 1), 2),
            "peak_mib": max(r for _, r, _ in samples)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--checkpoint_every", type=int, default=5)
    ap.add_argument("--kill_every", type=int, default=20)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "default.py"))
    ap.add_argument("--extra", action="append", default=[],
                    help="one more train.py flag, e.g. --extra=--config.dataset=DIR (repeatable)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "soak.json"))
    ap.add_argument("--keep", action="store_true", help="keep the work directories")
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="skip the second uninterrupted run (run-to-run noise of this machine)")
    a = ap.parse_args()
    args = ["--config", a.config, f"--config.num_train_steps={a.steps}",
            f"--config.checkpoint_every_steps={a.checkpoint_every}", "--config.log_every_steps=1",
            "--config.progress_bar=False"] + a.extra
    tmp = tempfile.mkdtemp(prefix="jaxbn_soak_")
    ref_dir, soak_dir = os.path.join(tmp, "uninterrupted"), os.path.join(tmp, "killed")
    t0 = time.monotonic()
    ref = run_segment(args, ref_dir, os.path.join(tmp, "uninterrupted.log"))
    if ref["rc"] != 0:
        raise SystemExit(f"soak: the uninterrupted run failed: {open(os.path.join(tmp, 'uninterrupted.log')).read()[-3000:]}")
    control_state = None
    if a.control:  # a second uninterrupted run: how much two identical runs differ on this machine
        control_dir = os.path.join(tmp, "control")
        control = run_segment(args, control_dir, os.path.join(tmp, "control.log"))
        if control["rc"] != 0:
            raise SystemExit("soak: the control run failed")
        control_state = final_state(control_dir)[1]
    segments, kill_at = [], a.kill_every
    while True:
        seg = run_segment(args, soak_dir, os.path.join(tmp, f"segment{len(segments)}.log"),
                          kill_at=kill_at if kill_at < a.steps else None)
        segments.append(seg)
        if seg["killed_after_step"] is None:
            if seg["rc"] != 0:
                raise SystemExit(f"soak: segment {len(segments) - 1} failed (rc {seg['rc']})")
            break
        kill_at += a.kill_every
    ref_step, ref_state = final_state(ref_dir)
    soak_step, soak_state = final_state(soak_dir)
    diffs = {k: float(np.max(np.abs(ref_state[k].astype(np.float64) - soak_state[k].astype(np.float64)),
                                initial=0.0)) for k in ref_state if k in soak_state}
    equal = (ref_step == soak_step and ref_state.keys() == soak_state.keys()
             and all(np.array_equal(ref_state[k], soak_state[k]) for k in ref_state))
    control_diff = None if control_state is None else max(
        float(np.max(np.abs(ref_state[k].astype(np.float64) - control_state[k].astype(np.float64)), initial=0.0))
        for k in ref_state)
    close = all(np.allclose(soak_state[k], ref_state[k], rtol=1e-5, atol=1e-6) for k in ref_state
                if k in soak_state) and ref_state.keys() == soak_state.keys()
    leaks = leftovers(soak_dir) + leftovers(ref_dir)
    resumed = [int(m.group(1)) for i in range(1, len(segments)) for m in re.finditer(
        r"Resuming from \S+ at step (\d+)", open(os.path.join(tmp, f"segment{i}.log")).read())]
    result = {
        "command": "python benchmarks/soak.py " + " ".join(sys.argv[1:]),
        "train_py_args": args,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "steps": a.steps, "checkpoint_every": a.checkpoint_every, "kill_every": a.kill_every,
        "kills": [s["killed_after_step"] for s in segments if s["killed_after_step"] is not None],
        "resumed_at": resumed,
        "final_step": {"uninterrupted": ref_step, "killed_and_resumed": soak_step},
        "final_state_bitwise_equal": equal,
        "leaves": len(ref_state),
        "max_abs_diff": max(diffs.values(), default=0.0),
        "max_abs_diff_control": control_diff,  # two uninterrupted runs
        "final_state_allclose_rtol1e-5": close,
        "rss_trajectory_uninterrupted": [
            (s, r) for i, (t, r, s) in enumerate(ref["samples"])
            if s is not None and (i + 1 == len(ref["samples"]) or ref["samples"][i + 1][2] != s) and s % 10 == 0],
        "leftover_tmp_dirs": leaks,
        # Steady state: after the first checkpoint and log (step 20) up to the last step before
        # the final one, which adds the test-set evaluation's buffers.
        "rss_uninterrupted": growth(ref["samples"], warm_step=20, before_step=a.steps),
        "rss_uninterrupted_whole_run": growth(ref["samples"], warm_step=1),
        "rss_segments_peak_mib": [max((r for _, r, _ in s["samples"]), default=None) for s in segments],
        "seconds": {"uninterrupted": ref["seconds"], "segments": [s["seconds"] for s in segments],
                    "total": round(time.monotonic() - t0, 1)},
        # Bitwise when the machine's runs are (control identical), else as close as two runs are.
        "ok": bool((equal or (close and control_diff is not None and control_diff > 0)) and not leaks),
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    rss = result["rss_uninterrupted"] or {}
    md = [f"# Soak: kill/resume every {a.kill_every} steps vs uninterrupted ({a.steps} steps)", "",
          f"Command: `{result['command']}`  ", f"Machine: {result['machine']}", "",
          f"* final state ({len(ref_state)} arrays, step {ref_step}) bitwise equal: **{equal}** "
          f"(max |diff| {result['max_abs_diff']:g}; two uninterrupted runs: "
          f"{'-' if control_diff is None else f'{control_diff:g}'}; allclose rtol 1e-5: {close})",
          f"* kills after steps {result['kills']}; resumed at steps {resumed}",
          f"* leftover temporary checkpoint directories: {leaks or 'none'}",
          f"* RSS of the uninterrupted run (steady state): {rss.get('rss_from_mib')} MiB at step {rss.get('from_step')} -> "
          f"{rss.get('rss_to_mib')} MiB at step {rss.get('to_step')} ({rss.get('growth_mib_per_100_steps')} "
          f"MiB / 100 steps), peak {rss.get('peak_mib')} MiB; segments' peaks {result['rss_segments_peak_mib']}",
          f"* RSS (MiB) of the uninterrupted run by step: {result['rss_trajectory_uninterrupted']}",
          f"* wall time {result['seconds']['total']} s", ""]
    with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    if not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"work directories kept in {tmp}")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
