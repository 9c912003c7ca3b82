"""The accelerator check (issue 19): the sweep, target training and attention kernels at the demo's and the
paper's sizes on a GPU or TPU, within 8 minutes, against the goals (`dma_jax.perf.accelerator`).

    .venv/bin/python bench/accelerator_check.py [OUT_JSON] [--quick] [--allow-cpu] [--budget-s 420]

Writes OUT_JSON (default accelerator_check.json) and, beside it, a markdown section for BENCHMARKS.md
(OUT_JSON with .md), which it also prints. Both are rewritten after every measurement. The usual entry point
is `bash bench/accelerator_check.sh OUT_DIR`. Exit status: 0 when every measurement ran or was skipped
(time budget, memory, kernel unavailable), 1 when one failed, 2 when refused (CPU without --quick/--allow-cpu).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG, PAPER_CONFIG = REPO / "configs" / "demo.yaml", REPO / "configs" / "paper-math.yaml"
BUDGET_S, QUICK_BUDGET_S = 420.0, 300.0  # measurements; imports and start-up add ~10-20 s: < 8 min in all


def _rate(x: dict) -> str:
    return f"{x['tokens_per_s']:,.0f} ({x['mfu']:.0%})"


def _tflops(x: float) -> str:
    return f"{x / 1e12:,.3g}"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(*names: str) -> list[str]:
    return [_row(names), _row("---" if i == 0 else "---:" for i in range(len(names)))]


def markdown(r: dict) -> str:
    """The results as a BENCHMARKS.md section: peaks, sweep, targets, attention, goals, what was skipped."""
    m = r["meta"]
    quick = " --quick" if r["plan"]["quick"] else ""
    lines = [f"## Accelerator check — {m['n_devices']} x {m['device_kind']} ({m['platform']}), jax {m['jax']}, "
             f"{m['date'][:10]}", "", "```bash",
             f"timeout 540 bash bench/accelerator_check.sh OUT_DIR{quick}   # {m.get('seconds', 0):.0f} s of "
             f"measurements{'' if m['complete'] else ' (INCOMPLETE: the run stopped early)'}", "```", ""]
    peaks = ", ".join(f"{dt} **{_tflops(p['flops_per_s'])} TFLOP/s** ({p['matmul']})" for dt, p in r["peak"].items())
    lines += [f"Matmul peaks measured in the run: {peaks or 'none'}; every MFU is against the peak of its model's "
              f"compute dtype (FLOPs: 6 x matmul parameters + full attention, per token).", ""]
    lines += ["### Sweep: tokens/s over all N proxies (MFU), same tokens each way", ""]
    lines += _header("proxy", "params", "dtype", "N", "S", "batch x seq", "chunk", "vmapped", "one at a time",
                     "plain loop", "x one", "x plain", "compile s")
    for s in r["sweep"]:
        head = [s["proxy"], f"{s['params'] / 1e6:.2f}M", s["dtype"], s["N"], s["S"], f"{s['batch']} x {s['seq_len']}"]
        if s["status"] != "ok":
            lines.append(_row(head + [s["status"]] + [""] * 6))
            continue
        lines.append(_row(head + [s["chunk"], _rate(s["vmapped"]), _rate(s["one_at_a_time"]), _rate(s["plain_loop"]),
                                  f"{s['x_one_at_a_time']:.2f}", f"{s['x_plain_loop']:.2f}",
                                  f"{s['vmapped']['compile_s']:.1f}"]))
    for x in r["memory"]:
        if x["status"] == "ok" and x["per_proxy_bytes"] is not None:
            lines.append(f"\n{x['proxy']}: compiled memory {x['per_proxy_bytes'] / 2**20:,.1f} MiB per proxy + "
                         f"{x['fixed_bytes'] / 2**20:,.1f} MiB (fit over N = {', '.join(str(p['n']) for p in x['points'])})"
                         f"; largest N in {x['budget_bytes'] / 2**30:.3g} GiB: {x['max_n']}.")
    lines += ["", "### Target train step (AdamW, float32 master weights)", ""]
    lines += _header("model", "params", "dtype", "attention", "batch x seq", "step s", "tokens/s", "MFU", "compile s")
    for t in r["target"]:
        head = [t["model"], f"{t['params'] / 1e6:.1f}M", t["dtype"], t["attention"], f"{t['batch']} x {t['seq_len']}"]
        lines.append(_row(head + ([f"{t['step_s']:.4f}", f"{t['tokens_per_s']:,.0f}", f"{t['mfu']:.0%}",
                                   f"{t['compile_s']:.1f}"] if t["status"] == "ok" else [t["status"], "", "", ""])))
    a0 = next((a for a in r["attention"] if "n_heads" in a), None)
    shape = "" if a0 is None else f", {a0['n_heads']} query / {a0['kv_heads']} kv heads of {a0['head_dim']}"
    lines += ["", f"### Attention forward + backward, the paper target's ({r['attention'][0]['batch']} x "
                  f"{r['attention'][0]['seq_len']} tokens{shape}; `auto` means `{r.get('attention_auto', 'n/a')}` "
                  "here)" if r["attention"] else "### Attention: not measured", ""]
    lines += _header("kernel", "ms", "TFLOP/s", "MFU", "compile s", "max abs diff vs xla (out, dq)")
    for a in r["attention"]:
        if a["status"] != "ok":
            lines.append(_row([a["impl"], a["status"], "", "", "", ""]))
            continue
        diff = a.get("max_abs_diff_vs_xla")
        lines.append(_row([a["impl"], f"{a['seconds'] * 1e3:.3f}", _tflops(a["flops_per_s"]), f"{a['mfu']:.0%}",
                           f"{a['compile_s']:.1f}", "" if diff is None else f"{diff['out']:.2g}, {diff['dq']:.2g}"]))
    lines += ["", "### Goals", ""] + _header("goal", "measured", "goal", "verdict")
    for g in r["goals"]:
        value = "not measured" if g["value"] is None else f"{g['value']:.3g}"
        verdict = {True: "met", False: "**missed**", None: "n/a"}[g["met"]]
        lines.append(_row([g["goal"], value, f">= {g['threshold']:g}", verdict]))
    missed = [f"{x['dtype']} matmul peak: {x['status']}" for x in r["peak_failed"]]
    missed += [f"{x['proxy']} compiled memory: {x['status']}" for x in r["memory"] if x["status"] != "ok"]
    if missed:
        lines += ["", "Not measured: " + "; ".join(missed) + "."]
    lines += ["", f"Machine: {', '.join(m['devices'][:4])}{' ...' if m['n_devices'] > 4 else ''}; jaxlib "
                  f"{m['jaxlib']}, python {m['python']}, {m['cpu_count']} CPUs."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="accelerator_check.json", help="the JSON file (the .md goes beside it)")
    ap.add_argument("--quick", action="store_true", help="the configs' tiny sizes, N = 1, 2 (any machine)")
    ap.add_argument("--allow-cpu", action="store_true", help="run the full sizes on a CPU too (slow)")
    ap.add_argument("--budget-s", type=float, help=f"seconds for the measurements (default {BUDGET_S:g}, "
                                                   f"{QUICK_BUDGET_S:g} with --quick)")
    args = ap.parse_args(argv)

    import jax

    from dma_jax.config import load_config
    from dma_jax.io_utils import atomic_write_json, atomic_write_text
    from dma_jax.perf import accelerator

    backend = jax.default_backend()
    if backend == "cpu" and not (args.quick or args.allow_cpu):
        print("accelerator_check: no GPU or TPU here (jax backend: cpu); this check is for accelerators: "
              "use --quick (tiny sizes) or --allow-cpu", file=sys.stderr)
        return 2
    budget_s = args.budget_s if args.budget_s is not None else QUICK_BUDGET_S if args.quick else BUDGET_S
    if not budget_s >= 0:
        ap.error(f"--budget-s={budget_s} must be >= 0 seconds")
    if (cache := os.environ.get("DMA_JAX_CACHE", "off")).lower() != "off":  # as the `dma` CLI: opt-in here
        jax.config.update("jax_compilation_cache_dir", cache)
    variant = "tiny" if args.quick else None
    plan = accelerator.plan_for(load_config(DEMO_CONFIG, variant=variant), load_config(PAPER_CONFIG, variant=variant),
                                args.quick)
    out_json = Path(args.out)
    out_md = out_json.with_suffix(".md")

    def save(r: dict) -> None:
        atomic_write_json(out_json, r)
        atomic_write_text(out_md, markdown(r))

    r = accelerator.run_check(plan, budget_s, jax.devices(), save,
                              log=lambda s: print(f"[accelerator_check] {s}", file=sys.stderr, flush=True))
    print(markdown(r))
    print(f"accelerator_check: {out_json} and {out_md}", file=sys.stderr)
    statuses = [x["status"] for k in ("peak_failed", "target", "memory", "sweep", "attention") for x in r[k]]
    return 1 if any(s.startswith("error") for s in statuses) else 0


if __name__ == "__main__":
    sys.exit(main())
