"""The accelerator check's results as a markdown report and a one-screen summary (check.py writes both)."""

from __future__ import annotations

from typing import List

from common import _common


def _ms(t) -> str:
    if t is None:
        return ""
    return f"{t * 1e3:.3f}" if t < 0.01 else f"{t * 1e3:.2f}" if t < 1 else f"{t * 1e3:.0f}"


def _pct(v) -> str:
    return "" if v is None else f"{v:.0%}"


def _x(v) -> str:
    return "" if v is None else f"×{v:.2f}"


def _env_line(r) -> str:
    e = r["environment"]
    v = e["versions"]
    cpu = e.get("cpu", {})
    return (f"{e['device_count']} × {e['device_kind']} ({e['platform']}, {str(e.get('platform_version', ''))[:80]}); "
            f"jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, flax {v.get('flax')}, optax {v.get('optax')}, "
            f"numpy {v.get('numpy')}, torch {v.get('torch', 'absent')}, python {v.get('python')}; "
            f"host {cpu.get('model_name')}, {cpu.get('logical_cpus')} logical CPUs; "
            f"load average {e.get('loadavg')} at start, {e.get('loadavg_end')} at end")


def _parts_lines(r) -> List[str]:
    out = []
    for name, p in r["parts"].items():
        extra = p.get("reason") or ""
        out.append(f"- {name}: {p.get('status')}" + (f" in {p['wall_s']:.0f} s" if p.get("wall_s") else "")
                   + (f" ({extra})" if extra else ""))
    return out


def _correctness_lines(r) -> List[str]:
    out = []
    o = r.get("oracle")
    if o:
        fails = [c["name"] for c in o["checks"] if not c["ok"]]
        out.append(f"- built-in oracle check on {o['platform']} ({o['device_count']} device(s)): {o['passed']} passed, "
                   f"{o['failed']} failed" + (f": {', '.join(fails)}" if fails else ""))
        out += [f"- {n}" for n in o.get("notes", [])]
        pr = o.get("program") or {}
        if pr:
            out.append(f"- compiled training step on {pr.get('platform')}: custom calls "
                       f"{pr.get('custom_calls') or 'none'}"
                       f", jaxbn CPU custom calls {pr.get('jaxbn_cpu_custom_calls') or 'none'}, optimization "
                       f"barriers {pr.get('opt_barriers')}, {pr.get('kernels')} kernels")
            for plats, res in (pr.get("jax_export") or {}).items():
                out.append(f"  - jax.export for {plats}: {res[:250]}")
            for plat, res in (pr.get("lowered_for") or {}).items():
                warn = "WARNING: " if plat != "cpu" and "jaxbn CPU custom calls [" in res else ""
                out.append(f"  - training step lowered from here for {plat}: {warn}{res}")
    for key, label in (("pytest_1dev", "pytest, one device"), ("pytest_ndev", "pytest, all devices")):
        t = r.get(key)
        if t:
            sk = "; ".join(f"{n} skipped: {why}" for why, n in t.get("skip_reasons", {}).items())
            out.append(f"- {label}: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, {t.get('skipped', 0)} "
                       f"skipped ({t['status']}, {t['wall_s']:.0f} s)" + (f"; {sk}" if sk else ""))
            for f in t.get("failures", [])[:10]:
                out.append(f"  - FAILED {f['test']}: {f['message'][:200]}")
    for name in ("pytest-1dev", "pytest-ndev"):
        p = r["parts"].get(name, {})
        if p.get("status") == "skipped":
            out.append(f"- {name}: skipped: {p.get('reason')}")
    return out


def _layer_tables(r) -> List[str]:
    lay = r.get("layer")
    if not lay:
        return ["No BN-layer results (part skipped or failed)."]
    tr = (r.get("torch") or {}).get("results") or {}
    absent = (lay.get("settings") or {}).get("absent") or []
    out = ([f"Peers not timed: {'; '.join(absent)}.", ""] if absent else [])
    out += [f"Copy bandwidth (a = -a, donated, {lay['bandwidth']['copy_bytes'] / 2**20:.0f} MiB moved): "
            f"{lay['bandwidth']['copy_bw'] / 1e9:.1f} GB/s at the start; each row has its own, interleaved.", ""]
    if r.get("torch"):
        t = r["torch"]
        where = (f"{t['device_name']}; CUDA {t['cuda']}, cuDNN {t['cudnn']}" if t["device"] == "cuda"
                 else f"{t['threads']} threads")
        out.append(f"PyTorch {t['torch']} on {t['device']} ({where}), own process, channels_last BatchNorm2d, "
                   f"copy bandwidth {t['copy_bw'] / 1e9:.1f} GB/s.")
        out.append("")
    for harness, rows in lay["train"].items():
        if not rows:
            continue
        peers = []
        for v in rows.values():
            peers += [p for p in v["peers"] if p not in peers]
        what = ("VJP with a fixed cotangent" if harness == "vjp"
                else "gradient of the scalar loss sum(dy·y²)/2 inside jit")
        out.append(f"**Training forward+backward ({what})**: ms per call (median), speed-up over flax.linen, "
                   f"fraction of the 5N roofline")
        out.append("")
        rows_md = []
        for k, v in rows.items():
            row = [k.split("/")[1] + " " + "×".join(map(str, v["shape"])), v["dtype"]]
            for p in peers:
                e = v["peers"].get(p)
                row.append("" if e is None else
                           f"{_ms(e['median_s'])} ({_x(e['speedup_vs_flax'])}, {_pct(e['roofline_5N'])})")
            if harness == "vjp" and tr:
                tk = f"train/{v['dtype']}/{','.join(map(str, v['shape']))}"
                row.append(f"{_ms(tr[tk]['median_s'])} ({_pct(tr[tk]['roofline'])})" if tk in tr else "")
            rows_md.append(row)
        header = ["shape", "dtype"] + peers + (["PyTorch (own process)"] if harness == "vjp" and tr else [])
        out.append(_common.fmt_table(header, rows_md))
        out.append("")
    if lay.get("eval"):
        peers = []
        for v in lay["eval"].values():
            peers += [p for p in v["peers"] if p not in peers]
        out.append("**Evaluation forward** (in place, x donated, as the copy): ms per call (median), speed-up over "
                   "flax.linen, fraction of the 2N roofline (the copy streams from memory; shapes that fit in the "
                   "caches exceed 100 %)")
        out.append("")
        rows_md = []
        for k, v in lay["eval"].items():
            row = [k.split("/")[1] + " " + "×".join(map(str, v["shape"])), v["dtype"]]
            for p in peers:
                e = v["peers"].get(p)
                row.append("" if e is None else
                           f"{_ms(e['median_s'])} ({_x(e['speedup_vs_flax'])}, {_pct(e['roofline_2N'])})")
            if tr:
                tk = f"eval/{v['dtype']}/{','.join(map(str, v['shape']))}"
                row.append(f"{_ms(tr[tk]['median_s'])} ({_pct(tr[tk]['roofline'])})" if tk in tr else "")
            rows_md.append(row)
        out.append(_common.fmt_table(["shape", "dtype"] + peers + (["PyTorch"] if tr else []), rows_md))
        out.append("")
    if lay.get("errors"):
        out.append("Peer errors or disagreements: " + "; ".join(lay["errors"]))
        out.append("")
    return out


def _training_lines(r) -> List[str]:
    out = []
    ts = r.get("train_step")
    if ts:
        rows = []
        for m, d in ts["models"].items():
            for n, v in d.items():
                rows.append([m, n, f"{v['images_per_s_median']:.0f}", _x(v.get("speedup_vs_flax")) or "1",
                             v["temp_bytes"]])
        out.append(f"**Train step** (batch {ts['batch']}, {ts['optimizer']}, state donated; steps per sample "
                   f"{ts['steps_per_sample']}):")
        out.append("")
        out.append(_common.fmt_table(["model", "norm", "images/s (median)", "speed-up vs flax", "XLA temp bytes"],
                                     rows))
        out.append("")
    tp = r.get("train_py")
    if tp:
        if tp.get("skipped"):
            out.append(f"train.py: skipped: {tp['skipped']}")
        else:
            out.append(f"**train.py** (data: {tp['dataset']}):")
            out.append("")
            for name, v in tp["runs"].items():
                if "skipped" in v:
                    out.append(f"- {name}: skipped ({v['skipped']})")
                else:
                    verdict = "ok" if v["ok"] else "TIMED OUT" if v.get("returncode") == "timeout" else "FAILED"
                    out.append(f"- `{v['command']}`: {verdict} in {v['wall_s']:.0f} s: "
                               f"{v['final_line'] or (v.get('tail') or '')[-300:]}")
        out.append("")
    return out


def markdown(r) -> str:
    out = [f"# jaxbn accelerator check ({r['mode']}): {r['environment']['device_kind']}", "",
           f"Command: `{r['command']}`; {r['date_utc']}; {r['wall_s']:.0f} s in all.", "",
           _env_line(r) + ".", ""]
    out += [f"Note: {n}" for n in r.get("notes", [])]
    out += ["", "## Parts", ""] + _parts_lines(r)
    out += ["", "## Correctness", ""] + _correctness_lines(r)
    out += ["", "## One BatchNorm layer", ""] + _layer_tables(r)
    out += ["## Training", ""] + _training_lines(r)
    out += ["## Goals (set for accelerators)", ""]
    for k, v in r.get("goals", {}).items():
        if isinstance(v, dict):
            v = ", ".join(f"{kk}: {vv:.2f}" for kk, vv in v.items())
        elif isinstance(v, float):
            v = f"{v:.2f}"
        out.append(f"- {k}: {v}")
    return "\n".join(out) + "\n"


def summary(r) -> str:
    """One screen: the device, each part's status, correctness, the goal numbers and training."""
    e = r["environment"]
    out = [f"==== jaxbn accelerator check ({r['mode']}): {e['device_count']} x {e['device_kind']} ({e['platform']}), "
           f"jax {e['versions'].get('jax')}, {r['wall_s']:.0f} s ===="]
    out += [ln for ln in _parts_lines(r)]
    out += [ln for ln in _correctness_lines(r) if not ln.startswith("  - ")]
    pr = (r.get("oracle") or {}).get("program") or {}
    if pr.get("jax_export"):
        out.append("- jax.export: " + "; ".join(f"{k}: {v.split(':')[0][:40]}" for k, v in pr["jax_export"].items()))
    if pr.get("lowered_for"):
        out.append("- step lowered for " + "; ".join(
            f"{k}: {'WARNING ' if k != 'cpu' and 'jaxbn CPU custom calls [' in v else ''}{v}"
            for k, v in pr["lowered_for"].items()))
    lay = r.get("layer")
    if lay:
        out.append(f"- copy bandwidth {lay['bandwidth']['copy_bw'] / 1e9:.1f} GB/s")
        for k, v in r["goals"].items():
            if isinstance(v, dict):
                v = ", ".join(f"{kk.replace('float32', 'f32').replace('bfloat16', 'bf16')} {vv:.2f}"
                              for kk, vv in v.items())
            elif isinstance(v, float):
                v = f"{v:.2f}"
            out.append(f"- {k}: {v}")
        if lay.get("errors"):
            out.append(f"- layer: {len(lay['errors'])} peer error(s)/disagreement(s), see the .md")
    ts = r.get("train_step")
    if ts:
        for m, d in ts["models"].items():
            out.append(f"- train step {m}: " + ", ".join(
                f"{n} {v['images_per_s_median']:.0f} img/s" + (f" ({_x(v['speedup_vs_flax'])})"
                                                                if v.get("speedup_vs_flax") else "")
                for n, v in d.items()))
    tp = r.get("train_py")
    if tp and not tp.get("skipped"):
        for name, v in tp["runs"].items():
            if "skipped" not in v:
                verdict = "ok" if v["ok"] else "TIMED OUT" if v.get("returncode") == "timeout" else "FAILED"
                out.append(f"- train.py {name}: {verdict}, {v['wall_s']:.0f} s, "
                           f"{(v['final_line'] or '')[:90]}")
    return "\n".join(out)
