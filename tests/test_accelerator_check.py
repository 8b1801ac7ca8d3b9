"""scripts/accelerator_check.sh --quick runs end to end on the CPU and writes the results it promises.

One run (about 1.5 min on the 2-core CPU, bounded at 3 min) into a temporary
folder (``--out``), never into benchmarks/results/; the checks read its JSON.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ran(res, part):
    """Skips the calling test when a benchmark part did not finish: a loaded shared machine, not a bug."""
    st = res["parts"].get(part, {})
    if st.get("status") in ("timeout",) or (st.get("status") == "skipped" and "budget" in st.get("reason", "")):
        pytest.skip(f"part {part} did not finish within the time budget on this (loaded) machine: {st}")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerator_check")
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "accelerator_check.sh"), "--quick", "--out", str(out),
                        "--budget-s", "160"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    path = out / "accelerator_check_quick.json"
    assert path.exists(), f"no JSON written (rc {r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    with open(path) as f:
        return r, json.load(f), out


def test_quick_run_succeeds_and_prints_a_summary(quick_run):
    r, res, out = quick_run
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "==== jaxbn accelerator check (quick)" in r.stdout
    assert (out / "accelerator_check_quick.md").exists()
    assert res["mode"] == "quick" and res["wall_s"] < 180


def test_environment_is_recorded(quick_run):
    _, res, _ = quick_run
    env = res["environment"]
    assert env["platform"] == "cpu" and env["device_kind"]
    assert env["versions"]["jax"] and env["versions"]["jaxlib"] and env["versions"]["python"]
    assert env["device_count"] >= 1 and "loadavg_end" in env


def test_correctness_parts_passed(quick_run):
    _, res, _ = quick_run
    assert res["oracle"]["failed"] == 0 and res["oracle"]["passed"] >= 10, res["oracle"]["checks"]
    for key in ("pytest_1dev", "pytest_ndev"):
        assert res[key]["failed"] == 0 and res[key]["passed"] > 0, res[key]
    # Multi-device tests ran on 8 virtual devices: none skipped for want of devices.
    assert res["pytest_ndev"]["skipped"] == 0, res["pytest_ndev"]["skip_reasons"]
    assert res["oracle"]["program"]["custom_calls"] is not None and res["oracle"]["program"]["jax_export"]


def test_layer_speed_results(quick_run):
    _, res, _ = quick_run
    _ran(res, "layer")
    lay = res["layer"]
    assert lay["bandwidth"]["copy_bw"] > 0
    for harness in ("vjp", "grad"):
        rows = lay["train"][harness]
        assert {"float32/cnn", "bfloat16/resnet-s3"} <= set(rows), rows.keys()
        for row in rows.values():
            for peer in ("jaxbn", "jaxbn.linen", "flax.linen"):
                e = row["peers"][peer]
                assert e["median_s"] > 0 and 0 < e["roofline_5N"] and e["speedup_vs_flax"] > 0
                assert max(e["max_rel_err_vs_jaxbn"]) < 0.1
    assert lay["eval"]["float32/cnn"]["peers"]["jaxbn"]["roofline_2N"] > 0
    assert not lay["errors"], lay["errors"]
    assert res["goals"]["train_f32_speedup_median_vjp (goal >= 1.5)"] > 0


def test_training_results(quick_run):
    _, res, _ = quick_run
    _ran(res, "train_step")
    _ran(res, "train_py")
    cnn = res["train_step"]["models"]["cnn"]
    assert cnn["jaxbn"]["images_per_s_median"] > 0 and cnn["flax"]["images_per_s_median"] > 0
    assert cnn["jaxbn"]["speedup_vs_flax"] > 0
    smoke = res["train_py"]["runs"]["smoke"]
    if "skipped" in smoke or smoke.get("returncode") == "timeout":
        pytest.skip(f"train.py did not finish within the time budget on this (loaded) machine: {smoke}")
    assert smoke["ok"], smoke
    assert smoke["final_line"].startswith("Final test accuracy")


def test_torch_skipped_with_a_reason_in_quick_mode(quick_run):
    _, res, _ = quick_run
    assert res["parts"]["torch"]["status"] == "skipped" and res["parts"]["torch"]["reason"]


def test_results_folder_is_named_by_device_kind():
    import importlib.util

    saved = list(sys.path)  # the module puts benchmarks/ on sys.path: keep the suite's path as it was
    try:
        spec = importlib.util.spec_from_file_location(
            "accelerator_common", os.path.join(ROOT, "benchmarks", "accelerator", "common.py"))
        common = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(common)
    finally:
        sys.path[:] = saved
    assert common.slug("NVIDIA H200") == "nvidia-h200"
    assert common.slug("TPU v5 lite") == "tpu-v5-lite"
    assert common.slug("cpu") == "cpu"
